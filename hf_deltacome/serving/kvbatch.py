"""The serving engine's running batch: rows, KV cache (left-padded to one length), attention mask, next tokens.

Rows join and leave between decode steps by surgery on the cache: :func:`select_rows` copies some rows out,
:func:`keep_rows` drops rows in place (and the leading columns that only padding uses), :func:`repeat_rows` copies
rows in place (one prompt prefilled for all its choices), :func:`join` left-pads two
batches to one length and concatenates them, :func:`crop` undoes a failed step. All of it needs plain
``DynamicLayer`` caches (full attention); :func:`joinable` tells.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .requests import GenerationRequest


@dataclass
class RunningBatch:
    """The running rows: their KV cache (left-padded to one length), attention mask, and next input tokens."""

    rows: list[GenerationRequest]
    cache: Any
    mask: torch.Tensor  # (rows, cached length), 1 = real token
    pending: torch.Tensor  # (rows,) the last sampled token of each row, fed by the next decode step


def joinable(cache: Any) -> bool:
    """Whether rows can be concatenated into this cache: every layer a filled plain ``DynamicLayer``."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def cache_argument(model: Any) -> str:
    """The forward argument that takes the KV cache: ``cache`` (recent transformers) or ``past_key_values``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]
    return F.pad(t, pad)


def crop(batch: RunningBatch, length: int) -> None:
    """Cut every cache layer back to ``length`` columns (undo a step that failed after some layers appended)."""
    for layer in batch.cache.layers:
        if layer.is_initialized and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def select_rows(batch: RunningBatch, keep: list[int]) -> RunningBatch:
    """A new batch of the rows ``keep`` (copies of their cache rows; ``batch`` is untouched)."""
    cache = copy.copy(batch.cache)
    cache.layers = [copy.copy(layer) for layer in batch.cache.layers]
    index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
        layer.values = layer.values.index_select(0, index.to(layer.values.device))
    return RunningBatch([batch.rows[i] for i in keep], cache, batch.mask[index], batch.pending[index.cpu()])


def repeat_rows(cache: Any, index: list[int], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows ``index`` (a row may repeat: ``n`` choices of one prompt prefilled once) of ``cache``, in place, and of
    each of ``tensors`` along its first dimension."""
    rows = torch.tensor(index, dtype=torch.long)
    cache.batch_select_indices(rows.to(cache.layers[0].keys.device))
    return tuple(t[rows.to(t.device)] for t in tensors)


def keep_rows(batch: RunningBatch, keep: list[int]) -> Optional[RunningBatch]:
    """``batch`` restricted to rows ``keep`` in place (None when empty), leading all-padding columns trimmed."""
    if not keep:
        return None
    if len(keep) < len(batch.rows):
        index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
        batch.cache.batch_select_indices(index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.mask = batch.mask[index]
        batch.pending = batch.pending[index.cpu()]
    if joinable(batch.cache):
        used = batch.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else batch.mask.shape[1]
        if start > 0:
            for layer in batch.cache.layers:
                layer.keys = layer.keys[..., start:, :]
                layer.values = layer.values[..., start:, :]
            batch.mask = batch.mask[:, start:]
    return batch


def join(a: RunningBatch, b: RunningBatch) -> RunningBatch:
    """Rows of ``a`` then ``b`` in one batch: caches and masks left-padded to one length, then concatenated."""
    length = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        la.keys = torch.cat([_left_pad(la.keys, length, -2), _left_pad(lb.keys, length, -2)])
        la.values = torch.cat([_left_pad(la.values, length, -2), _left_pad(lb.values, length, -2)])
    mask = torch.cat([_left_pad(a.mask, length, 1), _left_pad(b.mask, length, 1)])
    return RunningBatch(a.rows + b.rows, a.cache, mask, torch.cat([a.pending, b.pending]))
