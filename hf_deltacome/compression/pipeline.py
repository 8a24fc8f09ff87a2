"""``compress(base, finetuned, config)``: build a Delta-CoMe adapter from a fine-tune and its base.

The pipeline, step by step (each step is one function below):

1. :func:`_inputs` — the model kind (text LM, or a kind registered by :mod:`hf_deltacome.multimodal`) checks the
   pair and picks the target linears; every other parameter that changed (norms, embeddings, ``lm_head``) goes dense
   into ``modules_to_save``; the base fingerprint is recorded;
2. :func:`_calibration` — calibration data for GPTQ (given, or sampled from the fine-tune; ``quantizer="rtn"`` uses
   none), checkpointed so a resumed run uses the same tokens;
3. :func:`file_budget` then :func:`~.plan.plan_layouts` — the whole ``adapter_model.safetensors`` is held to the
   ratio: the safetensors header, the dense extras and the bias deltas are paid first, the rest is spread over the
   targets in proportion to their size; then the layout of each target from its share (method, band split,
   allocation);
4. :func:`_wrap` — the base wrapped with PEFT (zeroed packed buffers), the dense extras copied in;
5. :class:`_Filler` + :func:`~.layerwalk.walk_layers` — targets outside the decoder layers first, then the decoder
   layers one at a time: each target's input Hessian is collected by running the fine-tuned layer on the compressed
   model's hidden states, its delta is compressed (:func:`~.modules.compress_module`) into the packed buffers, and
   the now-compressed layer produces the next layer's inputs;
6. BitDelta's scale distillation (that method only) and the record of what was done (``compression_info``).

Peak memory is about base + fine-tune + one layer's activations.

A base whose linears are stored packed (an AMLQ-quantized base, :mod:`hf_deltacome.amlq`) is compressed against the
weights it actually runs with: :func:`on_quantized_base` enters every view registered in
:data:`QUANTIZED_BASE_VIEWS` (AMLQ's is registered by :mod:`hf_deltacome.integration`), under which those linears are
dense, for the whole call, so the adapter also absorbs the base's quantization error.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

from ..backend import check_device, dequant_cache
from ..config import DeltaCoMeConfig
from ..errors import ConfigError
from ..format.budget import safetensors_header_bound
from ..io.adapter_files import BLOB_SUFFIX, STATE_DICT_PREFIX
from ..io.fingerprint import fingerprint_json
from ..layer import DeltaCoMeLayer
from ..quant.hessian import HessianCollector
from .baselines import distill_sign_scales
from .calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, CalibrationSource
from .checkpoint import LayerCheckpoint, calibration_record
from .layerwalk import find_decoder_layers, module_device, walk_layers
from .modules import compress_module, with_changes
from .plan import plan_layouts
from .targets import ModelKind, changed_modules, model_kind

FORWARD_BATCH_SIZE = 8  # calibration sequences per forward pass through one decoder layer

# context managers ``view(base_model)`` under which a base's packed linears are dense linears of their effective
# weights (a no-op for a base without any); registered from above this layer (integration.py), never imported here
QUANTIZED_BASE_VIEWS: list[Callable[[nn.Module], AbstractContextManager[Any]]] = []


def on_quantized_base(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of :func:`compress`: runs it with every registered view of its base active (module docstring)."""

    @functools.wraps(fn)
    def wrapper(base_model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            for view in QUANTIZED_BASE_VIEWS:
                stack.enter_context(view(base_model))
            return fn(base_model, *args, **kwargs)

    return wrapper


@on_quantized_base
def compress(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    config: DeltaCoMeConfig | None = None,
    *,
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    adapter_name: str = "default",
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    processor: Any = None,
) -> Any:
    """Compress ``finetuned_model − base_model`` into a Delta-CoMe adapter and return the ``PeftModel`` (eval mode).

    ``base_model`` is wrapped in place (as with ``get_peft_model``); ``finetuned_model`` is only read.

    Args:
        config: how to compress (ratio, bands, quantizer, ...); a copy is filled with the per-module layout.
        calibration: texts (list, ``.txt``, ``.jsonl``) or a token-id tensor for GPTQ; ``None`` samples text from
            the fine-tune itself. Ignored with ``config.quantizer == "rtn"`` (data-free).
        tokenizer: needed to tokenize calibration texts; used for chat-templated prompts when sampling.
        num_samples, seq_len: size of the calibration batch.
        device: where each decoder layer is moved for its work (default: CUDA when available, else where it is);
            results stay on the base model's device and dtype.
        progress: show a progress bar over the decoder layers.
        seed: seed of calibration sampling.
        checkpoint_dir: folder where each finished decoder layer (and the calibration tokens) is checkpointed;
            a later call with the same folder and inputs skips finished layers and gives the same result.
        processor: for vision-language models (LLaVA-style; see :mod:`hf_deltacome.multimodal`), the base model's
            processor; needed for image + text calibration records (``{"image": ..., "text": ...}``), which then run
            through the whole model. Without images a VLM is calibrated on text only; the choice is logged and
            recorded in ``compression_info["calibration_kind"]``. A processor passed as ``tokenizer=`` works too.
    """
    t0 = time.time()
    config = copy.deepcopy(config) if config is not None else DeltaCoMeConfig()
    if not isinstance(config, DeltaCoMeConfig):
        raise ConfigError(f"config must be a DeltaCoMeConfig, got {type(config).__name__}")
    kind = model_kind(base_model, finetuned_model)
    targets, bias_changed = _inputs(kind, base_model, finetuned_model, config)
    budget = file_budget(base_model, targets, config, bias_changed)  # before any work: the extras may not fit
    device = _work_device(device)
    ckpt = None
    if checkpoint_dir is not None:  # a resume must have the same inputs: the fine-tune and calibration are recorded
        given = calibration_record(calibration, config, num_samples=num_samples, seq_len=seq_len, seed=seed,
                                   tokenizer=tokenizer if tokenizer is not None else processor)  # fmt: skip
        ckpt = LayerCheckpoint(checkpoint_dir, config, adapter_name, finetuned=finetuned_model, calibration=given)
    # calibration comes from the fine-tune before the base is wrapped, so a failure leaves the base untouched
    calib = _calibration(kind, config, finetuned_model, calibration, ckpt, tokenizer=tokenizer, processor=processor,
                         num_samples=num_samples, seq_len=seq_len, seed=seed, progress=progress)  # fmt: skip
    config.layout, plan_info = plan_layouts(
        base_model, finetuned_model, targets, with_changes(config, ratio=budget["factor_ratio"]),
        calibration_ids=calib.input_ids if calib is not None else None, bias_changed=bias_changed, progress=progress,
    )  # fmt: skip
    plan_info["budget"] = budget
    peft_model = _wrap(base_model, finetuned_model, config, adapter_name)
    peft_model.deltacome_finetuned = getattr(finetuned_model, "name_or_path", None)  # saves refuse to write there
    filler = _Filler(peft_model.base_model.model, finetuned_model, config, adapter_name, ckpt)
    filler.outside(kind, targets, calib, device)
    filler.layers(kind, targets, calib, device, progress)
    distill = {}
    if config.method == "bitdelta" and config.distill_steps > 0 and calib is not None and calib.input_ids is not None:
        distill = distill_sign_scales(peft_model, finetuned_model, calib.input_ids, steps=config.distill_steps,
                                      adapter_name=adapter_name, progress=progress)  # fmt: skip
    config.compression_info = _record(kind, config, calib, time.time() - t0, plan_info, distill, filler.fallbacks)
    return peft_model.eval()


def _inputs(
    kind: ModelKind, base: nn.Module, finetuned: nn.Module, config: DeltaCoMeConfig
) -> tuple[list[str], dict[str, bool]]:
    """Check the pair, pick the targets, and fill the config fields that describe the inputs."""
    kind.check_pair(base, finetuned)
    _, targets = kind.select_targets(base, finetuned, config)
    extras, bias_changed = changed_modules(base, finetuned, targets)
    config.modules_to_save = sorted(set(config.modules_to_save or []) | set(extras)) or None
    config.base_model_name_or_path = getattr(base, "name_or_path", None) or config.base_model_name_or_path
    if config.task_type is None and type(finetuned).__name__.endswith("ForCausalLM"):
        config.task_type = "CAUSAL_LM"
    config.inference_mode = True
    config.base_fingerprint = fingerprint_json(base)
    return targets, bias_changed


def _work_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else None
    return check_device(device)


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
            "(a fine-tune saved in another dtype changes every weight by rounding)"
        )
    record["factor_ratio"] = left / target_fp16
    return record


