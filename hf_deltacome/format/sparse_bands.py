"""Sparse bands of singular vectors (ImPart; Delta-CoMe's sparse tail): `SparseBand`, its seeded masks and bytes.

A sparse band lives in its `~.storage.PackedDelta`'s blob like the dense bands (``format/blob.py``): its parts are
segments after the baselines' parts, its masks are regenerated from the layout's seed with DARE's
:func:`~.baseline_parts.sparse_mask` (the one seeded mask generator), never stored: by the counter hash of
``format/draws.py`` since format 6 (``"draws": "hash"``), by the CPU generator before. ``backend.py`` adds sparse
bands beside the kernels' dense bands: a hashed band through its own kernels (``kernels/triton_sparse.py``, values
read packed, masks replayed), an older one by `SparseBand.forward_delta` (two matmuls by the band's decoded factors,
built once into the capped cache of decoded forms). Format-1 state-dict keys:
``<module>.deltacome_delta.<adapter>.sparse_bands.<k>.{s,v.qweight,...,u.qweight,...}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from ..errors import AdapterFileError
from .baseline_parts import sparse_mask
from .blob import BandOfVectors, BlobStore, OwnBlob, QuantizedFactor, Segments, factor_parts, part_property
from .draws import entry_draws
from .packing import stored_nbytes


def sparse_band_masks(
    out_features: int, in_features: int, rank: int, keep: float, seed: int, draws: str = "generator",
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The masks of a `SparseBand`: kept entries of ``Vᵀ`` (``rank x in``, drawn from ``seed``) and of ``Uᵀ``
    (``rank x out``, from ``seed + 1``), by DARE's :func:`sparse_mask` (``draws``: the CPU generator's, or the
    counter hash of `format/draws.py` that the kernel replays, format 6)."""
    return (sparse_mask(rank, in_features, keep, seed, draws=draws, device=device),
            sparse_mask(rank, out_features, keep, seed + 1, draws=draws, device=device))  # fmt: skip


def sparse_band_nbytes(bits: int, rank: int, nnz: Sequence[int], group_size: int) -> int:
    """Exact bytes of a `SparseBand`: the kept values of ``Vᵀ`` and ``Uᵀ`` (one flat row each) and ``S``."""
    if rank <= 0:
        return 0
    return stored_nbytes(1, int(nnz[0]), bits, group_size) + stored_nbytes(1, int(nnz[1]), bits, group_size) + 4 * rank


def sparse_band_key(entry: dict) -> tuple[int, int, float, int, int, int, str]:
    """``(bits, rank, keep, seed, nnz_v, nnz_u, draws)`` of one ``sparse_bands`` layout entry (hashable: segment
    tables are cached per layout)."""
    nnz = entry["nnz"]
    return (int(entry["bits"]), int(entry["rank"]), float(entry["keep"]), int(entry["seed"]), int(nnz[0]),
            int(nnz[1]), entry_draws(entry))  # fmt: skip


