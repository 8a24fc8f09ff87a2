"""Optional parts of the baselines' deltas: BitDelta's sign bits (`SignPart`) and DARE's sparse values (`SparsePart`).

They live in their `PackedDelta`'s blob like the bands (``format/blob.py``), or in a blob of their own when built
alone. The Triton kernels read DARE parts (`kernels/triton_sparse.py`), not sign parts (``backend.py`` routes
deltas that have them to the PyTorch path).
Format-1 state-dict keys: ``<module>.deltacome_delta.<adapter>.sign.{qweight,scale,row_mask}`` and
``<module>.deltacome_delta.<adapter>.sparse.values.{qweight,qweight_hi,scales,zeros}``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..errors import AdapterFileError
from .blob import BlobStore, OwnBlob, QuantizedFactor, Segments, factor_parts, part_property
from .draws import entry_draws, generator_uniform, hash_mask, hash_uniform
from .packing import pack_bits, pack_nibbles, packed_words, unpack_bits, unpack_nibbles


def sign_part_nbytes(out_features: int, in_features: int, rows: int, per_row: bool) -> int:
    """Exact bytes of a `SignPart` keeping ``rows`` of ``out_features`` rows (sign plane, scales, row mask)."""
    if rows <= 0:
        return 0
    nbytes = rows * packed_words(in_features, 1) * 4 + (rows if per_row else 1) * 4
    if rows < out_features:
        nbytes += packed_words(out_features, 1) * 4
    return nbytes


class SignPart:
    """BitDelta storage: ``Δ[rows] ≈ scale ⊙ sign``, one bit per weight plus one float32 scale per matrix or row.

    ``qweight`` (int32, ``k x ceil(n/32)``) holds the sign bits (1 = positive) of the ``k`` kept rows, packed like a
    1-bit `QuantizedMatrix`; ``scale`` is ``(1,)`` (per matrix) or ``(k,)`` (per row); ``row_mask`` (int32,
    ``1 x ceil(out/32)``, one bit per output row) marks the kept rows and is only stored when ``k < out_features``
    (at ratios below 1/16 one bit per weight does not fit, so only the rows that matter most keep their signs).
    """

    __slots__ = ("_store", "_prefix", "out_features", "in_features", "rows", "per_row")

    qweight = part_property("qweight")
    scale = part_property("scale")
    row_mask = part_property("row_mask")

    def __init__(
        self, out_features: int, in_features: int, rows: int, per_row: bool, *, store: Optional[BlobStore] = None,
        prefix: str = "",
    ) -> None:  # fmt: skip
        if not 0 < rows <= out_features:
            raise AdapterFileError(f"sign part keeps {rows} rows of a {out_features}x{in_features} delta")
        self.out_features, self.in_features, self.rows, self.per_row = out_features, in_features, rows, per_row
        self._prefix = prefix
        self._store = store if store is not None else OwnBlob(Segments(self.parts("", *self._args())))

    def _args(self) -> tuple:
        return self.out_features, self.in_features, self.rows, self.per_row

    @staticmethod
    def parts(prefix: str, out_features: int, in_features: int, rows: int, per_row: bool) -> list[tuple]:
        """Segment specs (key, shape, dtype, bits, cols) of a sign part under ``prefix``."""
        out = [
            (prefix + "qweight", (rows, packed_words(in_features, 1)), torch.int32, 0, None),
            (prefix + "scale", (rows if per_row else 1,), torch.float32, 0, None),
        ]
        if rows < out_features:
            out.append((prefix + "row_mask", (1, packed_words(out_features, 1)), torch.int32, 0, None))
        return out

    @classmethod
    def from_layout(cls, out_features: int, in_features: int, entry: dict, **where) -> SignPart:
        return cls(out_features, in_features, int(entry["rows"]), entry.get("scale", "matrix") == "row", **where)

    def set(self, positive: torch.Tensor, scale: torch.Tensor, row_index: torch.Tensor | None = None) -> None:
        """Store the sign pattern (``k x n`` bool, True = positive), the scale(s) and the kept rows."""
        if tuple(positive.shape) != (self.rows, self.in_features):
            raise AdapterFileError(
                f"sign pattern of shape {tuple(positive.shape)} does not fit a sign part of "
                f"{self.rows}x{self.in_features}"
            )
        qweight, stored_scale, row_mask = self.qweight, self.scale, self.row_mask
        qweight.copy_(pack_bits(positive.to(torch.int64), 1).to(qweight.device))
        stored_scale.copy_(scale.reshape(stored_scale.shape).to(stored_scale.device, torch.float32))
        if row_mask is not None:
            if row_index is None or row_index.numel() != self.rows:
                raise AdapterFileError(f"sign part keeps {self.rows} rows but got row index {row_index!r}")
            mask = torch.zeros(1, self.out_features, dtype=torch.int64)
            mask[0, row_index.long().cpu()] = 1
            if int(mask.sum()) != self.rows:
                raise AdapterFileError(f"sign part row index {row_index.tolist()} repeats rows")
            row_mask.copy_(pack_bits(mask, 1).to(row_mask.device))

    def row_index(self) -> torch.Tensor | None:
        """Indices of the kept rows in increasing order (``None`` when every row is kept), cached on the store until
        the mask changes: reading them syncs with the host, which a forward pass (a captured decode step) must not."""
        row_mask = self.row_mask
        if row_mask is None:
            return None

        def read() -> torch.Tensor:
            idx = unpack_bits(row_mask, 1, self.out_features)[0].nonzero().flatten()
            if idx.numel() != self.rows:
                raise AdapterFileError(f"sign part row mask marks {idx.numel()} rows, the layout says {self.rows}")
            return idx

        return self._store.derived("sign_rows", row_mask, read)

    def signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``k x n`` matrix of ±1."""
        return unpack_bits(self.qweight, 1, self.in_features).to(dtype) * 2 - 1

    def scaled_signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale ⊙ sign`` of the kept rows (``k x n``); differentiable in ``scale``."""
        scale = self.scale.to(dtype)
        return self.signs(dtype) * (scale.unsqueeze(1) if self.per_row else scale)

    def delta_weight(self) -> torch.Tensor:
        qweight = self.qweight
        w = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=qweight.device)
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

    def __repr__(self) -> str:
        return f"SignPart(rows={self.rows}/{self.out_features}, in={self.in_features}, per_row={self.per_row})"


CSR_MAX_KEEP = 0.3  # a DARE part kept up to this share runs as a CSR matrix, above it dense (SparsePart.forward_weight)
RATE_STEP = 0.25  # importance rates: log2 step between the 16 levels of a row's or column's 4-bit code
RATE_CENTER = 8  # the code of factor 1 (codes 0..15: factors 2^-2 .. 2^1.75)


def rate_nbytes(out_features: int, in_features: int) -> int:
    """Bytes of an importance-rated DARE part beside its values: 4-bit codes per row and per column, two a byte,
    and the float32 threshold."""
    return (out_features + 1) // 2 + (in_features + 1) // 2 + 4


def pack_rates(row_codes: torch.Tensor, col_codes: torch.Tensor) -> torch.Tensor:
    """The stored ``rates`` of a rated `SparsePart`: 4-bit codes (0..15) two to a byte, low nibble first, the rows
    (padded to a whole byte) then the columns (likewise); `rate_factors` reads them back."""
    return torch.cat([pack_nibbles(row_codes), pack_nibbles(col_codes)])


def rate_factors(packed: torch.Tensor, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and column factors (float32, ``2^((code − 8)·RATE_STEP)``) of packed rate codes: rows, then columns."""
    p = packed.to(torch.uint8).cpu()
    codes = unpack_nibbles(p, 2 * p.numel())
    rows, cols = (out_features + 1) // 2 * 2, (in_features + 1) // 2 * 2
    if codes.numel() != rows + cols:
        raise AdapterFileError(f"DARE rate codes: {p.numel()} bytes do not fit a {out_features}x{in_features} delta")
    table = torch.tensor([2.0 ** ((k - RATE_CENTER) * RATE_STEP) for k in range(16)], dtype=torch.float32)
    return table[codes[:out_features]], table[codes[rows : rows + in_features]]


