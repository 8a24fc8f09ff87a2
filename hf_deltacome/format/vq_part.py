"""Vector-quantized storage of a whole delta (`VectorPart`): the delta seen in a seeded random rotation, cut into
short vectors, each stored as the 4-bit index of its nearest entry in a 16-entry codebook kept beside the codes.

In the rotated basis ``Y = Q_m Δ Q_nᵀ`` every entry is a mix of the whole matrix, so the entries look alike (close to
Gaussian) and one small codebook fits every vector; the rotations are regenerated from the layout's seed, never
stored. At 0.5 bit a weight (ratio 1/32, 8-dim vectors) the error is ~0.6 of the delta's energy where DARE's random
drop at that size leaves more noise than the delta itself (benchmarks/RESULTS.md). ``backend.py`` adds it beside the
bands, like the sign and DARE parts: through `hf_deltacome.kernels.vq_add_into` where the kernels run (the codes read
in place), else through PyTorch (`VectorPart.forward_delta`).

Layout entry: ``"vq": {"dim": d, "codes": 16, "rows": r, "seed": s}``: the first ``r`` rows of ``Y`` (row-major,
padded with zeros to whole vectors) as ``ceil(r·n/d)`` codes; ``Δ̂ = Q_mᵀ [Ŷ; 0] Q_n``. Stored (format 4): ``codes``
(uint8, two 4-bit codes a byte, low nibble first), ``codebook`` (float16, ``16 x d``, unit RMS) and ``scale``
(float32, one).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from ..errors import AdapterFileError
from .blob import BlobStore, OwnBlob, Segments, part_property
from .budget import largest_fitting
from .packing import pack_nibbles, unpack_nibbles

VQ_CODES = (16,)  # codebook sizes a layout may name (4-bit codes)


def vq_nvectors(rows: int, in_features: int, dim: int) -> int:
    """Vectors of a part storing ``rows`` rotated rows of ``in_features`` entries in ``dim``-dim vectors."""
    return -(-rows * in_features // dim)


def vq_part_nbytes(in_features: int, rows: int, dim: int, codes: int = 16) -> int:
    """Exact bytes of a `VectorPart`: the packed codes, the float16 codebook and the float32 scale."""
    if rows <= 0:
        return 0
    bits = int(math.log2(codes))
    return -(-vq_nvectors(rows, in_features, dim) * bits // 8) + codes * dim * 2 + 4


def vq_rows(out_features: int, in_features: int, dim: int, nbytes: int, codes: int = 16) -> int:
    """The most rotated rows (at most ``out_features``) a part of ``dim``-dim vectors stores in ``nbytes``."""
    return largest_fitting(out_features, lambda rows: vq_part_nbytes(in_features, rows, dim, codes) <= nbytes)


def _kron_sizes(n: int) -> tuple[int, int]:
    """``n = a·b`` with ``a`` the largest divisor of ``n`` not above ``√n``."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


