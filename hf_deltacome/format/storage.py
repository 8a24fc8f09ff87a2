"""`PackedDelta`: the packed factors of one adapter on one target linear, held as buffers.

This module only stores and exposes the data; ``backend.py`` computes with it and ``layer.py`` plugs it into PEFT.
Its module tree *is* the file format: the state-dict keys under ``<module>.deltacome_delta.`` and their shapes and
dtypes come from here (:func:`layout_tensors`), for allocating buffers, validating files and counting bytes alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..errors import AdapterFileError
from .buffers import FixedDtypeModule, QuantizedFactor
from .packing import QuantizedMatrix
from .parts import (
    SignPart,
    SparseBand,
    SparsePart,
    sign_part_nbytes,
    sparse_band_masks,
    sparse_band_nbytes,
    sparse_mask,
)

__all__ = [  # the optional parts are re-exported: importers see the whole format here
    "FORMAT_VERSION", "DeltaBand", "FixedDtypeModule", "PackedDelta", "QuantizedFactor", "SignPart", "SparseBand",
    "SparsePart", "TensorSpec", "layout_tensors", "plane_bits", "sign_part_nbytes", "sparse_band_masks",
    "sparse_band_nbytes", "sparse_mask",
]  # fmt: skip

FORMAT_VERSION = 2  # of newly written adapters; layout entries without "format" are format 1


class DeltaBand(FixedDtypeModule):
    """One band: ``V_kᵀ`` (``rank x in``), ``U_k`` and ``S_k`` (``rank``, float32).

    Format 2 stores ``U_kᵀ`` (``rank x out``, groups along ``out``: one scale per singular vector and group of output
    rows); format 1 stored ``U_k`` (``out x rank``, groups along ``rank``: one scale per output row and group).
    """

    def __init__(
        self, out_features: int, in_features: int, bits: int, rank: int, group_size: int, u_transposed: bool = True
    ) -> None:
        super().__init__()
        self.bits, self.rank, self.u_transposed = bits, rank, u_transposed
        self.v = QuantizedFactor(rank, in_features, bits, group_size)
        if u_transposed:
            self.u = QuantizedFactor(rank, out_features, bits, group_size)
        else:
            self.u = QuantizedFactor(out_features, rank, bits, group_size)
        self.register_buffer("s", torch.zeros(rank, dtype=torch.float32))

    def set(self, v: QuantizedMatrix, u: QuantizedMatrix, s: torch.Tensor) -> None:
        """Store ``V_kᵀ``, ``U_k`` as this band's format holds it (``U_kᵀ`` in format 2) and ``S_k``."""
        self.v.set(v)
        self.u.set(u)
        self.s.copy_(s.to(torch.float32))

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


