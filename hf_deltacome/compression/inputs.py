"""What goes into a compression: the pair as a source of weights, what changed, the file budget, and what a
streamed run does instead of what needs the whole model.

* :func:`pair_of` — loaded models (:class:`~.streaming.LoadedPair`) or paths / Hub ids streamed from their
  safetensors files (:class:`~.streaming.StreamedPair`);
* :func:`describe_inputs` — the pair check, the targets, what changed beyond the rounding of the dtypes
  (:mod:`.changes`), added tokens (:mod:`.vocab`), the base fingerprint; a fine-tune equal to its base is refused
  (:class:`~hf_deltacome.errors.EmptyDeltaError`);
* :func:`file_budget` — what the whole adapter file may spend, and what is left for the packed factors;
* :func:`warn_degenerate` — a warning before any work when the adapter would store none of the targets' change;
* :func:`streamed_plan` — the documented fallbacks of a streamed run.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import nn

from ..backend import check_device
from ..config import DeltaCoMeConfig
from ..errors import ConfigError, DegenerateAdapterWarning, EmptyDeltaError, user_stacklevel
from ..format.budget import safetensors_header_bound
from ..io.adapter_files import BLOB_SUFFIX, STATE_DICT_PREFIX
from . import vocab
from .changes import PairChanges, find_changes
from .distill import distills
from .modules import with_changes
from .plan import weighs_residual
from .streaming import LoadedPair, StreamedPair
from .targets import ModelKind, attention_output_targets, matches, mlp_targets

log = logging.getLogger("hf_deltacome")
ModelSource = Union[nn.Module, str, os.PathLike]
# dare_modules="auto" stores the attention's output projections (o_proj) as DARE too at this ratio and below: at 1/64
# and 1/128 that answered 0-1.8 more held-out facts than their bands on both knowledge deltas (means of five mask
# draws), with more next-token agreement than every baseline; at 1/32 it lost answers and agreement to the bands
# (benchmarks/RESULTS.md, the readings at bbcc9b5 and a2b7ead)
DARE_ATTENTION_OUTPUT_RATIO = 1 / 64
# dare_modules="auto" stores the feed-forward targets as DARE only at this ratio and below. 2-bit DARE keeps every
# entry at about 1/7.3 (2 bits a weight plus its groups' scales), so above that the MLP cannot spend its budget: at
# `facts` 1/4 the default wrote 1/6.1 of the file's budget and agreed 97.0% with the fine-tune, against 99.0% for the
# bands in the whole budget (benchmarks/RESULTS.md, the reading at 7f0c896)
DARE_MLP_RATIO = 1 / 8


def pair_of(base: ModelSource, finetuned: ModelSource, dtype: torch.dtype | None, device: torch.device | None) -> Any:
    """The two models as a source of weights: loaded (:class:`~.streaming.LoadedPair`) or streamed from disk."""
    paths = [isinstance(m, (str, os.PathLike)) for m in (base, finetuned)]
    if all(paths):
        return StreamedPair(base, finetuned, dtype=dtype, device=device)
    if any(paths):
        raise ConfigError("pass both models loaded, or both as paths / Hub ids (streamed); not one of each")
    if dtype is not None:
        raise ConfigError("dtype= applies to streamed models; loaded models keep the dtype they were loaded in")
    return LoadedPair(base, finetuned)


def work_device(device: torch.device | str | None) -> torch.device | None:
    """Where each layer's work runs: as asked, else CUDA when available (``None``: where each layer is)."""
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else None
    return check_device(device)