class SparseBand(BandOfVectors):
    """``rank`` singular vectors with a random share ``keep`` of their entries, views into the delta's blob.

    ``Vᵀ`` (``rank x in``) and ``Uᵀ`` (``rank x out``) keep the entries under the masks ``sparse_mask(rank, in, keep,
    seed)`` and ``sparse_mask(rank, out, keep, seed + 1)`` (regenerated when read and checked against ``nnz``). Only
    the kept values are stored, vector after vector in row-major order, as one flat row each (``v``: ``1 x nnz[0]``,
    ``u``: ``1 x nnz[1]``) quantized in groups of ``group_size`` along it; every vector was scaled to unit RMS
    before quantizing, its scale folded into ``s`` (``rank`` float32), so groups that straddle two vectors see one
    magnitude.
    """

    __slots__ = ("_store", "_prefix", "out_features", "in_features", "bits", "rank", "keep", "seed", "nnz", "draws",
                 "v", "u")  # fmt: skip

    s = part_property("s")

    def __init__(
        self, out_features: int, in_features: int, key: tuple, group_size: int, *, store: Optional[BlobStore] = None,
        prefix: str = "",
    ) -> None:  # fmt: skip
        bits, rank, keep, seed, nnz_v, nnz_u, draws = key
        self.out_features, self.in_features, self.bits, self.rank = out_features, in_features, bits, rank
        self.keep, self.seed, self.nnz, self.draws = float(keep), int(seed), (int(nnz_v), int(nnz_u)), draws
        self._prefix = prefix
        self._store = store if store is not None else OwnBlob(Segments(self.parts("", key, group_size)))
        self.v = QuantizedFactor(self._store, prefix + "v.", 1, self.nnz[0], bits, group_size)
        self.u = QuantizedFactor(self._store, prefix + "u.", 1, self.nnz[1], bits, group_size)

    @classmethod
    def from_layout(cls, out_features: int, in_features: int, entry: dict, group_size: int, **where) -> SparseBand:
        """One ``sparse_bands`` layout entry; built on its own (its own blob) unless ``store``/``prefix`` are given."""
        return cls(out_features, in_features, sparse_band_key(entry), group_size, **where)

    @staticmethod
    def parts(prefix: str, key: tuple, group_size: int) -> list[tuple]:
        """Segment specs (key, shape, dtype, bits, cols) of one sparse band under ``prefix``: ``s``, then V's and
        U's kept values (the order its module's buffers had)."""
        bits, rank, _, _, nnz_v, nnz_u, _ = key
        return [
            (prefix + "s", (rank,), torch.float32, 0, None),
            *factor_parts(prefix + "v.", 1, nnz_v, bits, group_size),
            *factor_parts(prefix + "u.", 1, nnz_u, bits, group_size),
        ]

    def masks(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The kept entries of ``Vᵀ`` (``rank x in``) and ``Uᵀ`` (``rank x out``), regenerated from the seed (hashed
        draws on ``device`` itself, the generator's on the CPU)."""
        mv, mu = sparse_band_masks(self.out_features, self.in_features, self.rank, self.keep, self.seed, self.draws,
                                   device if self.draws == "hash" else "cpu")  # fmt: skip
        got = (int(mv.sum()), int(mu.sum()))
        if got != self.nnz:
            raise AdapterFileError(
                f"sparse band of {self.rank} vectors ({self.out_features}x{self.in_features}): the masks regenerated "
                f"from seed {self.seed} keep {list(got)} entries but {list(self.nnz)} values are stored"
            )
        return mv, mu

    @staticmethod
    def _scatter(values: QuantizedFactor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = values.dequantize(dtype).reshape(-1)
        w = torch.zeros(mask.shape, dtype=dtype, device=flat.device)
        w[mask.to(w.device)] = flat
        return w

    def vt_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``V_kᵀ`` (``rank x in``), dropped entries zero."""
        return self._scatter(self.v, self.masks()[0], dtype)

    def ut_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``U_kᵀ`` (``rank x out``), dropped entries zero."""
        return self._scatter(self.u, self.masks()[1], dtype)

    def u_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.ut_dense(dtype).t()

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``U_k diag(S_k) V_kᵀ x`` in ``x``'s dtype, shape ``(..., out_features)``: what the backend adds beside the
        kernels' dense bands. The factors (``in x rank`` and ``rank x out``, dropped entries zero) are decoded once
        into the capped cache of decoded forms (``format/decoded.py``; regenerating the masks is the slow part) and
        decoded again when the band's bytes change."""
        a, b = self._store.derived(self._prefix + "factors", self.v.qweight,
                                   lambda: tuple(f.to(x.device).contiguous() for f in self.decoded_factors(x.dtype)),
                                   x.dtype, x.device, capped=True)  # fmt: skip
        return (x @ a) @ b

    def __repr__(self) -> str:
        return (f"SparseBand(rank={self.rank}, bits={self.bits}, keep={self.keep:.4f}, nnz={list(self.nnz)}, "
                f"seed={self.seed}, draws={self.draws})")  # fmt: skip
