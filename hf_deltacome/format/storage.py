"""`PackedDelta`: the packed factors of one adapter on one target linear, held in one ``uint8`` buffer.

This module only stores and exposes the data; ``backend.py`` computes with it and ``layer.py`` plugs it into PEFT.
It *is* the file format: the state-dict keys under ``<module>.deltacome_delta.`` and their shapes, dtypes and
offsets come from here (:func:`layout_tensors`), for allocating buffers, validating files and counting bytes alike.
The blob and its views are in ``format/blob.py``, the baselines' parts in ``format/baseline_parts.py``, the sparse
bands (impart, the sparse tail) in ``format/sparse_bands.py``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import AdapterFileError
from .baseline_parts import SignPart, SparsePart, rate_nbytes, sign_part_nbytes, sparse_mask
from .blob import BandOfVectors, BlobStore, QuantizedFactor, Segments, factor_parts, part_property
from .packing import QuantizedMatrix
from .sparse_bands import SparseBand, sparse_band_key, sparse_band_masks, sparse_band_nbytes
from .vq_part import VectorPart, vq_part_nbytes

__all__ = [  # the parts are re-exported: importers see the whole format here
    "FORMAT_VERSION", "HASH_FORMAT", "RATED_FORMAT", "READ_FORMATS", "SPARSE_BANDS_HASH_FORMAT", "DeltaBand",
    "PackedDelta", "QuantizedFactor", "SignPart", "SparseBand", "SparsePart", "TensorSpec", "blob_state_dicts",
    "layout_tensors", "plane_bits", "rate_nbytes", "sign_part_nbytes", "sparse_band_masks", "sparse_band_nbytes",
    "sparse_mask", "VQ_FORMAT", "VectorPart", "vq_part_nbytes",
]  # fmt: skip

FORMAT_VERSION = 2  # of newly written adapters; layout entries without "format" are format 1
RATED_FORMAT = 3  # format 2 plus an importance-rated DARE part ("rates" in "sparse"): written only for such entries
VQ_FORMAT = 4  # format 3 plus a vector-quantized part ("vq", format/vq_part.py): written only for such entries
HASH_FORMAT = 5  # format 4 plus a DARE part whose mask is drawn by a hash ("draws": "hash", format/draws.py)
SPARSE_BANDS_HASH_FORMAT = 6  # format 5 plus sparse bands whose masks are drawn by the hash ("draws": "hash")
READ_FORMATS = (1, 2, 3, 4, 5, 6)  # what this version reads (an older reader refuses a newer entry by its version)
_BLOB_KEYS: contextvars.ContextVar[bool] = contextvars.ContextVar("deltacome_blob_keys", default=False)


@contextlib.contextmanager
def blob_state_dicts() -> Iterator[None]:
    """Inside the block every `PackedDelta` (format 1 too) shows its runtime form in state dicts: one ``blob``.

    For loaders that set tensors by attribute path after matching the model's state-dict keys (transformers'
    ``load_adapter``): the parts of a format-1 module are views, not attributes they could set."""
    token = _BLOB_KEYS.set(True)
    try:
        yield
    finally:
        _BLOB_KEYS.reset(token)



class DeltaBand(BandOfVectors):
    """One band: ``V_kᵀ`` (``rank x in``), ``U_k`` and ``S_k`` (``rank``, float32), views into the delta's blob.

    Format 2 stores ``U_kᵀ`` (``rank x out``, groups along ``out``: one scale per singular vector and group of output
    rows); format 1 stored ``U_k`` (``out x rank``, groups along ``rank``: one scale per output row and group).
    """

    __slots__ = ("_store", "_prefix", "bits", "rank", "u_transposed", "v", "u")

    s = part_property("s")

    def __init__(
        self, store: BlobStore, prefix: str, out_features: int, in_features: int, bits: int, rank: int,
        group_size: int, u_transposed: bool = True,
    ) -> None:  # fmt: skip
        self._store, self._prefix = store, prefix
        self.bits, self.rank, self.u_transposed = bits, rank, u_transposed
        self.v = QuantizedFactor(store, prefix + "v.", rank, in_features, bits, group_size)
        u_shape = (rank, out_features) if u_transposed else (out_features, rank)
        self.u = QuantizedFactor(store, prefix + "u.", *u_shape, bits, group_size)

    @staticmethod
    def parts(prefix: str, out_features: int, in_features: int, bits: int, rank: int, group_size: int,
              u_transposed: bool) -> list[tuple]:  # fmt: skip
        """Segment specs of one band under ``prefix``: ``s``, then V's and U's tensors (the old module order)."""
        u_shape = (rank, out_features) if u_transposed else (out_features, rank)
        return [
            (prefix + "s", (rank,), torch.float32, 0, None),
            *factor_parts(prefix + "v.", rank, in_features, bits, group_size),
            *factor_parts(prefix + "u.", *u_shape, bits, group_size),
        ]

    def vt_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``V_kᵀ`` (``rank x in``) dequantized."""
        return self.v.dequantize(dtype)

    def u_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``U_k`` (``out x rank``) dequantized, whichever way it is stored."""
        w = self.u.dequantize(dtype)
        return w.t() if self.u_transposed else w

    def ut_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``U_kᵀ`` (``rank x out``) dequantized."""
        w = self.u.dequantize(dtype)
        return w if self.u_transposed else w.t()

    def __repr__(self) -> str:
        return f"DeltaBand(bits={self.bits}, rank={self.rank}, v={self.v!r}, u={self.u!r})"


