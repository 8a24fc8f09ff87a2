"""One ``uint8`` tensor per packed delta, and its parts as views made on demand.

Every tensor of a packed delta (codes, scales, zeros, singular values, bias, the baselines' parts) lives in one
``blob`` at a fixed byte offset given by its layout entry (:class:`Segments`, built once per distinct entry and
shared). The part objects (`QuantizedFactor`, the bands, the baselines' parts) hold no tensors: each attribute read
(``band.v.qweight``) is a fresh view of the store's current blob. So a loaded adapter costs one module and one tensor
per target linear, not a module per factor and a tensor per part (which cost more memory than the packed bytes:
issue 16), and moving or replacing the blob can never leave a stale view behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Optional

import torch

from ..errors import AdapterFileError
from .decoded import dequant_cache
from .packing import QuantizedMatrix, expected_tensor_shapes


class Segment(NamedTuple):
    """One part of a blob: where it is and what it holds."""

    key: str  # format-1 state-dict key relative to ``<module>.deltacome_delta`` (``bands.0.v.qweight``)
    offset: int  # in bytes
    shape: tuple[int, ...]
    dtype: torch.dtype
    bits: int  # bit width of the codes of the factor it belongs to (0: not part of a factor)
    cols: Optional[int]  # values per row of a packed plane (its padding must be zero); None: not a packed plane

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class Segments:
    """The parts of a blob by key; ``order`` lists them as the module tree did (state-dict order of format 1), the
    offsets follow the blob order (largest item size first, stable), so no part needs padding."""

    __slots__ = ("by_key", "nbytes", "order")

    def __init__(self, parts: Iterable[tuple[str, tuple[int, ...], torch.dtype, int, Optional[int]]]) -> None:
        parts = list(parts)
        offsets, offset = {}, 0
        for key, shape, dtype, _, _ in sorted(parts, key=lambda p: -p[2].itemsize):
            offsets[key] = offset
            offset += Segment(key, 0, tuple(shape), dtype, 0, None).nbytes
        self.order = tuple(Segment(k, offsets[k], tuple(s), d, b, c) for k, s, d, b, c in parts)
        self.by_key = {seg.key: seg for seg in self.order}
        self.nbytes = offset

    def in_blob_order(self) -> list[Segment]:
        return sorted(self.order, key=lambda s: s.offset)


def factor_parts(prefix: str, rows: int, cols: int, bits: int, group_size: int) -> list[tuple]:
    """Segment specs of one quantized ``rows x cols`` matrix stored under ``prefix`` (``bands.0.v.``)."""
    out = []
    for name, (shape, dtype) in expected_tensor_shapes(rows, cols, bits, group_size).items():
        plane = cols if name in ("qweight", "qweight_hi") and bits != 16 else None
        out.append((prefix + name, shape, dtype, bits, plane))
    return out


PINNED_FACTORS = "factors"  # override key: ``(A, B)`` the PyTorch path multiplies by instead of the stored bands


class BlobStore:
    """What holds a blob: a `PackedDelta` (a module, ``blob`` a buffer) or a part built on its own (`OwnBlob`).

    ``_overrides`` (key -> tensor) replace a part for computing without touching the stored bytes (scale distillation
    differentiates through them; under `PINNED_FACTORS` the bands' factors as a pair); ``_derived`` holds what
    `derived` built from the parts."""

    _segs: Segments
    _overrides: Optional[dict] = None
    _derived: Optional[dict] = None

    def _blob(self) -> torch.Tensor:
        raise NotImplementedError

    def _set_blob(self, blob: torch.Tensor) -> None:
        raise NotImplementedError

    @torch.compiler.disable  # eager under torch.compile, stamp and all (one graph break, not one per check)
    def derived(
        self, kind: str, source: torch.Tensor, build: Callable[[], Any], *key: Any, capped: bool = False
    ) -> Any:
        """``build()``, cached under ``kind`` until ``source`` (the part it is made from) is written, replaced or
        moved: its address, version and device (and ``key``) stamp the entry. ``capped``: kept in the one capped
        cache of decoded forms (`format/decoded.py`, ``DELTACOME_DEQUANT_CACHE_MB``) instead of on this store: for
        what grows with the delta, ``"csr"`` (a DARE part's sparse matrix for the PyTorch path) and ``"vq"`` (a
        vector-quantized part's decoded rows). On the store: ``"csr_t"`` (the CSR matrix's transpose, for an input's
        gradient while scales are distilled), ``"dare_mask"`` (what a DARE part's kernel reads of its mask: each
        row's first value index, and a bitmap, 1/16 of the fp16 delta, unless the kernel hashes the mask itself),
        ``"sign_rows"`` (a sign part's kept rows) and ``"vq_rot"`` (a vq part's rotations' factors)."""
        stamp = (source.data_ptr(), self._version_of(source), source.device, *key)
        if capped:
            return dequant_cache.get(self, kind, stamp, build)
        cache = self._derived
        if cache is None:
            cache = self._derived = {}
        hit = cache.get(kind)
        if hit is None or hit[0] != stamp:
            hit = cache[kind] = (stamp, build())
        return hit[1]

    def forget(self, kind: str) -> None:
        """Drop what `derived` built under ``kind`` (``"csr_t"`` after the job that needed it: scale distillation)."""
        if self._derived:
            self._derived.pop(kind, None)
        dequant_cache.forget(self, kind)

    def _version_of(self, source: torch.Tensor) -> Optional[int]:
        """``source``'s version counter. A part viewed under ``torch.inference_mode`` (a server's forward) is an
        inference tensor, which has none: the blob it views counts its writes (views share the counter), else
        ``None`` (an inference-mode override: only replacing it, a new address, refreshes the entry)."""
        if not source.is_inference():
            return source._version
        blob = self._blob()
        return None if blob.is_inference() else blob._version

    def part(self, key: str) -> Optional[torch.Tensor]:
        """A view of part ``key`` of the blob (``None`` if the layout has no such part)."""
        if self._overrides and key in self._overrides:
            return self._overrides[key]
        seg = self._segs.by_key.get(key)
        if seg is None:
            return None
        return self._blob()[seg.offset : seg.offset + seg.nbytes].view(seg.dtype).view(seg.shape)

    def replace_part(self, key: str, value: torch.Tensor) -> None:
        """Assigning a part stores it in a new blob (views of the old one keep the old values)."""
        seg = self._segs.by_key.get(key)
        if seg is None or tuple(value.shape) != seg.shape:
            want = "no such part" if seg is None else f"shape {seg.shape}"
            raise AttributeError(f"cannot assign a tensor of shape {tuple(value.shape)} to part {key!r} ({want})")
        blob = self._blob().clone()
        blob[seg.offset : seg.offset + seg.nbytes].view(seg.dtype).view(seg.shape).copy_(value)
        self._set_blob(blob)

    @property
    def overridden(self) -> bool:
        """Whether some part is being computed from an override rather than the stored bytes."""
        return bool(self._overrides)

    def override(self, key: str, value: Optional[torch.Tensor]) -> None:
        """Compute with ``value`` in place of part ``key`` (``None``: back to the stored bytes)."""
        overrides = dict(self._overrides or {})
        if value is None:
            overrides.pop(key, None)
        else:
            overrides[key] = value
        self._overrides = overrides or None


class OwnBlob(BlobStore):
    """The blob of a part made on its own (outside a `PackedDelta`), on the CPU."""

    __slots__ = ("_segs", "_data", "_overrides", "_derived")

    def __init__(self, segs: Segments) -> None:
        self._segs, self._overrides, self._derived = segs, None, None
        self._data = torch.zeros(segs.nbytes, dtype=torch.uint8)

    def _blob(self) -> torch.Tensor:
        return self._data

    def _set_blob(self, blob: torch.Tensor) -> None:
        self._data = blob


def part_property(name: str, doc: str = "") -> Any:
    """``obj.<name>``: the view of part ``obj._prefix + name`` in ``obj._store`` (assignable, see `replace_part`)."""

    def get(self: Any) -> Optional[torch.Tensor]:
        return self._store.part(self._prefix + name)

    def set(self: Any, value: torch.Tensor) -> None:
        self._store.replace_part(self._prefix + name, value)

    return property(get, set, doc=doc)


class QuantizedFactor:
    """One `QuantizedMatrix` of a blob: ``qweight``, ``qweight_hi``, ``scales``, ``zeros`` (views; absent: None)."""

    __slots__ = ("_store", "_prefix", "rows", "cols", "bits", "group_size")

    qweight = part_property("qweight")
    qweight_hi = part_property("qweight_hi")
    scales = part_property("scales")
    zeros = part_property("zeros")

    def __init__(self, store: BlobStore, prefix: str, rows: int, cols: int, bits: int, group_size: int) -> None:
        self._store, self._prefix = store, prefix
        self.rows, self.cols, self.bits = rows, cols, bits
        self.group_size = group_size if bits != 16 else 0

    def set(self, q: QuantizedMatrix) -> None:
        """Copy a `QuantizedMatrix` into the blob (shapes and bits must match)."""
        if tuple(q.shape) != (self.rows, self.cols) or q.bits != self.bits:
            raise AdapterFileError(
                f"factor of shape {tuple(q.shape)} at {q.bits} bits does not fit a buffer of shape "
                f"{(self.rows, self.cols)} at {self.bits} bits"
            )
        for name, t in q.tensors().items():
            getattr(self, name).copy_(t)

    def matrix(self) -> QuantizedMatrix:
        """A `QuantizedMatrix` view of the blob (no copy)."""
        return QuantizedMatrix.of(self)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.matrix().dequantize(dtype)

    def buffers(self) -> Iterator[torch.Tensor]:
        """Its stored tensors (views), as its buffers were when it was a module."""
        yield from self.matrix().tensors().values()

    def __repr__(self) -> str:
        return f"QuantizedFactor({self.rows}x{self.cols}, bits={self.bits}, group_size={self.group_size})"


class BandOfVectors:
    """What every band of singular vectors shares (dense `DeltaBand`, sparse `SparseBand`): ``s`` and the factors
    ``v`` and ``u``, each a view into the delta's blob (the classes define ``s``, ``v`` and ``u``)."""

    __slots__ = ()

    def set(self, v: QuantizedMatrix, u: QuantizedMatrix, s: torch.Tensor) -> None:
        """Store ``Vᵀ`` and ``U`` as the band's layout holds them (codes, scales, zeros) and ``S``."""
        self.v.set(v)
        self.u.set(u)
        self.s.copy_(s.to(torch.float32))

    def decoded_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` in ``dtype`` with ``x @ A @ B`` the band's product: ``A = [S ⊙ Vᵀ]ᵀ`` (``in x rank``) and
        ``B = Uᵀ`` (``rank x out``), on the band's device (what the PyTorch path multiplies by, cached)."""
        return (self.vt_dense(dtype) * self.s.to(dtype)[:, None]).t(), self.ut_dense(dtype)

    def buffers(self) -> Iterator[torch.Tensor]:
        """Its stored tensors (views: ``s``, then V's and U's), as its buffers were when bands were modules."""
        yield self.s
        yield from self.v.buffers()
        yield from self.u.buffers()
