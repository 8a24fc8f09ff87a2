"""The one cache of what the PyTorch path decodes from packed deltas, under one byte cap for every adapter.

Three kinds of entry: a delta's band factors (``A = [S_k ⊙ V_kᵀ]ᵀ``, ``in x rank``, and ``B = [U_kᵀ]``,
``rank x out``, every band concatenated, so a forward pass is two matmuls instead of dequantizing every band of every
layer at every step), a DARE part's matrix (CSR, 8 bytes a kept value: ~0.9x the fp16 delta at 1/32; dense float32
above a keep-rate of 0.3, as at 1/16: 2x) and a vector-code part's decoded rows (float32: 2x the fp16 delta). The last two are what the default's MLP and the
option ``full_rank="vq"`` store, so one cap has to hold all three for ``DELTACOME_DEQUANT_CACHE_MB`` to bound an
adapter server's memory. The packed bytes stay the source of truth: an entry is rebuilt when they change (in-place
loads bump the tensors' versions).

Beyond ``max_bytes`` an entry is evicted only once it has gone unused for two rounds of the cache (``2 x`` its number
of entries in lookups); until then a new one is used once and not kept. A step over more adapters than the cap holds
cycles through every entry, and plain LRU would then evict each entry just before its next use (no hit at all); this
way the entries that fit keep hitting, and those of adapters that are no longer asked for age out. ``max_bytes=0``
turns it off (each forward decodes again); the default is ``DELTACOME_DEQUANT_CACHE_MB`` (1024 when unset). The first
entry a cap too small turns away gives a `DecodeCacheFullWarning`. Compression's scale distillation runs with the
cap lifted (`DequantCache.uncapped`): it runs one adapter for many steps, and decoding its DARE parts again at every
pass would regenerate their masks each time. The kernels read the packed bytes and use none of this.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from ..errors import DecodeCacheFullWarning


class _Entry(NamedTuple):
    stamp: tuple
    value: Any
    owner: weakref.ref
    size: int


def decoded_nbytes(value: Any) -> int:
    """Bytes held by a decoded form: a tensor (a CSR matrix's indices and values counted), or a tuple of them."""
    if isinstance(value, (tuple, list)):
        return sum(decoded_nbytes(v) for v in value)
    if value.layout == torch.sparse_csr:
        return sum(t.numel() * t.element_size() for t in (value.crow_indices(), value.col_indices(), value.values()))
    return value.numel() * value.element_size()


class DequantCache:
    """Decoded forms of packed deltas, for the PyTorch path (CPU, and GPUs without the kernels): see the module."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._last_use: dict[tuple, int] = {}
        self._tick = 0  # lookups so far
        self._warned = False  # DecodeCacheFullWarning given

    def configure(self, max_bytes: int) -> None:
        """Set the memory cap (0 disables the cache and frees it)."""
        self.max_bytes = max(0, int(max_bytes))
        self._shrink()

    def clear(self) -> None:
        self._entries.clear()
        self._last_use.clear()
        self.bytes = 0

    @contextlib.contextmanager
    def _capped_at(self, max_bytes: int) -> Iterator[None]:
        """``max_bytes`` inside the block, the cap before it again after it (what exceeds it then freed)."""
        saved = self.max_bytes
        self.configure(max_bytes)
        try:
            yield
        finally:
            self.configure(saved)

    def suspended(self) -> contextlib.AbstractContextManager[None]:
        """No caching inside the block (compression runs each layer a few times: caching would only cost memory)."""
        return self._capped_at(0)

    def uncapped(self) -> contextlib.AbstractContextManager[None]:
        """No cap inside the block, the cap again after it (what exceeds it then freed, least recent first): for a
        job that runs the same adapter many times and must not decode it at every call (scale distillation, where
        a DARE part decoded again regenerates its mask at every forward and backward pass)."""
        return self._capped_at(1 << 62)

    def prune(self) -> None:
        """Free the entries of deltas that no longer exist (an adapter was deleted from the model)."""
        for key in [k for k, entry in self._entries.items() if entry.owner() is None]:
            self._drop(key)

    def holds(self, owner: Any, kind: str) -> bool:
        """Is a ``kind`` entry of ``owner`` (a packed delta) cached."""
        return any(k[:2] == (id(owner), kind) and e.owner() is owner for k, e in self._entries.items())

    def forget(self, owner: Any, kind: str) -> None:
        """Drop ``owner``'s ``kind`` entries."""
        for key in [k for k in self._entries if k[:2] == (id(owner), kind)]:
            self._drop(key)

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key)
        self._last_use.pop(key, None)
        self.bytes -= entry.size

    def _shrink(self) -> None:
        while self._entries and self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _make_room(self, size: int) -> bool:
        """Evict entries unused for two rounds (least recent first) until ``size`` more bytes fit; False if they
        cannot (the new entry is then not kept)."""
        while self._entries and self.bytes + size > self.max_bytes:
            oldest = next(iter(self._entries))
            if self._tick - self._last_use.get(oldest, 0) <= 2 * len(self._entries):
                return False
            self._drop(oldest)
        return self.bytes + size <= self.max_bytes

    @torch.compiler.disable
    def get(self, owner: Any, kind: str, stamp: tuple, build: Callable[[], Any], *key: Any) -> Any:
        """``build()`` for ``owner``'s ``kind`` (one entry per ``key``), reused while ``stamp`` (what says the
        packed bytes it is made from are unchanged) holds, kept if it fits. A hit compares the stamp only: it
        touches no part of the delta. Run eagerly under ``torch.compile``: traced, dynamo guarded on its bookkeeping
        (an entry's size), which changes as entries come and go, and recompiled until it hit its limit."""
        key = (id(owner), kind, *key)
        self._tick += 1
        hit = self._entries.get(key)
        if hit is not None and hit.stamp == stamp and hit.owner() is owner:
            self._entries.move_to_end(key)
            self._last_use[key] = self._tick
            return hit.value
        if hit is not None:
            self._drop(key)
        value = build()
        size = decoded_nbytes(value)
        if self._make_room(size):
            self._entries[key] = _Entry(stamp, value, weakref.ref(owner), size)
            self._last_use[key] = self._tick
            self.bytes += size
        elif self.max_bytes > 0 and not self._warned:
            self._warned = True
            warnings.warn(
                f"the PyTorch path's cache of decoded adapters is full ({self.bytes / 2**20:.0f} of "
                f"DELTACOME_DEQUANT_CACHE_MB={self.max_bytes / 2**20:.0f} MiB held; a {kind!r} entry of "
                f"{size / 2**10:,.0f} KiB did not fit): what does not fit is decoded again at every call, which is "
                "slower; raise DELTACOME_DEQUANT_CACHE_MB (or hf_deltacome.backend.dequant_cache.configure(bytes)) "
                "where memory allows",
                DecodeCacheFullWarning,
                stacklevel=3,  # past torch.compiler.disable's wrapper, to the caller of get()
            )
        return value

    @torch.compiler.disable
    def factors(self, delta: Any, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of ``delta`` (a `PackedDelta`) with ``x @ A @ B`` = the bands' product (built now, or reused).
        Eager under ``torch.compile`` with its stamp, one graph break a module (the stamp's ``is_inference()`` would
        be a second)."""
        build = lambda: _band_factors(delta, dtype, device)  # noqa: E731
        return self.get(delta, "factors", delta.version_stamp(), build, dtype, device)


def _band_factors(delta: Any, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    bands = delta.low_rank_bands  # dense, then sparse (masks regenerated from their seeds)
    if not bands:
        raise ValueError("a delta without low-rank bands has no factors")
    factors = [band.decoded_factors(dtype) for band in bands]
    a, b = torch.cat([f[0] for f in factors], 1), torch.cat([f[1] for f in factors])
    return a.contiguous().to(device), b.contiguous().to(device)


dequant_cache = DequantCache(int(float(os.environ.get("DELTACOME_DEQUANT_CACHE_MB", "1024")) * 2**20))
