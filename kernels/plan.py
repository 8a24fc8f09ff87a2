"""Launch plans: the per-band metadata the Triton kernels read, built once per `PackedDelta` and cached.

A plan is a small ``int64`` table on the delta's device with one row per quantized band (raw addresses of the
band's buffers plus bits, rank, group size and row strides), and one row per adapter (its band range and bias).
The kernels read the packed buffers in place through those addresses, so nothing is copied or re-laid out and a
forward pass does no host-device synchronisation (decode loops can be captured in CUDA graphs).

A plan stays valid while the module keeps the very same buffer tensors (``load_state_dict`` copies into them in
place; ``.to()`` / ``.cuda()`` replace them, which invalidates the plan and rebuilds it on the next forward).
This module needs only PyTorch; the kernels live in ``triton_delta.py``.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hf_deltacome.errors import AdapterFileError, DeltaCoMeError
from hf_deltacome.format.storage import DeltaBand, PackedDelta, QuantizedFactor

# Columns of the band table (one int64 row per quantized band).
F_VQ, F_VHI, F_VS, F_VZ = 0, 1, 2, 3  # addresses of V's qweight, qweight_hi, scales, zeros
F_UQ, F_UHI, F_US, F_UZ = 4, 5, 6, 7  # addresses of U's qweight, qweight_hi, scales, zeros
F_S = 8  # address of S (float32)
F_BITS = 9  # 1, 2, 3, 4 or 8 (a 3-bit band is a 2-bit plane plus a 1-bit plane)
F_HAS_HI = 10  # 1 for 3-bit bands (informational)
F_RANK = 11
F_TCOL = 12  # first column of this band in the rank-space buffer ``t`` (per adapter)
F_GROUP = 13
F_V_WSTRIDE, F_V_HSTRIDE, F_V_GSTRIDE = 14, 15, 16  # row strides of V's qweight, qweight_hi, scales/zeros
F_U_WSTRIDE, F_U_HSTRIDE, F_U_GSTRIDE = 17, 18, 19  # row strides of U's qweight, qweight_hi, scales/zeros
F_ADAPTER = 20  # adapter slot of the band (mixed batches; 0 otherwise)
N_FIELDS = 24  # padded

# Columns of the adapter table (one int64 row per adapter slot).
A_BAND_LO, A_BAND_HI, A_BIAS, A_HAS_BIAS = 0, 1, 2, 3
N_AFIELDS = 4

# Rank-tile sizes of the shrink's tile table: row ``i`` maps the tiles of ``TILE_BLOCKS[i]`` ranks to their bands.
TILE_BLOCKS = (8, 16, 32, 64, 128, 256)
KERNEL_BITS = (1, 2, 3, 4, 8)  # bit widths the kernels dequantize; 16-bit bands take a dense matmul
_MIXED_CACHE_SIZE = 8
_uids = itertools.count(1)


@dataclass(eq=False)
class KernelPlan:
    """Everything a launch needs for one delta (or one mixed set of deltas) on one device."""

    device: torch.device
    tab: torch.Tensor  # int64 (n_bands, N_FIELDS) on device
    tile_tab: torch.Tensor  # int32 (len(TILE_BLOCKS), tiles of 8): band << 16 | tile within the band, per rank tile
    atab: torch.Tensor  # int64 (n_adapters, N_AFIELDS) on device
    ranks: tuple[int, ...]  # rank of each quantized band (host copy, for grid sizes)
    t_cols: int  # width of the rank-space buffer: max over adapters of their total quantized rank
    group: int  # group size shared by every quantized band if a power of two >= 16, else 0 (read per element)
    dense_bands: tuple[tuple[int, DeltaBand], ...]  # (adapter slot, band) of 16-bit bands, applied densely
    in_features: int
    out_features: int
    uid: int = field(default_factory=lambda: next(_uids))
    dummy: torch.Tensor | None = None  # zeros: placeholder address of absent buffers, and slot 0 for every row
    watched: tuple = ()  # (buffer dict, name, weakref) of every buffer whose address is in ``tab``
    _tiles: dict[int, int] = field(default_factory=dict)

    @property
    def zero_index(self) -> torch.Tensor:
        """A one-row adapter index of 0 (single-adapter calls map every token to slot 0)."""
        return self.dummy[:1]

    @property
    def n_bands(self) -> int:
        return len(self.ranks)

    @property
    def n_adapters(self) -> int:
        return self.atab.shape[0]

    def tiles(self, block_r: int) -> int:
        """Number of rank tiles of ``block_r`` over all quantized bands (tiles never straddle two bands)."""
        n = self._tiles.get(block_r)
        if n is None:
            n = self._tiles[block_r] = sum(-(-r // block_r) for r in self.ranks)
        return n

    def is_current(self) -> bool:
        """True while every buffer the table points at is still the module's buffer."""
        for buffers, name, ref in self.watched:
            if buffers.get(name) is not ref():
                return False
        return True