def _freeze(spec: dict | None) -> tuple | None:
    return tuple(sorted(spec.items())) if spec else None


@functools.lru_cache(maxsize=4096)
def _segments(
    out_features: int, in_features: int, layout: tuple, group_size: int, bias: bool, sign: tuple | None,
    sparse: tuple | None, format: int, sparse_bands: tuple = (), vq: tuple | None = None,
) -> Segments:  # fmt: skip
    """Every part of one layout entry, shared by all deltas of that layout (64 adapters of one base: one table)."""
    parts = [("bias", (out_features,), torch.float32, 0, None)] if bias else []
    bands = [(b, r) for b, r in layout if r > 0]
    for k, (b, r) in enumerate(bands):
        parts += DeltaBand.parts(f"bands.{k}.", out_features, in_features, b, r, group_size, format >= 2)
    if sign:
        entry = dict(sign)
        parts += SignPart.parts("sign.", out_features, in_features, int(entry["rows"]), entry.get("scale") == "row")
    if sparse:
        entry = dict(sparse)
        parts += SparsePart.parts("sparse.", out_features, in_features, int(entry["nnz"]), int(entry["bits"]),
                                  int(entry.get("group_size", 128)), entry.get("rates") is not None)  # fmt: skip
    for k, key in enumerate(sparse_bands):  # after every other part: default files keep their bytes
        parts += SparseBand.parts(f"sparse_bands.{k}.", key, group_size)
    if vq:
        entry = dict(vq)
        parts += VectorPart.parts("vq.", out_features, in_features, int(entry["rows"]), int(entry["dim"]),
                                  int(entry.get("codes", 16)))  # fmt: skip
    return Segments(parts)


