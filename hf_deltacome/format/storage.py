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
from .packing import QuantizedMatrix, expected_tensor_shapes, pack_bits, packed_words, unpack_bits

FORMAT_VERSION = 2  # of newly written adapters; layout entries without "format" are format 1


class _FixedDtypeModule(nn.Module):
    """A module whose buffers keep their stored dtypes: ``.to(dtype)``, ``.half()`` etc. only move devices.

    Packed codes, float16 scales and float32 singular values are the file format; casting them to the model's
    dtype (as ``model.to(torch.bfloat16)`` or PEFT's device/dtype alignment would) loses precision for nothing.
    """

    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - torch API
        if recurse:
            for child in self.children():
                child._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self


class QuantizedFactor(_FixedDtypeModule):
    """Buffers of one `QuantizedMatrix` (``qweight``, ``qweight_hi``, ``scales``, ``zeros``)."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int) -> None:
        super().__init__()
        self.rows, self.cols, self.bits = rows, cols, bits
        self.group_size = group_size if bits != 16 else 0
        for name, (shape, dtype) in expected_tensor_shapes(rows, cols, bits, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))

    def set(self, q: QuantizedMatrix) -> None:
        """Copy a `QuantizedMatrix` into the buffers (shapes and bits must match)."""
        if tuple(q.shape) != (self.rows, self.cols) or q.bits != self.bits:
            raise AdapterFileError(
                f"factor of shape {tuple(q.shape)} at {q.bits} bits does not fit a buffer of shape "
                f"{(self.rows, self.cols)} at {self.bits} bits"
            )
        for name, t in q.tensors().items():
            getattr(self, name).copy_(t)

    def matrix(self) -> QuantizedMatrix:
        """A `QuantizedMatrix` view of the buffers (no copy)."""
        return QuantizedMatrix(
            qweight=self.qweight,
            scales=getattr(self, "scales", None),
            zeros=getattr(self, "zeros", None),
            bits=self.bits,
            group_size=self.group_size,
            shape=(self.rows, self.cols),
            qweight_hi=getattr(self, "qweight_hi", None),
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.matrix().dequantize(dtype)

    def extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, bits={self.bits}, group_size={self.group_size}"


class DeltaBand(_FixedDtypeModule):
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

    def u_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``U_k`` (``out x rank``) dequantized, whichever way it is stored."""
        w = self.u.dequantize(dtype)
        return w.t() if self.u_transposed else w

    def ut_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``U_kᵀ`` (``rank x out``) dequantized."""
        w = self.u.dequantize(dtype)
        return w if self.u_transposed else w.t()


class PackedDelta(_FixedDtypeModule):
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
        """True when a baseline part (sign bits or sparse values) is present: the Triton kernels read bands only."""
        return self.sign is not None or self.sparse is not None

    @property
    def rank(self) -> int:
        return sum(r for _, r in self.layout)

    def set_band(self, k: int, v: QuantizedMatrix, u: QuantizedMatrix, s: torch.Tensor) -> None:
        """Fill band ``k`` (index among the non-empty bands)."""
        self.bands[k].set(v, u, s)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``out x in`` delta ``Σ_k U_k diag(S_k) V_kᵀ`` (for merging and export)."""
        w = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self._device())
        for band in self.bands:
            w += (band.u_dense() * band.s) @ band.v.dequantize()
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


# ================================================================================ optional baseline parts
# These parts are not read by the Triton kernels (backend.py routes deltas that have them to the PyTorch path).
# State-dict keys: ``<module>.deltacome_delta.<adapter>.sign.{qweight,scale,row_mask}`` and
# ``<module>.deltacome_delta.<adapter>.sparse.values.{qweight,qweight_hi,scales,zeros}``.


def sign_part_nbytes(out_features: int, in_features: int, rows: int, per_row: bool) -> int:
    """Exact bytes of a `SignPart` keeping ``rows`` of ``out_features`` rows (sign plane, scales, row mask)."""
    if rows <= 0:
        return 0
    nbytes = rows * packed_words(in_features, 1) * 4 + (rows if per_row else 1) * 4
    if rows < out_features:
        nbytes += packed_words(out_features, 1) * 4
    return nbytes


