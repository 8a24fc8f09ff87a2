"""Scale distillation: a compressed adapter's stored scales refined against the fine-tune's next-token distribution.

The codes, masks and layout stay as compression wrote them, so the file's bytes, format and loading path do not
change; only float values already in the file move: BitDelta's sign scales (as published), and with
``distill_bands`` each band's singular values ``S_k`` and the per-group scales of ``V_kᵀ`` and ``U_kᵀ`` (a multiplier
per group scales a group's dequantized values, ``(q − z)·s``, so learning it is a differentiable product with the
dequantized factor). Adam works on log-multipliers, so each scale keeps its sign and moves in proportion to its size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from ..backend import dequant_cache
from ..errors import CalibrationError
from ..format.blob import BlobStore
from ..progress import progress_bar

log = logging.getLogger(__name__)

TEACHER_CACHE_BYTES = 1 << 30  # the fine-tune's log-probabilities are kept across steps when they fit in this


class ScalePart(NamedTuple):
    """One stored float tensor the distillation may scale: where it is and its value before distillation."""

    store: BlobStore
    key: str
    start: torch.Tensor  # float32 copy of the stored value


def scale_parts(model: nn.Module, adapter_name: str = "default", *, bands: bool = False) -> list[ScalePart]:
    """The scales of ``model``'s adapter ``adapter_name`` that distillation refines: every sign part's scale, and
    with ``bands`` every band's ``S_k`` (dense and sparse bands) and the group scales of its quantized factors."""
    out = []
    for delta in _deltas(model, adapter_name):
        keys = [delta.sign._prefix + "scale"] if delta.sign is not None else []
        if bands:
            for band in delta.low_rank_bands:
                keys.append(band._prefix + "s")
                keys += [f._prefix + "scales" for f in (band.v, band.u) if f.bits != 16 and f.scales is not None]
        for key in keys:
            value = delta.part(key)
            if value is not None and value.numel():
                out.append(ScalePart(delta, key, value.detach().to(torch.float32).clone()))
    return out


def _deltas(model: nn.Module, adapter_name: str) -> Iterator:
    for mod in model.modules():
        deltas = getattr(mod, "deltacome_delta", None)
        if deltas is not None and adapter_name in deltas:
            yield deltas[adapter_name]


def _teacher(finetuned: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    device = next(finetuned.parameters()).device
    with torch.no_grad():
        return torch.log_softmax(finetuned(input_ids=batch.to(device)).logits.float(), -1)


def _batches(input_ids: torch.Tensor, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    return list(input_ids[:, :seq_len].split(batch_size))


def distill_scales(
    model: nn.Module,
    finetuned_model: nn.Module,
    input_ids: torch.Tensor | None,
    *,
    bands: bool = False,
    steps: int = 50,
    lr: float = 0.01,
    batch_size: int = 4,
    seq_len: int = 128,
    adapter_name: str = "default",
    progress: bool = False,
) -> dict[str, float]:
    """Refine the scales of :func:`scale_parts` by distillation; returns the loss of the first and last steps.

    Minimises the KL divergence from the fine-tune's next-token distribution to the compressed model's on
    ``input_ids`` (cut to ``seq_len`` tokens, ``batch_size`` sequences a step), with Adam over log-multipliers of
    the scales. The refined values are written into the adapter's stored bytes in place at the end."""
    parts = scale_parts(model, adapter_name, bands=bands)
    if not parts or steps <= 0:
        return {}
    if input_ids is None or input_ids.numel() == 0:
        raise CalibrationError("scale distillation needs calibration token ids")
    device = parts[0].store.part(parts[0].key).device
    logs = [torch.zeros_like(p.start, device=device, requires_grad=True) for p in parts]
    starts = [p.start.to(device) for p in parts]
    opt = torch.optim.Adam(logs, lr=lr)
    batches = _batches(input_ids, batch_size, seq_len)
    vocab = getattr(getattr(finetuned_model, "config", None), "vocab_size", None) or 0
    keep = sum(b.numel() for b in batches) * vocab * 4 <= TEACHER_CACHE_BYTES
    teacher: dict[int, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    first = last = None
    bar = progress_bar(steps, progress, "Distilling scales")
    try:
        with dequant_cache.suspended():  # cached factors would hide the overridden scales
            for step in range(steps):
                i = step % len(batches)
                batch = batches[i]
                target = teacher.get(i)
                if target is None:
                    target = _teacher(finetuned_model, batch)
                    if keep:
                        teacher[i] = target
                for p, s0, lg in zip(parts, starts, logs, strict=True):
                    p.store.override(p.key, s0 * torch.exp(lg))  # differentiable; the bytes are written at the end
                with torch.enable_grad():
                    logp = torch.log_softmax(model(input_ids=batch.to(device)).logits.float(), -1)
                    loss = nn.functional.kl_div(logp, target.to(logp.device), log_target=True, reduction="batchmean")
                    loss = loss / batch.shape[1]
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                last = float(loss.detach())
                first = last if first is None else first
                bar.update(1)
    finally:
        with torch.no_grad():
            for p, s0, lg in zip(parts, starts, logs, strict=True):
                p.store.override(p.key, None)
                stored = p.store.part(p.key)
                value = s0 * torch.exp(lg.detach())
                if stored.dtype == torch.float16:
                    value = value.clamp(-65504.0, 65504.0)
                stored.copy_(value.to(stored.device, stored.dtype))  # in place: the saved bytes change
        bar.close()
        model.train(was_training)
    return {"first_loss": first, "last_loss": last, "steps": steps, "scales": sum(p.start.numel() for p in parts)}