def _calibration(
    kind: ModelKind,
    config: DeltaCoMeConfig,
    finetuned: nn.Module,
    source: CalibrationSource,
    ckpt: LayerCheckpoint | None,
    **options: Any,
) -> Any:
    """The calibration data GPTQ needs (``None`` for data-free round-to-nearest), resumed from the checkpoint."""
    if config.quantizer != "gptq":
        return None
    resumable = ckpt is not None and kind.resumable_calibration
    calib = ckpt.load_calibration() if resumable else None
    if calib is None:
        calib = kind.calibration(source, finetuned, **options)
        if resumable:
            ckpt.save_calibration(calib)
    return calib


def _wrap(base: nn.Module, finetuned: nn.Module, config: DeltaCoMeConfig, adapter_name: str) -> Any:
    """The base wrapped with PEFT (zeroed packed buffers where the layout says) and the fine-tune's dense extras."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*")
        peft_model = get_peft_model(base, config, adapter_name=adapter_name)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name in config.modules_to_save or []:
            wrapper = inner.get_submodule(name)
            copies = getattr(wrapper, "modules_to_save", None)
            if copies is None or adapter_name not in copies:
                raise ConfigError(f"modules_to_save entry {name!r} was not wrapped by PEFT")
            source = dict(finetuned.get_submodule(name).named_parameters(recurse=True, remove_duplicate=False))
            for pname, p in copies[adapter_name].named_parameters(recurse=True, remove_duplicate=False):
                if pname in source:
                    p.data = source[pname].detach().to(p.device, p.dtype).clone()
    return peft_model


class _Filler:
    """Compresses each target's delta into the packed buffers of the wrapped model, layer by layer."""

    def __init__(
        self,
        inner: nn.Module,
        finetuned: nn.Module,
        config: DeltaCoMeConfig,
        adapter_name: str,
        ckpt: LayerCheckpoint | None,
    ) -> None:
        self.inner, self.finetuned, self.config = inner, finetuned, config
        self.adapter_name, self.ckpt = adapter_name, ckpt
        self.fallbacks: list[str] = []

    def fill(self, name: str, hessian: torch.Tensor | None, device: torch.device) -> None:
        """Compress target ``name`` (its input Hessian, or ``None`` for round-to-nearest) into its buffers."""
        module = self.inner.get_submodule(name)
        assert isinstance(module, DeltaCoMeLayer)
        base_layer, ft_layer = module.get_base_layer(), self.finetuned.get_submodule(name)
        delta = ft_layer.weight.detach().to(device, torch.float32) - base_layer.weight.detach().to(device, torch.float32)
        packed = module.deltacome_delta[self.adapter_name]
        compress_module(delta, hessian, self.config.layout[name], self.config, name=name).fill(packed)
        if packed.bias is not None:
            bias = ft_layer.bias.detach().float().cpu() - base_layer.bias.detach().float().cpu()
            packed.bias.copy_(bias.to(packed.bias.device))

    def outside(self, kind: ModelKind, targets: Sequence[str], calib: Any, device: torch.device | None) -> None:
        """Targets that run before the decoder layers (a VLM's projector and vision tower), compressed first so the
        first layer sees their result."""
        outside = kind.outside_targets(self.inner, targets)
        if not outside:
            return
        hessians, why = kind.outside_hessians(self.finetuned, outside, calib, device) if calib is not None else ({}, "")
        for name in outside:
            h = hessians.get(name)
            self.fill(name, h, device or module_device(self.inner.get_submodule(name)))
            if h is None and calib is not None:
                self.fallbacks.append(f"{name}: {why} (round-to-nearest)")

    def layers(
        self, kind: ModelKind, targets: Sequence[str], calib: Any, device: torch.device | None, progress: bool
    ) -> None:
        """Walk the decoder layers, compressing each layer's targets against the fine-tune's activations."""
        prefix, layers = find_decoder_layers(self.inner)
        ft_layers = self.finetuned.get_submodule(prefix)
        per_layer = [[t for t in targets if t.startswith(f"{prefix}.{i}.")] for i in range(len(layers))]

        def visit(i: int, hidden: Any, calls: Any, work: torch.device) -> None:
            names = per_layer[i]
            modules = {n: self.inner.get_submodule(n) for n in names}
            if self.ckpt is not None and self.ckpt.load_layer(i, modules):
                return
            hessians = {}
            if hidden is not None:
                layer_prefix = f"{prefix}.{i}."
                inputs = {n: ft_layers[i].get_submodule(n[len(layer_prefix):]) for n in names}
                with HessianCollector(inputs, device=work) as collector:
                    for h, (a, k) in zip(hidden, calls, strict=True):
                        collector.run(lambda h=h, a=a, k=k: ft_layers[i](h, *a, **k))
                hessians = {n: collector.matrix(n) for n in names}
            for name in names:
                self.fill(name, hessians.get(name), work)
                if hidden is not None and hessians.get(name) is None:
                    self.fallbacks.append(f"{name}: no activations (round-to-nearest)")
            if self.ckpt is not None:
                self.ckpt.save_layer(i, modules)

        inputs = kind.layer_inputs(calib) if calib is not None else None
        with dequant_cache.suspended():
            walk_layers(self.inner, ft_layers, inputs, visit, batch_size=FORWARD_BATCH_SIZE, device=device,
                        progress=progress)  # fmt: skip


def _record(
    kind: ModelKind,
    config: DeltaCoMeConfig,
    calib: Any,
    seconds: float,
    plan_info: dict[str, Any],
    distill: dict[str, Any],
    fallbacks: list[str],
) -> dict[str, Any]:
    """``compression_info``: what data, method and library versions made the adapter, and how the plan was chosen."""
    import peft
    import transformers

    from .. import __version__

    info: dict[str, Any] = {
        "calibration": calib.source if calib is not None else "none (round-to-nearest, data-free)",
        "num_samples": calib.num_samples if calib is not None else 0,
        "seq_len": calib.seq_len if calib is not None else 0,
        "seconds": round(seconds, 2),
        "method": config.method,
        "quantizer": config.quantizer,
        "refit_u": config.quantizer == "gptq" and config.method in ("deltacome", "svd-uniform"),
        "hf_deltacome": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    info.update(plan_info)
    info.update(kind.record(calib))
    if distill:
        info["distill"] = distill
    if fallbacks:
        info["fallbacks"] = fallbacks
    return info
