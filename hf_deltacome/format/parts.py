"""The optional parts of a `~.storage.PackedDelta` beside its dense bands, none read by the Triton kernels
(``backend.py`` routes deltas that have them to the PyTorch path):

* `SignPart` — BitDelta's sign bits and scales;
* `SparsePart` — DARE's seeded random subset of the delta's entries;
* `SparseBand` — a band of singular vectors whose entries are a seeded random subset (ImPart, Delta-CoMe's sparse
  tail). Both seeded parts draw their masks with :func:`sparse_mask`, regenerated at load (never stored).

State-dict keys under ``<module>.deltacome_delta.<adapter>.``: ``sign.{qweight,scale,row_mask}``,
``sparse.values.{qweight,qweight_hi,scales,zeros}``, ``sparse_bands.<k>.{v,u}.{qweight,...}`` and
``sparse_bands.<k>.s``.
"""

from __future__ import annotations

import torch

from ..errors import AdapterFileError
from .buffers import FixedDtypeModule, QuantizedFactor
from .packing import QuantizedMatrix, pack_bits, packed_words, stored_nbytes, unpack_bits


def sign_part_nbytes(out_features: int, in_features: int, rows: int, per_row: bool) -> int:
    """Exact bytes of a `SignPart` keeping ``rows`` of ``out_features`` rows (sign plane, scales, row mask)."""
    if rows <= 0:
        return 0
    nbytes = rows * packed_words(in_features, 1) * 4 + (rows if per_row else 1) * 4
    if rows < out_features:
        nbytes += packed_words(out_features, 1) * 4
    return nbytes


class SignPart(FixedDtypeModule):
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


class SparsePart(FixedDtypeModule):
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


def sparse_band_masks(
    out_features: int, in_features: int, rank: int, keep: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masks of a `SparseBand`: kept entries of ``Vᵀ`` (``rank x in``, drawn from ``seed``) and of ``Uᵀ``
    (``rank x out``, from ``seed + 1``), by DARE's :func:`sparse_mask`."""
    return sparse_mask(rank, in_features, keep, seed), sparse_mask(rank, out_features, keep, seed + 1)


def sparse_band_nbytes(bits: int, rank: int, nnz: tuple[int, int] | list[int], group_size: int) -> int:
    """Exact bytes of a `SparseBand`: the kept values of ``Vᵀ`` and ``Uᵀ`` (one flat row each) and ``S``."""
    if rank <= 0:
        return 0
    return stored_nbytes(1, int(nnz[0]), bits, group_size) + stored_nbytes(1, int(nnz[1]), bits, group_size) + 4 * rank


class SparseBand(FixedDtypeModule):
    """``rank`` singular vectors with a random share ``keep`` of their entries (ImPart; Delta-CoMe's sparse tail).

    ``Vᵀ`` (``rank x in``) and ``Uᵀ`` (``rank x out``) keep the entries under the masks ``sparse_mask(rank, in, keep,
    seed)`` and ``sparse_mask(rank, out, keep, seed + 1)`` (DARE's generator; regenerated at load and checked
    against ``nnz``). Only the kept values are stored, vector after vector in row-major order, as one flat row each
    (``v``: ``1 x nnz[0]``, ``u``: ``1 x nnz[1]``) quantized in groups of ``group_size`` along it; every vector was
    scaled to unit RMS before quantizing, its scale folded into ``s`` (``rank`` float32), so groups that straddle
    two vectors see one magnitude.
    """

    def __init__(
        self, out_features: int, in_features: int, bits: int, rank: int, keep: float, seed: int,
        nnz: tuple[int, int] | list[int], group_size: int,
    ) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.in_features, self.bits, self.rank = out_features, in_features, bits, rank
        self.keep, self.seed, self.nnz = float(keep), int(seed), (int(nnz[0]), int(nnz[1]))
        self.v = QuantizedFactor(1, self.nnz[0], bits, group_size)
        self.u = QuantizedFactor(1, self.nnz[1], bits, group_size)
        self.register_buffer("s", torch.zeros(rank, dtype=torch.float32))

    @classmethod
    def from_layout(cls, out_features: int, in_features: int, entry: dict, group_size: int) -> SparseBand:
        return cls(out_features, in_features, int(entry["bits"]), int(entry["rank"]), float(entry["keep"]),
                   int(entry["seed"]), entry["nnz"], group_size)  # fmt: skip

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept entries of ``Vᵀ`` (``rank x in``) and ``Uᵀ`` (``rank x out``), regenerated from the seed."""
        mv, mu = sparse_band_masks(self.out_features, self.in_features, self.rank, self.keep, self.seed)
        got = (int(mv.sum()), int(mu.sum()))
        if got != self.nnz:
            raise AdapterFileError(
                f"sparse band of {self.rank} vectors ({self.out_features}x{self.in_features}): the masks regenerated "
                f"from seed {self.seed} keep {list(got)} entries but {list(self.nnz)} values are stored"
            )
        return mv, mu

    def set(self, v: QuantizedMatrix, u: QuantizedMatrix, s: torch.Tensor) -> None:
        """Store the kept values of ``Vᵀ`` and ``Uᵀ`` (flat rows, in mask order) and ``S``."""
        self.v.set(v)
        self.u.set(u)
        self.s.copy_(s.to(torch.float32))

    def _scatter(self, values: QuantizedFactor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w = torch.zeros(mask.shape, dtype=dtype, device=values.qweight.device)
        w[mask.to(w.device)] = values.dequantize(dtype).reshape(-1)
        return w

    def vt_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``V_kᵀ`` (``rank x in``), dropped entries zero."""
        return self._scatter(self.v, self.masks()[0], dtype)

    def ut_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``U_kᵀ`` (``rank x out``), dropped entries zero."""
        return self._scatter(self.u, self.masks()[1], dtype)

    def u_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.ut_dense(dtype).t()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, bits={self.bits}, keep={self.keep:.4f}, nnz={list(self.nnz)}, seed={self.seed}"
