"""Vector quantization of a whole delta into a `~hf_deltacome.format.vq_part.VectorPart`'s codes and codebook.

The delta is rotated by the part's seeded rotations (``Y = Q_m Δ Q_nᵀ``), its first ``rows`` rows cut into
``dim``-dim vectors, and a ``codes``-entry codebook fitted to them by k-means (Lloyd's iterations on up to
``FIT_VECTORS`` of them drawn with the seed, from the first 16 drawn); every vector then takes its nearest entry.
The codebook is then stretched so the stored ``Ŷ`` is not shrunk: k-means' centroids are conditional means, so ``Ŷ`` alone keeps only ``1 − D`` of ``Y`` along ``Y`` (``D`` the relative distortion, ~0.6
at 0.5 bit a weight), and a shrunk delta loses the fine-tune's behaviour (benchmarks/RESULTS.md); stretched by
``‖Y‖² / ⟨Y, Ŷ⟩`` its projection on ``Y`` is ``Y``, like DARE's rescaled values.

With calibration activations (``hessian``: the input second moment ``H``) the codes are then chosen as GPTQ chooses
its rounding, for the output rather than the weights (GPTVQ, van Baalen et al. 2024): the rotated columns are taken
``dim`` at a time, every row's vector of them takes the entry nearest in the metric of the remaining columns'
inverse Hessian, and the error it leaves is pushed onto the columns not yet coded. In the rotated basis the output
error is ``tr((Y − Ŷ) H' (Y − Ŷ)ᵀ)`` with ``H' = Q_n H Q_nᵀ`` (``Q_m`` drops out). The stretch is then taken again
in that metric. On ten of the `facts-hot` MLP's modules at 1/32 this cut the output error from 0.34 to 0.07 of the
delta's, on held-out text as on the calibration text (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch

from ..errors import DeltaCoMeError
from ..format.vq_part import rotate, rotate_matrix, rotation, vq_nvectors
from .cholesky import inverse_cholesky

KMEANS_ITERS = 25
# damping of the output fit, as a fraction of the mean Hessian diagonal: 100 times GPTQ's for bands, because a vector
# code's error is ~0.6 of the delta at 1/32 (GPTQ's rounding error is a few percent), and pushed through a barely
# damped inverse Hessian it inflates the columns calibration text hardly reaches (see benchmarks/RESULTS.md)
VQ_DAMP = 1.0
VQ_WINDOW = 128  # columns whose errors reach the rest in one product (output_fitted_codes)
FIT_VECTORS = 1 << 15  # vectors the codebook is fitted on (a 7B MLP projection has 5.6M of 8 dims)
_CHUNK = 1 << 16  # vectors compared with the codebook at a time


def _nearest(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cdist(v, codebook).argmin(1) for v in vectors.split(_CHUNK)])


@torch.no_grad()
def vq_fit(
    delta: torch.Tensor,
    rows: int,
    dim: int,
    codes: int,
    seed: int,
    *,
    iters: int = KMEANS_ITERS,
    hessian: torch.Tensor | None = None,
    damp: float = VQ_DAMP,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(indices, codebook, scale)`` of ``delta``'s rotated first ``rows`` rows: one index a ``dim``-dim vector
    (``ceil(rows·in/dim)``, the last vector zero-padded), a ``codes x dim`` float32 codebook of unit RMS, and the
    float32 scale that multiplies it (the stretch above included). With ``hessian`` (``in x in``) the codes are
    fitted to the output (see above) where vectors do not straddle rows (``in`` a multiple of ``dim``)."""
    n = delta.shape[1]
    if hessian is not None and tuple(hessian.shape) != (n, n):
        where = f" of {name!r}" if name else ""
        raise DeltaCoMeError(f"vector codes{where}: the input Hessian has shape {tuple(hessian.shape)}, the "
                             f"{tuple(delta.shape)} delta needs ({n}, {n})")  # fmt: skip
    y = rotate_matrix(delta.detach().to(torch.float32).cpu(), seed)[:rows].reshape(-1)
    count = vq_nvectors(rows, n, dim)
    flat = torch.cat([y, y.new_zeros(count * dim - y.numel())])
    sigma = float(y.square().mean().sqrt())
    if not sigma > 0:
        return torch.zeros(count, dtype=torch.int64), torch.zeros(codes, dim), 0.0
    vectors = (flat / sigma).view(count, dim)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    order = torch.randperm(count, generator=g)
    sample = vectors[order[:FIT_VECTORS]]  # the codebook is fitted on a seeded sample: 16 entries need few
    codebook = sample[:codes].clone()
    if codebook.shape[0] < codes:  # fewer vectors than codes: the rest drawn at random
        codebook = torch.cat([codebook, torch.randn(codes - codebook.shape[0], dim, generator=g)])
    for _ in range(iters):
        idx = _nearest(sample, codebook)
        counts = torch.bincount(idx, minlength=codes).to(torch.float32)
        sums = torch.zeros(codes, dim).index_add_(0, idx, sample)
        codebook = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], codebook)
    idx = _nearest(vectors, codebook)
    rms = float(codebook.square().mean().sqrt()) or 1.0
    table = codebook / rms
    approx = table.to(torch.float16).to(torch.float32)[idx].reshape(-1)[: y.numel()]  # as stored
    along = float((approx * (y / sigma)).sum())
    stretch = float((y / sigma).square().sum()) / along if along > 0 else rms
    scale = sigma * stretch
    if hessian is not None and n % dim == 0:
        y = y.view(rows, n)
        h = hessian.detach().to(torch.float32).cpu()
        q = rotation(n, seed, 1)
        h = rotate(rotate(h, q).t(), q).t()
        stored = table.to(torch.float16).float()
        idx = output_fitted_codes(y, h, stored * scale, damp, name)
        yh = y @ h  # the codes keep less of the delta's output along itself than k-means' did of its weights:
        along = float((yh * stored[idx].view(rows, n)).sum())  # stretched again, in the output's metric
        scale = float((yh * y).sum()) / along if along > 0 else scale
    return idx, table, scale


