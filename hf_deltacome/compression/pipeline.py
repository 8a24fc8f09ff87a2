"""``compress(base, finetuned, config)``: build a Delta-CoMe adapter from a fine-tune and its base.

The two models are either loaded (``nn.Module``: today's in-memory path) or paths / Hub ids of safetensors
checkpoints, which are *streamed* (:mod:`.streaming`): one decoder layer of each model is read from disk at a time,
worked on and freed. Both paths run the same steps below and write the same bytes where both apply.

The pipeline, step by step (each step is one function below):

1. :func:`~.inputs.describe_inputs` — the model kind (text LM, or a kind registered by :mod:`hf_deltacome.multimodal`) checks the
   pair and picks the target linears; every other parameter that changed beyond the rounding of its dtypes (norms,
   embeddings, ``lm_head``; :mod:`.changes`) goes dense into ``modules_to_save``, the rows of added tokens into
   trainable tokens (:mod:`.vocab`); a fine-tune equal to its base is refused; the base fingerprint is recorded;
2. :func:`_calibration` — calibration data for GPTQ (given, or sampled from the fine-tune; ``quantizer="rtn"`` uses
   none), checkpointed so a resumed run uses the same tokens;
3. :func:`~.inputs.file_budget` then :func:`~.plan.plan_layouts` — the whole ``adapter_model.safetensors`` is held to the
   ratio: the safetensors header, the dense extras and the bias deltas are paid first, the rest is spread over the
   targets in proportion to their size; then the layout of each target from its share (method, band split,
   allocation);
4. :func:`_wrap` — the base wrapped with PEFT (zeroed packed buffers), the dense extras copied in;
5. :class:`_Filler` + :func:`~.layerwalk.walk_layers` — targets outside the decoder layers first, then the decoder
   layers one at a time: each target's input Hessian is collected by running the fine-tuned layer on the compressed
   model's hidden states, its delta is compressed (:func:`~.modules.compress_module`) into the packed buffers, and
   the now-compressed layer produces the next layer's inputs;
6. scale distillation (BitDelta's sign scales; the bands' with ``distill_bands``, :mod:`.distill`) and the record of
   what was done (``compression_info``).

Peak memory: loaded, about base + fine-tune + one layer's activations; streamed, about one decoder layer of each
model, the calibration activations, the SVD workspace and the adapter being built.

Streamed runs cannot do what needs the whole model at once; each has a documented fallback :
calibration is given (texts, a file, token ids) or the built-in generic text (:func:`~.calibration.generic_texts`), not sampled
from the fine-tune; ``min_rank_share="auto"`` falls back to 0 (the published split); ``search`` and
``allocation="adaptive"`` are refused; scale distillation runs one decoder layer at a time against the fine-tune's
layer (:func:`~.distill.distill_layer`; each with a logged note, :func:`~.inputs.streamed_plan`).

A base whose linears are stored packed (an AMLQ-quantized base, :mod:`hf_deltacome.amlq`) is compressed against the
weights it actually runs with: :func:`on_quantized_base` enters every view registered in
:data:`QUANTIZED_BASE_VIEWS` (AMLQ's is registered by :mod:`hf_deltacome.integration`), under which those linears are
dense, for the whole call, so the adapter also absorbs the base's quantization error. Loaded GPT-2-family models'
``Conv1D`` layers are ``nn.Linear`` stand-ins for the call the same way, and fused mixture-of-experts weights one
``nn.Linear`` per expert and projection (:func:`hf_deltacome.linears.on_linear_views`; streamed, the skeletons'
experts, each read from its own checkpoint tensors: :mod:`.stream_keys`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

from ..backend import dequant_cache
from ..config import DeltaCoMeConfig
from ..errors import ConfigError
from ..layer import DeltaCoMeLayer
from ..linears import Conv1DAsLinear, ExpertsAsLinears, on_linear_views
from ..quant.hessian import HessianCollector
from ..quant.spill import maybe_spill
from . import vocab
from .calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, CalibrationSource, check_sizes, generic_texts
from .checkpoint import LayerCheckpoint, calibration_record
from .distill import VQ_MIN_KL, distill_layer, distill_scales, distills, distills_bands, layerwise_record
from .inputs import (
    ModelSource,
    describe_inputs,
    file_budget,
    load_tokenizer,
    pair_of,
    streamed_plan,
    warn_degenerate,
    work_device,
)
from .layerwalk import find_decoder_layers, floats_to, hessian_passes, module_device, walk_layers
from .modules import compress_module, with_changes
from .plan import plan_layouts
from .svd import reuse_svd_if_fits
from .targets import TEXT, ModelKind, model_kind

log = logging.getLogger("hf_deltacome")

FORWARD_BATCH_SIZE = 8  # calibration sequences per forward pass through one decoder layer
ONE_PASS_HESSIAN_BYTES = 64 << 20  # a layer's input Hessians (counted unshared) up to this size: one pass for all
PASS_HESSIAN_BYTES = 1 << 30  # else at most this much a pass (a mixture's experts: a Hessian each; see hessian_passes)

# context managers ``view(base_model)`` under which a base's packed linears are dense linears of their effective
# weights (a no-op for a base without any); registered from above this layer (integration.py), never imported here
QUANTIZED_BASE_VIEWS: list[Callable[[nn.Module], AbstractContextManager[Any]]] = []


def on_quantized_base(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of :func:`compress`: runs it with every registered view of its base active (module docstring)."""

    @functools.wraps(fn)
    def wrapper(base_model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            for view in QUANTIZED_BASE_VIEWS if isinstance(base_model, nn.Module) else ():  # paths: see streaming
                stack.enter_context(view(base_model))
            return fn(base_model, *args, **kwargs)

    return wrapper


@on_quantized_base
@on_linear_views
def compress(
    base_model: ModelSource,
    finetuned_model: ModelSource,
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
    base_tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """Compress ``finetuned_model − base_model`` into a Delta-CoMe adapter and return the ``PeftModel`` (eval mode).

    Loaded models: ``base_model`` is wrapped in place (as with ``get_peft_model``); ``finetuned_model`` is only read.
    Paths (local folders or Hub ids of safetensors checkpoints, sharded or not): both models are streamed from their
    files one decoder layer at a time; the returned ``PeftModel`` holds the adapter around a base left on the meta
    device (save it with ``save_pretrained``, load it onto the base with ``PeftModel.from_pretrained``). See the
    module docstring for what a streamed run does instead of what needs the whole model.

    Args:
        config: how to compress (ratio, bands, quantizer, ...); a copy is filled with the per-module layout.
        calibration: texts (list, ``.txt``, ``.jsonl``) or a token-id tensor for GPTQ; ``None`` samples text from
            the fine-tune itself (streamed: the built-in generic text). Ignored with ``config.quantizer == "rtn"``.
        tokenizer: the fine-tune's; tokenizes calibration texts, chat-templates sampling prompts, and (with
            ``base_tokenizer``) checks that a fine-tune which added tokens kept the base's first ones. Streamed:
            loaded from the fine-tune's folder when not given (``base_tokenizer`` from the base's).
        num_samples, seq_len: size of the calibration batch.
        device: where each decoder layer is moved for its work (default: CUDA when available, else where it is;
            streamed: CUDA when available, else the CPU); results stay on the base model's device and dtype.
        progress: show progress bars (the layers, with elapsed/remaining time and peak memory; long phases).
        seed: seed of calibration sampling.
        checkpoint_dir: folder where each finished decoder layer (and the calibration tokens) is checkpointed;
            a later call with the same folder and inputs skips finished layers and gives the same result.
        processor: for vision-language models (LLaVA-style; see :mod:`hf_deltacome.multimodal`), the base model's
            processor; needed for image + text calibration records (``{"image": ..., "text": ...}``), which then run
            through the whole model. Without images a VLM is calibrated on text only; the choice is logged and
            recorded in ``compression_info["calibration_kind"]``. A processor passed as ``tokenizer=`` works too.
        dtype: streamed only: hold the weights in this dtype (default: each tensor's own dtype on disk).
    """
    t0 = time.time()
    check_sizes(num_samples, seq_len)  # by name, whatever the quantizer
    config = copy.deepcopy(config) if config is not None else DeltaCoMeConfig()
    if not isinstance(config, DeltaCoMeConfig):
        raise ConfigError(f"config must be a DeltaCoMeConfig, got {type(config).__name__}")
    device = work_device(device)
    pair = pair_of(base_model, finetuned_model, dtype, device)
    if pair.streamed:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(pair.ft_ckpt.folder)
        base_tokenizer = base_tokenizer if base_tokenizer is not None else load_tokenizer(pair.base_ckpt.folder)
        device = device or torch.device("cpu")
    kind = model_kind(pair.base, pair.finetuned)
    if pair.streamed and kind is not TEXT:
        raise ConfigError(f"streamed compression handles text causal LMs; load this {kind.name} pair instead")
    targets, changes = describe_inputs(kind, pair, config, base_tokenizer, tokenizer, progress)
    budget = file_budget(pair.base, targets, config, changes.bias_changed)  # before any work: extras may not fit
    ckpt = None
    if checkpoint_dir is not None:  # a resume must have the same inputs: the fine-tune and calibration are recorded
        given = calibration_record(calibration, config, num_samples=num_samples, seq_len=seq_len, seed=seed,
                                   tokenizer=tokenizer if tokenizer is not None else processor)  # fmt: skip
        ckpt = LayerCheckpoint(checkpoint_dir, config, adapter_name, finetuned=pair.finetuned, calibration=given,
                               finetuned_fingerprint=pair.finetuned_fingerprint(progress))  # fmt: skip
    # calibration comes from the fine-tune before the base is wrapped, so a failure leaves the base untouched
    calib = _calibration(kind, config, pair, calibration, ckpt, device, tokenizer=tokenizer, processor=processor,
                         num_samples=num_samples, seq_len=seq_len, seed=seed, progress=progress)  # fmt: skip
    plan_config, notes = streamed_plan(config, calib) if pair.streamed else (config, {})
    # loaded weights worked on the CPU: each delta's SVD, taken while planning, is reused when it is compressed
    on_cpu = not pair.streamed and (device is None or device.type == "cpu")
    with reuse_svd_if_fits(_shapes(pair.base, targets)) if on_cpu else contextlib.nullcontext():
        config.layout, plan_info = plan_layouts(
            pair.base, pair.finetuned, targets, with_changes(plan_config, ratio=budget["factor_ratio"]),
            calibration_ids=calib.input_ids if calib is not None else None, bias_changed=changes.bias_changed,
            unchanged=changes.unchanged, progress=progress, deltas=pair.read_delta if pair.streamed else None,
            device=device,
        )  # fmt: skip
        plan_info.update(budget=budget, **notes)
        warn_degenerate(config, targets, changes)
        peft_model = _wrap(pair, config, adapter_name)
        peft_model.deltacome_finetuned = getattr(pair.finetuned, "name_or_path", None)  # saves refuse to write there
        filler = _Filler(peft_model.base_model.model, pair, config, adapter_name, ckpt)
        filler.outside(kind, targets, calib, device)
        filler.layers(kind, targets, calib, device, progress)
    distill: dict[str, Any] = layerwise_record(filler.distilled)
    if distills(config) and calib is not None and not pair.streamed:
        if calib.input_ids is None:  # image-text pairs: the student and teacher would need the images too
            distill = {"skipped": "the calibration has no token ids of its own (image-text pairs)"}
        else:
            least = VQ_MIN_KL if any(e.get("vq") for e in config.layout.values()) else None
            distill = distill_scales(peft_model, pair.finetuned, calib.input_ids, bands=distills_bands(config),
                                     steps=config.distill_steps, adapter_name=adapter_name, progress=progress,
                                     min_kl=least)  # fmt: skip
    config.compression_info = _record(kind, config, calib, time.time() - t0, plan_info, distill, filler.fallbacks)
    config.compression_info.update(streamed=pair.streamed, layer_seconds=[round(t, 2) for t in filler.layer_seconds])
    if any(isinstance(m, Conv1DAsLinear) for m in pair.base.modules()):  # GPT-2: a LoRA export is fan_in_fan_out
        config.compression_info["fan_in_fan_out"] = True
    fused = [n for n, m in pair.base.named_modules() if isinstance(m, ExpertsAsLinears) and m.hosts_adapter()]
    if fused:  # fused mixture-of-experts weights, stored one linear per expert (compressed or dense; linears.py)
        config.compression_info["fused_experts"] = fused
    if changes.rounding:
        config.compression_info["unchanged_within_rounding"] = changes.rounding
    return peft_model.eval()


def _shapes(model: nn.Module, targets: Sequence[str]) -> list[tuple[int, int]]:
    """The ``(out, in)`` shape of each target linear."""
    return [(model.get_submodule(nm).out_features, model.get_submodule(nm).in_features) for nm in targets]


def _calibration(
    kind: ModelKind,
    config: DeltaCoMeConfig,
    pair: Any,
    source: CalibrationSource,
    ckpt: LayerCheckpoint | None,
    device: torch.device | None,
    **options: Any,
) -> Any:
    """The calibration data GPTQ needs (``None`` for data-free round-to-nearest), resumed from the checkpoint.

    Sampling from a loaded fine-tune runs on the work device (the GPU when there is one); a streamed run reads the
    built-in generic text when no calibration is given."""
    if config.quantizer != "gptq":
        return None
    resumable = ckpt is not None and kind.resumable_calibration
    calib = ckpt.load_calibration() if resumable else None
    if calib is None:
        builtin = pair.streamed and source is None
        if builtin:
            log.info("streamed compression: calibrating on the built-in generic text (pass calibration= for data "
                     "like the fine-tune's)")  # fmt: skip
            source = generic_texts()
        elif source is None:
            log.info("no calibration given: sampling it from the fine-tune; text like the fine-tune's own data (its "
                     "training prompts and answers, e.g. prompt/completion .jsonl records) keeps more of a delta "
                     "that carries knowledge (benchmarks/RESULTS.md)")  # fmt: skip
        with _on_device(pair.finetuned, device if source is None else None):
            calib = kind.calibration(source, pair.finetuned, **options)
        if builtin:
            calib.source = f"built-in generic text ({calib.source})"
        if resumable:
            ckpt.save_calibration(calib)
    return calib


@contextlib.contextmanager
def _on_device(model: nn.Module, device: torch.device | None) -> Iterator[None]:
    """``model`` on ``device`` inside the block (only when it is all on the CPU and ``device`` is a GPU)."""
    params = list(model.parameters())
    move = device is not None and device.type != "cpu" and all(p.device.type == "cpu" for p in params)
    if move:
        model.to(device)
    try:
        yield
    finally:
        if move:
            model.to("cpu")


def _wrap(pair: Any, config: DeltaCoMeConfig, adapter_name: str) -> Any:
    """The base wrapped with PEFT (zeroed packed buffers where the layout says) and the fine-tune's dense extras."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*")
        peft_model = get_peft_model(pair.base, config, adapter_name=adapter_name)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name in config.modules_to_save or []:
            wrapper = inner.get_submodule(name)
            copies = getattr(wrapper, "modules_to_save", None)
            if copies is None or adapter_name not in copies:
                raise ConfigError(f"modules_to_save entry {name!r} was not wrapped by PEFT")
            owned = {n for n, _ in pair.finetuned.get_submodule(name).named_parameters(remove_duplicate=False)}
            copy_ = copies[adapter_name]
            for pname, p in list(copy_.named_parameters(recurse=True, remove_duplicate=False)):
                if pname not in owned:
                    continue
                value = pair.read_finetuned(f"{name}.{pname}")
                if p.device.type == "meta":  # streamed: the copy of a base skeleton module gets real weights
                    owner, _, leaf = pname.rpartition(".")
                    copy_.get_submodule(owner)._parameters[leaf] = nn.Parameter(value.to("cpu", p.dtype).clone(),
                                                                              requires_grad=False)  # fmt: skip
                else:
                    p.data = value.to(p.device, p.dtype).clone()
        vocab.fill_added_rows(inner, config, adapter_name, pair.read_finetuned)
    return peft_model


class _Filler:
    """Compresses each target's delta into the packed buffers of the wrapped model, layer by layer."""

    def __init__(
        self, inner: nn.Module, pair: Any, config: DeltaCoMeConfig, adapter_name: str, ckpt: LayerCheckpoint | None
    ) -> None:
        self.inner, self.pair, self.finetuned, self.config = inner, pair, pair.finetuned, config
        self.adapter_name, self.ckpt = adapter_name, ckpt
        self.fallbacks: list[str] = []
        self.layer_seconds: list[float] = []
        self.distilled: list[dict[str, Any]] = []  # streamed: each layer's scales distilled against the fine-tune's

    def fill(self, name: str, hessian: torch.Tensor | None, device: torch.device) -> None:
        """Compress target ``name`` (its input Hessian, or ``None`` for round-to-nearest) into its buffers."""
        module = self.inner.get_submodule(name)
        assert isinstance(module, DeltaCoMeLayer)
        with self.pair.hold([name], base=self.inner, finetuned=self.finetuned):  # streamed: this linear only
            base_layer, ft_layer = module.get_base_layer(), self.finetuned.get_submodule(name)
            ft_weight = ft_layer.weight.detach()
            delta = ft_weight.to(device, torch.float32)
            delta = delta.clone() if delta.data_ptr() == ft_weight.data_ptr() else delta  # never edit the fine-tune
            delta.sub_(base_layer.weight.detach().to(device))  # float32 result, no float32 copy of the base
            packed = module.deltacome_delta[self.adapter_name]
            if packed.bias is not None:
                bias = ft_layer.bias.detach().float().cpu() - base_layer.bias.detach().float().cpu()
                packed.bias.copy_(bias.to(packed.bias.device))
        compress_module(delta, hessian, self.config.layout[name], self.config, name=name).fill(packed)

    def _hessians(
        self, layer_name: str, inputs: dict[str, nn.Module], hidden: Any, calls: Any, work: torch.device
    ) -> dict[str, torch.Tensor | None]:
        """Input Hessians of the linears ``inputs`` of the fine-tune's decoder layer over the calibration batches
        (streamed: the layer is read for this pass only; each linear is read again when it is filled)."""
        ft_layer = self.finetuned.get_submodule(layer_name)
        dtype = next((p.dtype for p in ft_layer.parameters() if p.is_floating_point()), None)
        with self.pair.hold([layer_name], base=None, finetuned=self.finetuned), \
                HessianCollector(inputs, device=work) as collector:  # fmt: skip
            for h, (a, k) in zip(hidden, calls, strict=True):
                # a fine-tune saved in another dtype than its base runs in its own (hidden states, rotary tables and
                # masks cast to it, as the fine-tune's own forward would make them)
                a, k = (a, k) if h.dtype == dtype else (floats_to(a, dtype), floats_to(k, dtype))
                collector.run(lambda h=h, a=a, k=k: ft_layer(floats_to(h, dtype), *a, **k))
        hessians = {n: collector.matrix(n) for n in inputs}
        collector.hessians.clear()  # the caller's dict is the only owner: each Hessian is freed once used
        return hessians

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
            if hidden is None:  # data-free
                for name in names:
                    self.fill(name, None, work)
            else:
                # Passes of the fine-tune's layer (hessian_passes), each pass's linears compressed before the next
                # pass's Hessians exist; the layer is the same in every pass, so the Hessians are those of one pass.
                layer_prefix = f"{prefix}.{i}."
                inputs = {n: ft_layers[i].get_submodule(n[len(layer_prefix) :]) for n in names}
                for group in hessian_passes(inputs, ONE_PASS_HESSIAN_BYTES, PASS_HESSIAN_BYTES):
                    hessians = self._hessians(f"{prefix}.{i}", {n: inputs[n] for n in group}, hidden, calls, work)
                    for name in group:
                        h = hessians.pop(name, None)  # freed once its last linear is done
                        if not any(other is h for other in hessians.values()):
                            h = maybe_spill(h)  # its last user: a large one waits on disk while GPTQ works
                        self.fill(name, h, work)
                        if h is None:
                            self.fallbacks.append(f"{name}: no activations (round-to-nearest)")
                        del h
                if self.pair.streamed and distills(self.config):  # both layers held: distilled layer by layer
                    with self.pair.hold([f"{prefix}.{i}"], base=self.inner, finetuned=self.finetuned):
                        self.distilled.append(distill_layer(layers[i], ft_layers[i], hidden, calls, bands=distills_bands(
                            self.config), steps=self.config.distill_steps, adapter_name=self.adapter_name))  # fmt: skip
            if self.ckpt is not None:
                self.ckpt.save_layer(i, modules)

        def hold(i: int | None) -> Any:  # streamed: the embedding for the first inputs, then each compressed layer
            if i is None:
                return self.pair.hold(vocab.vocab_modules(self.inner)[:1], base=self.inner, finetuned=None)
            return self.pair.hold([f"{prefix}.{i}"], base=self.inner, finetuned=None)

        inputs = kind.layer_inputs(calib) if calib is not None else None
        with dequant_cache.suspended():
            self.layer_seconds = walk_layers(self.inner, ft_layers, inputs, visit, batch_size=FORWARD_BATCH_SIZE,
                                             device=device, progress=progress, hold=hold)  # fmt: skip


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