def _addr(t: torch.Tensor, what: str) -> int:
    if not t.is_contiguous():
        raise AdapterFileError(
            f"{what} must be a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}"
        )
    return t.data_ptr()


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0)


def _factor_fields(f: QuantizedFactor, dummy: int, what: str) -> tuple[list[int], list[int]]:
    """Addresses (qweight, qweight_hi, scales, zeros) and row strides (qweight, qweight_hi, groups) of a factor."""
    hi = getattr(f, "qweight_hi", None)
    addrs = [
        _addr(f.qweight, f"{what}.qweight"),
        _addr(hi, f"{what}.qweight_hi") if hi is not None else dummy,
        _addr(f.scales, f"{what}.scales"),
        _addr(f.zeros, f"{what}.zeros"),
    ]
    strides = [_row_stride(f.qweight), _row_stride(hi) if hi is not None else 0, _row_stride(f.scales)]
    if _row_stride(f.scales) != _row_stride(f.zeros):
        raise AdapterFileError(f"{what}: scales and zeros have different layouts ({f.scales.shape} vs {f.zeros.shape})")
    return addrs, strides


def _watch(module: torch.nn.Module) -> list[tuple]:
    out = []
    for mod in module.modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                out.append((mod._buffers, name, weakref.ref(buf)))
    return out


def _build(deltas: Sequence[PackedDelta | None], device: torch.device) -> KernelPlan:
    present = [d for d in deltas if d is not None]
    if not present:
        raise DeltaCoMeError("a kernel plan needs at least one delta")
    m, n = present[0].out_features, present[0].in_features
    for i, d in enumerate(deltas):
        if d is not None and (d.out_features, d.in_features) != (m, n):
            raise DeltaCoMeError(
                f"delta {i} is {d.out_features}x{d.in_features} but delta 0 is {m}x{n}; a mixed batch needs "
                "deltas of one linear"
            )
    dummy = torch.zeros(16, dtype=torch.int32, device=device)
    dptr = dummy.data_ptr()
    rows: list[list[int]] = []
    arows: list[list[int]] = []
    dense: list[tuple[int, DeltaBand]] = []
    watched: list[tuple] = []
    t_cols = 0
    for slot, d in enumerate(deltas):
        lo = len(rows)
        if d is None:
            arows.append([lo, lo, dptr, 0])
            continue
        for name, buf in d.named_buffers():
            if buf.device != device:
                raise DeltaCoMeError(f"delta buffer {name!r} is on {buf.device} but the input is on {device}")
        watched += _watch(d)
        col = 0
        for k, band in enumerate(d.bands):
            if band.bits == 16:
                dense.append((slot, band))
                continue
            if band.bits not in KERNEL_BITS:
                raise AdapterFileError(f"band {k} has {band.bits} bits; the kernels support {KERNEL_BITS} and 16")
            v_addr, v_str = _factor_fields(band.v, dptr, f"bands.{k}.v")
            u_addr, u_str = _factor_fields(band.u, dptr, f"bands.{k}.u")
            row = [0] * N_FIELDS
            row[F_VQ : F_VZ + 1] = v_addr
            row[F_UQ : F_UZ + 1] = u_addr
            row[F_S] = _addr(band.s, f"bands.{k}.s")
            row[F_BITS] = band.bits
            row[F_HAS_HI] = int(band.bits == 3)
            row[F_RANK] = band.rank
            row[F_TCOL] = col
            row[F_GROUP] = band.v.group_size
            row[F_V_WSTRIDE], row[F_V_HSTRIDE], row[F_V_GSTRIDE] = v_str
            row[F_U_WSTRIDE], row[F_U_HSTRIDE], row[F_U_GSTRIDE] = u_str
            row[F_ADAPTER] = slot
            rows.append(row)
            col += band.rank
        t_cols = max(t_cols, col)
        bias = d.bias
        arows.append([lo, len(rows), _addr(bias, "bias") if bias is not None else dptr, int(bias is not None)])
    tab = torch.tensor(rows or [[0] * N_FIELDS], dtype=torch.int64).to(device)
    atab = torch.tensor(arows, dtype=torch.int64).to(device)
    ranks = [r[F_RANK] for r in rows]
    return KernelPlan(
        device=device,
        tab=tab,
        tile_tab=_tile_table(ranks, device),
        atab=atab,
        ranks=tuple(ranks),
        t_cols=t_cols,
        group=_common_group({r[F_GROUP] for r in rows}),
        dense_bands=tuple(dense),
        in_features=n,
        out_features=m,
        dummy=dummy,
        watched=tuple(watched),
    )


