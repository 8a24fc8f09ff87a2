"""Sparse singular vectors: ImPart (``method="impart"``) and Delta-CoMe's sparse tail (``sparse_tail=``).

The last band of the split (2 bits by default) keeps only a random share of each singular vector's entries, so the
same bytes buy more rank. The masks are DARE's seeded masks
(:func:`~hf_deltacome.format.sparse_bands.sparse_band_masks`), regenerated at load; the kept entries are rescaled by
``1/keep`` (unbiased) and quantized, every vector scaled to unit RMS first with its scale folded into ``S``
(:class:`~hf_deltacome.format.sparse_bands.SparseBand`).

* :func:`sparse_split` — the layout: the dense head bands, the tail vectors kept whole (keep 1) as a dense band,
  and up to ``KEEP_LEVELS`` sparse bands of falling keep-rates, with the largest rank whose exact bytes fit;
* :func:`keep_rates` — ImPart's keep-rates: proportional to ``σ_k``, the last kept vector at the floor
  (``sparse_tail``), capped at 1; the sparse tail of ``deltacome`` keeps every vector at the floor;
* :func:`compress_sparse_bands` — the stored values: ``V`` masked, rescaled, rounded to nearest; ``U`` likewise, or,
  with an input Hessian, its kept entries refit by least squares against the output error (each output row on its
  own support), absorbing the error of the sparse ``V`` and of the dense bands.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config import IMPART_MIN_KEEP, DeltaCoMeConfig
from ..errors import DeltaCoMeError
from ..format.budget import band_nbytes, layout_nbytes
from ..format.draws import entry_draws
from ..format.packing import QuantizedMatrix, stored_nbytes
from ..format.storage import sparse_band_masks, sparse_band_nbytes
from ..quant.rtn import quantize_rtn
from .baselines import mask_seed
from .svd import svd

KEEP_LEVELS = 4  # sparse bands a tail is cut into (consecutive vectors, equal counts, each its mean keep-rate)
MODEL_DECAY = 0.5  # without the delta's spectrum at plan time (streamed runs) σ_k is taken as (k + 1) ** -0.5

Band = tuple[int, int]


def keep_floor(config: DeltaCoMeConfig) -> float:
    """The lowest keep-rate of a sparse tail: ``sparse_tail``, else ImPart's default."""
    return float(config.sparse_tail) if config.sparse_tail is not None else IMPART_MIN_KEEP


def keep_rates(sigma: torch.Tensor, floor: float, importance: bool) -> torch.Tensor:
    """Keep-rate of each tail vector (``sigma`` falling): ``min(1, floor · σ_k / σ_last)`` (ImPart), else ``floor``."""
    if not importance or sigma.numel() == 0:
        return torch.full((sigma.numel(),), floor, dtype=torch.float64)
    s = sigma.to(torch.float64)
    last = s[-1].clamp_min(float(s[0]) * 1e-6 + 1e-30)
    return (floor * s / last).clamp(max=1.0)


def _levels(p: torch.Tensor) -> tuple[int, list[tuple[int, float]]]:
    """Vectors kept whole (leading, keep 1) and the sparse levels ``[(rank, keep), ...]`` of the rest."""
    dense = int((p >= 1.0).sum())
    rest = p[dense:]
    k = min(KEEP_LEVELS, rest.numel())
    levels: list[tuple[int, float]] = []
    for chunk in rest.tensor_split(k) if k else ():
        keep = max(round(float(chunk.mean()), 4), 1e-4)
        if levels and levels[-1][1] == keep:  # one keep-rate (the sparse tail): one band
            levels[-1] = (levels[-1][0] + chunk.numel(), keep)
        else:
            levels.append((chunk.numel(), keep))
    return dense, levels


def _expected_nbytes(m: int, n: int, bits: int, g: int, dense: int, levels: Sequence[tuple[int, float]]) -> int:
    total = band_nbytes(m, n, bits, dense, g)
    for r, keep in levels:
        total += stored_nbytes(1, round(keep * r * n), bits, g) + stored_nbytes(1, round(keep * r * m), bits, g) + 4 * r
    return total


