"""Triton kernels for ``y = Σ_k U_k (S_k ⊙ (V_kᵀ x)) + bias`` reading the packed Delta-CoMe format in place.

Two launches per call, both covering every band of every adapter at once:

* **shrink**: ``t[:, band cols] = S_k ⊙ (x V_k)`` into a float32 rank-space buffer ``t`` (tokens x total rank).
  The grid runs over rank tiles of all bands (a tile never straddles two bands; each program finds its band in
  the plan's band table), token blocks and, for small batches, splits of the reduction dimension so that enough
  programs stream the packed ``V`` in parallel. Split ``s`` stores its partial sums in slice ``s`` of ``t``
  (``split_k x tokens x rank``): no atomics and no zero-filled buffer (one launch fewer per call).
* **expand**: ``y[:, m block] = Σ_bands t[:, band cols] U_kᵀ + bias`` (optionally added to an existing ``y``),
  summing the ``split_k`` slices of ``t`` as it loads them. The grid runs over output blocks, token blocks and, for
  small batches, splits of the rank (float32 partial outputs, added in split order by the last program to reach
  the tile: deterministic) and the adapter slots of a mixed batch (each slot's programs write only its rows).

Both dequantize in registers: a tile's packed int32 words are loaded as a contiguous block and split into their
``32 / bits`` values (1/2/4/8-bit planes; a 3-bit band adds its 1-bit plane as bit 2), then ``(q - zero) * scale``
with the group's float16 scale and uint8 zero. Each program branches once, uniformly, to a loop specialised for
its band's bit width, so one launch serves bands of mixed widths and any ranks. A group size shared by all bands
(power of two, >= 16: the usual 128) is a compile-time constant, so that scales and zeros are loaded once per row
and group; other group sizes are read per element.

Mixed batches (one adapter per batch row, ``-1`` or any index without a delta = none) use the same kernels (one
adapter is the case of a single slot that every row uses): shrink programs of adapter ``a`` keep only the tokens whose row maps to ``a`` (and skip the reduction
when none does), expand programs add only the adapters present in their token block (one program per adapter slot
for small batches, a loop over the slots for prefill) — the Punica / S-LoRA
gather done by masking, without sorting and without any host synchronisation.

Under ``TRITON_INTERPRET=1`` (CPU) the matmuls run in float32 and a single small configuration is used.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from hf_deltacome.errors import DeltaCoMeError
from hf_deltacome.format.baseline_parts import SparsePart
from hf_deltacome.format.sparse_bands import SparseBand
from hf_deltacome.format.storage import PackedDelta
from hf_deltacome.format.vq_part import VectorPart

from . import plan as P

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # triton.jit reads it at decoration time, as we do

# Table layout, mirrored from plan.py as compile-time constants.
_NF = tl.constexpr(P.N_FIELDS)
_NA = tl.constexpr(P.N_AFIELDS)
_F_VQ = tl.constexpr(P.F_VQ)
_F_VHI = tl.constexpr(P.F_VHI)
_F_VS = tl.constexpr(P.F_VS)
_F_VZ = tl.constexpr(P.F_VZ)
_F_UQ = tl.constexpr(P.F_UQ)
_F_UHI = tl.constexpr(P.F_UHI)
_F_US = tl.constexpr(P.F_US)
_F_UZ = tl.constexpr(P.F_UZ)
_F_S = tl.constexpr(P.F_S)
_F_BITS = tl.constexpr(P.F_BITS)
_F_HAS_HI = tl.constexpr(P.F_HAS_HI)
_F_RANK = tl.constexpr(P.F_RANK)
_F_TCOL = tl.constexpr(P.F_TCOL)
_F_GROUP = tl.constexpr(P.F_GROUP)
_F_V_WSTRIDE = tl.constexpr(P.F_V_WSTRIDE)
_F_V_HSTRIDE = tl.constexpr(P.F_V_HSTRIDE)
_F_V_GSTRIDE = tl.constexpr(P.F_V_GSTRIDE)
_F_U_WSTRIDE = tl.constexpr(P.F_U_WSTRIDE)
_F_U_HSTRIDE = tl.constexpr(P.F_U_HSTRIDE)
_F_U_GSTRIDE = tl.constexpr(P.F_U_GSTRIDE)
_F_ADAPTER = tl.constexpr(P.F_ADAPTER)
_A_BAND_LO = tl.constexpr(P.A_BAND_LO)
_A_BAND_HI = tl.constexpr(P.A_BAND_HI)
_A_BIAS = tl.constexpr(P.A_BIAS)
_A_HAS_BIAS = tl.constexpr(P.A_HAS_BIAS)


# Only our own @triton.jit helpers and Triton builtins are used in the kernels, never triton.language's jit'd
# library functions (tl.cdiv, tl.zeros, tl.max, tl.sum): those are compiled-mode objects when Triton was imported before
# TRITON_INTERPRET=1 was set (transformers imports it early), and the interpreter cannot call them.


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


# Triton's own combine functions when present: the interpreter recognises them and reduces with numpy (it steps
# through any other combine function element by element); passing them to tl.reduce never calls them in Python.
_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _add)
_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _max)


@triton.jit
def _any(mask):
    """Scalar: is any element of the 1-D boolean ``mask`` set."""
    return tl.reduce(mask.to(tl.int32), 0, _MAX_COMBINE) != 0


@triton.jit
def _dequant_packed(
    q_ptr,
    hi_ptr,
    sc_ptr,
    z_ptr,
    rows,
    row_mask,
    col0,
    ncols,
    wstride,
    hstride,
    gstride,
    group,
    BITS: tl.constexpr,
    NCOLS: tl.constexpr,
    GROUP: tl.constexpr,
    OUT: tl.constexpr,
):
    """``(q - zero) * scale`` of the ``[rows, col0 : col0 + NCOLS]`` tile of a packed matrix, as ``OUT``.

    Columns run along the packed (reduction) dimension; ``col0`` is a multiple of ``NCOLS`` (itself a multiple of
    32) and columns from ``ncols`` on read as code 0. The packed words are loaded as a contiguous ``[rows, words]``
    tile and split into ``32 / bits`` values each in registers (a 3-bit band adds its 1-bit plane as bit 2). With a
    compile-time power-of-two ``GROUP`` the scales and zeros are loaded once per row and group and broadcast;
    ``GROUP == 0`` reads them per element with the runtime ``group`` (any group size). ``OUT`` is float16 for
    float16 activations (codes and zeros are exact in float16, so the product is rounded once, as in float32 then
    float16) and float32 otherwise.
    """
    tl.static_assert(NCOLS % 32 == 0)
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LO
    W: tl.constexpr = NCOLS // PER
    R: tl.constexpr = rows.shape[0]
    wcols = col0 // PER + tl.arange(0, W)
    words = tl.load(
        q_ptr + rows[:, None] * wstride + wcols[None, :],
        mask=row_mask[:, None] & (wcols * PER < ncols)[None, :],
        other=0,
    )
    shifts = tl.arange(0, PER) * LO
    q = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & ((1 << LO) - 1), [R, NCOLS])
    if BITS == 3:
        hcols = col0 // 32 + tl.arange(0, NCOLS // 32)
        hw = tl.load(
            hi_ptr + rows[:, None] * hstride + hcols[None, :],
            mask=row_mask[:, None] & (hcols * 32 < ncols)[None, :],
            other=0,
        )
        hbits = (hw[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
        q = q | (tl.reshape(hbits, [R, NCOLS]) << 2)
    if GROUP == 0:
        cols = col0 + tl.arange(0, NCOLS)
        mask = row_mask[:, None] & (cols < ncols)[None, :]
        goff = rows[:, None] * gstride + (cols // group)[None, :]
        scale = tl.load(sc_ptr + goff, mask=mask, other=0.0).to(OUT)
        zero = tl.load(z_ptr + goff, mask=mask, other=0).to(OUT)
    elif NCOLS <= GROUP:  # the whole tile lies in one group
        goff = rows * gstride + col0 // GROUP
        scale = tl.load(sc_ptr + goff, mask=row_mask, other=0.0).to(OUT)[:, None]
        zero = tl.load(z_ptr + goff, mask=row_mask, other=0).to(OUT)[:, None]
    else:  # NCOLS / GROUP whole groups
        NG: tl.constexpr = NCOLS // GROUP
        gidx = col0 // GROUP + tl.arange(0, NG)
        gmask = row_mask[:, None] & (gidx < gstride)[None, :]  # gstride == number of groups per row
        goff = rows[:, None] * gstride + gidx[None, :]
        scale = tl.load(sc_ptr + goff, mask=gmask, other=0.0).to(OUT)
        zero = tl.load(z_ptr + goff, mask=gmask, other=0).to(OUT)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], [R, NG, GROUP]), [R, NCOLS])
        zero = tl.reshape(tl.broadcast_to(zero[:, :, None], [R, NG, GROUP]), [R, NCOLS])
    # Columns past ``ncols`` dequantize to ``-zero * scale``; the other operand is zero there.
    return (q.to(OUT) - zero) * scale


@triton.jit
def _slot_tokens(pid_t, T, row_ad_ptr, tokens_per_row, slot, BT: tl.constexpr):
    """The ``BT`` token indices of a parts' kernel program and which of them it computes: those in range whose batch
    row maps to adapter ``slot`` (``row_ad_ptr``: one slot per row; a single adapter passes a zero and ``T``)."""
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    return offs_t, tmask & (tl.load(row_ad_ptr + offs_t // tokens_per_row, mask=tmask, other=-1).to(tl.int32) == slot)


@triton.jit
def _mma(acc, a, b, COMPUTE: tl.constexpr):
    """``acc += a @ b`` with both operands in the activations' dtype (float32 products for a single token)."""
    if a.shape[0] == 1:  # one token: a matrix-vector product, multiply-add and reduce (no tensor-core tile)
        return acc + tl.reduce(tl.trans(a.to(tl.float32)) * b.to(tl.float32), 0, _SUM_COMBINE)[None, :]
    elif COMPUTE == tl.float32:  # near-float32 accuracy on tensor cores (three tf32 products)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        return tl.dot(a.to(COMPUTE), b.to(COMPUTE), acc)


