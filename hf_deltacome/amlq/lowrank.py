"""Low-rank reconstruction of the quantization error from the activation covariance (LQER / L²QER family).

With ``E = W − Q(W)`` and the input Hessian ``H = 2/N Σ x xᵀ = C Cᵀ`` (Cholesky, damped like GPTQ), the output
error of the layer is ``||E X||² ∝ tr(E H Eᵀ) = ||E C||²_F``. The best rank-``k`` correction ``L R`` in that metric
is the truncated SVD of ``E C`` mapped back: ``E C ≈ U_k S_k V_kᵀ`` gives ``L R = U_k S_k V_kᵀ C⁻¹`` (exact, not
the diagonal-scaling approximation of L²QER). ``R`` is stored at ``bits`` (8 or 4); ``L`` is then refit by least
squares against the stored ``R`` (so it absorbs ``R``'s rounding) and stored at ``bits`` too.

:func:`captured_fractions` gives, for the allocation, the share of ``tr(E H Eᵀ)`` that each candidate rank removes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..format.amlq_layout import LOWRANK_GROUP
from ..format.packing import QuantizedMatrix
from ..quant.rtn import quantize_rtn


def damped_cholesky(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower Cholesky factor ``C`` of ``H + λI`` (``λ = damp · mean diag``; dead inputs get the mean diagonal)."""
    H = H.to(torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    if bool(dead.all()):
        return torch.eye(H.shape[0], dtype=torch.float64)
    diag[dead] = diag[~dead].mean()
    d = max(float(damp), 1e-8) * float(diag.mean())
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + d * torch.eye(H.shape[0], dtype=torch.float64))
        if int(info) == 0:
            return L
        d *= 10.0
    return torch.diag(torch.sqrt(torch.clamp(diag, min=1e-12)))


def output_error(E: torch.Tensor, C: torch.Tensor) -> float:
    """``||E C||²_F = tr(E H Eᵀ)``."""
    return float((E.to(torch.float64) @ C).square().sum())


def captured_fractions(E: torch.Tensor, C: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """Share of ``tr(E H Eᵀ)`` that the best rank-``k`` correction removes, for each ``k`` in ``ranks``."""
    EC = E.to(torch.float64) @ C
    gram = EC @ EC.T if EC.shape[0] <= EC.shape[1] else EC.T @ EC
    ev = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)
    total = float(ev.sum())
    if total <= 0:
        return [0.0 for _ in ranks]
    cum = torch.cumsum(ev, 0)
    return [float(cum[min(k, len(ev)) - 1]) / total if k > 0 else 0.0 for k in ranks]


@torch.no_grad()
def error_factors(
    E: torch.Tensor, C: torch.Tensor, rank: int, bits: int = 8
) -> tuple[QuantizedMatrix, QuantizedMatrix, float]:
    """Stored ``bits``-bit factors ``(L, R)`` of the best rank-``rank`` correction of ``E`` and the error left, as a
    share of ``tr(E H Eᵀ)``."""
    E64 = E.to(torch.float64)
    U, S, Vh = torch.linalg.svd(E64 @ C, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    # R = sqrt(S) V_kᵀ C⁻¹  (solve Cᵀ Rᵀ = V_k sqrt(S))
    R = torch.linalg.solve_triangular(C.T, (Vh[:k].T * root), upper=True).T
    Rq = quantize_rtn(R.float(), bits, LOWRANK_GROUP)
    Rd = Rq.dequantize().to(torch.float64)
    # L = argmin ||(E − L Rd) C||: normal equations L (Rd H Rdᵀ) = E H Rdᵀ, with H = C Cᵀ
    RC = Rd @ C
    gram = RC @ RC.T
    gram += 1e-10 * float(torch.diagonal(gram).mean().clamp(min=1e-30)) * torch.eye(k, dtype=torch.float64)
    L = torch.linalg.solve(gram, RC @ (E64 @ C).T).T
    Lq = quantize_rtn(L.float(), bits, LOWRANK_GROUP)
    left = E64 - Lq.dequantize().to(torch.float64) @ Rd
    base = output_error(E64, C)
    return Lq, Rq, (output_error(left, C) / base) if base > 0 else 0.0