def module_seed(name: str, draw: int = 0) -> int:
    """The seed of a module's masks (its sparse band ``j`` uses ``seed + 2j`` for ``V`` and ``seed + 2j + 1`` for ``U``;
    ``draw``: :func:`~.baselines.mask_seed`'s)."""
    return mask_seed(name, draw) & 0x3FFFFFFF


def sparse_split(
    name: str,
    m: int,
    n: int,
    budget: int,
    bands: Sequence[Band],
    config: DeltaCoMeConfig,
    spectrum: torch.Tensor | None = None,
) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """The dense bands and the sparse bands of a layout whose last band is sparse, within ``budget`` bytes.

    ``bands`` is the all-dense split (head bands, then the last band filling the budget). The head stays as it is;
    the tail's rank ``R`` is the largest whose keep-rates (:func:`keep_rates`; ImPart for ``method="impart"``, using
    ``spectrum``, the delta's singular values, or ``MODEL_DECAY`` without it) fit the bytes left: more rank at lower
    density, never below the floor. Exact bytes are counted on the masks as drawn."""
    g, floor = config.group_size, keep_floor(config)
    head = [(int(b), int(r)) for b, r in bands[:-1]]
    bits = int(bands[-1][0])
    left = budget - layout_nbytes(m, n, head, g)
    start = sum(r for _, r in head)
    cap = min(m, n) - start
    if spectrum is None:
        spectrum = (torch.arange(min(m, n), dtype=torch.float64) + 1) ** -MODEL_DECAY
    sigma = spectrum.to(torch.float64)[start : start + cap]
    importance = config.method == "impart"

    def split(rank: int) -> tuple[int, list[tuple[int, float]]]:
        return _levels(keep_rates(sigma[:rank], floor, importance))

    lo, hi = 0, cap
    while lo < hi:  # the largest rank whose expected bytes fit (keep-rates only grow with the rank)
        mid = (lo + hi + 1) // 2
        if _expected_nbytes(m, n, bits, g, *split(mid)) <= left:
            lo = mid
        else:
            hi = mid - 1
    seed = module_seed(name, config.mask_draw)
    for rank in range(lo, -1, -1):  # the masks as drawn scatter around the expected counts: shrink until they fit
        dense, levels = split(rank)
        sparse = []
        for j, (r, keep) in enumerate(levels):
            mv, mu = sparse_band_masks(m, n, r, keep, seed + 2 * j, "hash")
            sparse.append({"bits": bits, "rank": r, "keep": keep, "seed": seed + 2 * j,
                           "nnz": [int(mv.sum()), int(mu.sum())], "draws": "hash"})  # fmt: skip
        used = band_nbytes(m, n, bits, dense, g) + sum(sparse_band_nbytes(bits, b["rank"], b["nnz"], g) for b in sparse)
        if used <= left or rank == 0:
            return [list(b) for b in head] + [[bits, dense]], sparse
    raise DeltaCoMeError(f"{name}: no sparse tail fits {budget} bytes")  # pragma: no cover


def resplit(
    name: str, entry: dict[str, Any], budget: int, config: DeltaCoMeConfig, spectrum: torch.Tensor | None = None
) -> dict[str, Any]:
    """A layout ``entry`` whose last band is sparse (from :func:`sparse_split`), planned again for ``budget`` bytes:
    the same head bands, the tail's rank the largest that now fits (:func:`.unspent.spend_unspent` offers it more)."""
    m, n = entry["shape"]
    bands, sparse = sparse_split(name, int(m), int(n), budget, [*entry["bands"][:-1], [entry["bands"][-1][0], 0]],
                                 config, spectrum)  # fmt: skip
    return {**entry, "bands": bands, "sparse_bands": sparse}