@functools.lru_cache(maxsize=4096)  # two small factors a (size, seed, side): every module of a model
def rotation(n: int, seed: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded random orthogonal ``Q = Q_a ⊗ Q_b`` of size ``n`` (its two factors, float32, CPU): Kronecker
    products of Haar-random orthogonal matrices, as QuIP's incoherence processing, so a rotation of a 14336-wide
    delta costs two small QR factorizations, not one of 14336². ``side``: 0 for the rows, 1 for the columns."""
    g = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + n * 8 + side) % (2**63))
    out = []
    for size in _kron_sizes(n):
        q, r = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
        out.append((q * torch.sign(torch.diagonal(r))).to(torch.float32))
    return out[0], out[1]


def rotate(x: torch.Tensor, q: tuple[torch.Tensor, torch.Tensor], inverse: bool = False) -> torch.Tensor:
    """``Q v`` (or ``Qᵀ v`` with ``inverse``) for every vector ``v`` along the last dim of ``x``."""
    qa, qb = (t.to(x.device, x.dtype) for t in q)
    a, b = qa.shape[0], qb.shape[0]
    v = x.reshape(*x.shape[:-1], a, b)
    v = qa.t() @ v @ qb if inverse else qa @ v @ qb.t()
    return v.reshape(x.shape)


def rotate_matrix(w: torch.Tensor, seed: int, inverse: bool = False) -> torch.Tensor:
    """``Q_m W Q_nᵀ`` (or ``Q_mᵀ W Q_n`` with ``inverse``) for an ``m x n`` matrix and the part's seeded rotations."""
    m, n = w.shape
    w = rotate(w, rotation(n, seed, 1), inverse)
    return rotate(w.t(), rotation(m, seed, 0), inverse).t()


class VectorPart:
    """Vector-quantized storage of a whole ``out x in`` delta (see the module docstring)."""

    __slots__ = ("_store", "_prefix", "out_features", "in_features", "rows", "dim", "codes", "seed")

    packed = part_property("codes")
    codebook = part_property("codebook")
    scale = part_property("scale")

    def __init__(
        self, out_features: int, in_features: int, rows: int, dim: int, codes: int, seed: int,
        *, store: Optional[BlobStore] = None, prefix: str = "",
    ) -> None:  # fmt: skip
        if not 0 < rows <= out_features or dim < 1 or codes not in VQ_CODES:
            raise AdapterFileError(f"vq part of {rows} rows, {dim}-dim vectors, {codes} codes on a "
                                   f"{out_features}x{in_features} delta")  # fmt: skip
        self.out_features, self.in_features, self.rows, self.dim = out_features, in_features, rows, dim
        self.codes, self.seed = codes, int(seed)
        self._prefix = prefix
        self._store = store if store is not None else OwnBlob(Segments(self.parts("", *self._args())))

    def _args(self) -> tuple:
        return self.out_features, self.in_features, self.rows, self.dim, self.codes

    @staticmethod
    def parts(prefix: str, out_features: int, in_features: int, rows: int, dim: int, codes: int) -> list[tuple]:
        """Segment specs (key, shape, dtype, bits, cols) of a vq part under ``prefix``."""
        ncodes = vq_part_nbytes(in_features, rows, dim, codes) - codes * dim * 2 - 4
        return [
            (prefix + "scale", (1,), torch.float32, 0, None),
            (prefix + "codebook", (codes, dim), torch.float16, 0, None),
            (prefix + "codes", (ncodes,), torch.uint8, 0, None),
        ]

    @classmethod
    def from_layout(cls, out_features: int, in_features: int, entry: dict, **where) -> VectorPart:
        return cls(out_features, in_features, int(entry["rows"]), int(entry["dim"]), int(entry.get("codes", 16)),
                   int(entry["seed"]), **where)  # fmt: skip

    def set(self, idx: torch.Tensor, codebook: torch.Tensor, scale: float) -> None:
        """Store the code of every vector (``ceil(rows·in/dim)``), the ``codes x dim`` codebook and its scale."""
        n = vq_nvectors(self.rows, self.in_features, self.dim)
        if idx.numel() != n or tuple(codebook.shape) != (self.codes, self.dim):
            raise AdapterFileError(f"vq part expects {n} codes and a {self.codes}x{self.dim} codebook, got "
                                   f"{idx.numel()} and {tuple(codebook.shape)}")  # fmt: skip
        self.packed.copy_(pack_nibbles(idx).to(self.packed.device))
        self.codebook.copy_(codebook.to(self.codebook.device, torch.float16))
        self.scale.fill_(float(scale))

    def rotated_rows(self) -> torch.Tensor:
        """``Ŷ``: the stored ``rows x in`` block of the rotated delta (float32, on the part's device)."""
        n = vq_nvectors(self.rows, self.in_features, self.dim)
        table = self.codebook.to(torch.float32) * self.scale.to(torch.float32)
        flat = table[unpack_nibbles(self.packed, n).to(table.device)].reshape(-1)
        return flat[: self.rows * self.in_features].reshape(self.rows, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        """The dense ``out x in`` delta ``Q_mᵀ [Ŷ; 0] Q_n`` (float32), for merging and export; not kept."""
        y = self.rotated_rows()
        full = y.new_zeros(self.out_features, self.in_features)
        full[: self.rows] = y
        return rotate_matrix(full, self.seed, inverse=True)

    def rotations(self, device: torch.device) -> tuple[tuple, tuple]:
        """The float32 factors of ``Q_n`` and ``Q_m`` on ``device``, cached on the blob's store (a forward pass then
        copies nothing to the device)."""
        def build() -> tuple[tuple, tuple]:
            return tuple(tuple(f.to(device) for f in rotation(size, self.seed, side))
                         for size, side in ((self.in_features, 1), (self.out_features, 0)))  # fmt: skip

        return self._store.derived("vq_rot", self.packed, build, device)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``Δ̂ x`` in ``x``'s dtype: ``x`` rotated, times ``Ŷᵀ`` (decoded and kept in the capped cache of decoded
        forms, `format/decoded.py`, until its bytes change: float32, twice the fp16 delta; the Triton kernel,
        `hf_deltacome.kernels.vq_add_into`, reads the codes in place instead), padded to ``out`` and rotated back."""
        y = self._store.derived("vq", self.packed, self.rotated_rows, capped=True).to(x.device)
        q_in, q_out = self.rotations(x.device)
        t = rotate(x.to(y.dtype), q_in) @ y.t()
        if self.rows < self.out_features:
            t = torch.nn.functional.pad(t, (0, self.out_features - self.rows))
        return rotate(t, q_out, inverse=True).to(x.dtype)

    def __repr__(self) -> str:
        return (f"VectorPart(rows={self.rows}/{self.out_features}, dim={self.dim}, codes={self.codes}, "
                f"seed={self.seed})")  # fmt: skip
