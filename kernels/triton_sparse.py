"""Triton kernel for a DARE part (`SparsePart`): ``y += Δ̂ x`` with the kept values read in their packed form.

The mask comes from a CPU generator's seed (`baseline_parts.sparse_mask`), which a kernel cannot replay, so it is
drawn once per part and device and kept as a bitmap (one bit per weight: 1/16 of the fp16 delta) with, per row and
block of ``OFFSET_BLOCK`` columns, the index of its first kept value (int32: 1/64 of the fp16 delta). The PyTorch path
keeps a CSR copy instead, 8 bytes per kept value: at a keep-rate of 0.23 (half of 1/16 in 2-bit values) about 0.9x
the fp16 delta. A program takes ``BM`` rows and ``BT`` tokens and walks the columns in tiles of ``BK``: it expands
the tile's bitmap words to bits, numbers the kept ones by a running sum from the block's first index, gathers their
codes, scales and zeros from the packed values (row-major order of the kept entries), and multiplies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_deltacome.errors import DeltaCoMeError
from hf_deltacome.format.baseline_parts import SparsePart
from hf_deltacome.format.packing import pack_bits

from .triton_delta import _COMPUTE, _SUM_COMBINE, INTERPRET, _mma, _slot_tokens, part_call

OFFSET_BLOCK = 128  # columns per stored first-value index; the kernel's column tile is a multiple of it
SPARSE_BITS = (2, 3, 4, 8)  # value widths the kernel reads (DARE stores 2; the other widths are options)


@triton.jit(
    do_not_specialize=["T", "M", "N", "tokens_per_row", "slot", "stride_xt", "stride_yt", "bm_stride", "off_stride",
                       "group"]
)  # fmt: skip
def _sparse_kernel(
    x_ptr,
    y_ptr,
    row_ad_ptr,  # adapter slot of each batch row (a mixed batch); the tokens of rows of another slot are left alone
    bm_ptr,  # int32 bitmap words, ``M x ceil(N / 32)``, bit j of word w = column 32 w + j
    off_ptr,  # int32 index of the first kept value of each row and block of OFFSET_BLOCK columns
    q_ptr,  # the values' packed codes (low plane), qweight_hi (3 bits), float16 scales, uint8 zeros
    hi_ptr,
    sc_ptr,
    z_ptr,
    T,
    M,
    N,
    tokens_per_row,
    slot,
    stride_xt,
    stride_yt,
    bm_stride,
    off_stride,
    group,
    BITS: tl.constexpr,
    COMPUTE: tl.constexpr,
    OFFB: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    tl.static_assert(BK % OFFB == 0)
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mmask = offs_m < M
    offs_t, tmask = _slot_tokens(pid_t, T, row_ad_ptr, tokens_per_row, slot, BT)
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LO
    acc = tl.full([BT, BM], 0.0, tl.float32)
    for k0 in range(0, N, BK):
        wcols = k0 // 32 + tl.arange(0, BK // 32)
        words = tl.load(
            bm_ptr + offs_m[:, None] * bm_stride + wcols[None, :],
            mask=mmask[:, None] & (wcols * 32 < N)[None, :],
            other=0,
        )
        bits = tl.reshape((words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1, [BM, BK])
        first = tl.load(off_ptr + offs_m * off_stride + k0 // OFFB, mask=mmask, other=0)
        idx = first[:, None] + tl.associative_scan(bits, 1, _SUM_COMBINE) - bits  # kept values before each entry
        keep = bits != 0
        code = (tl.load(q_ptr + idx // PER, mask=keep, other=0) >> (idx % PER * LO)) & ((1 << LO) - 1)
        if BITS == 3:
            code = code | (((tl.load(hi_ptr + idx // 32, mask=keep, other=0) >> (idx % 32)) & 1) << 2)
        scale = tl.load(sc_ptr + idx // group, mask=keep, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + idx // group, mask=keep, other=0).to(tl.float32)
        w = tl.where(keep, (code.to(tl.float32) - zero) * scale, 0.0)  # [BM, BK]
        offs_k = k0 + tl.arange(0, BK)
        xt = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :],
            mask=tmask[:, None] & (offs_k < N)[None, :],
            other=0.0,
        )
        acc = _mma(acc, xt, tl.trans(w), COMPUTE)
    out = y_ptr + offs_t[:, None] * stride_yt + offs_m[None, :]
    omask = tmask[:, None] & mmask[None, :]
    acc += tl.load(out, mask=omask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=omask)


def _bitmap(part: SparsePart, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The part's mask as int32 bitmap words and per-block first-value indices on ``device``, cached on its store
    until the stored values change (beside the PyTorch path's CSR matrix: a model run on both keeps both)."""
    return part._store.derived("bitmap", part.values.qweight, lambda: _build_bitmap(part, device), device)