@torch.no_grad()
def compress_sparse_bands(
    delta: torch.Tensor,
    hessian: torch.Tensor | None,
    entry: dict[str, Any],
    dense_approx: torch.Tensor,
    *,
    quantizer: str = "gptq",
    damp: float = 0.01,
) -> list[tuple[QuantizedMatrix, QuantizedMatrix, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``[(V values, U values, S, Vᵀ dense, Uᵀ dense), ...]`` of the entry's sparse bands (see the module doc).

    ``dense_approx`` is what the dense bands already store (the refit of ``U`` fits the rest of the delta)."""
    m, n = delta.shape
    g = int(entry["group_size"])
    d = delta.detach().to(torch.float32).cpu()
    U, S, Vh = svd(d)
    start = sum(int(r) for _, r in entry.get("bands", []))
    live = [b for b in entry.get("sparse_bands", []) if b["rank"] > 0]
    vqs, vts, uts, scale_v, sig, mus = [], [], [], [], [], []
    for b in live:
        r, keep = int(b["rank"]), float(b["keep"])
        sl = slice(start, start + r)
        start += r
        mv, mu = sparse_band_masks(m, n, r, keep, int(b["seed"]), entry_draws(b))
        vt, cv = _unit_rms(Vh[sl].cpu() * mv / keep, mv)
        vq = quantize_rtn(vt[mv].view(1, -1), int(b["bits"]), g)
        vqs.append(vq)
        vts.append(_scatter(vq, mv))
        scale_v.append(cv)
        sig.append(S[sl].cpu())
        uts.append(U[:, sl].t().cpu() * mu / keep)
        mus.append(mu)
    if not live:
        return []
    if quantizer == "gptq" and hessian is not None:
        A = (torch.cat(sig) * torch.cat(scale_v)).to(torch.float64)[:, None] * torch.cat(vts).to(torch.float64)
        refit = _refit_u(d.to(torch.float64) - dense_approx.to(torch.float64), A, hessian, torch.cat(mus),
                         torch.cat(uts).to(torch.float64), damp)  # fmt: skip
        uts = list(refit.to(torch.float32).split([int(b["rank"]) for b in live]))
    out = []
    for b, vq, vq_dense, cv, s, ut, mu in zip(live, vqs, vts, scale_v, sig, uts, mus, strict=True):
        ut, cu = _unit_rms(ut, mu)
        uq = quantize_rtn(ut[mu].view(1, -1), int(b["bits"]), g)
        out.append((vq, uq, (s * cv * cu).to(torch.float32), vq_dense, _scatter(uq, mu)))
    return out


def _unit_rms(w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``w`` divided by the RMS of its kept entries (rows with none keep scale 1), and the scales."""
    count = mask.sum(1).clamp_min(1)
    rms = ((w * mask).square().sum(1) / count).sqrt()
    rms = torch.where(rms > 0, rms, torch.ones_like(rms))
    return w / rms[:, None], rms


def _scatter(q: QuantizedMatrix, mask: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(mask.shape, dtype=torch.float32)
    w[mask] = q.dequantize().reshape(-1).cpu()
    return w


def _refit_u(
    target: torch.Tensor, A: torch.Tensor, hessian: torch.Tensor, mask_u: torch.Tensor, u0: torch.Tensor, damp: float
) -> torch.Tensor:
    """``Uᵀ`` (``R x m``) whose kept entries minimise ``||(target − U A) X||²`` row by row of ``target`` (output
    ``i`` uses only its own kept entries), ridge-damped towards ``u0`` (the masked, rescaled SVD factor)."""
    H = hessian.to(torch.float64).cpu()
    AH = A @ H
    G = AH @ A.t()
    G = (G + G.t()) / 2
    B = target @ AH.t()  # m x R
    lam = max(damp, 1e-6) * float(torch.diagonal(G).mean().clamp_min(1e-30))
    out = u0.clone()
    for i in range(target.shape[0]):
        support = mask_u[:, i].nonzero().flatten()
        if support.numel() == 0:
            continue
        Gs = G[support][:, support] + lam * torch.eye(support.numel(), dtype=torch.float64)
        rhs = B[i, support] + lam * u0[support, i]
        sol, info = torch.linalg.solve_ex(Gs, rhs)
        if int(info) == 0 and bool(torch.isfinite(sol).all()):
            out[support, i] = sol
    return out