class PackedDelta(BlobStore, nn.Module):
    """All bands (and the optional dense bias delta) of one adapter on one ``out x in`` linear, in one ``blob``.

    Every tensor of the delta (the bands' codes, scales, zeros and singular values, the bias delta, the baselines'
    parts) is a view into the ``uint8`` buffer ``blob``, laid out by its layout entry (``format/blob.py``: int32
    codes first, then float32, float16, uint8, each in the old module order, so no part needs padding) and made when
    read: the module holds one tensor, whatever the number of bands. Format 2 (``format`` in the layout entry;
    absent = format 1) saves ``blob`` as the module's only tensor (one name per module keeps the safetensors header
    small: 4,471 names on SmolLM2 in format 1); format 1 saved every part under its own key (``bands.0.v.qweight``),
    which :meth:`_save_to_state_dict` / :meth:`_load_from_state_dict` still write and read. Only devices move:
    ``.to(dtype)``, ``.half()`` etc. never cast the stored bytes.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        bands: Sequence[Sequence[int]],
        group_size: int,
        bias: bool = False,
        sign: dict | None = None,
        sparse: dict | None = None,
        format: int = FORMAT_VERSION,
        sparse_bands: Sequence[dict] = (),
        vq: dict | None = None,
    ) -> None:
        super().__init__()
        if format not in READ_FORMATS:
            raise AdapterFileError(f"unknown adapter format {format!r}; this version reads formats {READ_FORMATS}")
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self.format = format
        self.layout = tuple((int(b), int(r)) for b, r in bands)
        # bands of sparse singular vectors after the dense ones (impart, the sparse tail; see `SparseBand`)
        self._sparse_bands = tuple(sparse_band_key(e) for e in sparse_bands if int(e["rank"]) > 0)
        self._rank = sum(r for _, r in self.layout) + sum(key[1] for key in self._sparse_bands)  # fixed: per step
        self._segs = _segments(out_features, in_features, self.layout, group_size, bool(bias), _freeze(sign),
                               _freeze(sparse), format, self._sparse_bands, _freeze(vq))  # fmt: skip
        self.register_buffer("blob", torch.zeros(self._segs.nbytes, dtype=torch.uint8), persistent=format >= 2)
        self._sign = dict(sign) if sign else None
        self._sparse = dict(sparse) if sparse else None
        self._vq = dict(vq) if vq else None

    @classmethod
    def from_layout(cls, entry: dict, group_size: int = 128) -> PackedDelta:
        """Zeroed buffers for one ``adapter_config.json`` layout entry (bands, bias and optional parts)."""
        m, n = entry["shape"]
        return cls(
            m,
            n,
            entry.get("bands", []),
            entry.get("group_size", group_size),
            bias=bool(entry.get("bias", False)),
            sign=entry.get("sign"),
            sparse=entry.get("sparse"),
            format=entry.get("format", 1),
            sparse_bands=entry.get("sparse_bands", ()),
            vq=entry.get("vq"),
        )

    # -- the parts, made when read (nothing here holds a view: moving or replacing the blob leaves none stale) ----
    def _blob(self) -> torch.Tensor:
        return self._buffers["blob"]

    def _set_blob(self, blob: torch.Tensor) -> None:
        self._buffers["blob"] = blob

    @property
    def bands(self) -> tuple[DeltaBand, ...]:
        """The non-empty bands, in layout order."""
        u_t = self.format >= 2
        live = [(b, r) for b, r in self.layout if r > 0]
        return tuple(DeltaBand(self, f"bands.{k}.", self.out_features, self.in_features, b, r, self.group_size, u_t)
                     for k, (b, r) in enumerate(live))  # fmt: skip

    @property
    def bias(self) -> torch.Tensor | None:
        return self.part("bias")

    def _extra(self, cls: type, spec: dict | None, prefix: str) -> Any:
        """The part ``cls`` of the layout's ``spec`` as a view of this blob (``None`` where the layout has none)."""
        return None if spec is None else cls.from_layout(self.out_features, self.in_features, spec, store=self,
                                                         prefix=prefix)  # fmt: skip

    @property
    def sign(self) -> SignPart | None:
        return self._extra(SignPart, self._sign, "sign.")

    @property
    def sparse(self) -> SparsePart | None:
        return self._extra(SparsePart, self._sparse, "sparse.")

    @property
    def vq(self) -> VectorPart | None:
        return self._extra(VectorPart, self._vq, "vq.")

    @property
    def extra_parts(self) -> list:
        """The parts beside the bands that add their own ``Δ̂ x``: sign bits, DARE values, vector codes."""
        return [p for p in (self.sign, self.sparse, self.vq) if p is not None]

    @property
    def sparse_bands(self) -> tuple[SparseBand, ...]:
        """The non-empty sparse bands, in layout order (their masks regenerated from their seeds when read)."""
        return tuple(SparseBand(self.out_features, self.in_features, key, self.group_size, store=self,
                                prefix=f"sparse_bands.{k}.") for k, key in enumerate(self._sparse_bands))  # fmt: skip

    def segments(self) -> list[tuple[str, int, torch.Size, torch.dtype]]:
        """``(key, byte offset, shape, dtype)`` of every part inside ``blob``, in blob order, keys as in format 1."""
        return [(s.key, s.offset, torch.Size(s.shape), s.dtype) for s in self._segs.in_blob_order()]

    # -- torch plumbing --------------------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - torch API
        blob = self._buffers["blob"]
        moved = fn(blob)
        self._buffers["blob"] = moved if moved.dtype == blob.dtype else blob.to(moved.device)
        return self

    def _stored(self) -> list[tuple[str, tuple[int, ...]]]:
        """(key, shape) of what a state dict holds: the blob (format 2, or `blob_state_dicts`), else every part."""
        if self.format >= 2 or _BLOB_KEYS.get():
            return [("blob", (self._segs.nbytes,))]
        return [(seg.key, seg.shape) for seg in self._segs.order]

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D401 - torch API
        for key, _ in self._stored():
            t = self._buffers["blob"] if key == "blob" else self.part(key)
            destination[prefix + key] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        if self.format >= 2:  # the blob is a persistent buffer: torch's own loading (assign=True replaces it)
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected,
                                                 errors)  # fmt: skip
        stored = self._stored()
        known = {key for key, _ in stored}
        found = [(key, shape, state_dict[prefix + key]) for key, shape in stored if prefix + key in state_dict]
        missing.extend(prefix + key for key in known if prefix + key not in state_dict)
        if strict:
            unexpected.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in known)
        if found and self._blob().is_meta:  # injected on the meta device (PEFT's low_cpu_mem_usage)
            self._set_blob(torch.zeros(self._segs.nbytes, dtype=torch.uint8, device=found[0][2].device))
        for key, shape, t in found:
            if tuple(t.shape) != shape:
                errors.append(f"size mismatch for {prefix + key}: copying a param with shape {tuple(t.shape)} "
                              f"from checkpoint, the shape in current model is {shape}.")  # fmt: skip
                continue
            with torch.no_grad():
                (self._blob() if key == "blob" else self.part(key)).copy_(t)
        return None

    # -- what callers use ------------------------------------------------------------------------------------
    @property
    def has_extra_parts(self) -> bool:
        """True when a part beside the dense bands is present (sign bits, sparse values, sparse bands): the Triton
        kernels read dense bands; the backend adds DARE values, vector codes and (format 6) sparse bands beside them
        with their own kernels, sign bits and older files' sparse bands in PyTorch."""
        return self.full_rank or bool(self._sparse_bands)

    @property
    def full_rank(self) -> bool:
        """True when sign bits, DARE values or vector codes are stored: the delta is not the low-rank sum of its
        bands (sparse bands are; LoRA export and PEFT's conversion go through the bands' rank)."""
        return self._sign is not None or self._sparse is not None or self._vq is not None

    @property
    def has_sparse_bands(self) -> bool:
        """True when the layout holds bands of sparse singular vectors (impart, the sparse tail)."""
        return bool(self._sparse_bands)

    @property
    def low_rank_bands(self) -> list:
        """Every band as stored, dense then sparse: each has ``s``, ``vt_dense(dtype)`` and ``ut_dense(dtype)``."""
        return [*self.bands, *self.sparse_bands]

    @property
    def rank(self) -> int:
        return self._rank

    def set_band(self, k: int, v: QuantizedMatrix, u: QuantizedMatrix, s: torch.Tensor) -> None:
        """Fill band ``k`` (index among the non-empty bands)."""
        self.bands[k].set(v, u, s)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``out x in`` delta ``Σ_k U_k diag(S_k) V_kᵀ`` (for merging and export)."""
        w = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self._device())
        for band in self.low_rank_bands:
            w += (band.ut_dense().t() * band.s) @ band.vt_dense()
        for part in self.extra_parts:
            w += part.delta_weight().to(w.device)
        return w.to(dtype)

    def version_stamp(self) -> tuple:
        """Changes whenever the stored bytes may have (the blob replaced, moved, or written in place; tensors made
        under ``torch.inference_mode`` have no version counter and can only be seen being replaced)."""
        blob = self._buffers["blob"]
        return ((blob.data_ptr(), -1 if blob.is_inference() else blob._version),)

    def nbytes(self) -> int:
        """Exact bytes of every part (what the adapter file stores for this module): the blob, which has no padding."""
        return self._buffers["blob"].numel()

    def _device(self) -> torch.device:
        return self._buffers["blob"].device

    def extra_repr(self) -> str:
        """Shape, bands and every other part (a DARE-only module shows its `SparsePart`, not an empty list)."""
        others = [*map(repr, self.sparse_bands), *map(repr, self.extra_parts)]
        return ", ".join([f"{self.out_features}x{self.in_features}", f"bands={list(self.layout)}", *others,
                          f"format={self.format}"])  # fmt: skip


class TensorSpec(NamedTuple):
    """What the file must hold for one buffer of a layout entry."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    bits: int  # bit width of the codes (0: not a code tensor)
    cols: int | None  # values per row of a packed plane (its padding must be zero); None: not a packed plane
    offset: int | None = None  # byte offset inside the module's blob (format 2 parts)