def _build_bitmap(part: SparsePart, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mask = part.mask()  # CPU, checked against the stored count
    m, n = mask.shape
    blocks = -(-n // OFFSET_BLOCK)
    padded = torch.zeros(m, blocks * OFFSET_BLOCK, dtype=torch.int64)
    padded[:, :n] = mask
    per_block = padded.view(m, blocks, OFFSET_BLOCK).sum(-1)
    flat = per_block.flatten()
    first = (torch.cumsum(flat, 0) - flat).view(m, blocks)  # kept values before each block, row-major
    if int(flat.sum()) >= 2**31:
        raise DeltaCoMeError(f"a {m}x{n} DARE part keeps {int(flat.sum())} values; the kernel indexes up to 2^31")
    words = pack_bits(mask.to(torch.int64), 1)
    return words.to(device), first.to(torch.int32).to(device)


def sparse_ready(part: SparsePart) -> bool:
    """Can the kernel read this part's values (bit width, contiguous buffers)."""
    v = part.values
    return v.bits in SPARSE_BITS and all(b is None or b.is_contiguous() for b in (v.qweight, v.scales, v.zeros))


def sparse_add_into(
    y: torch.Tensor,
    x: torch.Tensor,
    part: SparsePart,
    row_index: torch.Tensor | None = None,
    slot: int = 0,
) -> torch.Tensor:
    """``y += Δ̂ x`` for a DARE part, in place (``y``: ``(..., out)``, contiguous; ``x``: ``(..., in)``); returns ``y``.
    With ``row_index`` (one adapter slot per batch row, as in `delta_forward_mixed`) only the rows of ``slot``."""
    x2, rows, tokens_per_row = part_call(y, x, part, "DARE", row_index)
    if not sparse_ready(part):
        raise DeltaCoMeError(f"the kernel reads DARE values of {SPARSE_BITS} bits, not {part.values.bits}")
    y2 = y.view(-1, part.out_features)
    T, (M, N) = x2.shape[0], (part.out_features, part.in_features)
    if T == 0:
        return y
    words, first = _bitmap(part, x.device)
    v = part.values
    hi = v.qweight_hi if v.bits == 3 else v.qweight
    compute = tl.float32 if INTERPRET else _COMPUTE[x2.dtype]
    bt = 1 if T == 1 else min(32, max(16, triton.next_power_of_2(T)))
    bm, bk = (32, 128) if INTERPRET or T > 1 else (16, 256)
    grid = (triton.cdiv(M, bm), triton.cdiv(T, bt))
    _sparse_kernel[grid](
        x2, y2, rows, words, first, v.qweight, hi, v.scales, v.zeros, T, M, N, tokens_per_row, slot, x2.stride(0),
        y2.stride(0),
        words.stride(0), first.stride(0), v.group_size,
        BITS=v.bits, COMPUTE=compute, OFFB=OFFSET_BLOCK, BT=bt, BM=bm, BK=bk, num_warps=4,
    )  # fmt: skip
    return y
