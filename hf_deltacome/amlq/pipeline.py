"""``quantize_model()``: AMLQ quantization of a (base) causal LM, and saving it as a transformers checkpoint.

1. **Sensitivity** (:mod:`.sensitivity`): per-linear GPTQ errors at every candidate precision, low-rank gains, and
   each linear's end-to-end curve (whole-model KL when only it is quantized). Measured once per model and
   calibration set; pass ``sensitivity=`` to reuse it across targets.
2. **Allocation** (:func:`.allocation.allocate`): the layout minimising the summed estimated KL within the true bpw.
3. **Quantization**, GPTQ-sequential like ``compress`` (:func:`~hf_deltacome.compression.layerwalk.walk_layers`):
   layer ``i`` is quantized with the Hessians of its inputs in the *already quantized* model, each linear in one
   GPTQ pass with per-group bit widths (:meth:`~hf_deltacome.quant.gptq.GPTQ.quantize_groups`), its error corrected
   by a low-rank term where the layout says, and swapped for an `AmlqLinear`; then the quantized layer runs to give
   layer ``i + 1`` its inputs.

Only the decoder linears are quantized (embeddings, norms and ``lm_head`` stay as they are; GPT-2's ``Conv1D`` as the
``nn.Linear`` it computes, ``model.dequantize()`` giving a ``Conv1D`` back); "bits per weight" is over those linears
and counts every stored byte: codes with their row padding, scales, zeros, low-rank factors.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compression.calibration import CalibrationSource, get_calibration
from ..compression.layerwalk import walk_layers
from ..errors import ConfigError
from ..format.amlq_layout import column_groups, entry_nbytes, layout_bpw, mean_bits, plane_columns, unit_spans
from ..format.packing import QuantizedMatrix
from ..linears import Conv1DAsLinear, ExpertsAsLinears, fuse_experts, on_conv1d_views, unfuse_experts
from ..quant.gptq import GPTQ
from .allocation import Sensitivity, allocate
from .config import DEFAULT_BITS, DEFAULT_DAMP, DEFAULT_GROUP_SIZES, DEFAULT_LOW_BIT_SHARE, AmlqConfig, resolve_damp
from .linear import AmlqLinear
from .lowrank import damped_cholesky, error_factors
from .sensitivity import (
    FORWARD_BATCH_SIZE,
    decoder_linears,
    layer_hessians,
    measure_end_to_end,
    measure_sensitivity,
    trace_error,
)

DEFAULT_NUM_SAMPLES = 16
DEFAULT_SEQ_LEN = 256


def pack_planes(
    entry: dict[str, Any], codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> list[QuantizedMatrix]:
    """Sort the column groups of a GPTQ result into the entry's planes (storage layout of ``linear.py``)."""
    n = int(entry["shape"][1])
    plane_groups: list[list[int]] = [[] for _ in entry["planes"]]
    gid = 0
    for (s, e), p in zip(unit_spans(n, int(entry["unit"])), entry["units"], strict=True):
        count = math.ceil((e - s) / int(entry["planes"][int(p)][1]))
        plane_groups[int(p)].extend(range(gid, gid + count))
        gid += count
    out = []
    for (bits, gs), cols, groups in zip(entry["planes"], plane_columns(entry), plane_groups, strict=True):
        idx = torch.tensor(groups, dtype=torch.long)
        out.append(QuantizedMatrix.from_int(codes[:, cols], scales[:, idx], zeros[:, idx], int(bits), int(gs)))
    return out


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = FORWARD_BATCH_SIZE) -> float:
    """Perplexity of ``model`` on token windows ``ids`` (sequences x tokens), every next token counted."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll -= float(torch.log_softmax(logits, -1).gather(-1, batch[:, 1:, None]).sum())
        count += batch[:, 1:].numel()
    return math.exp(nll / max(count, 1))


@torch.no_grad()
@on_conv1d_views  # GPT-2's Conv1D quantized as the nn.Linear it computes; those skipped are Conv1D again afterwards
def quantize_model(
    model: nn.Module,
    bpw: float = 3.0,
    *,
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    bits: Sequence[int] = DEFAULT_BITS,
    group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
    error_rank: int | str = "auto",
    rank_bits: int = 8,
    low_bit_share: float | str = DEFAULT_LOW_BIT_SHARE,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    damp: float | str = DEFAULT_DAMP,
    act_order: bool = True,
    skip: Sequence[str] | None = None,
    layout: dict[str, dict[str, Any]] | None = None,
    sensitivity: Sequence[Sensitivity] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> nn.Module:
    """Quantize ``model``'s decoder linears in place with AMLQ at ``bpw`` true bits per weight; returns the model.

    Args:
        calibration: texts / file / token ids, or ``None`` to sample text from the model (``get_calibration``).
        bits, group_sizes: candidate precisions; error_rank: ``"auto"``, ``0`` or a fixed rank; rank_bits: 8 or 4.
        low_bit_share: the largest share of a linear's columns at the lowest candidate bit width, or ``"auto"``
            (0.5 where it reaches ``bpw``, else no limit).
        damp: GPTQ damping, or ``"auto"`` (per linear from calibration tokens per input column,
            :func:`~hf_deltacome.amlq.config.auto_damp`); the values used are recorded in ``info["damping"]``.
        layout: a ready layout (e.g. ``format.amlq_layout.uniform_layout``): no sensitivity pass, no search.
        sensitivity: a ready :func:`measure_sensitivity` result (with end-to-end curves) for this model and
            calibration, reused across targets.
        device: where each decoder layer is moved for its work (default: where it is).
    The result keeps ``model.config.quantization_config`` (an `AmlqConfig`, with the layout and what was measured)
    and saves with ``model.save_pretrained`` or :func:`save_quantized`.
    """
    from ..io.fingerprint import fingerprint_json

    t0 = time.time()
    config = AmlqConfig(bpw=bpw, bits=bits, group_sizes=group_sizes, error_rank=error_rank, rank_bits=rank_bits,
                        low_bit_share=low_bit_share, damp=damp, act_order=act_order,
                        modules_to_not_convert=list(skip) if skip else None)  # fmt: skip
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise ConfigError(f"{type(model).__name__} is already quantized; quantize the full-precision model")
    unfuse_experts(model, keep=True)  # fused mixture-of-experts weights: one linear per expert, quantized as any
    prefix, layers, per_layer = decoder_linears(model, skip)  # before any work: a model without them is refused
    if _whole_experts(model, set(layout) if layout is not None else {n for names in per_layer for n in names}):
        prefix, layers, per_layer = decoder_linears(model, skip)  # fused experts left out are fused again
    calib = get_calibration(calibration, model, tokenizer, num_samples, seq_len, seed, progress=progress)
    source = "sampled from the model itself" if calibration is None else calib.source
    work = torch.device(device) if device is not None else None
    source_fp = fingerprint_json(model)
    ppl_fp = perplexity(model, calib.input_ids)
    info: dict[str, Any] = {"calibration": source, "num_samples": calib.num_samples, "seq_len": calib.seq_len}
    if layout is None:
        t1 = time.time()
        if sensitivity is None:
            sensitivity = measure_sensitivity(model, calib.input_ids, bits=bits, group_sizes=group_sizes,
                                              error_rank=error_rank, damp=damp, act_order=act_order, skip=skip,
                                              device=work, progress=progress)  # fmt: skip
            measure_end_to_end(model, calib.input_ids, sensitivity, progress=progress)
            info["sensitivity_seconds"] = round(time.time() - t1, 1)
        layout, alloc = allocate(sensitivity, bpw, error_rank, low_bit_share=low_bit_share, rank_bits=rank_bits)
        info["estimated_kl"], info["low_bit_share"] = alloc["estimated_kl"], alloc["low_bit_share"]
    else:
        config.error_rank = max((int(e.get("rank", 0)) for e in layout.values()), default=0)
        if layout_bpw(layout) > bpw + 1e-9:
            raise ConfigError(f"the given layout takes {layout_bpw(layout):.4f} bpw, above the requested {bpw}")
    wanted = {n for names in per_layer for n in names}
    if set(layout) - wanted:
        raise ConfigError(f"layout names modules that are not decoder linears: {sorted(set(layout) - wanted)[:5]}")

    t2 = time.time()
    errors: dict[str, dict[str, float]] = {}
    damping: dict[str, float] = {}

    def visit(i: int, hidden: Any, calls: Any, here: torch.device) -> None:
        names = [n for n in per_layer[i] if n in layout]
        hessians = layer_hessians(layers[i], f"{prefix}.{i}.", names, hidden, calls, here)
        for name in names:
            g = hessians.get(name)
            damping[name] = resolve_damp(damp, g.nsamples if g is not None else 0, int(layout[name]["shape"][1]))
            errors[name] = _quantize_linear(model, name, layout[name], g, damping[name], act_order)

    walk_layers(model, list(layers), calib.input_ids, visit, batch_size=FORWARD_BATCH_SIZE, device=work,
                progress=progress)  # fmt: skip
    for stand_in in model.modules():
        if isinstance(stand_in, ExpertsAsLinears) and stand_in.keep:
            stand_in.drop_fused()  # its linears hold their own packed weights now
    modules = {n: m for n, m in model.named_modules() if isinstance(m, AmlqLinear)}
    weights = sum(m.in_features * m.out_features for m in modules.values())
    true_bpw = 8.0 * sum(m.stored_nbytes() for m in modules.values()) / max(weights, 1)
    if abs(true_bpw - layout_bpw(layout)) > 1e-9 or true_bpw > bpw + 1e-9:  # pragma: no cover - by construction
        raise ConfigError(f"internal error: stored {true_bpw:.5f} bpw, planned {layout_bpw(layout):.5f}, asked {bpw}")
    info.update({"true_bpw": true_bpw, "quantized_weights": weights,
                 "stored_bytes": sum(entry_nbytes(e) for e in layout.values()),
                 "quantize_seconds": round(time.time() - t2, 1), "seconds": round(time.time() - t0, 1),
                 "errors": errors, "damping": damping, "mean_code_bits": {n: mean_bits(e) for n, e in layout.items()},
                 "calibration_perplexity": {"full_precision": ppl_fp,
                                            "quantized": perplexity(model, calib.input_ids)}})  # fmt: skip
    config.layout, config.info, config.source_fingerprint = layout, info, source_fp
    config.post_init()
    attach_quantizer(model, config)
    return model


def _whole_experts(model: nn.Module, quantized: set[str]) -> bool:
    """Each fused experts module is quantized whole or not at all: a stand-in none of whose linears is in
    ``quantized`` is fused again (returns whether any was), one with some of them is refused (`ConfigError`): a saved
    checkpoint holds a fused module's experts packed or in transformers' own layout, not a mix."""
    left_out = False
    for name, stand_in in model.named_modules():
        if isinstance(stand_in, ExpertsAsLinears) and stand_in.keep:
            linears = [f"{name}.{e}.{p}" for e in range(stand_in.experts.num_experts) for p in stand_in.projections]
            inside = [n for n in linears if n in quantized]
            if inside and len(inside) < len(linears):
                out = sorted(set(linears) - set(inside))
                raise ConfigError(
                    f"AMLQ would quantize {len(inside)} of the {len(linears)} per-expert linears of the fused experts "
                    f"module {name} (not {out[0]}{', ...' if len(out) > 1 else ''}): a fused module's experts are "
                    "quantized all or none; skip every projection of its experts, or none"
                )
            if not inside:
                stand_in.keep, left_out = False, True
    if left_out:
        fuse_experts(model)
    return left_out


def _quantize_linear(
    model: nn.Module, name: str, entry: dict[str, Any], g: GPTQ | None, damp: float, act_order: bool
) -> dict[str, float]:
    """GPTQ (per-group bits) + low-rank correction of one linear; swaps in the `AmlqLinear`. Returns its errors."""
    old = model.get_submodule(name)
    W = old.weight.detach().to(torch.float32)
    if g is None:  # no activations reached it: identity Hessian, i.e. round-to-nearest
        g = GPTQ.from_hessian(torch.eye(W.shape[1], device=W.device), name=name)
    codes, scales, zeros, dq = g.quantize_groups(W, column_groups(entry), damp, act_order)
    E, H = W.cpu() - dq, g.H.cpu()
    rel = trace_error(E, H) / max(trace_error(W.cpu(), H), 1e-30)
    lowrank, left = None, 1.0
    if int(entry.get("rank", 0)):
        Lq, Rq, left = error_factors(E, damped_cholesky(H, damp), int(entry["rank"]), int(entry.get("rank_bits", 8)))
        lowrank = (Lq, Rq)
    device = old.weight.device
    new = AmlqLinear(old.in_features, old.out_features, entry, bias=old.bias is not None, dtype=old.weight.dtype,
                     device=device, name=name, from_conv1d=isinstance(old, Conv1DAsLinear))  # fmt: skip
    new.fill([_to(p, device) for p in pack_planes(entry, codes, scales, zeros)],
             tuple(_to(p, device) for p in lowrank) if lowrank else None)  # fmt: skip
    if old.bias is not None:
        new.bias.data = old.bias.detach().clone()
    new.requires_grad_(False)
    model.set_submodule(name, new)
    return {"relative_error": rel, "after_lowrank": rel * left}


def _to(q: QuantizedMatrix, device: torch.device) -> QuantizedMatrix:
    return QuantizedMatrix(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in q.__dict__.items()})


def attach_quantizer(model: nn.Module, config: AmlqConfig) -> None:
    """Make a model quantized in memory look like one loaded by ``from_pretrained`` (config + ``hf_quantizer``)."""
    from transformers.quantizers.base import _assign_is_quantized

    from .quantizer import AmlqHfQuantizer

    model.config.quantization_config = config
    model.hf_quantizer = AmlqHfQuantizer(config, pre_quantized=True)
    model.quantization_method = config.quant_method
    _assign_is_quantized(model)


def save_quantized(model: nn.Module, folder: str | os.PathLike, tokenizer: Any = None) -> Path:
    """``model.save_pretrained`` (and the tokenizer's) into ``folder``, which is replaced as a unit
    (:func:`~hf_deltacome.io.atomic.atomic_folder`: a kill leaves the previous folder or the new one, never a mix)."""
    from ..io.atomic import atomic_folder

    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(cfg, AmlqConfig):
        raise ConfigError("save_quantized needs a model quantized by hf_deltacome.amlq.quantize_model")
    with atomic_folder(folder) as nxt:
        for entry in os.scandir(nxt):  # the previous version's files (hard links): a fresh folder, not a mix
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        model.save_pretrained(nxt)
        if tokenizer is not None:
            tokenizer.save_pretrained(nxt)
    return Path(folder)