def layout_tensors(entry: dict, group_size: int = 128, *, parts: bool = False) -> dict[str, TensorSpec]:
    """Every tensor of one ``adapter_config.json`` layout entry, by key relative to ``<module>.deltacome_delta``.

    Read from the very segment table the runtime `PackedDelta` uses (nothing is allocated), so the loader, the
    validator and the byte counts can never disagree about the format. In format 2 the file holds one ``blob``;
    with ``parts=True`` the parts inside it are listed instead (their ``offset`` within the blob set).
    """
    with torch.device("meta"):
        packed = PackedDelta.from_layout(entry, group_size)
    segs = packed._segs
    if packed.format >= 2 and not parts:
        return {"blob": TensorSpec((segs.nbytes,), torch.uint8, 0, None)}
    if packed.format >= 2:
        return {s.key: TensorSpec(s.shape, s.dtype, s.bits, s.cols, s.offset) for s in segs.in_blob_order()}
    return {s.key: TensorSpec(s.shape, s.dtype, s.bits, s.cols) for s in segs.order}


def plane_bits(key: str, bits: int) -> int:
    """Bits per value of the packed plane ``key`` of a ``bits``-bit factor (3-bit: 2-bit plane + 1-bit plane)."""
    return 1 if key.endswith("_hi") else (2 if bits == 3 else bits)
