"""Triton kernel for a vector-quantized part (`VectorPart`): ``y += Q_mᵀ [Ŷ; 0] Q_n x`` with ``Ŷ`` read from its
4-bit codes and its codebook in place.

The PyTorch path decodes ``Ŷ`` once and keeps it as float32: twice the fp16 delta the part replaces, where the part
itself is ~1/32 of it. The kernel keeps nothing beyond the part's own bytes. A program takes ``BM`` rows of ``Ŷ``
and ``BT`` tokens and walks the columns in tiles of ``BK``: entry ``(r, c)`` is element ``f mod dim`` of the code
of vector ``f // dim`` (``f = r·in + c``: the vectors run row-major and may straddle rows), two codes a byte, low
nibble first, looked up in the ``codes x dim`` float16 codebook (a few hundred bytes, cache-resident) and
multiplied by the part's scale. The two rotations are Kronecker products of two small orthogonal factors each
(`format/vq_part.rotate`): applied by PyTorch before and after the kernel, ``O(in·(a + b))`` per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_deltacome.errors import DeltaCoMeError
from hf_deltacome.format.vq_part import VectorPart, rotate

from .triton_delta import INTERPRET, _mma, _slot_tokens, part_call, part_launch

VQ_CODES = (16,)  # codebook sizes the kernel reads (4-bit codes, two a byte)


@triton.jit(do_not_specialize=["T", "R", "N", "DIM", "tokens_per_row", "slot", "stride_xt", "stride_tt"])
def _vq_kernel(
    x_ptr,  # the rotated input, ``T x N``
    t_ptr,  # float32 ``T x R``: the rotated output's first R entries
    row_ad_ptr,  # adapter slot of each batch row (a mixed batch); other slots' tokens get zeros
    codes_ptr,  # uint8, two 4-bit codes a byte
    book_ptr,  # float16 ``codes x DIM``
    scale_ptr,  # float32, one
    T,
    R,
    N,
    DIM,
    tokens_per_row,
    slot,
    stride_xt,
    stride_tt,
    COMPUTE: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mmask = offs_m < R
    offs_t, tmask = _slot_tokens(pid_t, T, row_ad_ptr, tokens_per_row, slot, BT)
    acc = tl.full([BT, BM], 0.0, tl.float32)
    for k0 in range(0, N, BK):
        offs_k = k0 + tl.arange(0, BK)
        wmask = mmask[:, None] & (offs_k < N)[None, :]
        flat = offs_m[:, None] * N + offs_k[None, :]  # [BM, BK] entry of the row-major Ŷ (int32: checked)
        vec = flat // DIM
        byte = tl.load(codes_ptr + vec // 2, mask=wmask, other=0).to(tl.int32)
        code = (byte >> ((vec % 2) * 4)) & 15
        w = tl.load(book_ptr + code * DIM + (flat % DIM), mask=wmask, other=0.0).to(tl.float32)
        xt = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :],
            mask=tmask[:, None] & (offs_k < N)[None, :],
            other=0.0,
        )
        acc = _mma(acc, xt, tl.trans(w), COMPUTE)
    acc = acc * tl.load(scale_ptr)
    tl.store(t_ptr + offs_t[:, None] * stride_tt + offs_m[None, :], acc, mask=(offs_t < T)[:, None] & mmask[None, :])


def vq_ready(part: VectorPart) -> bool:
    """Can the kernel read this part (4-bit codes, contiguous buffers)."""
    return part.codes in VQ_CODES and all(b.is_contiguous() for b in (part.packed, part.codebook, part.scale))


def vq_add_into(
    y: torch.Tensor,
    x: torch.Tensor,
    part: VectorPart,
    row_index: torch.Tensor | None = None,
    slot: int = 0,
) -> torch.Tensor:
    """``y += Δ̂ x`` for a vector-quantized part, in place (``y``: ``(..., out)``, contiguous; ``x``: ``(..., in)``);
    returns ``y``. With ``row_index`` (one adapter slot per batch row, as in `delta_forward_mixed`) only the rows
    of ``slot`` change."""
    x2, rows, tokens_per_row = part_call(y, x, part, "vector-quantized", row_index)
    if not vq_ready(part):
        raise DeltaCoMeError(f"the kernel reads {VQ_CODES}-entry codebooks, not {part.codes}")
    T, M, N, R = x2.shape[0], part.out_features, part.in_features, part.rows
    if R * N >= 2**31:
        raise DeltaCoMeError(f"a vector-quantized part of {R}x{N} stored entries; the kernel indexes up to 2^31")
    if T == 0:
        return y
    q_in, q_out = part.rotations(x.device)  # float32: rotated in float32, multiplied in the activations' dtype
    xr = rotate(x2.to(torch.float32), q_in).to(x2.dtype).contiguous()
    t = torch.zeros(T, M, dtype=torch.float32, device=x.device)  # rows past R stay zero: ``[Ŷ; 0]``
    compute, bt = part_launch(x2)
    bm, bk = (32, 64) if INTERPRET or T > 1 else (32, 128)
    grid = (triton.cdiv(R, bm), triton.cdiv(T, bt))
    _vq_kernel[grid](
        xr, t, rows, part.packed, part.codebook, part.scale, T, R, N, part.dim, tokens_per_row, slot, xr.stride(0),
        t.stride(0), COMPUTE=compute, BT=bt, BM=bm, BK=bk, num_warps=4,
    )  # fmt: skip
    out = rotate(t, q_out, inverse=True)
    y.view(-1, M).add_(out.to(y.dtype))
    return y
