"""Triton kernel for a DARE part (`SparsePart`): ``y += Δ̂ x`` with the kept values read in their packed form.

A part of format 5 draws its mask by a hash of ``(seed, row, column)`` (`format/draws.py`), which the kernel
replays tile by tile: beside the file the GPU keeps only the index of each row's first kept value (int32 a row).
A part of an older format drew it from a CPU generator's seed, which a kernel cannot replay, so that mask (and an
importance-rated part's, whose threshold depends on per-row and per-column rates) is drawn once per part and device
and kept as a bitmap (one bit per weight: 1/16 of the fp16 delta). The PyTorch path keeps a CSR copy instead, 8
bytes per kept value: at a keep-rate of 0.23 (half of 1/16 in 2-bit values) about 0.9x the fp16 delta. A program
takes ``BM`` rows and ``BT`` tokens and walks the columns in tiles of ``BK``: it hashes the tile's entries (or
expands its bitmap words) to bits, numbers the kept ones by a running sum from each row's first index, gathers
their codes, scales and zeros from the packed values (row-major order of the kept entries), and multiplies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_deltacome.errors import DeltaCoMeError
from hf_deltacome.format.baseline_parts import SparsePart
from hf_deltacome.format.draws import HASH_BITS, MIX_A, MIX_B, hash_cut
from hf_deltacome.format.packing import pack_bits

from .triton_delta import _COMPUTE, _SUM_COMBINE, INTERPRET, _mma, _slot_tokens, part_call

SPARSE_BITS = (2, 3, 4, 8)  # value widths the kernel reads (DARE stores 2; the other widths are options)
_MIX_A, _MIX_B, _HASH_BITS = tl.constexpr(MIX_A), tl.constexpr(MIX_B), tl.constexpr(HASH_BITS)


@triton.jit
def _mix32(x):
    """`format/draws.py`'s finaliser on uint32 (its multiplies wrap)."""
    x = x ^ (x >> 16)
    x = x * _MIX_A
    x = x ^ (x >> 15)
    x = x * _MIX_B
    return x ^ (x >> 15)


@triton.jit(
    do_not_specialize=["T", "M", "N", "tokens_per_row", "slot", "stride_xt", "stride_yt", "bm_stride", "group",
                       "seed", "cut"]
)  # fmt: skip
def _sparse_kernel(
    x_ptr,
    y_ptr,
    row_ad_ptr,  # adapter slot of each batch row (a mixed batch); the tokens of rows of another slot are left alone
    bm_ptr,  # int32 bitmap words, ``M x ceil(N / 32)``, bit j of word w = column 32 w + j (unused when HASHED)
    start_ptr,  # int32 index of the first kept value of each row
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
    group,
    seed,  # HASHED: the mask's seed (its low 32 bits) and cut (entries whose draw is under it are kept)
    cut,
    HASHED: tl.constexpr,
    BITS: tl.constexpr,
    COMPUTE: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    tl.static_assert(BK % 32 == 0)
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mmask = offs_m < M
    offs_t, tmask = _slot_tokens(pid_t, T, row_ad_ptr, tokens_per_row, slot, BT)
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LO
    acc = tl.full([BT, BM], 0.0, tl.float32)
    before = tl.load(start_ptr + offs_m, mask=mmask, other=0)  # kept values of each row before the tile
    if HASHED:
        row_key = _mix32(seed.to(tl.uint32) ^ _mix32((2 * offs_m + 1).to(tl.uint32)))
    for k0 in range(0, N, BK):
        offs_k = k0 + tl.arange(0, BK)
        if HASHED:
            col_key = _mix32((2 * offs_k + 2).to(tl.uint32))
            draw = _mix32(row_key[:, None] ^ col_key[None, :]) >> (32 - _HASH_BITS)
            bits = ((draw < cut.to(tl.uint32)) & mmask[:, None] & (offs_k < N)[None, :]).to(tl.int32)
        else:
            wcols = k0 // 32 + tl.arange(0, BK // 32)
            words = tl.load(
                bm_ptr + offs_m[:, None] * bm_stride + wcols[None, :],
                mask=mmask[:, None] & (wcols * 32 < N)[None, :],
                other=0,
            )
            bits = tl.reshape((words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1, [BM, BK])
        idx = before[:, None] + tl.associative_scan(bits, 1, _SUM_COMBINE) - bits  # kept values before each entry
        before += tl.reduce(bits, 1, _SUM_COMBINE)  # (tl.sum: a late TRITON_INTERPRET=1 does not patch it)
        keep = bits != 0
        code = (tl.load(q_ptr + idx // PER, mask=keep, other=0) >> (idx % PER * LO)) & ((1 << LO) - 1)
        if BITS == 3:
            code = code | (((tl.load(hi_ptr + idx // 32, mask=keep, other=0) >> (idx % 32)) & 1) << 2)
        scale = tl.load(sc_ptr + idx // group, mask=keep, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + idx // group, mask=keep, other=0).to(tl.float32)
        w = tl.where(keep, (code.to(tl.float32) - zero) * scale, 0.0)  # [BM, BK]
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


def hashed_in_kernel(part: SparsePart) -> bool:
    """Does the kernel replay this part's mask itself (uniform hashed draws), keeping no bitmap."""
    return part.draws == "hash" and not part.rated


def mask_state(part: SparsePart, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What the kernel reads of the part's mask on ``device``: the bitmap words (None where it hashes the mask
    itself) and each row's first kept value index, cached on its store until the stored values change (beside the
    PyTorch path's CSR matrix: a model run on both keeps both)."""
    return part._store.derived("dare_mask", part.values.qweight, lambda: build_mask_state(part, device), device)


def build_mask_state(part: SparsePart, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`mask_state` built: the mask drawn on ``device`` (hashed draws; the CPU's generator otherwise) and checked
    against the stored count."""
    mask = part.mask(device)
    m, n = mask.shape
    per_row = mask.sum(1, dtype=torch.int64)
    if int(per_row.sum()) >= 2**31:
        raise DeltaCoMeError(f"a {m}x{n} DARE part keeps {int(per_row.sum())} values; the kernel indexes up to 2^31")
    starts = (torch.cumsum(per_row, 0) - per_row).to(torch.int32)
    words = None if hashed_in_kernel(part) else pack_bits(mask.to(torch.int64), 1).to(device)
    return words, starts


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
    words, starts = mask_state(part, x.device)
    hashed = words is None
    v = part.values
    hi = v.qweight_hi if v.bits == 3 else v.qweight
    compute = tl.float32 if INTERPRET else _COMPUTE[x2.dtype]
    bt = 1 if T == 1 else min(32, max(16, triton.next_power_of_2(T)))
    bm, bk = (32, 128) if INTERPRET or T > 1 else (16, 256)
    grid = (triton.cdiv(M, bm), triton.cdiv(T, bt))
    _sparse_kernel[grid](
        x2, y2, rows, starts if hashed else words, starts, v.qweight, hi, v.scales, v.zeros, T, M, N,
        tokens_per_row, slot, x2.stride(0), y2.stride(0), 0 if hashed else words.stride(0), v.group_size,
        part.seed & 0xFFFFFFFF, hash_cut(part.keep) if hashed else 0,
        HASHED=hashed, BITS=v.bits, COMPUTE=compute, BT=bt, BM=bm, BK=bk, num_warps=4,
    )  # fmt: skip
    return y
