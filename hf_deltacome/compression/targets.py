"""What to compress: the pair check, the target linears, and model kinds (what changed: :mod:`.changes`).

:class:`ModelKind` is the small interface through which :func:`hf_deltacome.compress` handles a family of models:
text LMs are the default kind here; vision-language models register theirs from :mod:`hf_deltacome.multimodal`
(:func:`register_model_kind`), so the pipeline has no VLM branches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from ..config import DeltaCoMeConfig
from ..errors import ConfigError, IncompatibleModelsError
from ..linears import Conv1DAsLinear, is_linear
from .calibration import get_calibration
from .layerwalk import find_decoder_layers
from .vocab import vocab_params, vocab_size

_MAX_LISTED = 20
# the attention's output projection in transformers' decoders: Llama, Mistral, Qwen2, Gemma (o_proj); OPT, BART
# (out_proj); Phi, GPT-NeoX, Falcon (dense); GPT-2 (c_proj). Only its name tells it from q_proj in a square attention
ATTENTION_OUTPUT_LEAVES = ("o_proj", "out_proj", "dense", "c_proj")


# ================================================================================ model kinds


class ModelKind:
    """How :func:`hf_deltacome.compress` treats one family of models (this class: text causal LMs).

    Subclasses override what differs: the pair check, target selection, calibration data, the inputs the decoder
    layers are driven with, and targets that run before the decoder layers (a VLM's projector and vision tower).
    """

    name = "text"
    resumable_calibration = True  # the calibration token ids are checkpointed with the layers

    def matches(self, model: nn.Module) -> bool:
        return True

    def check_pair(self, base: nn.Module, finetuned: nn.Module) -> None:
        check_compatible(base, finetuned)

    def select_targets(self, base: nn.Module, finetuned: nn.Module, config: DeltaCoMeConfig) -> tuple[str, list[str]]:
        return select_targets(base, config)

    def calibration(self, source: Any, finetuned: nn.Module, *, tokenizer: Any, processor: Any, num_samples: int,
                    seq_len: int, seed: int, progress: bool) -> Any:  # fmt: skip
        """Calibration data (``.input_ids``, ``.source``, ``.num_samples``, ``.seq_len``) for GPTQ."""
        return get_calibration(source, finetuned, tokenizer, num_samples, seq_len, seed, progress=progress)

    def layer_inputs(self, calib: Any) -> Any:
        """What drives the decoder layers: a token-id tensor, or a list of ready model-input batches."""
        return calib.input_ids

    def outside_targets(self, model: nn.Module, targets: Sequence[str]) -> list[str]:
        """Targets outside the decoder layers, compressed before them (none for text LMs)."""
        return []

    def outside_hessians(self, finetuned: nn.Module, names: Sequence[str], calib: Any,
                         device: torch.device | None) -> tuple[dict[str, torch.Tensor], str]:  # fmt: skip
        """Input Hessians of the :meth:`outside_targets`, and why there are none when there are none."""
        return {}, "no activations"

    def record(self, calib: Any) -> dict[str, Any]:
        """Extra ``compression_info`` entries."""
        return {}


TEXT = ModelKind()
_KINDS: list[ModelKind] = []


def register_model_kind(kind: ModelKind) -> None:
    """Let :func:`model_kind` recognise another family of models (checked before text LMs; idempotent by name)."""
    if all(k.name != kind.name for k in _KINDS):
        _KINDS.append(kind)


def model_kind(base: nn.Module, finetuned: nn.Module) -> ModelKind:
    """The registered kind of ``base`` (text LMs when no other kind claims it); PEFT models are refused, and so are
    quantized ones (but an AMLQ base, which :func:`~.pipeline.compress` reads through its dense view)."""
    for role, model in (("base", base), ("fine-tuned", finetuned)):
        if _is_peft(model):
            raise IncompatibleModelsError(
                f"the fine-tuned model is a PEFT model ({type(model).__name__}); pass the fine-tune it makes: the "
                "adapter merged into its own copy of the base (PeftModel.from_pretrained(<base loaded again>, "
                "<adapter>).merge_and_unload()), not into the base passed as base_model" if role == "fine-tuned" else
                f"the base model is already a PEFT model ({type(model).__name__}); pass the plain transformers model"
            )  # fmt: skip
        method = _quant_method(model)
        if method is not None and not (role == "base" and method == "amlq"):
            raise IncompatibleModelsError(
                f"the {role} model is quantized ({method}): the delta is taken from full-precision weights, so load "
                "it without quantization_config. The adapter made against the full-precision base still loads onto "
                "a quantized copy of it (PeftModel.from_pretrained)"
            )
    return next((k for k in _KINDS if k.matches(base)), TEXT)


# ================================================================================ the pair


def check_compatible(base: nn.Module, finetuned: nn.Module) -> None:
    """Raise `IncompatibleModelsError` listing every difference that makes ``finetuned − base`` meaningless."""
    problems: list[str] = []
    if type(base) is not type(finetuned):
        problems.append(f"model class: base is {type(base).__name__}, fine-tuned is {type(finetuned).__name__}")
    cb, cf = getattr(base, "config", None), getattr(finetuned, "config", None)
    for attr in ("model_type", "architectures"):
        vb, vf = getattr(cb, attr, None), getattr(cf, attr, None)
        if vb is not None and vf is not None and vb != vf:
            problems.append(f"config.{attr}: base {vb!r}, fine-tuned {vf!r}")
    vb, vf = vocab_size(base), vocab_size(finetuned)
    grown = vb is not None and vf is not None and vf > vb  # added tokens (checked in compression.vocab)
    if vb != vf and not grown:
        problems.append(f"vocabulary size: base {vb}, fine-tuned {vf} (a fine-tune may add tokens, not remove any)")
    mb = {n: _kind(m) for n, m in base.named_modules()}
    mf = {n: _kind(m) for n, m in finetuned.named_modules()}
    pb = dict(base.named_parameters(remove_duplicate=False))
    pf = dict(finetuned.named_parameters(remove_duplicate=False))
    rows = set(vocab_params(finetuned)) if grown else set()
    for n in sorted(set(pb) & set(pf)):
        if n in rows and (pb[n].shape[0], pf[n].shape[0]) == (vb, vf) and pb[n].shape[1:] == pf[n].shape[1:]:
            continue
        if pb[n].shape != pf[n].shape:
            problems.append(f"parameter {n!r}: base shape {tuple(pb[n].shape)}, fine-tuned shape {tuple(pf[n].shape)}")
    for n in sorted(set(mb) & set(mf)):
        if mb[n] != mf[n] and {mb[n], mf[n]} != {"Conv1D", "Linear"}:  # a GPT-2 on its AMLQ base: both compute x Wᵀ
            problems.append(f"module {n!r}: base is {mb[n]}, fine-tuned is {mf[n]}")

    def parent(name: str) -> str:
        return name.rpartition(".")[0]

    # a missing module is reported once, not with everything inside it
    for mine, other, where in ((mb, mf, "base"), (mf, mb, "fine-tuned model")):
        for n in sorted(set(mine) - set(other)):
            if parent(n) in other:
                problems.append(f"module {n!r} ({mine[n]}) is only in the {where}")
    for mine, other, mods, where in ((pb, pf, mf, "base"), (pf, pb, mb, "fine-tuned model")):
        for n in sorted(set(mine) - set(other)):
            if parent(n) in mods:
                problems.append(f"parameter {n!r} {tuple(mine[n].shape)} is only in the {where}")
    if problems:
        shown = problems[:_MAX_LISTED]
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise IncompatibleModelsError(
            f"the base and fine-tuned models do not match ({len(problems)} difference(s)):\n  "
            + "\n  ".join(shown)
            + more
        )


def _kind(module: nn.Module) -> str:
    """A module's class name as the user knows it (a `Conv1DAsLinear` stand-in is GPT-2's ``Conv1D``)."""
    return "Conv1D" if isinstance(module, Conv1DAsLinear) else type(module).__name__


def _quant_method(model: nn.Module) -> str | None:
    """The ``quant_method`` of a model transformers loaded quantized (``None``: not quantized)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None and not getattr(model, "is_quantized", False):
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown method")


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, (PeftModel, BaseTuner))


