"""SVD of a delta and its Delta-CoMe compression: singular vectors split into bands, ``Vᵀ`` then ``U`` quantized.

:func:`svd` factorizes a delta (cached by content inside :func:`reuse_svd`, so planning, searching and compressing
factorize each delta once); :func:`compress_linear` turns one delta into packed bands with GPTQ (or RTN).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from ..errors import ConfigError, DeltaCoMeError
from ..format.packing import QuantizedMatrix
from ..quant.gptq import GPTQ
from ..quant.rtn import quantize_rtn
from ..quant.spill import Hessian, SpilledHessian, column_block

_SVD_CACHE: dict[bytes, Any] | None = None
T = TypeVar("T")


SVD_CACHE_BYTES = 4 << 30  # a run keeps every delta's SVD when they fit in this (float32, ~2x the delta)
_BLOCK = 4096  # columns of the Hessian turned to float64 at a time when forming A H


@contextlib.contextmanager
def reuse_svd() -> Iterator[None]:
    """Within this block, :func:`svd` remembers each delta's SVD (by content), so planning, compressing and
    compressing again at other ratios factorize each delta once. Holds the factors in memory until the block ends."""
    global _SVD_CACHE
    outer = _SVD_CACHE
    if outer is None:
        _SVD_CACHE = {}
    try:
        yield
    finally:
        if outer is None:
            _SVD_CACHE = None


def reuse_svd_if_fits(shapes: Iterable[tuple[int, int]]) -> contextlib.AbstractContextManager:
    """:func:`reuse_svd` when the factors of deltas of these shapes fit in ``SVD_CACHE_BYTES`` (float32, about twice
    each delta), else a block that keeps nothing: a small model's deltas are factorized once for the whole run."""
    fits = sum(m * n for m, n in shapes) * 8 <= SVD_CACHE_BYTES
    return reuse_svd() if fits else contextlib.nullcontext()


def remembered(kind: str, delta: torch.Tensor, compute: Callable[[], T], *params: Any) -> T:
    """``compute()`` of ``delta``, remembered inside :func:`reuse_svd` by ``kind``, the delta's content and
    ``params`` (its SVD; the vector codes of a ``vq`` part, fitted once where the plan weighs several layouts)."""
    if _SVD_CACHE is None:
        return compute()
    d = delta.detach()
    h = hashlib.blake2b(digest_size=20)
    h.update(str((kind, tuple(d.shape), str(d.dtype), str(d.device), params)).encode())
    h.update(d.contiguous().cpu().numpy().tobytes())
    key = h.digest()
    hit = _SVD_CACHE.get(key)
    if hit is None:
        hit = _SVD_CACHE[key] = compute()
    return hit


def svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, Vh)`` of a float32 matrix (cached inside :func:`reuse_svd`)."""
    d = delta.detach().to(torch.float32)
    return remembered("svd", d, lambda: tuple(torch.linalg.svd(d, full_matrices=False)))


@torch.no_grad()
def compress_linear(
    delta: torch.Tensor,
    hessian: Hessian | None,
    bands: Sequence[Sequence[int]],
    group_size: int,
    *,
    quantizer: str = "gptq",
    damp: float = 0.01,
    act_order: bool = False,
    refit_u: bool = True,
    name: str = "",
) -> list[tuple[QuantizedMatrix, QuantizedMatrix, torch.Tensor]]:
    """Compress one ``m x n`` delta into ``[(V_kᵀ, U_kᵀ, S_k), ...]``, one entry per band of non-zero rank.

    Both factors are returned as stored in format 2: ``V_kᵀ`` (``r_k x n``) and ``U_kᵀ`` (``r_k x m``), each singular
    vector with its own scale and zero per group of ``group_size`` values.

    ``Δ = U S Vᵀ`` (SVD); the singular triplets are split into ``bands`` (``[(bits, rank), ...]``, largest singular
    values first). With ``quantizer="gptq"`` and an input Hessian ``H`` (``n x n``), all bands of ``Vᵀ`` are quantized
    in one GPTQ pass against ``H``; then ``U`` is quantized (bands = column segments) against the Hessian of its own
    input ``z = S V_qᵀ x``, i.e. ``A H Aᵀ`` with ``A = diag(S) V_qᵀ``. With ``refit_u`` the target for ``U`` is first
    re-solved by least squares, ``U* = Δ H Aᵀ (A H Aᵀ)⁻¹`` (ridge-damped towards the SVD's ``U``), so that ``U``
    absorbs the error of ``V_q``; then GPTQ on ``U*`` minimises the whole module's output error ``||(Δ − U_q A) X||``
    (the least-squares residual is orthogonal to what ``U`` can change). Without a Hessian (or with
    ``quantizer="rtn"``) both factors are rounded to nearest.
    """
    if delta.dim() != 2:
        raise DeltaCoMeError(f"delta of {name or 'module'} must be a matrix, got shape {tuple(delta.shape)}")
    m, n = delta.shape
    bands = [(int(b), int(r)) for b, r in bands]
    total = sum(r for _, r in bands)
    if total > min(m, n):
        raise ConfigError(f"layout of {name or 'module'}: total rank {total} exceeds min({m}, {n})")
    live = [(b, r) for b, r in bands if r > 0]
    if not live:
        return []
    if quantizer not in ("gptq", "rtn"):
        raise ConfigError(f"unknown quantizer {quantizer!r}; choose 'gptq' or 'rtn'")
    d = delta.to(torch.float32)
    U, S, Vh = svd(d)  # cached inside reuse_svd() (search, benchmarks compressing one delta many times)
    # copies of the kept singular vectors, so the full factors (0.17 GiB for a 7B MLP projection) are freed here
    U, S, Vh = U[:, :total].clone(), S[:total], Vh[:total].clone()
    use_gptq = quantizer == "gptq" and hessian is not None
    if use_gptq and tuple(hessian.shape) != (n, n):
        raise DeltaCoMeError(f"Hessian of {name or 'module'} has shape {tuple(hessian.shape)}, expected ({n}, {n})")

    if use_gptq:
        # No n x n float64 copy of the Hessian is kept here (0.97 GB for a 7B down_proj): GPTQ shares the caller's
        # and makes its one working copy, and A H is formed a block of columns at a time
        H = hessian if isinstance(hessian, SpilledHessian) else hessian.to(device=d.device)
        gptq_v = GPTQ.from_hessian(H, name=f"{name} V", copy=False)
        v_parts = gptq_v.quantize_row_bands(Vh, live, group_size, damp, act_order)
        Vq = torch.cat([q.dequantize().to(d.device) for q in v_parts])
        A = S.to(torch.float64).unsqueeze(1) * Vq.to(torch.float64)  # r x n
        AH = torch.cat([A @ column_block(H, j, j + _BLOCK).to(d.device, torch.float64) for j in range(0, n, _BLOCK)], 1)
        Hz = AH @ A.t()  # Hessian of z = A x
        Hz = (Hz + Hz.t()) / 2
        target = U
        if refit_u:
            target = _least_squares_u(d, U.to(torch.float64), AH, Hz, damp)
            if target is None:
                target = U
        u_parts = GPTQ.from_hessian(Hz, name=f"{name} U").quantize_columns_transposed(
            target.to(torch.float32), live, group_size, damp
        )
    else:
        v_parts, u_parts = [], []
        start = 0
        for b, r in live:
            v_parts.append(quantize_rtn(Vh[start : start + r], b, group_size))
            u_parts.append(quantize_rtn(U[:, start : start + r].t(), b, group_size))
            start += r
    out = []
    start = 0
    for (_, r), vq, uq in zip(live, v_parts, u_parts, strict=True):
        out.append((vq, uq, S[start : start + r].to(torch.float32).cpu()))
        start += r
    return out


def _least_squares_u(
    delta: torch.Tensor, u0: torch.Tensor, AH: torch.Tensor, Hz: torch.Tensor, damp: float
) -> torch.Tensor | None:
    """``argmin_U ||(Δ − U A) X||² + λ ||U − U₀||²`` = ``(Δ H Aᵀ + λ U₀)(A H Aᵀ + λI)⁻¹``; None if singular.

    The ridge pulls towards the SVD factor ``U₀`` (not towards zero), so damping never shrinks the delta;
    ``λ = damp · mean(diag(A H Aᵀ))`` as in GPTQ.
    """
    reg = Hz.clone()
    mean_diag = float(torch.diagonal(reg).mean())
    if not mean_diag > 0:
        return None
    lam = max(damp, 1e-6) * mean_diag
    torch.diagonal(reg).add_(lam)
    L, info = torch.linalg.cholesky_ex(reg)
    if int(info) != 0:
        return None
    # Δ H Aᵀ in float64 a block of rows at a time (each entry the same dot product as in one product; no m x n
    # float64 copy of the delta, 0.34 GiB for a 7B gate_proj)
    rhs = torch.cat([delta[i : i + _BLOCK].to(torch.float64) @ AH.t() for i in range(0, delta.shape[0], _BLOCK)])
    rhs += lam * u0  # m x r
    sol = torch.cholesky_solve(rhs.t(), L).t()
    return sol if bool(torch.isfinite(sol).all()) else None