class PackedDelta(FixedDtypeModule):
    """All bands (and the optional dense bias delta) of one adapter on one ``out x in`` linear.

    Format 2 (``format`` in the layout entry; absent = format 1) keeps every buffer of the module in one ``uint8``
    tensor, ``blob``, the only tensor saved for the module: the bands' codes, scales, zeros and singular values,
    the bias delta and the baselines' parts are views into it, laid out by :meth:`_segments` (int32 codes first,
    then float32, float16, uint8, each in module order, so no segment needs padding). One tensor per module keeps
    the safetensors header small (4,471 names on SmolLM2 in format 1). Format 1 saved every buffer separately.
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
    ) -> None:
        super().__init__()
        if format not in (1, 2):
            raise AdapterFileError(f"unknown adapter format {format!r}; this version reads formats 1 and 2")
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self.format = format
        self.layout = [(int(b), int(r)) for b, r in bands]
        self.bands = nn.ModuleList(
            [DeltaBand(out_features, in_features, b, r, group_size, u_transposed=format >= 2)
             for b, r in self.layout if r > 0]
        )  # fmt: skip
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None
        # optional parts of the baselines (see `SignPart`, `SparsePart`); absent for Delta-CoMe deltas
        self.sign = SignPart.from_layout(out_features, in_features, sign) if sign else None
        self.sparse = SparsePart.from_layout(out_features, in_features, sparse) if sparse else None
        # bands of sparse singular vectors after the dense ones (ImPart, the sparse tail; see `SparseBand`)
        self.sparse_bands = nn.ModuleList(
            [SparseBand.from_layout(out_features, in_features, e, group_size) for e in sparse_bands if e["rank"] > 0]
        )
        self._views: list[tuple[nn.Module, str, int, torch.Size, torch.dtype]] = []
        if format >= 2:
            self._into_blob()

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
        )

    # -- the blob (format 2) ---------------------------------------------------------------------------------
    def _into_blob(self) -> None:
        parts = [(mod, name, buf) for mod in self.modules() for name, buf in mod._buffers.items() if buf is not None]
        parts.sort(key=lambda p: -p[2].element_size())  # stable: module order within each item size
        offset = 0
        for mod, name, buf in parts:
            self._views.append((mod, name, offset, buf.shape, buf.dtype))
            offset += buf.numel() * buf.element_size()
            mod._non_persistent_buffers_set.add(name)
        self.register_buffer("blob", torch.zeros(offset, dtype=torch.uint8, device=parts[0][2].device if parts else None))
        self._rebind()

    def _rebind(self) -> None:
        """Point every part at its bytes of ``blob`` (after it was allocated, moved or loaded)."""
        blob = self._buffers["blob"]
        for mod, name, offset, shape, dtype in self._views:
            nbytes = shape.numel() * dtype.itemsize
            mod._buffers[name] = blob[offset : offset + nbytes].view(dtype).view(shape)
        if self.sparse is not None:
            self.sparse._cache = None

    def segments(self) -> list[tuple[str, int, torch.Size, torch.dtype]]:
        """``(key, byte offset, shape, dtype)`` of every part inside ``blob`` (format 2), keys as in format 1."""
        names = {id(mod): prefix for prefix, mod in self.named_modules()}
        return [(f"{names[id(mod)]}.{name}".lstrip("."), off, shape, dtype)
                for mod, name, off, shape, dtype in self._views]  # fmt: skip

    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - torch API
        if not self._views:
            return super()._apply(fn, recurse)
        blob = self._buffers["blob"]
        moved = fn(blob)
        self._buffers["blob"] = moved if moved.dtype == blob.dtype else blob.to(moved.device)
        self._rebind()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch API
        blob = self._buffers.get("blob")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self._views and self._buffers.get("blob") is not blob:  # replaced (assign=True), not copied into
            self._rebind()
        elif self.sparse is not None:
            self.sparse._cache = None

    @property
    def has_extra_parts(self) -> bool:
        """True when a part beside the dense bands is present (sign bits, sparse values, sparse bands): the Triton
        kernels read dense bands only, so such deltas take the PyTorch path."""
        return self.sign is not None or self.sparse is not None or len(self.sparse_bands) > 0

    @property
    def low_rank_bands(self) -> list:
        """Every band as stored, dense then sparse: each has ``s``, ``vt_dense(dtype)`` and ``ut_dense(dtype)``."""
        return [*self.bands, *self.sparse_bands]

    @property
    def rank(self) -> int:
        return sum(r for _, r in self.layout) + sum(b.rank for b in self.sparse_bands)

    def set_band(self, k: int, v: QuantizedMatrix, u: QuantizedMatrix, s: torch.Tensor) -> None:
        """Fill band ``k`` (index among the non-empty bands)."""
        self.bands[k].set(v, u, s)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``out x in`` delta ``Σ_k U_k diag(S_k) V_kᵀ`` (for merging and export)."""
        w = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self._device())
        for band in self.low_rank_bands:
            w += (band.ut_dense().t() * band.s) @ band.vt_dense()
        if self.sign is not None:
            w += self.sign.delta_weight().to(w.device)
        if self.sparse is not None:
            w += self.sparse.delta_weight().to(w.device)
        return w.to(dtype)

    def version_stamp(self) -> tuple:
        """Changes whenever the stored bytes may have (a buffer replaced, moved, or written in place; tensors made
        under ``torch.inference_mode`` have no version counter and can only be seen being replaced)."""
        blob = self._buffers.get("blob")
        tensors = [blob] if blob is not None else [b for b in self.buffers()]
        return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)

    def nbytes(self) -> int:
        """Exact bytes of every saved buffer (what the adapter file stores for this module)."""
        return sum(b.numel() * b.element_size() for b in self.state_dict().values())

    def _device(self) -> torch.device:
        for b in self.buffers():
            return b.device
        return torch.device("cpu")


class TensorSpec(NamedTuple):
    """What the file must hold for one buffer of a layout entry."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    bits: int  # bit width of the codes (0: not a code tensor)
    cols: int | None  # values per row of a packed plane (its padding must be zero); None: not a packed plane
    offset: int | None = None  # byte offset inside the module's blob (format 2 parts)


def layout_tensors(entry: dict, group_size: int = 128, *, parts: bool = False) -> dict[str, TensorSpec]:
    """Every tensor of one ``adapter_config.json`` layout entry, by key relative to ``<module>.deltacome_delta``.

    Built from the runtime module itself on the meta device (nothing is allocated), so the loader, the validator
    and the byte counts can never disagree about the format. In format 2 the file holds one ``blob``; with
    ``parts=True`` the parts inside it are listed instead (their ``offset`` within the blob set).
    """
    with torch.device("meta"):
        packed = PackedDelta.from_layout(entry, group_size)
    factors = {name: mod for name, mod in packed.named_modules() if isinstance(mod, QuantizedFactor)}
    out: dict[str, TensorSpec] = {}
    if parts and packed.format >= 2:
        items = [(key, torch.empty(shape, dtype=dtype, device="meta"), off) for key, off, shape, dtype in packed.segments()]
    else:
        items = [(key, t, None) for key, t in packed.state_dict().items()]
    for key, t, offset in items:
        owner, _, leaf = key.rpartition(".")
        factor = factors.get(owner)
        bits = factor.bits if factor is not None else 0
        cols = factor.cols if factor is not None and leaf in ("qweight", "qweight_hi") and factor.bits != 16 else None
        out[key] = TensorSpec(tuple(t.shape), t.dtype, bits, cols, offset)
    return out


def plane_bits(key: str, bits: int) -> int:
    """Bits per value of the packed plane ``key`` of a ``bits``-bit factor (3-bit: 2-bit plane + 1-bit plane)."""
    return 1 if key.endswith("_hi") else (2 if bits == 3 else bits)