class SignPart(_FixedDtypeModule):
    """BitDelta storage: ``Δ[rows] ≈ scale ⊙ sign``, one bit per weight plus one float32 scale per matrix or row.

    ``qweight`` (int32, ``k x ceil(n/32)``) holds the sign bits (1 = positive) of the ``k`` kept rows, packed like a
    1-bit `QuantizedMatrix`; ``scale`` is ``(1,)`` (per matrix) or ``(k,)`` (per row); ``row_mask`` (int32,
    ``1 x ceil(out/32)``, one bit per output row) marks the kept rows and is only stored when ``k < out_features``
    (at ratios below 1/16 one bit per weight does not fit, so only the rows that matter most keep their signs).
    """

    def __init__(self, out_features: int, in_features: int, rows: int, per_row: bool) -> None:
        super().__init__()
        if not 0 < rows <= out_features:
            raise AdapterFileError(f"sign part keeps {rows} rows of a {out_features}x{in_features} delta")
        self.out_features, self.in_features, self.rows, self.per_row = out_features, in_features, rows, per_row
        self.register_buffer("qweight", torch.zeros(rows, packed_words(in_features, 1), dtype=torch.int32))
        self.register_buffer("scale", torch.zeros(rows if per_row else 1, dtype=torch.float32))
        if rows < out_features:
            self.register_buffer("row_mask", torch.zeros(1, packed_words(out_features, 1), dtype=torch.int32))
        else:
            self.row_mask = None

    @classmethod
    def from_layout(cls, out_features: int, in_features: int, entry: dict) -> SignPart:
        return cls(out_features, in_features, int(entry["rows"]), entry.get("scale", "matrix") == "row")

    def set(self, positive: torch.Tensor, scale: torch.Tensor, row_index: torch.Tensor | None = None) -> None:
        """Store the sign pattern (``k x n`` bool, True = positive), the scale(s) and the kept rows."""
        if tuple(positive.shape) != (self.rows, self.in_features):
            raise AdapterFileError(
                f"sign pattern of shape {tuple(positive.shape)} does not fit a sign part of "
                f"{self.rows}x{self.in_features}"
            )
        self.qweight.copy_(pack_bits(positive.to(torch.int64), 1).to(self.qweight.device))
        self.scale.copy_(scale.reshape(self.scale.shape).to(self.scale.device, torch.float32))
        if self.row_mask is not None:
            if row_index is None or row_index.numel() != self.rows:
                raise AdapterFileError(f"sign part keeps {self.rows} rows but got row index {row_index!r}")
            mask = torch.zeros(1, self.out_features, dtype=torch.int64)
            mask[0, row_index.long().cpu()] = 1
            if int(mask.sum()) != self.rows:
                raise AdapterFileError(f"sign part row index {row_index.tolist()} repeats rows")
            self.row_mask.copy_(pack_bits(mask, 1).to(self.row_mask.device))

    def row_index(self) -> torch.Tensor | None:
        """Indices of the kept rows in increasing order (``None`` when every row is kept)."""
        if self.row_mask is None:
            return None
        idx = unpack_bits(self.row_mask, 1, self.out_features)[0].nonzero().flatten()
        if idx.numel() != self.rows:
            raise AdapterFileError(f"sign part row mask marks {idx.numel()} rows, the layout says {self.rows}")
        return idx

    def signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``k x n`` matrix of ±1."""
        return unpack_bits(self.qweight, 1, self.in_features).to(dtype) * 2 - 1

    def scaled_signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale ⊙ sign`` of the kept rows (``k x n``); differentiable in ``scale``."""
        scale = self.scale.to(dtype)
        return self.signs(dtype) * (scale.unsqueeze(1) if self.per_row else scale)

    def delta_weight(self) -> torch.Tensor:
        w = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.qweight.device)
        idx = self.row_index()
        w[idx if idx is not None else slice(None)] = self.scaled_signs()
        return w

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``Δ̂ x`` in ``x``'s dtype, shape ``(..., out_features)``."""
        part = x @ self.scaled_signs(x.dtype).t()
        idx = self.row_index()
        if idx is None:
            return part
        y = x.new_zeros(*part.shape[:-1], self.out_features)
        return y.index_copy(-1, idx.to(part.device), part)

    def extra_repr(self) -> str:
        return f"rows={self.rows}/{self.out_features}, in={self.in_features}, per_row={self.per_row}"


def sparse_mask(out_features: int, in_features: int, keep: float, seed: int) -> torch.Tensor:
    """The random keep-mask of a `SparsePart`: regenerated from ``seed`` on the CPU, never stored."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.rand(out_features, in_features, generator=g) < float(keep)


class SparsePart(_FixedDtypeModule):
    """DARE storage: the delta's entries kept by a seeded random mask, rescaled and quantized as one flat row.

    Only the values are stored (``values``: a ``1 x nnz`` `QuantizedMatrix` in row-major order of the kept
    entries); the mask is regenerated from ``seed`` and ``keep`` in the layout, and checked against ``nnz``.
    """

    def __init__(
        self, out_features: int, in_features: int, nnz: int, keep: float, seed: int, bits: int, group_size: int
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.nnz, self.keep, self.seed, self.bits = nnz, float(keep), int(seed), bits
        self.values = QuantizedFactor(1, nnz, bits, group_size)
        self._cache: tuple | None = None

    @classmethod
    def from_layout(cls, out_features: int, in_features: int, entry: dict) -> SparsePart:
        return cls(
            out_features,
            in_features,
            int(entry["nnz"]),
            float(entry["keep"]),
            int(entry["seed"]),
            int(entry["bits"]),
            int(entry.get("group_size", 128)),
        )

    def mask(self) -> torch.Tensor:
        mask = sparse_mask(self.out_features, self.in_features, self.keep, self.seed)
        if int(mask.sum()) != self.nnz:
            raise AdapterFileError(
                f"sparse part of a {self.out_features}x{self.in_features} delta: the mask regenerated from seed "
                f"{self.seed} keeps {int(mask.sum())} entries but {self.nnz} values are stored"
            )
        return mask

    def delta_weight(self) -> torch.Tensor:
        """Dense delta; cached until the stored values change (in-place copies bump the tensor version)."""
        q = self.values.qweight
        key = (q.data_ptr(), q._version, q.device)
        if self._cache is None or self._cache[0] != key:
            w = torch.zeros(self.out_features, self.in_features, dtype=torch.float32)
            w[self.mask()] = self.values.dequantize().reshape(-1).cpu()
            self._cache = (key, w.to(q.device))
        return self._cache[1]

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.delta_weight().to(x.dtype).t()

    def extra_repr(self) -> str:
        return f"nnz={self.nnz}, keep={self.keep:.4f}, bits={self.bits}, seed={self.seed}"