def _tile_table(ranks: Sequence[int], device: torch.device) -> torch.Tensor:
    """Row ``i``: for each rank tile of ``TILE_BLOCKS[i]`` ranks (tiles never straddle two bands, laid out band after
    band), ``band << 16 | index of the tile within its band``, so a shrink program finds its band with one load
    instead of a walk over the band table (a chain of loads per band, long for a mixed batch's many bands)."""
    if len(ranks) >= 1 << 15 or max(ranks, default=0) >= TILE_BLOCKS[0] << 16:
        raise DeltaCoMeError(f"{len(ranks)} bands of ranks up to {max(ranks)} do not fit the kernels' tile table")
    width = max(1, sum(-(-r // TILE_BLOCKS[0]) for r in ranks))
    tab = torch.zeros(len(TILE_BLOCKS), width, dtype=torch.int32)
    for i, block in enumerate(TILE_BLOCKS):
        codes = [b << 16 | k for b, r in enumerate(ranks) for k in range(-(-r // block))]
        if codes:
            tab[i, : len(codes)] = torch.tensor(codes, dtype=torch.int32)
    return tab.to(device)


def _common_group(groups: set[int]) -> int:
    if len(groups) != 1:
        return 0
    (g,) = groups
    return g if g >= 16 and g & (g - 1) == 0 else 0


def plan_for(delta: PackedDelta, device: torch.device) -> KernelPlan:
    """The cached plan of ``delta`` on ``device``, rebuilt when its buffers were replaced or moved."""
    plan = delta.__dict__.get("_deltacome_kernel_plan")
    if plan is None or plan.device != device or not plan.is_current():
        plan = _build([delta], device)
        delta.__dict__["_deltacome_kernel_plan"] = plan
    return plan


def mixed_plan_for(deltas: Sequence[PackedDelta | None], device: torch.device) -> KernelPlan:
    """The cached plan of a mixed batch over ``deltas`` (slot ``i`` serves rows with adapter index ``i``).

    Cached on the first delta, keyed by the plans of all deltas, so it is rebuilt whenever one of them is.
    """
    present = [d for d in deltas if d is not None]
    if not present:
        raise DeltaCoMeError("delta_forward_mixed needs at least one delta that is not None")
    key = tuple(plan_for(d, device).uid if d is not None else 0 for d in deltas)
    owner = present[0]
    cache: OrderedDict | None = owner.__dict__.get("_deltacome_mixed_plans")
    if cache is None:
        cache = owner.__dict__["_deltacome_mixed_plans"] = OrderedDict()
    plan = cache.get(key)
    if plan is None:
        plan = _build(deltas, device)
        cache[key] = plan
        while len(cache) > _MIXED_CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return plan
