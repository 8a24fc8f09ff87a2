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

A sparse band of singular vectors (`SparseBand`: impart, the sparse tail; format 6 hashes its masks the same way)
runs as two products: ``Vᵀ x`` by the same kernel into a ``tokens x rank`` float32 buffer, scaled by ``S``, then
``Uᵀ``'s product, which is transposed (the band's rows are its vectors, its outputs are columns): a program of
`BAND_TILE` outputs walks the rank and numbers each row's kept entries from that row's first value index in its
output tile, a table of ``rank x ceil(out / BAND_TILE)`` int32 kept beside the file (with ``Vᵀ``'s row starts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_deltacome.errors import DeltaCoMeError
from hf_deltacome.format.baseline_parts import SparsePart
from hf_deltacome.format.draws import HASH_BITS, MIX_A, MIX_B, hash_cut
from hf_deltacome.format.packing import pack_bits
from hf_deltacome.format.sparse_bands import SparseBand

from .triton_delta import _SUM_COMBINE, INTERPRET, _mma, _slot_tokens, part_call, part_launch

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


@triton.jit
def _hash_bits(seed, offs_r, offs_c, rmask, cmask, cut):
    """The kept entries (int32 0/1, ``[rows, cols]``) of a hashed mask: `format/draws.py`'s ``hash_mask``."""
    row_key = _mix32(seed.to(tl.uint32) ^ _mix32((2 * offs_r + 1).to(tl.uint32)))
    col_key = _mix32((2 * offs_c + 2).to(tl.uint32))
    draw = _mix32(row_key[:, None] ^ col_key[None, :]) >> (32 - _HASH_BITS)
    return ((draw < cut.to(tl.uint32)) & rmask[:, None] & cmask[None, :]).to(tl.int32)


@triton.jit
def _gather_values(q_ptr, hi_ptr, sc_ptr, z_ptr, idx, keep, group, BITS: tl.constexpr):
    """The dequantized values at flat indices ``idx`` of a packed ``1 x nnz`` row (zero where not ``keep``)."""
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LO
    code = (tl.load(q_ptr + idx // PER, mask=keep, other=0) >> (idx % PER * LO)) & ((1 << LO) - 1)
    if BITS == 3:
        code = code | (((tl.load(hi_ptr + idx // 32, mask=keep, other=0) >> (idx % 32)) & 1) << 2)
    scale = tl.load(sc_ptr + idx // group, mask=keep, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + idx // group, mask=keep, other=0).to(tl.float32)
    return tl.where(keep, (code.to(tl.float32) - zero) * scale, 0.0)


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
    acc = tl.full([BT, BM], 0.0, tl.float32)
    before = tl.load(start_ptr + offs_m, mask=mmask, other=0)  # kept values of each row before the tile
    for k0 in range(0, N, BK):
        offs_k = k0 + tl.arange(0, BK)
        if HASHED:
            bits = _hash_bits(seed, offs_m, offs_k, mmask, offs_k < N, cut)
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
        w = _gather_values(q_ptr, hi_ptr, sc_ptr, z_ptr, idx, bits != 0, group, BITS)  # [BM, BK]
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


@triton.jit(do_not_specialize=["T", "R", "M", "tokens_per_row", "slot", "stride_tt", "stride_yt", "n_tiles", "group",
                               "seed", "cut"])  # fmt: skip
def _sparse_t_kernel(
    t_ptr,
    y_ptr,
    row_ad_ptr,
    tile_start_ptr,  # int32 ``R x n_tiles``: index of the first kept value of row r at or after column j * BO
    q_ptr,
    hi_ptr,
    sc_ptr,
    z_ptr,
    T,
    R,
    M,
    tokens_per_row,
    slot,
    stride_tt,
    stride_yt,
    n_tiles,
    group,
    seed,
    cut,
    BITS: tl.constexpr,
    COMPUTE: tl.constexpr,
    BT: tl.constexpr,
    BO: tl.constexpr,
    BK: tl.constexpr,
):
    """``y += t @ W`` for a hashed sparse ``W`` (``R x M``, its kept values packed row-major): a sparse band's
    ``Uᵀ``, whose rows are the band's vectors and whose columns are the outputs. A program takes ``BO`` outputs and
    ``BT`` tokens and walks the ``R`` rows in tiles of ``BK``, numbering each row's kept entries from its start in
    the output tile (``tile_start_ptr``)."""
    pid_o = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_o = pid_o * BO + tl.arange(0, BO)
    omask = offs_o < M
    offs_t, tmask = _slot_tokens(pid_t, T, row_ad_ptr, tokens_per_row, slot, BT)
    acc = tl.full([BT, BO], 0.0, tl.float32)
    for r0 in range(0, R, BK):
        offs_r = r0 + tl.arange(0, BK)
        rmask = offs_r < R
        bits = _hash_bits(seed, offs_r, offs_o, rmask, omask, cut)  # [BK, BO]
        first = tl.load(tile_start_ptr + offs_r * n_tiles + pid_o, mask=rmask, other=0)
        idx = first[:, None] + tl.associative_scan(bits, 1, _SUM_COMBINE) - bits
        w = _gather_values(q_ptr, hi_ptr, sc_ptr, z_ptr, idx, bits != 0, group, BITS)
        tt = tl.load(
            t_ptr + offs_t[:, None] * stride_tt + offs_r[None, :],
            mask=tmask[:, None] & rmask[None, :],
            other=0.0,
        )
        acc = _mma(acc, tt, w, COMPUTE)
    out = y_ptr + offs_t[:, None] * stride_yt + offs_o[None, :]
    ymask = tmask[:, None] & omask[None, :]
    acc += tl.load(out, mask=ymask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=ymask)


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
    starts = _first_indices(mask.sum(1, dtype=torch.int64), f"a {mask.shape[0]}x{mask.shape[1]} DARE part")
    words = None if hashed_in_kernel(part) else pack_bits(mask.to(torch.int64), 1).to(device)
    return words, starts


def _first_indices(counts: torch.Tensor, what: str) -> torch.Tensor:
    """The index of each group's first kept value (int32) from the groups' kept counts, in the order the values are
    stored; ``what`` names the part in the error when the values pass what the kernels index (2^31)."""
    total = int(counts.sum())
    if total >= 2**31:
        raise DeltaCoMeError(f"{what} keeps {total} values; the kernels index up to 2^31")
    return (torch.cumsum(counts, 0) - counts).to(torch.int32)


def _dare_tile(T: int) -> tuple[int, int]:
    """The DARE kernel's rows and columns a program (``compile_check._SPARSE_TILES`` compiles these)."""
    return (32, 128) if INTERPRET or T > 1 else (16, 256)


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
    compute, bt = part_launch(x2)
    bm, bk = _dare_tile(T)
    grid = (triton.cdiv(M, bm), triton.cdiv(T, bt))
    _sparse_kernel[grid](
        x2, y2, rows, starts if hashed else words, starts, v.qweight, hi, v.scales, v.zeros, T, M, N,
        tokens_per_row, slot, x2.stride(0), y2.stride(0), 0 if hashed else words.stride(0), v.group_size,
        part.seed & 0xFFFFFFFF, hash_cut(part.keep) if hashed else 0,
        HASHED=hashed, BITS=v.bits, COMPUTE=compute, BT=bt, BM=bm, BK=bk, num_warps=4,
    )  # fmt: skip
    return y


# -- sparse bands (impart, the sparse tail) -------------------------------------------------------------------------

BAND_TILE = 64  # outputs a program of the ``Uᵀ`` product takes: the tile the band's mask state counts in


def band_mask_state(band: SparseBand, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels read of a hashed sparse band's masks on ``device``: each row of ``Vᵀ``'s first kept value
    index (int32, ``rank``) and, for ``Uᵀ``, the first kept value index of each row in each tile of `BAND_TILE`
    outputs (int32, ``rank x ceil(out / BAND_TILE)``); cached on the band's store until its bytes change."""
    key = band._prefix + "mask"
    return band._store.derived(key, band.v.qweight, lambda: build_band_mask_state(band, device), device)


def build_band_mask_state(band: SparseBand, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`band_mask_state` built: the masks hashed on ``device`` and checked against the stored counts."""
    mv, mu = band.masks(device)
    v_starts = _first_indices(mv.sum(1, dtype=torch.int64), f"{band!r} (its V)")
    r, m = mu.shape
    tiles = -(-m // BAND_TILE)
    padded = torch.zeros(r, tiles * BAND_TILE, dtype=torch.int64, device=mu.device)
    padded[:, :m] = mu
    per_tile = padded.view(r, tiles, BAND_TILE).sum(2).reshape(-1)  # row-major: the order the values are stored in
    return v_starts, _first_indices(per_tile, f"{band!r} (its U)").view(r, tiles)


def sparse_band_ready(band: SparseBand) -> bool:
    """Can the kernels read this sparse band: hashed masks (format 6; the CPU generator's of older files go through
    PyTorch), a bit width they read, contiguous buffers."""
    buffers = [t for factor in (band.v, band.u) for t in (factor.qweight, factor.scales, factor.zeros)]
    return band.draws == "hash" and band.bits in SPARSE_BITS and all(t.is_contiguous() for t in buffers)


def sparse_band_add_into(
    y: torch.Tensor,
    x: torch.Tensor,
    band: SparseBand,
    row_index: torch.Tensor | None = None,
    slot: int = 0,
) -> torch.Tensor:
    """``y += U diag(S) Vᵀ x`` for a sparse band, in place, its values read packed and its masks hashed in the
    kernels (``Vᵀ x`` by the DARE kernel into a ``tokens x rank`` buffer, scaled by ``S``, then ``Uᵀ``'s product);
    with ``row_index`` only the rows of ``slot``. Returns ``y``."""
    x2, rows, tokens_per_row = part_call(y, x, band, "sparse band", row_index)
    if not sparse_band_ready(band):
        raise DeltaCoMeError(f"the kernels read sparse bands of hashed draws and {SPARSE_BITS} bits, not {band!r}")
    y2 = y.view(-1, band.out_features)
    T, R = x2.shape[0], band.rank
    if T == 0 or R == 0:
        return y
    v_starts, tile_starts = band_mask_state(band, x.device)
    compute, bt = part_launch(x2)
    cut = hash_cut(band.keep)
    t = torch.zeros(T, R, dtype=torch.float32, device=x.device)
    v, u = band.v, band.u
    bm, bk = _dare_tile(T)
    _sparse_kernel[(triton.cdiv(R, bm), triton.cdiv(T, bt))](
        x2, t, rows, v_starts, v_starts, v.qweight, v.qweight_hi if v.bits == 3 else v.qweight, v.scales, v.zeros,
        T, R, band.in_features, tokens_per_row, slot, x2.stride(0), t.stride(0), 0, v.group_size,
        band.seed & 0xFFFFFFFF, cut, HASHED=True, BITS=v.bits, COMPUTE=compute, BT=bt, BM=bm, BK=bk, num_warps=4,
    )  # fmt: skip
    t.mul_(band.s.to(t.device, torch.float32))
    _sparse_t_kernel[(triton.cdiv(band.out_features, BAND_TILE), triton.cdiv(T, bt))](
        t, y2, rows, tile_starts, u.qweight, u.qweight_hi if u.bits == 3 else u.qweight, u.scales, u.zeros,
        T, R, band.out_features, tokens_per_row, slot, t.stride(0), y2.stride(0), tile_starts.shape[1], u.group_size,
        (band.seed + 1) & 0xFFFFFFFF, cut, BITS=u.bits, COMPUTE=compute, BT=bt, BO=BAND_TILE, BK=32, num_warps=4,
    )  # fmt: skip
    return y
