"""GPTQ of a sparse matrix whose support is fixed: the kept values of a DARE part rounded with error feedback.

DARE's mask is regenerated from a seed, so only the kept values are stored (one row, groups of ``group_size``, the
layout of ``format.baseline_parts.SparsePart``). Rounding them to nearest ignores the inputs; here each column's
rounding error, a dropped entry's update included, is pushed onto the columns not yet visited through the Cholesky
factor of ``H⁻¹`` (:mod:`.cholesky`), as GPTQ (:mod:`.gptq`) does for dense factors and SparseGPT for a mask it
chooses itself. The per-group grids cannot follow the loop (a group is a run of kept values in row-major order that
crosses columns), so they are fitted (clipped round-to-nearest) to the kept values before any error feedback, as
GPTQ's static groups are.
"""

from __future__ import annotations

import torch

from ..errors import DeltaCoMeError
from ..format.packing import QuantizedMatrix
from .cholesky import inverse_cholesky
from .rtn import quantize_rtn
from .spill import Hessian

BLOCK_SIZE = 128  # columns whose updates are applied to the rest at once (lazy batch updates, as in GPTQ)


def quantize_masked(
    hessian: Hessian,
    W: torch.Tensor,
    mask: torch.Tensor,
    bits: int,
    group_size: int,
    capacity: int | None = None,
    damp: float = 0.01,
    name: str = "",
) -> tuple[QuantizedMatrix, torch.Tensor]:
    """GPTQ of ``W`` restricted to ``mask`` under the input second moment ``hessian`` (``n x n`` for ``W`` ``m x n``).

    Entries outside ``mask`` become zero; the kept ones are quantized at ``bits`` and returned as one row of
    ``capacity`` values (row-major order, zero-padded; default: as many as are kept) with the dense ``m x n``
    result (float32, CPU), which is exactly what that row dequantizes to on the mask.
    """
    where = f" of {name!r}" if name else ""
    rows, cols = W.shape
    if tuple(hessian.shape) != (cols, cols):
        raise DeltaCoMeError(f"masked GPTQ{where}: weight of shape {(rows, cols)} does not match a Hessian of "
                             f"shape {tuple(hessian.shape)}")  # fmt: skip
    if tuple(mask.shape) != (rows, cols):
        raise DeltaCoMeError(f"masked GPTQ{where}: mask of shape {tuple(mask.shape)} does not match the weight "
                             f"{(rows, cols)}")  # fmt: skip
    mask = mask.to(torch.bool).cpu()
    kept = int(mask.sum())
    capacity = kept if capacity is None else int(capacity)
    if capacity < max(kept, 1):
        raise DeltaCoMeError(f"masked GPTQ{where}: {kept} kept entries do not fit {capacity} values")
    Hinv, _ = inverse_cholesky(hessian, damp, name)  # upper triangle meaningful
    values = torch.zeros(1, capacity)
    values[0, :kept] = W.detach().to(torch.float32).cpu()[mask]
    grid = quantize_rtn(values, bits, group_size, clip=True)  # the grids only; the codes come from the loop
    scales, zeros = grid.scales.to(torch.float32).view(-1), grid.zeros.to(torch.float32).view(-1)
    group = torch.arange(kept) // group_size
    smap, zmap = torch.ones(rows, cols), torch.zeros(rows, cols)
    smap[mask], zmap[mask] = scales[group], zeros[group]
    codes, dense = _loop(W, mask, Hinv, smap, zmap, float(2**bits - 1))
    row = zeros[torch.arange(capacity) // group_size].clone()  # padding rounds to its group's zero point
    row[:kept] = codes[mask]
    return QuantizedMatrix.from_int(row.view(1, -1).to(torch.int64), grid.scales, grid.zeros, bits, group_size), dense


def _loop(
    W: torch.Tensor, mask: torch.Tensor, Hinv: torch.Tensor, smap: torch.Tensor, zmap: torch.Tensor, top: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The column loop on the per-entry grid (``smap``, ``zmap``, top code ``top``): the codes and the dequantized
    values, zero off ``mask``. A block is held transposed, so each column is a contiguous row."""
    rows, cols = W.shape
    W = W.detach().to(torch.float32).cpu().clone()
    keep = mask.to(torch.float32)
    dense, codes = torch.zeros(rows, cols), torch.zeros(rows, cols)
    for i1 in range(0, cols, BLOCK_SIZE):
        i2 = min(i1 + BLOCK_SIZE, cols)
        count = i2 - i1
        Wt, Kt = W[:, i1:i2].t().contiguous(), keep[:, i1:i2].t().contiguous()
        St, Zt = smap[:, i1:i2].t().contiguous(), zmap[:, i1:i2].t().contiguous()
        Qt, Et, Ct = torch.zeros(count, rows), torch.zeros(count, rows), torch.zeros(count, rows)
        H1 = Hinv[i1:i2, i1:i2].to(torch.float32).cpu()
        pivots = H1.diagonal().tolist()
        for i in range(count):
            w = Wt[i]
            c = torch.div(w, St[i], out=Ct[i]).round_().add_(Zt[i]).clamp_(0.0, top)
            torch.sub(c, Zt[i], out=Qt[i]).mul_(St[i]).mul_(Kt[i])
            e = torch.sub(w, Qt[i], out=Et[i]).div_(pivots[i])
            if i + 1 < count:
                Wt[i + 1 :].sub_(torch.outer(H1[i, i + 1 :], e))
        dense[:, i1:i2], codes[:, i1:i2] = Qt.t(), Ct.t()
        if i2 < cols:
            W[:, i2:] -= Et.t() @ Hinv[i1:i2, i2:].to(torch.float32).cpu()
    return codes, dense