def matches(name: str, patterns: str | set | list | None) -> bool:
    """PEFT's ``target_modules`` semantics (``check_target_module_exists``): a string is a regex matched against the
    whole name, a collection matches exact names and ``.``-suffixes."""
    if patterns is None:
        return False
    probe = SimpleNamespace(target_modules=patterns, target_parameters=None, exclude_modules=None,
                            modules_to_save=None)  # fmt: skip
    return bool(check_target_module_exists(probe, name))


def show(patterns: Any) -> str:
    """``target_modules`` as given, for error messages (sets sorted)."""
    return repr(sorted(patterns)) if isinstance(patterns, (set, list, tuple)) else repr(patterns)


def _in_layers(prefix: str) -> re.Pattern:
    """Matches the names of modules inside one of the decoder layers at ``prefix`` (``prefix.N.``)."""
    return re.compile(re.escape(prefix) + r"\.\d+\.")


def _attention_prefixes(model: nn.Module, inside: re.Pattern) -> list[str]:
    """The names (with a trailing dot) of the attention modules inside the decoder layers: a module whose class name
    has "Attention" (``LlamaAttention``, ``OPTAttention``, ``FalconAttention`` ...)."""
    return [n + "." for n, m in model.named_modules() if inside.match(n) and "attention" in type(m).__name__.lower()]