def output_fitted_codes(
    y: torch.Tensor, hessian: torch.Tensor, table: torch.Tensor, damp: float, name: str = "", window: int = VQ_WINDOW
) -> torch.Tensor:
    """The code of every ``dim``-dim vector of ``y`` (``rows x in``, row-major) chosen column block by column block
    against the output error ``tr((y − ŷ) H (y − ŷ)ᵀ)`` (``table``: the scaled codebook as stored), each block's
    error pushed onto the columns after it through the upper Cholesky factor ``U`` of ``H⁻¹``, as GPTQ does for one
    column. A block's vectors are compared with the entries in the metric ``(U_BBᵀ U_BB)⁻¹`` of the inverse Hessian
    left for it, so the choice is exact for the block, not only its diagonal. As GPTQ's lazy batches, the errors of
    the blocks in a ``window`` of columns reach the columns past it in one product (the same sums, 1/16 of the
    passes over ``y`` at 8-dim vectors: the loop is bound by memory traffic, not arithmetic)."""
    rows, n = y.shape
    dim = table.shape[1]
    u, _ = inverse_cholesky(hessian, damp, name)
    u = torch.triu(u).to(torch.float32)
    w = y.clone()
    out = torch.empty(rows, n // dim, dtype=torch.int64)
    window = dim * max(1, window // dim)
    for ws in range(0, n, window):
        we = min(ws + window, n)
        err = torch.empty(rows, we - ws)
        for s in range(ws, we, dim):
            e = s + dim
            inv = torch.linalg.solve_triangular(u[s:e, s:e], torch.eye(dim), upper=True)
            idx = _nearest(w[:, s:e] @ inv, table @ inv)
            out[:, s // dim] = idx
            err[:, s - ws : e - ws] = (w[:, s:e] - table[idx]) @ inv
            w[:, e:we] -= err[:, s - ws : e - ws] @ u[s:e, e:we]
        w[:, we:] -= err @ u[ws:we, we:]
    return out.reshape(-1)