def sparse_scores(
    out_features: int, in_features: int, seed: int, rates: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    draws: str = "generator",
) -> torch.Tensor:
    """What a `SparsePart`'s mask compares with its keep-rate or threshold: the seeded uniform draws ``u`` (float32,
    CPU; ``draws``: which generator, `format/draws.py`), divided by ``a_i b_j`` when importance ``rates`` (row and
    column factors) are given."""
    if draws == "hash":
        u = hash_uniform(out_features, in_features, seed)
    else:
        u = generator_uniform(out_features, in_features, seed)
    if rates is None:
        return u
    a, b = rates
    return u / (a.to(torch.float32).view(-1, 1) * b.to(torch.float32).view(1, -1))


def sparse_mask(
    out_features: int, in_features: int, keep: float, seed: int,
    rates: Optional[tuple[torch.Tensor, torch.Tensor]] = None, draws: str = "generator",
    device: torch.device | str = "cpu",
) -> torch.Tensor:  # fmt: skip
    """The random keep-mask of a `SparsePart` (bool, on ``device``): regenerated from ``seed``, never stored. Uniform:
    entry ``(i, j)`` is kept when its draw ``u < keep``; with importance ``rates`` (row and column factors ``a``,
    ``b``) when ``u / (a_i b_j) < keep`` (``keep`` then the stored float32 threshold): at rate ``min(1, keep a_i
    b_j)``. Uniform hashed draws are made on ``device`` itself; the others on the CPU."""
    if draws == "hash" and rates is None:
        return hash_mask(out_features, in_features, keep, seed, device)
    scores = sparse_scores(out_features, in_features, seed, rates, draws)
    mask = scores < (float(keep) if rates is None else torch.tensor(float(keep), dtype=torch.float32))
    return mask.to(device)