def mlp_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The ``targets`` in the feed-forward blocks of the decoder layers: inside a layer, not inside its attention
    (:func:`_attention_prefixes`), so ``mlp.down_proj``, OPT's ``fc1`` and a mixture's experts count, whatever their
    leaf names."""
    inside = _in_layers(find_decoder_layers(model)[0])
    attention = _attention_prefixes(model, inside)
    return [t for t in targets if inside.match(t) and not any(t.startswith(a) for a in attention)]


def attention_output_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The ``targets`` that project a decoder layer's attention heads back to the residual stream: a child of its
    attention module with a leaf name of ``ATTENTION_OUTPUT_LEAVES``."""
    inside = _in_layers(find_decoder_layers(model)[0])
    attention = _attention_prefixes(model, inside)
    return [t for t in targets if t.rsplit(".", 1)[-1] in ATTENTION_OUTPUT_LEAVES
            and any(t.startswith(a) and "." not in t[len(a):] for a in attention)]  # fmt: skip


def _no_linears(model: nn.Module, prefix: str, inside: re.Pattern) -> None:
    """Raise a `ConfigError` naming what the decoder layers compute with when none of it is a linear."""
    kinds: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        if inside.match(name) and isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 2:
            kinds.setdefault(type(mod).__name__, []).append(name)
    found = "; ".join(f"{kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                      for kind, names in kinds.items()) or "no 2-D weights"  # fmt: skip
    raise ConfigError(
        f"the decoder layers of {type(model).__name__} ({prefix}.N) hold no nn.Linear to compress: they hold {found}. "
        "hf-deltacome compresses nn.Linear layers (and transformers' Conv1D, GPT-2's linear) only"
    )


def select_targets(model: nn.Module, config: DeltaCoMeConfig) -> tuple[str, list[str]]:
    """The decoder-layers prefix and the names of the target linears (default: every linear inside the layers)."""
    prefix, _ = find_decoder_layers(model)
    inside = _in_layers(prefix)
    linears = {n for n, m in model.named_modules() if is_linear(m)}  # compress sees a Conv1D as an nn.Linear
    in_layers = [n for n in linears if inside.match(n)]
    if not in_layers:
        _no_linears(model, prefix, inside)
    if config.target_modules is None:
        targets = in_layers
    else:
        matched = sorted(n for n in linears if matches(n, config.target_modules))
        if not matched:
            available = sorted({n.rsplit(".", 1)[-1] for n in in_layers})
            raise ConfigError(
                f"target_modules={show(config.target_modules)} matches no nn.Linear of {type(model).__name__}; "
                f"the decoder linears are named {available}"
            )
        outside = [n for n in matched if not inside.match(n)]
        if outside:
            raise ConfigError(
                f"target_modules={show(config.target_modules)} selects {outside[:5]}, which are outside the decoder "
                f"layers ({prefix}.N); only decoder linears can be compressed (other changed modules are stored dense)"
            )
        targets = matched
    if config.exclude_modules is not None:
        targets = [n for n in targets if not matches(n, config.exclude_modules)]
    if not targets:
        raise ConfigError(
            f"exclude_modules={show(config.exclude_modules)} excludes every target linear of {type(model).__name__}; "
            "nothing is left to compress"
        )
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return prefix, sorted(targets, key=order.__getitem__)
