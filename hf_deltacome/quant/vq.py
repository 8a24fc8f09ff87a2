"""Vector quantization of a whole delta into a `~hf_deltacome.format.vq_part.VectorPart`'s codes and codebook.

The delta is rotated by the part's seeded rotations (``Y = Q_m Δ Q_nᵀ``), its first ``rows`` rows cut into
``dim``-dim vectors, and a ``codes``-entry codebook fitted to them by k-means (Lloyd's iterations on up to
``FIT_VECTORS`` of them drawn with the seed, from the first 16 drawn); every vector then takes its nearest entry.
The codebook is then stretched so the stored ``Ŷ`` is not shrunk: k-means' centroids are conditional means, so ``Ŷ`` alone keeps only ``1 − D`` of ``Y`` along ``Y`` (``D`` the relative distortion, ~0.6
at 0.5 bit a weight), and a shrunk delta loses the fine-tune's behaviour (benchmarks/RESULTS.md); stretched by
``‖Y‖² / ⟨Y, Ŷ⟩`` its projection on ``Y`` is ``Y``, like DARE's rescaled values.
"""

from __future__ import annotations

import torch

from ..format.vq_part import rotate_matrix, vq_nvectors

KMEANS_ITERS = 25
FIT_VECTORS = 1 << 15  # vectors the codebook is fitted on (a 7B MLP projection has 5.6M of 8 dims)
_CHUNK = 1 << 16  # vectors compared with the codebook at a time


def _nearest(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cdist(v, codebook).argmin(1) for v in vectors.split(_CHUNK)])


@torch.no_grad()
def vq_fit(
    delta: torch.Tensor, rows: int, dim: int, codes: int, seed: int, *, iters: int = KMEANS_ITERS
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(indices, codebook, scale)`` of ``delta``'s rotated first ``rows`` rows: one index a ``dim``-dim vector
    (``ceil(rows·in/dim)``, the last vector zero-padded), a ``codes x dim`` float32 codebook of unit RMS, and the
    float32 scale that multiplies it (the stretch above included)."""
    n = delta.shape[1]
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
    return idx, table, sigma * stretch