def load_tokenizer(folder: Any) -> Any:
    """The tokenizer saved in a model folder (``None`` when there is none)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        return None


def _resolve_dare_modules(config: DeltaCoMeConfig, model: nn.Module, targets: Sequence[str]) -> None:
    """``dare_modules`` becomes names (leaf names or dotted suffixes, :func:`_own_names`; or ``None``): ``"mlp"`` those
    of the feed-forward targets (:func:`.targets.mlp_targets`), ``"auto"`` the same for ``deltacome`` with GPTQ at
    ``ratio <= DARE_MLP_RATIO``, else none, and at ``ratio <= DARE_ATTENTION_OUTPUT_RATIO`` the attention's output
    projections too (:func:`.targets.attention_output_targets`). A listed name that names no target is a typo, not a
    request for nothing."""
    leaves = {nm.rsplit(".", 1)[-1] for nm in targets}
    asked = config.dare_modules
    if asked == "auto" and (config.method != "deltacome" or config.quantizer != "gptq"):
        config.dare_modules = None  # measured with calibration data (GPTQ, distilled bands); RTN is data-free
    elif asked == "auto" and config.ratio > DARE_MLP_RATIO * (1 + 1e-9):
        config.dare_modules = None
        log.info("dare_modules='auto': every target keeps the bands above ratio 1/%g (2-bit DARE could not spend "
                 "the budget)", 1 / DARE_MLP_RATIO)  # fmt: skip
    elif asked in ("mlp", "auto"):
        chosen, problem = _own_names(model, targets, mlp_targets(model, targets), "in a decoder layer's feed-forward "
                                      "block (outside its attention)")  # fmt: skip
        if asked == "mlp" and problem:
            raise ConfigError(f"dare_modules='mlp': {problem}")
        if problem:
            log.info("dare_modules='auto': every target keeps the bands (%s)", problem)
        elif asked == "auto" and config.ratio <= DARE_ATTENTION_OUTPUT_RATIO * (1 + 1e-9):
            out, why = _own_names(model, targets, attention_output_targets(model, targets), "the output projection "
                                   "of a decoder layer's attention")  # fmt: skip
            if why:
                log.info("dare_modules='auto': the attention keeps the bands (%s)", why)
            chosen |= out
        config.dare_modules = sorted(chosen) or None
        if config.dare_modules:
            log.info("dare_modules=%r: %s stored whole (%s)", asked, ", ".join(config.dare_modules),
                     "vector codes" if config.full_rank == "vq" else "DARE alone")  # fmt: skip
    unknown = sorted(s for s in config.dare_leaves if not any(matches(t, [s]) for t in targets))
    if unknown:
        raise ConfigError(f"dare_modules {unknown} name no target module; the targets' leaf names are {sorted(leaves)}")


def _own_names(model: nn.Module, targets: Sequence[str], picked: Sequence[str], where: str) -> tuple[set[str], str | None]:
    """Names that pick exactly the ``picked`` targets (each one's leaf name, or its shortest dotted suffix that names
    no other target: GPT-2's ``mlp.c_proj`` beside ``attn.c_proj``), and why there are none (``None`` when there are):
    no target is ``where``, or a target's whole name is a suffix of another's."""
    leaves = sorted({nm.rsplit(".", 1)[-1] for nm in targets})
    if not picked:
        return set(), f"no target of {_name(model)} is {where}; the targets' leaf names are {leaves}"
    others = set(targets) - set(picked)
    chosen: set[str] = set()
    for name in picked:
        parts = name.split(".")
        suffix = next((s for s in (".".join(parts[-k:]) for k in range(1, len(parts) + 1))
                       if not any(matches(other, [s]) for other in others)), None)  # fmt: skip
        if suffix is None:
            return set(), f"the target {name!r} of {_name(model)} is {where}, but its name ends another target's"
        chosen.add(suffix)
    return chosen, None


def describe_inputs(
    kind: ModelKind, pair: Any, config: DeltaCoMeConfig, base_tokenizer: Any, tokenizer: Any, progress: bool
) -> tuple[list[str], PairChanges]:
    """Check the pair, pick the targets, and fill the config fields that describe the inputs."""
    base, finetuned = pair.base, pair.finetuned
    kind.check_pair(base, finetuned)
    base_vocab, ft_vocab = vocab.vocab_size(base), vocab.vocab_size(finetuned)
    grown = base_vocab is not None and ft_vocab is not None and ft_vocab > base_vocab
    if grown:
        vocab.check_added_tokens(base_tokenizer, tokenizer, base_vocab, ft_vocab)
    _, targets = kind.select_targets(base, finetuned, config)
    _resolve_dare_modules(config, base, targets)  # before the scan of changes and the fingerprint: a typo fails at once
    params = vocab.vocab_params(finetuned) if grown else []
    changes = find_changes(pair.verdicts(base_vocab, params, progress), targets)
    if changes.nothing:
        raise EmptyDeltaError(
            f"the fine-tuned model {_name(finetuned)} equals the base {_name(base)} in every parameter"
            + (" (some only within the rounding of the lower of their dtypes)" if changes.rounding else "")
            + ": there is nothing to compress. Is it the right fine-tune?"
        )
    if changes.rounding:
        log.info(
            "%d parameter(s) differ only by the rounding of the lower of the two dtypes and count as unchanged: %s",
            len(changes.rounding), ", ".join(changes.rounding[:5]) + (" ..." if len(changes.rounding) > 5 else ""),
        )  # fmt: skip
    config.modules_to_save = sorted(set(config.modules_to_save or []) | set(changes.extras)) or None
    if grown:
        vocab.record(config, finetuned, changes.added_rows, base_vocab, ft_vocab)
    config.base_model_name_or_path = getattr(base, "name_or_path", None) or config.base_model_name_or_path
    if config.task_type is None and type(finetuned).__name__.endswith("ForCausalLM"):
        config.task_type = "CAUSAL_LM"
    config.inference_mode = True
    config.base_fingerprint = pair.fingerprint(progress)
    return targets, changes


def _name(model: nn.Module) -> str:
    return repr(getattr(model, "name_or_path", None) or type(model).__name__)


def warn_degenerate(config: DeltaCoMeConfig, targets: Sequence[str], changes: PairChanges) -> None:
    """Warn, before any work, when the adapter would store none of the change to the target linears."""
    changed = [t for t in targets if t not in changes.unchanged]
    if not changed:
        carried = list(config.modules_to_save or [])
        if config.trainable_token_indices:
            carried.append(f"the rows of {config.vocab_size - config.base_vocab_size} added token(s)")
        warnings.warn(
            f"no target linear changed: only {', '.join(carried[:3])}{', ...' if len(carried) > 3 else ''} "
            f"{'and ' + carried[-1] + ' ' if len(carried) > 3 else ''}changed, and the adapter carries them dense (no "
            "compressed delta). Is this the fine-tune you meant?",
            DegenerateAdapterWarning, stacklevel=user_stacklevel(),
        )  # fmt: skip
        return
    empty = [t for t in changed if not _stores_anything(config.layout[t])]
    if len(empty) == len(changed):
        warnings.warn(
            f"at ratio 1/{1 / config.ratio:.4g} every changed target linear ({len(changed)}) gets rank 0: the adapter "
            "stores none of their change (only the dense extras and bias deltas). Use a larger ratio",
            DegenerateAdapterWarning, stacklevel=user_stacklevel(),
        )  # fmt: skip
    elif empty:
        log.info("%d of %d changed target linears get rank 0 at this ratio (e.g. %s)", len(empty), len(changed), empty[0])


def _stores_anything(entry: dict[str, Any]) -> bool:
    return any(r > 0 for _, r in entry.get("bands", [])) or bool(
        entry.get("sign") or entry.get("sparse") or entry.get("vq")
    ) or any(b["rank"] > 0 for b in entry.get("sparse_bands", []))


def streamed_plan(config: DeltaCoMeConfig, calib: Any) -> tuple[DeltaCoMeConfig, dict[str, Any]]:
    """A streamed run has no whole model to measure plans on: the config it plans with, and the notes recorded."""
    if config.search is not None or config.allocation == "adaptive":
        raise ConfigError(
            "search= and allocation='adaptive' measure layouts on the whole model; a streamed compression cannot "
            "(pass loaded models, or --in-memory on the command line)"
        )
    notes: dict[str, Any] = {}
    # first, on the caller's config (the one saved), before any copy below
    if distills(config) and calib is not None:
        log.info("streamed: the scales are distilled one decoder layer at a time against the fine-tune's layer (the "
                 "whole-model distillation needs both whole models)")  # fmt: skip
    elif distills(config) and config.method == "bitdelta":
        log.info("scale distillation needs calibration activations; skipped in a streamed round-to-nearest run")
        notes["distill"] = {"skipped": "streamed: no calibration activations"}
        config.distill_steps = 0
    if config.method in ("deltacome", "impart") and config.min_rank_share == "auto" and calib is not None:
        note = "streamed: no whole-model check; the published split (min_rank_share 0)"
        log.info("min_rank_share='auto' needs the whole model's KL to the fine-tune; %s", note.split("; ")[1])
        notes["rank_share"] = {"chosen": 0.0, "fallback": note}
        config = with_changes(config, min_rank_share=0.0)
    if weighs_residual(config) and calib is not None:
        notes["residual"] = {"chosen": "none", "fallback": "streamed: no whole-model check; the bands alone"}
        config = with_changes(config, residual="none")
    return config, notes


def _experts_note(modules: dict[str, nn.Module], extras: dict[str, int]) -> str:
    """A sentence for the budget error when some dense extras are 3-D parameters (fused mixture-of-experts weights)."""
    params = {f"{STATE_DICT_PREFIX}{name}.{pname}": p for name, mod in modules.items() if name
              for pname, p in mod.named_parameters(recurse=False)}  # fmt: skip
    fused = [k[len(STATE_DICT_PREFIX):] for k in extras if k in params and params[k].dim() >= 3]
    if not fused:
        return ""
    return (f". {len(fused)} of them are 3-D parameters ({', '.join(fused[:3])}{', ...' if len(fused) > 3 else ''}): "
            "a mixture-of-experts layer's fused expert weights, stored dense here. hf-deltacome compresses fused "
            "experts one linear per expert when their experts class follows transformers' "
            "use_experts_implementation protocol")


def file_budget(
    base: nn.Module, targets: Sequence[str], config: DeltaCoMeConfig, bias_changed: dict[str, bool]
) -> dict[str, Any]:
    """What the whole adapter file may spend, and what is left for the packed factors.

    ``config.ratio`` is a share of the fp16 delta of the target linears (``2·m·n`` bytes each); the file must fit in
    it whole: the safetensors header (an upper bound from the tensor names), the dense extras (``modules_to_save``,
    stored in the base's dtypes) and the bias deltas (float32) come first, and ``factor_ratio`` is what is left, as
    a share of the same fp16 delta, so every module gets the same share of its own size. Raises `ConfigError`,
    naming the largest extras, when those alone do not fit.
    """
    modules = dict(base.named_modules())
    target_fp16 = sum(2 * modules[t].out_features * modules[t].in_features for t in targets)
    total = int(config.ratio * target_fp16)
    extras, tensors = {}, []
    for name in config.modules_to_save or []:
        for pname, p in modules[name].named_parameters(remove_duplicate=False):
            key = f"{STATE_DICT_PREFIX}{name}.{pname}"
            extras[key] = p.numel() * p.element_size()
            tensors.append((key, str(p.dtype), p.dim()))
    for key, (nbytes, dtype, ndim) in vocab.added_row_bytes(base, config).items():  # added tokens' rows
        extras[f"{STATE_DICT_PREFIX}{key}"] = nbytes
        tensors.append((f"{STATE_DICT_PREFIX}{key}", dtype, ndim))
    bias = sum(4 * modules[t].out_features for t in targets if bias_changed.get(t))
    tensors += [(f"{STATE_DICT_PREFIX}{t}{BLOB_SUFFIX}", "U8", 1) for t in targets]
    header = safetensors_header_bound([(k, d.removeprefix("torch."), n) for k, d, n in tensors], total + 1)
    left = total - header - sum(extras.values()) - bias
    record = {"file_budget_bytes": total, "header_bytes_bound": header, "dense_extra_bytes": sum(extras.values()),
              "bias_bytes": bias, "target_fp16_bytes": target_fp16}  # fmt: skip
    if left <= 0:
        biggest = sorted(extras.items(), key=lambda kv: -kv[1])[:5]
        shown = ", ".join(f"{k[len(STATE_DICT_PREFIX):]} ({v:,} B)" for k, v in biggest)
        raise ConfigError(
            f"at ratio 1/{1 / config.ratio:.4g} the whole adapter file may take {total:,} bytes, but the header "
            f"({header:,} B), the bias deltas ({bias:,} B) and the changed modules stored dense "
            f"({sum(extras.values()):,} B: {shown or 'none'}) already take {total - left:,}; nothing is left for "
            "the compressed linears. Use a larger ratio, or make sure only modules that really changed are carried "
            "(a fine-tune saved in another dtype changes every weight by rounding)" + _experts_note(modules, extras)
        )
    record["factor_ratio"] = left / target_fp16
    return record