class _CsrProduct(torch.autograd.Function):
    """``x Δ̂ᵀ`` for a CSR ``Δ̂`` whose input gradient ``g Δ̂`` is a CSR product with a stored ``Δ̂ᵀ``: the same bits
    as torch's own backward of the product, which took 3-6x the forward's time at SmolLM2's MLP shapes and keep-rates
    0.06-0.23 on two CPU threads (the default's compression time: benchmarks/RESULTS.md, the reading at 141d693)."""

    @staticmethod
    def forward(ctx: object, flat: torch.Tensor, weight: torch.Tensor, transposed: torch.Tensor) -> torch.Tensor:
        ctx.transposed = transposed
        return torch.sparse.mm(weight, flat.t()).t()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return torch.sparse.mm(ctx.transposed, grad.t()).t(), None, None


class SparsePart:
    """DARE storage: the delta's entries kept by a seeded random mask, rescaled and quantized as one flat row.

    Only the values are stored (``values``: a ``1 x nnz`` `QuantizedFactor` in row-major order of the kept
    entries); the mask is regenerated from ``seed`` and ``keep`` in the layout, and checked against ``nnz``. An
    importance-rated part (``rates`` in the layout, format 3) also stores ``rates`` (4-bit codes of a factor per row
    and per column, `rate_factors`) and ``threshold`` (float32): the mask is ``u / (a_i b_j) < threshold``, keeping
    at most ``nnz`` entries (``nnz`` is the capacity the plan reserved; values past the kept count are zero).
    ``draws`` (``"draws"`` in the layout, format 5: ``"hash"``; absent: ``"generator"``) names how ``u`` is drawn
    (`format/draws.py`).
    """

    __slots__ = ("_store", "_prefix", "out_features", "in_features", "nnz", "keep", "seed", "bits", "rated", "draws",
                 "values")

    rates = part_property("rates")
    threshold = part_property("threshold")

    def __init__(
        self, out_features: int, in_features: int, nnz: int, keep: float, seed: int, bits: int, group_size: int,
        *, rated: bool = False, draws: str = "generator", store: Optional[BlobStore] = None, prefix: str = "",
    ) -> None:  # fmt: skip
        self.out_features, self.in_features = out_features, in_features
        self.nnz, self.keep, self.seed, self.bits, self.rated = nnz, float(keep), int(seed), bits, bool(rated)
        self.draws = draws
        if store is None:
            store = OwnBlob(Segments(self.parts("", out_features, in_features, nnz, bits, group_size, rated)))
        self._store, self._prefix = store, prefix
        self.values = QuantizedFactor(store, prefix + "values.", 1, nnz, bits, group_size)

    @staticmethod
    def parts(
        prefix: str, out_features: int, in_features: int, nnz: int, bits: int, group_size: int, rated: bool
    ) -> list[tuple]:
        """Segment specs of a sparse part under ``prefix``: the values, and the rate codes and threshold if rated."""
        out = factor_parts(prefix + "values.", 1, nnz, bits, group_size)
        if rated:
            codes = rate_nbytes(out_features, in_features) - 4
            out += [(prefix + "rates", (codes,), torch.uint8, 0, None), (prefix + "threshold", (1,), torch.float32, 0, None)]
        return out

    @classmethod
    def from_layout(cls, out_features: int, in_features: int, entry: dict, **where) -> SparsePart:
        return cls(
            out_features,
            in_features,
            int(entry["nnz"]),
            float(entry["keep"]),
            int(entry["seed"]),
            int(entry["bits"]),
            int(entry.get("group_size", 128)),
            rated=entry.get("rates") is not None,
            draws=entry_draws(entry),
            **where,
        )

    def set_rates(self, rates: torch.Tensor, threshold: float) -> None:
        """Store the packed rate codes and the mask threshold of an importance-rated part."""
        self.rates.copy_(rates.to(torch.uint8).reshape(self.rates.shape).to(self.rates.device))
        self.threshold.fill_(float(threshold))

    def mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The regenerated keep-mask (bool, on ``device``: drawn there for uniform hashed draws), checked against
        the stored count."""
        if self.rated:
            factors = rate_factors(self.rates, self.out_features, self.in_features)
            mask = sparse_mask(self.out_features, self.in_features, float(self.threshold.cpu()), self.seed, factors,
                               self.draws, device)  # fmt: skip
            if int(mask.sum()) > self.nnz:
                raise AdapterFileError(
                    f"sparse part of a {self.out_features}x{self.in_features} delta: its rates and threshold keep "
                    f"{int(mask.sum())} entries but only {self.nnz} values are stored"
                )
            return mask
        mask = sparse_mask(self.out_features, self.in_features, self.keep, self.seed, draws=self.draws, device=device)
        if int(mask.sum()) != self.nnz:
            raise AdapterFileError(
                f"sparse part of a {self.out_features}x{self.in_features} delta: the mask regenerated from seed "
                f"{self.seed} keeps {int(mask.sum())} entries but {self.nnz} values are stored"
            )
        return mask

    def kept_values(self, mask: torch.Tensor) -> torch.Tensor:
        """The stored values of the entries ``mask`` keeps, in row-major order (float32, on ``mask``'s device)."""
        return self.values.dequantize().reshape(-1)[: int(mask.sum())].to(mask.device)

    def delta_weight(self) -> torch.Tensor:
        """The dense ``out x in`` delta (float32, on the values' device), for merging and export; not kept."""
        device = self.values.qweight.device
        w = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=device)
        mask = self.mask(device)
        w[mask] = self.kept_values(mask)
        return w

    def forward_weight(self) -> torch.Tensor:
        """What :meth:`forward_delta` multiplies by, kept in the capped cache of decoded forms (`format/decoded.py`)
        until the stored values change (a write bumps the blob's version, a new blob has a new address): at a
        keep-rate up to ``CSR_MAX_KEEP`` a CSR matrix (float32 values, int32 indices: 8 bytes a kept entry, where a
        dense float32 copy costs ``4 / keep``; on one CPU thread 2-3x faster than the dense product at keep 0.06),
        above it the dense matrix (as small, and faster). Built again where the cache has no room (a 576x1536 part at
        keep 0.23 on one CPU core: ~9 ms with the generator's mask, ~14 ms with a hashed one)."""
        return self._store.derived("csr", self.values.qweight, self._build_forward_weight, capped=True)

    def _build_forward_weight(self) -> torch.Tensor:
        if self.keep > CSR_MAX_KEEP:
            return self.delta_weight()
        mask = self.mask(self.values.qweight.device)
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: the order the values are stored in
        crow = torch.zeros(self.out_features + 1, dtype=torch.int32, device=mask.device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=self.out_features), 0).to(torch.int32)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                crow, cols.to(torch.int32), self.kept_values(mask),
                size=(self.out_features, self.in_features), check_invariants=False,
            ).to(self.values.qweight.device)  # fmt: skip

    def _build_transposed(self) -> torch.Tensor:
        """``Δ̂ᵀ`` as a CSR matrix: the same entries (explicit zeros kept) as `forward_weight`'s, by column."""
        return self.forward_weight().to_sparse_coo().t().coalesce().to_sparse_csr()

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``Δ̂ x`` in ``x``'s dtype (in float32 through the sparse matrix at low keep-rates: no dense copy made).
        Where ``x`` needs its gradient (scale distillation), through `_CsrProduct` with a CSR copy of ``Δ̂ᵀ``
        (``derived`` kind ``"csr_t"``, built on the first such call; :meth:`BlobStore.forget` drops it)."""
        weight = self.forward_weight()
        if weight.layout != torch.sparse_csr:
            return x @ weight.to(x.dtype).t()
        flat = x.reshape(-1, self.in_features).to(torch.float32)
        if flat.requires_grad and torch.is_grad_enabled():
            transposed = self._store.derived("csr_t", self.values.qweight, self._build_transposed)
            y = _CsrProduct.apply(flat, weight, transposed)
        else:
            y = torch.sparse.mm(weight, flat.t()).t()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def __repr__(self) -> str:
        rated = ", rated" if self.rated else ""
        return f"SparsePart(nnz={self.nnz}, keep={self.keep:.4f}, bits={self.bits}, seed={self.seed}{rated})"