@triton.jit
def _shrink_loop(
    acc,
    x_ptr,
    stride_xt,
    offs_t,
    tmask,
    vq,
    vhi,
    vs,
    vz,
    offs_r,
    rmask,
    wstride,
    hstride,
    gstride,
    group,
    k_lo,
    k_hi,
    BITS: tl.constexpr,
    COMPUTE: tl.constexpr,
    DEQ: tl.constexpr,
    GROUP: tl.constexpr,
    BK: tl.constexpr,
):
    """``acc[t, r] += Σ_k x[t, k] V[r, k]`` over ``k_lo <= k < k_hi`` for one band at ``BITS`` bits."""
    for k0 in range(k_lo, k_hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        xt = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :],
            mask=tmask[:, None] & (offs_k < k_hi)[None, :],
            other=0.0,
        )
        w = _dequant_packed(
            vq, vhi, vs, vz, offs_r, rmask, k0, k_hi, wstride, hstride, gstride, group, BITS, BK, GROUP, DEQ
        )
        acc = _mma(acc, xt, tl.trans(w), COMPUTE)
    return acc


@triton.jit(do_not_specialize=["tile_cols", "T", "tokens_per_row", "T_BUCKET", "split_k", "stride_ts"])
def _shrink_kernel(
    x_ptr,
    row_ad_ptr,
    t_ptr,
    tab_ptr,
    tile_ptr,  # the plan's tile table: band << 16 | tile within the band, one row per rank-tile size
    tile_cols,  # its row stride
    T,
    N,
    tokens_per_row,
    stride_xt,
    stride_tt,
    T_BUCKET,  # autotuning key only (a plain int: no recompilation per bucket)
    split_k,  # programs along the reduction
    stride_ts,  # stride of ``t`` between the slices of the splits
    COMPUTE: tl.constexpr,
    DEQ: tl.constexpr,
    GROUP: tl.constexpr,
    BT: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    # This program's band and tile within it, from the tile table's row for BR (plan.TILE_BLOCKS).
    tl.static_assert(BR == 8 or BR == 16 or BR == 32 or BR == 64 or BR == 128 or BR == 256)
    TROW: tl.constexpr = 0 if BR == 8 else 1 if BR == 16 else 2 if BR == 32 else 3 if BR == 64 else 4 if BR == 128 else 5
    code = tl.load(tile_ptr + TROW * tile_cols + pid_r)
    band = code >> 16
    row = tab_ptr + band * _NF
    vq = tl.load(row + _F_VQ).to(tl.pointer_type(tl.int32))
    vhi = tl.load(row + _F_VHI).to(tl.pointer_type(tl.int32))
    vs = tl.load(row + _F_VS).to(tl.pointer_type(tl.float16))
    vz = tl.load(row + _F_VZ).to(tl.pointer_type(tl.uint8))
    sp = tl.load(row + _F_S).to(tl.pointer_type(tl.float32))
    bits = tl.load(row + _F_BITS).to(tl.int32)
    rank = tl.load(row + _F_RANK).to(tl.int32)
    tcol = tl.load(row + _F_TCOL).to(tl.int32)
    group = tl.load(row + _F_GROUP).to(tl.int32)
    ws = tl.load(row + _F_V_WSTRIDE).to(tl.int32)
    hs = tl.load(row + _F_V_HSTRIDE).to(tl.int32)
    gs = tl.load(row + _F_V_GSTRIDE).to(tl.int32)

    offs_r = (code & 0xFFFF) * BR + tl.arange(0, BR)
    rmask = offs_r < rank
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    k_span = ((N + split_k - 1) // split_k + BK - 1) // BK * BK
    k_lo = pid_k * k_span
    k_hi = tl.minimum(k_lo + k_span, N)
    # keep the tokens whose row uses this band's adapter; if there is none, skip reading the factors
    adapter = tl.load(row + _F_ADAPTER).to(tl.int32)
    ad = tl.load(row_ad_ptr + offs_t // tokens_per_row, mask=tmask, other=-1).to(tl.int32)
    tmask = tmask & (ad == adapter)
    k_hi = tl.where(_any(tmask), k_hi, k_lo)

    acc = tl.full([BT, BR], 0.0, tl.float32)
    # one specialised loop per bit width (the branch is uniform over the program)
    if bits == 2:
        acc = _shrink_loop(acc, x_ptr, stride_xt, offs_t, tmask, vq, vhi, vs, vz, offs_r, rmask, ws, hs, gs, group,
                           k_lo, k_hi, 2, COMPUTE, DEQ, GROUP, BK)  # fmt: skip
    elif bits == 3:
        acc = _shrink_loop(acc, x_ptr, stride_xt, offs_t, tmask, vq, vhi, vs, vz, offs_r, rmask, ws, hs, gs, group,
                           k_lo, k_hi, 3, COMPUTE, DEQ, GROUP, BK)  # fmt: skip
    elif bits == 4:
        acc = _shrink_loop(acc, x_ptr, stride_xt, offs_t, tmask, vq, vhi, vs, vz, offs_r, rmask, ws, hs, gs, group,
                           k_lo, k_hi, 4, COMPUTE, DEQ, GROUP, BK)  # fmt: skip
    elif bits == 8:
        acc = _shrink_loop(acc, x_ptr, stride_xt, offs_t, tmask, vq, vhi, vs, vz, offs_r, rmask, ws, hs, gs, group,
                           k_lo, k_hi, 8, COMPUTE, DEQ, GROUP, BK)  # fmt: skip
    else:
        acc = _shrink_loop(acc, x_ptr, stride_xt, offs_t, tmask, vq, vhi, vs, vz, offs_r, rmask, ws, hs, gs, group,
                           k_lo, k_hi, 1, COMPUTE, DEQ, GROUP, BK)  # fmt: skip
    acc = acc * tl.load(sp + offs_r, mask=rmask, other=0.0)[None, :]
    # every split stores its slice (zeros where its share of the reduction is empty): ``t`` needs no zero-fill
    out = t_ptr + pid_k * stride_ts + offs_t[:, None] * stride_tt + (tcol + offs_r)[None, :]
    tl.store(out, acc, mask=tmask[:, None] & rmask[None, :])


@triton.jit
def _expand_loop(
    acc,
    t_ptr,
    stride_tt,
    split_k,
    stride_ts,
    offs_t,
    amask,
    tcol,
    uq,
    uhi,
    us,
    uz,
    m0,
    M,
    r_lo,
    r_hi,
    wstride,
    hstride,
    gstride,
    group,
    BITS: tl.constexpr,
    COMPUTE: tl.constexpr,
    DEQ: tl.constexpr,
    GROUP: tl.constexpr,
    BR: tl.constexpr,
    BM: tl.constexpr,
):
    """``acc[t, m] += Σ_r t[t, tcol + r] Uᵀ[r, m]`` over ranks ``r_lo <= r < r_hi`` of one band at ``BITS`` bits.

    Format 2 stores ``U_kᵀ`` (``rank x out``) packed along ``out``: the tile ``Uᵀ[r0 : r0 + BR, m0 : m0 + BM]`` is a
    run of whole packed words of ``BR`` rows, with one scale per row (singular vector) and group of outputs.
    """
    for r0 in range(r_lo, r_hi, BR):
        offs_r = r0 + tl.arange(0, BR)
        rmask = offs_r < r_hi
        t_offs = offs_t[:, None] * stride_tt + (tcol + offs_r)[None, :]
        t_mask = amask[:, None] & rmask[None, :]
        tt = tl.load(t_ptr + t_offs, mask=t_mask, other=0.0)
        for s in range(1, split_k):  # the partial sums of the other reduction splits
            tt += tl.load(t_ptr + s * stride_ts + t_offs, mask=t_mask, other=0.0)
        w = _dequant_packed(
            uq, uhi, us, uz, offs_r, rmask, m0, M, wstride, hstride, gstride, group, BITS, BM, GROUP, DEQ
        )
        acc = _mma(acc, tt, w, COMPUTE)
    return acc


@triton.jit(
    do_not_specialize=[
        "n_adapters", "T", "tokens_per_row", "T_BUCKET", "split_k", "stride_ts", "split_r", "split_a", "stride_ps",
        "accumulate",
    ]
)  # fmt: skip
def _expand_kernel(
    t_ptr,
    row_ad_ptr,
    y_ptr,
    yp_ptr,  # float32 partial outputs of the rank splits (``split_r x tokens x M``; unused when split_r == 1)
    sem_ptr,  # int32 arrival counters, one per output tile, zero between launches
    tab_ptr,
    atab_ptr,
    n_adapters,
    T,
    M,
    tokens_per_row,
    stride_tt,
    stride_yt,
    split_k,  # slices of ``t`` to sum (the shrink's reduction splits)
    stride_ts,
    split_r,  # programs along the rank (each walks a share of every band's rank)
    split_a,  # 1: each program walks every adapter; n_adapters: program ``pid_s // split_r`` serves one adapter
    stride_ps,  # stride of ``yp`` between the rank splits
    T_BUCKET,  # autotuning key only (a plain int: no recompilation per bucket)
    accumulate,  # 1: add into ``y``, 0: overwrite it
    COMPUTE: tl.constexpr,
    DEQ: tl.constexpr,
    GROUP: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    s_r = pid_s % split_r  # this program's share of every band's rank
    s_a = pid_s // split_r  # and its adapter when the adapters are split (0 otherwise)
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    mmask = offs_m < M
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    ad = tl.load(row_ad_ptr + offs_t // tokens_per_row, mask=tmask, other=-1).to(tl.int32)
    acc = tl.full([BT, BM], 0.0, tl.float32)
    a_hi = tl.where(split_a > 1, s_a + 1, n_adapters)
    for a in range(s_a, a_hi):
        arow = atab_ptr + a * _NA
        amask = tmask & (ad == a)
        present = _any(amask)
        b_lo = tl.load(arow + _A_BAND_LO).to(tl.int32)
        b_hi = tl.where(present, tl.load(arow + _A_BAND_HI).to(tl.int32), b_lo)
        for b in range(b_lo, b_hi):
            row = tab_ptr + b * _NF
            uq = tl.load(row + _F_UQ).to(tl.pointer_type(tl.int32))
            uhi = tl.load(row + _F_UHI).to(tl.pointer_type(tl.int32))
            us = tl.load(row + _F_US).to(tl.pointer_type(tl.float16))
            uz = tl.load(row + _F_UZ).to(tl.pointer_type(tl.uint8))
            bits = tl.load(row + _F_BITS).to(tl.int32)
            rank = tl.load(row + _F_RANK).to(tl.int32)
            tcol = tl.load(row + _F_TCOL).to(tl.int32)
            group = tl.load(row + _F_GROUP).to(tl.int32)
            ws = tl.load(row + _F_U_WSTRIDE).to(tl.int32)
            hs = tl.load(row + _F_U_HSTRIDE).to(tl.int32)
            gs = tl.load(row + _F_U_GSTRIDE).to(tl.int32)
            chunk = ((rank + split_r - 1) // split_r + BR - 1) // BR * BR  # this split's share of the band's rank
            r_lo = s_r * chunk
            r_hi = tl.minimum(r_lo + chunk, rank)
            if bits == 2:
                acc = _expand_loop(acc, t_ptr, stride_tt, split_k, stride_ts, offs_t, amask, tcol, uq, uhi, us, uz,
                                   m0, M, r_lo, r_hi, ws, hs, gs, group, 2, COMPUTE, DEQ, GROUP, BR, BM)  # fmt: skip
            elif bits == 3:
                acc = _expand_loop(acc, t_ptr, stride_tt, split_k, stride_ts, offs_t, amask, tcol, uq, uhi, us, uz,
                                   m0, M, r_lo, r_hi, ws, hs, gs, group, 3, COMPUTE, DEQ, GROUP, BR, BM)  # fmt: skip
            elif bits == 4:
                acc = _expand_loop(acc, t_ptr, stride_tt, split_k, stride_ts, offs_t, amask, tcol, uq, uhi, us, uz,
                                   m0, M, r_lo, r_hi, ws, hs, gs, group, 4, COMPUTE, DEQ, GROUP, BR, BM)  # fmt: skip
            elif bits == 8:
                acc = _expand_loop(acc, t_ptr, stride_tt, split_k, stride_ts, offs_t, amask, tcol, uq, uhi, us, uz,
                                   m0, M, r_lo, r_hi, ws, hs, gs, group, 8, COMPUTE, DEQ, GROUP, BR, BM)  # fmt: skip
            else:
                acc = _expand_loop(acc, t_ptr, stride_tt, split_k, stride_ts, offs_t, amask, tcol, uq, uhi, us, uz,
                                   m0, M, r_lo, r_hi, ws, hs, gs, group, 1, COMPUTE, DEQ, GROUP, BR, BM)  # fmt: skip
        has_bias = tl.load(arow + _A_HAS_BIAS).to(tl.int32)
        bias_ptr = tl.load(arow + _A_BIAS).to(tl.pointer_type(tl.float32))
        bias_on = (offs_m * 0 + has_bias * present.to(tl.int32) * (s_r == 0).to(tl.int32)) != 0  # (vector form:
        # the interpreter wants it); the first rank split adds the bias
        bias = tl.load(bias_ptr + offs_m, mask=mmask & bias_on, other=0.0)
        acc += tl.where(amask[:, None], bias[None, :], 0.0)
    out = y_ptr + offs_t[:, None] * stride_yt + offs_m[None, :]
    omask = tmask[:, None] & mmask[None, :]
    # The rows this program writes: all of them, or with the adapters split, the rows of its adapter (every batch row
    # has one adapter, so no two adapters' programs write one row) and, for adapter 0's, the rows of none.
    no_adapter = (ad < 0) | (ad >= n_adapters)
    whole = offs_t * 0 + split_a == 1  # (vector forms: the interpreter wants them)
    own = tmask & (whole | (ad == s_a) | ((offs_t * 0 + s_a == 0) & no_adapter))
    wmask = own[:, None] & mmask[None, :]
    if split_r == 1:
        if accumulate != 0:
            acc += tl.load(out, mask=wmask, other=0.0).to(tl.float32)
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=wmask)
    else:
        # Rank splits: each stores its partial sums, then counts itself in on the tile's counter; the last to arrive
        # adds the partials in split order (deterministic), writes ``y`` and resets the counter for the next launch.
        # With the adapters split too, split ``s`` of every adapter stores into slice ``s`` (on its own rows).
        part = offs_t[:, None] * M + offs_m[None, :]
        tl.store(yp_ptr + s_r * stride_ps + part, acc, mask=wmask)
        tl.debug_barrier()  # every thread's partials are stored before the arrival below (which releases them)
        tile = pid_t * tl.num_programs(0) + pid_m
        arrived = tl.atomic_add(sem_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == split_a * split_r - 1:
            total = tl.full([BT, BM], 0.0, tl.float32)
            for s in range(0, split_r):  # from L2 (.cg): the other programs' stores are not in this SM's L1
                total += tl.load(yp_ptr + s * stride_ps + part, mask=omask, other=0.0, cache_modifier=".cg")
            if accumulate != 0:
                total += tl.load(out, mask=omask, other=0.0).to(tl.float32)
            tl.store(out, total.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(sem_ptr + tile, 0, sem="relaxed", scope="gpu")


# -- configurations -------------------------------------------------------------------------------------------------

DECODE_MAX_TOKENS = 64  # up to here the token block is fixed by the wrapper and only the weight tiles are tuned


def _cfg(num_warps: int = 4, num_stages: int = 2, **kw) -> triton.Config:
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


if INTERPRET:
    # large blocks: the interpreter's cost is per operation, not per element
    _CONFIGS = {
        ("shrink", "gemv"): [_cfg(BR=32, BK=64)],
        ("expand", "gemv"): [_cfg(BM=64, BR=32)],
        ("shrink", "decode"): [_cfg(BR=32, BK=64)],
        ("shrink", "prefill"): [_cfg(BT=32, BR=32, BK=64)],
        ("expand", "decode"): [_cfg(BM=64, BR=32)],
        ("expand", "prefill"): [_cfg(BT=32, BM=64, BR=32)],
    }
    _CONFIGS_F32 = _CONFIGS
else:  # pragma: no cover - needs a GPU
    # Candidates chosen with `compile_check` (ptxas -v, sm_90) to avoid register spills for float16/bfloat16. Spills
    # depend on the Triton version: with Triton 3.9 the first decode expand candidate spills 76-164 bytes and the
    # float32 decode/prefill expand up to 260 (2026-12-04), so rerun `compile_check` after an upgrade. With few
    # tokens the MMA tile is 16 x BR (shrink) or 16 x BM (expand), so small warp counts avoid replicated work.
    _CONFIGS = {
        # one token: multiply-add tiles spread over all threads (no MMA), so tiles can be larger
        ("shrink", "gemv"): [
            _cfg(8, 3, BR=16, BK=512),
            _cfg(8, 3, BR=32, BK=256),
            _cfg(4, 3, BR=8, BK=512),
            _cfg(2, 3, BR=8, BK=256),
            _cfg(4, 3, BR=16, BK=256),
        ],
        # expand tiles are [BR, BM] of U_kᵀ packed along the outputs: BM is a multiple of 32 (whole int32 words)
        ("expand", "gemv"): [
            _cfg(4, 3, BM=64, BR=64),
            _cfg(8, 3, BM=128, BR=64),
            _cfg(4, 3, BM=32, BR=128),
            _cfg(2, 3, BM=32, BR=64),
        ],
        ("shrink", "decode"): [
            _cfg(2, 3, BR=16, BK=256),
            _cfg(4, 3, BR=16, BK=256),
            _cfg(2, 3, BR=32, BK=256),
            _cfg(4, 3, BR=64, BK=256),
            _cfg(2, 4, BR=32, BK=128),
        ],
        ("shrink", "prefill"): [
            _cfg(4, 3, BT=64, BR=32, BK=64),
            _cfg(8, 3, BT=128, BR=64, BK=64),
            _cfg(8, 3, BT=128, BR=128, BK=32),
        ],
        ("expand", "decode"): [
            _cfg(2, 3, BM=32, BR=128),
            _cfg(4, 3, BM=32, BR=64),
            _cfg(4, 3, BM=64, BR=64),
            _cfg(8, 3, BM=128, BR=64),
        ],
        ("expand", "prefill"): [
            _cfg(4, 3, BT=64, BM=64, BR=32),
            _cfg(8, 3, BT=64, BM=128, BR=32),
            _cfg(8, 3, BT=128, BM=128, BR=32),
        ],
    }
    # float32 activations (tf32x3 products) need smaller tiles to stay out of local memory
    _CONFIGS_F32 = {
        ("shrink", "gemv"): [_cfg(4, 3, BR=16, BK=256)],
        ("expand", "gemv"): [_cfg(4, 3, BM=32, BR=128)],
        ("shrink", "decode"): [_cfg(4, 2, BR=16, BK=64), _cfg(2, 3, BR=16, BK=64)],
        ("shrink", "prefill"): [_cfg(4, 2, BT=64, BR=32, BK=32)],
        ("expand", "decode"): [_cfg(4, 2, BM=32, BR=64), _cfg(4, 2, BM=64, BR=32)],
        ("expand", "prefill"): [_cfg(4, 2, BT=64, BM=64, BR=32)],
    }


def _prune(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    """Without a compile-time group size, scales are gathered per element: keep the smallest weight tiles only."""
    if kwargs.get("GROUP", 0) != 0:
        return configs

    def size(c: triton.Config) -> int:
        return c.kwargs.get("BR", 1) * c.kwargs.get("BK", c.kwargs.get("BM", 1))

    smallest = min(size(c) for c in configs)
    return [c for c in configs if size(c) == smallest]


_KEYS = {
    "shrink": dict(key=["N", "T_BUCKET", "split_k", "GROUP"]),  # stores only: tuning runs need no restore
    "expand": dict(key=["M", "T_BUCKET", "split_r", "GROUP"], restore_value=["y_ptr"]),
}
_PRUNE = {"early_config_prune": _prune}
_KERNELS = {"shrink": _shrink_kernel, "expand": _expand_kernel}
# DELTACOME_KERNEL_TUNING=first: the first candidate of each list only, no autotuning (correctness runs on a GPU:
# every test shape would otherwise compile and time every candidate; measured > 150 s for tests/test_kernels.py).
_TUNING = os.environ.get("DELTACOME_KERNEL_TUNING", "full").strip().lower()
if _TUNING not in ("full", "first"):
    raise DeltaCoMeError(f"DELTACOME_KERNEL_TUNING={_TUNING!r} must be 'full' or 'first'")


def _candidates(configs: list[triton.Config]) -> list[triton.Config]:
    return configs[:1] if _TUNING == "first" else configs


_TUNERS = {
    (kind, phase, f32): triton.autotune(
        _candidates(configs[(kind, phase)]), prune_configs_by=_PRUNE, **_KEYS[kind]
    )(_KERNELS[kind])
    for kind in ("shrink", "expand")
    for phase in ("gemv", "decode", "prefill")
    for f32, configs in ((False, _CONFIGS), (True, _CONFIGS_F32))
}

_COMPUTE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _token_bucket(T: int) -> int:
    """Power-of-two bucket of the token count (autotuning key and decode token block), capped at 4096."""
    return min(4096, max(16, triton.next_power_of_2(T)))


def _split_k(plan: P.KernelPlan, T: int, N: int, device: torch.device) -> int:
    """Splits of the reduction so that small batches still put ~2 programs per SM on the packed ``V``."""
    if device.type != "cuda" or T > DECODE_MAX_TOKENS:
        return 1
    programs = plan.tiles(16) * (1 if T == 1 else triton.cdiv(T, min(_token_bucket(T), 32)))
    want = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= want:
        return 1
    return int(max(1, min(triton.cdiv(want, programs), N // 512, 16)))


def _split_a(plan: P.KernelPlan, T: int, device: torch.device) -> int:
    """Programs along the adapters of a mixed small batch: one per adapter slot (``n_adapters``), or 1.

    With 1 every expand program walks every adapter present in its token block one after another: eight adapters
    in a decode batch took 4-6x one adapter's time on an H200. Split, each adapter's programs write only its rows
    (no extra buffer). Prefill keeps the loop (a token block there holds most adapters anyway)."""
    if device.type != "cuda" or T > DECODE_MAX_TOKENS or plan.n_adapters == 1:
        return 1
    return plan.n_adapters


def _split_r(plan: P.KernelPlan, T: int, M: int, device: torch.device, split_a: int = 1) -> int:
    """Splits of the rank for the expand of a small batch, so that ~4 programs per SM stream the packed ``U``.

    Without them the expand has only ``M / BM`` programs (64 for a 4096-wide output), each walking the whole rank
    in a chain of dependent loads: a fraction of the SMs, latency-bound (measured 37 µs for 1 MiB on an H200).
    """
    if device.type != "cuda" or T > DECODE_MAX_TOKENS:
        return 1
    programs = split_a * triton.cdiv(M, 64) * (1 if T == 1 else triton.cdiv(T, min(_token_bucket(T), 32)))
    want = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= want:
        return 1
    return int(max(1, min(triton.cdiv(want, programs), plan.t_cols // 64, 16)))


_SEMAPHORES: dict[tuple, torch.Tensor] = {}


def _semaphores(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for ``n`` output tiles, one set per device and stream (kernels on one stream
    run one after the other; each launch leaves the counters at zero)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    sem = _SEMAPHORES.get(key)
    if sem is None or sem.numel() < n:
        sem = _SEMAPHORES[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return sem


_BEST: dict[tuple, triton.Config] = {}


def _run(tuner, key: tuple, grid, args: tuple, kwargs: dict) -> None:
    """Launch through the autotuner the first time per key, then straight with its choice (less Python per call)."""
    cfg = _BEST.get(key)
    if cfg is None:
        tuner[grid](*args, **kwargs)
        _BEST[key] = tuner.best_config
    else:
        tuner.fn[grid](*args, **kwargs, **cfg.all_kwargs())


def _phase(T: int) -> tuple[str, int, bool]:
    """(autotuning phase, token bucket, decode?) of a call with ``T`` tokens."""
    bucket = _token_bucket(T)
    decode = T <= DECODE_MAX_TOKENS
    return ("gemv" if T == 1 else "decode" if decode else "prefill"), bucket, decode


def _consts(x2: torch.Tensor, plan: P.KernelPlan, T: int, decode: bool) -> dict:
    compute = tl.float32 if INTERPRET else _COMPUTE[x2.dtype]
    deq = tl.float16 if compute == tl.float16 else tl.float32  # dtype the factors are dequantized to
    common = dict(COMPUTE=compute, DEQ=deq, GROUP=plan.group)
    if decode:  # decode token block: 1 (matrix-vector), 16 or 32 (larger ones spill; 33-64 tokens take two blocks)
        common["BT"] = 1 if T == 1 else min(_token_bucket(T), 32)
    return common


def _shrink(
    x2: torch.Tensor, plan: P.KernelPlan, row_index: torch.Tensor, tokens_per_row: int, split_k: int | None
) -> torch.Tensor:
    """The shrink launch: ``t`` (``split_k x tokens x t_cols``, float32) of the partial sums of ``S ⊙ (x V)``."""
    T, N = x2.shape
    phase, bucket, decode = _phase(T)
    sk = split_k or _split_k(plan, T, N, x2.device)
    t = torch.empty(sk, T, plan.t_cols, device=x2.device, dtype=torch.float32)

    def grid(meta):
        return (plan.tiles(meta["BR"]), triton.cdiv(T, meta["BT"]), sk)

    args = (x2, row_index, t, plan.tab, plan.tile_tab, plan.tile_tab.stride(0), T, N, tokens_per_row, x2.stride(0),
            t.stride(1), bucket, sk, t.stride(0))  # fmt: skip
    tuner = _TUNERS["shrink", phase, x2.dtype == torch.float32]
    _run(tuner, ("s", x2.device, x2.dtype, N, bucket, sk, plan.group), grid, args, _consts(x2, plan, T, decode))
    return t


def _expand(
    t: torch.Tensor | None,
    x2: torch.Tensor,
    y2: torch.Tensor,
    plan: P.KernelPlan,
    row_index: torch.Tensor,
    tokens_per_row: int,
    accumulate: bool,
    split_r: int | None = None,
    split_a: int | None = None,
) -> None:
    """The expand launch: ``y2 (+)= Σ_bands t U_kᵀ + bias`` (``t`` None when the plan has no quantized band)."""
    T, M = x2.shape[0], plan.out_features
    phase, bucket, decode = _phase(T)
    sa = split_a or _split_a(plan, T, x2.device)
    if sa not in (1, plan.n_adapters):
        raise DeltaCoMeError(f"split_a={sa} must be 1 or the number of adapter slots ({plan.n_adapters})")
    if t is None:
        t = plan.tab  # no quantized band: expand only adds the bias (``t`` is never read)
        sk, stride_tt, stride_ts, sr = 1, 0, 0, 1
    else:
        sk, stride_tt, stride_ts = t.shape[0], t.stride(1), t.stride(0)
        sr = split_r or _split_r(plan, T, M, x2.device, sa)
    if sr > 1:  # float32 partials of the rank splits and the tiles' arrival counters
        yp = torch.empty(sr, T, M, device=x2.device, dtype=torch.float32)
        sem = _semaphores(x2.device, triton.cdiv(M, 16) * triton.cdiv(T, 1 if T == 1 else 16))
    else:  # never read: stand-ins of the kernel's pointer types (float32, int32)
        yp = t if t.dtype == torch.float32 else torch.empty(1, 1, 1, device=x2.device, dtype=torch.float32)
        sem = plan.dummy

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]), triton.cdiv(T, meta["BT"]), sa * sr)

    args = (t, row_index, y2, yp, sem, plan.tab, plan.atab, plan.n_adapters, T, M, tokens_per_row, stride_tt)
    args += (y2.stride(0), sk, stride_ts, sr, sa, yp.stride(0), bucket, int(accumulate))
    tuner = _TUNERS["expand", phase, x2.dtype == torch.float32]
    _run(tuner, ("e", x2.device, y2.dtype, M, bucket, sr, plan.group), grid, args, _consts(x2, plan, T, decode))


def _launch(
    x2: torch.Tensor,
    y2: torch.Tensor,
    plan: P.KernelPlan,
    rows: torch.Tensor,
    tokens_per_row: int,
    accumulate: bool,
    split_k: int | None,
    split_r: int | None = None,
    split_a: int | None = None,
) -> None:
    """Shrink + expand of ``plan`` for ``x2`` (tokens x in) into ``y2`` (tokens x out, stride 1 along out)."""
    t = _shrink(x2, plan, rows, tokens_per_row, split_k) if plan.n_bands else None
    _expand(t, x2, y2, plan, rows, tokens_per_row, accumulate, split_r, split_a)


def _check_input(x: torch.Tensor, in_features: int) -> None:
    if x.dtype not in _COMPUTE:
        raise DeltaCoMeError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise DeltaCoMeError(f"input of shape {tuple(x.shape)} does not end in the delta's in_features={in_features}")


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _out_rows(x: torch.Tensor, M: int, out: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """The (tokens x M) output rows to write, and whether they must be accumulated into."""
    if out is None:
        return torch.empty(x.numel() // x.shape[-1], M, device=x.device, dtype=x.dtype), False
    if out.shape != (*x.shape[:-1], M) or out.device != x.device:
        raise DeltaCoMeError(
            f"out has shape {tuple(out.shape)} on {out.device}, expected {(*x.shape[:-1], M)} on {x.device}"
        )
    if not out.is_contiguous() or out.dtype not in _COMPUTE:
        raise DeltaCoMeError("out must be a contiguous float16, bfloat16 or float32 tensor")
    return out.view(-1, M), True


def _dense_band(x2: torch.Tensor, band) -> torch.Tensor:
    """A 16-bit band applied as two plain matmuls (16-bit bands hold float16 values, nothing to dequantize)."""
    dt = x2.dtype
    tt = (x2 @ band.v.qweight.to(dt).t()) * band.s.to(dt)
    return tt @ band.u.qweight.to(dt)  # format 2: float16 U_kᵀ (rank x out)


def _add_dense_bands(
    x2: torch.Tensor, y2: torch.Tensor, plan: P.KernelPlan, rows: torch.Tensor, tokens_per_row: int, mixed: bool
) -> None:
    """``y2 += `` the 16-bit bands (each on the tokens of its adapter's rows in a mixed batch)."""
    token_ad = rows.repeat_interleave(tokens_per_row) if mixed and plan.dense_bands else None
    for slot, band in plan.dense_bands:
        xin = x2 if token_ad is None else x2 * (token_ad == slot).to(x2.dtype)[:, None]
        y2 += _dense_band(xin, band).to(y2.dtype)


def _first_delta(x: torch.Tensor, deltas: list[PackedDelta | None], row_index: torch.Tensor | None):
    """The first delta present (None if there is none), once ``x`` and a mixed batch's ``row_index`` are valid."""
    present = [d for d in deltas if d is not None]
    if not present:
        return None
    _check_input(x, present[0].in_features)
    if row_index is not None:
        if x.dim() < 2 or row_index.dim() != 1 or row_index.shape[0] != x.shape[0]:
            raise DeltaCoMeError(
                f"row_index of shape {tuple(row_index.shape)} must hold one adapter index per batch row of the input "
                f"of shape {tuple(x.shape)}"
            )
        if row_index.dtype not in (torch.int32, torch.int64):
            raise DeltaCoMeError(f"row_index must be an int32 or int64 tensor, got {row_index.dtype}")
    return present[0]


def _plan_rows(
    x: torch.Tensor, deltas: list[PackedDelta | None], row_index: torch.Tensor | None
) -> tuple[P.KernelPlan, torch.Tensor, torch.Tensor, int]:
    """(plan, ``x`` as token rows, adapter index per batch row, tokens per batch row) of a call."""
    x2 = _as_rows(x)
    if row_index is None:  # one adapter: every token maps to slot 0
        plan = P.plan_for(deltas[0], x.device)
        return plan, x2, plan.zero_index, x2.shape[0]
    return P.mixed_plan_for(deltas, x.device), x2, row_index.to(x.device).contiguous(), x2.shape[0] // x.shape[0]


def _forward(
    x: torch.Tensor,
    deltas: list[PackedDelta | None],
    row_index: torch.Tensor | None,
    out: torch.Tensor | None,
    split_k: int | None,
    split_r: int | None,
    split_a: int | None = None,
) -> torch.Tensor:
    """`delta_forward` (``row_index`` None, one delta) and `delta_forward_mixed`."""
    first = _first_delta(x, deltas, row_index)
    M = first.out_features if first is not None else 0
    if first is None or x.numel() == 0:
        return out if out is not None else x.new_zeros(*x.shape[:-1], M)
    plan, x2, rows, tokens_per_row = _plan_rows(x, deltas, row_index)
    y2, accumulate = _out_rows(x, M, out)
    _launch(x2, y2, plan, rows, tokens_per_row, accumulate, split_k, split_r, split_a)
    _add_dense_bands(x2, y2, plan, rows, tokens_per_row, row_index is not None)
    return out if out is not None else y2.view(*x.shape[:-1], M)


def delta_forward(
    x: torch.Tensor,
    delta: PackedDelta,
    out: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
    split_r: int | None = None,
) -> torch.Tensor:
    """``Σ_k U_k (S_k ⊙ (V_kᵀ x)) + bias`` of one adapter, shape ``(..., out_features)``, in ``x``'s dtype.

    With ``out`` (same shape, contiguous) the delta is added into ``out`` in place and ``out`` is returned, which
    saves the separate add of the base output. ``split_k`` / ``split_r`` override the shrink's reduction split and
    the expand's rank split (testing, benchmarks).
    """
    return _forward(x, [delta], None, out, split_k, split_r)


def delta_forward_mixed(
    x: torch.Tensor,
    deltas: list[PackedDelta | None],
    row_index: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
    split_r: int | None = None,
    split_a: int | None = None,
) -> torch.Tensor:
    """Mixed batch: row ``i`` of ``x`` (``batch x ... x in``) gets ``deltas[row_index[i]]``.

    An index of ``-1``, an index without a delta (``None``) or out of range gives no delta (zeros). One pair of
    launches serves every adapter; nothing is synchronised with the host. ``out`` works as in `delta_forward`;
    ``split_k`` / ``split_r`` as there, ``split_a`` (1 or ``len(deltas)``) overrides whether the expand's programs
    are split by adapter (testing, benchmarks).
    """
    return _forward(x, deltas, row_index, out, split_k, split_r, split_a)


@functools.cache
def _single_slot(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)  # made once per device: nothing allocated per call


def part_call(
    y: torch.Tensor, x: torch.Tensor, part: SparsePart | VectorPart | SparseBand, what: str,
    row_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Check a call of the parts' kernels (``y += Δ̂ x`` for a DARE, vector-code or sparse-band part, ``what``
    naming it) and
    return ``x`` as ``tokens x in`` with unit stride, the adapter slot of each batch row (one zero for a single
    adapter) and the tokens per row."""
    if x.shape[-1] != part.in_features or y.shape != (*x.shape[:-1], part.out_features):
        raise DeltaCoMeError(f"a {part.out_features}x{part.in_features} {what} part got input {tuple(x.shape)} and "
                             f"output {tuple(y.shape)}")  # fmt: skip
    if not y.is_contiguous() or y.dtype not in _COMPUTE:
        raise DeltaCoMeError(f"the output of a {what} part must be a contiguous float16, bfloat16 or float32 tensor")
    if row_index is not None and (row_index.dim() != 1 or row_index.shape[0] != x.shape[0] or x.dim() < 2):
        raise DeltaCoMeError(f"row_index of shape {tuple(row_index.shape)} does not fit the input {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    if row_index is None:
        return x2, _single_slot(x.device), max(1, x2.shape[0])
    return x2, row_index.to(x.device).contiguous(), x2.shape[0] // x.shape[0]


def part_launch(x2: torch.Tensor) -> tuple[tl.dtype, int]:
    """What the parts' kernels compute in for the ``tokens x in`` input ``x2`` (float32 under the interpreter) and
    their token tile: one token alone, else 16-32."""
    T = x2.shape[0]
    return tl.float32 if INTERPRET else _COMPUTE[x2.dtype], 1 if T == 1 else min(32, max(16, triton.next_power_of_2(T)))


def can_add_into(y: torch.Tensor, x: torch.Tensor, out_features: int) -> bool:
    """Can the kernels add a delta of ``x`` into ``y`` in place: the output's shape, a layout and dtype they write,
    and nothing that needs ``y``'s gradient (the kernels are not differentiable)."""
    return (
        y.shape == (*x.shape[:-1], out_features)
        and y.device == x.device
        and y.is_contiguous()
        and y.dtype in _COMPUTE
        and not (torch.is_grad_enabled() and y.requires_grad)
    )


# -- the delta beside the base layer --------------------------------------------------------------------------------

_SIDE_STREAMS: dict[tuple, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """A high-priority stream beside the current one (per device and current stream) for the shrink."""
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    side = _SIDE_STREAMS.get(key)
    if side is None:
        side = _SIDE_STREAMS[key] = torch.cuda.Stream(device=device, priority=-1)
    return side


def base_plus_delta(
    x: torch.Tensor,
    base: Callable[[], torch.Tensor],
    deltas: list[PackedDelta | None],
    row_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base() + delta(x)`` with the delta's shrink running beside the base layer, then its expand added in place.

    The shrink needs only ``x``, so on CUDA it runs on a side stream while ``base()`` (the base linear) runs on the
    current one; the expand then adds into the base output. A small batch's shrink is latency-bound and the base
    GEMV bandwidth-bound, so the two share the GPU and the shrink's time mostly disappears. Inside a CUDA graph
    capture the two streams become parallel branches of the graph. ``deltas`` holds one delta (``row_index``
    None: every row) or a mixed set, as in `delta_forward_mixed`. The base output is written in place when it is a
    contiguous float tensor that nothing needs the gradient of; otherwise a new tensor is returned.
    """
    first = _first_delta(x, deltas, row_index)
    if first is None:
        return base()
    M = first.out_features
    if x.numel() == 0 or x.device.type != "cuda":
        y = base()
        return y + _forward(x, deltas, row_index, None, None, None).to(y.dtype)
    plan, x2, rows, tokens_per_row = _plan_rows(x, deltas, row_index)
    current = torch.cuda.current_stream(x.device)
    t = None
    if plan.n_bands:
        # Ordering: the side stream starts after everything enqueued so far (x is ready; the previous call's
        # expand, which read the last t, is done), and the current stream waits for the shrink before the expand.
        side = _side_stream(x.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            t = _shrink(x2, plan, rows, tokens_per_row, None)
    y = base()
    if t is not None:
        current.wait_stream(side)
    writable = can_add_into(y, x, M)
    target = y if writable else torch.empty(*x.shape[:-1], M, device=x.device, dtype=x.dtype)
    y2 = target.view(-1, M)
    _expand(t, x2, y2, plan, rows, tokens_per_row, writable)
    _add_dense_bands(x2, y2, plan, rows, tokens_per_row, row_index is not None)
    return y if writable else y + target.to(y.dtype)
