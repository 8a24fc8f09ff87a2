"""Bit budget: how many singular vectors each band may keep at a compression ratio.

A target linear with an ``m x n`` delta may spend ``16 * ratio * m * n`` bits. A band of ``r`` singular vectors
at ``b`` bits stores ``V_bᵀ`` (``r x n``, groups along ``n``), ``U_bᵀ`` (``r x m``, groups along ``m``: format 2)
and the singular values ``S_b`` (``r`` float32). Every stored byte counts: packing padding, float16 scales and uint8
zeros included, so the true file never exceeds the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import ConfigError
from .packing import SUPPORTED_BITS, stored_nbytes

SINGULAR_VALUE_BYTES = 4  # S is stored as float32
DEFAULT_BANDS: list[list] = [[8, 2], [3, 32], [2, None]]
SHRINK_STEPS = 32  # min_rank_share shrinks the fixed-rank bands in steps of 1/32 of their configured ranks

Band = tuple[int, int]  # (bits, rank)


def band_nbytes(m: int, n: int, bits: int, rank: int, group_size: int) -> int:
    """Exact stored bytes of one band of ``rank`` singular vectors at ``bits`` bits for an ``m x n`` delta."""
    if rank <= 0:
        return 0
    return (
        stored_nbytes(rank, n, bits, group_size)  # V_bᵀ, groups along n
        + stored_nbytes(rank, m, bits, group_size)  # U_bᵀ (format 2), groups along m
        + rank * SINGULAR_VALUE_BYTES
    )


def layout_nbytes(m: int, n: int, bands: Sequence[Band], group_size: int) -> int:
    """Exact stored bytes of all bands of one module."""
    return sum(band_nbytes(m, n, b, r, group_size) for b, r in bands)


def budget_bytes(m: int, n: int, ratio: float) -> int:
    """Bytes a module's factors may take: ``ratio`` times its float16 delta (``2 * m * n`` bytes)."""
    return int(2 * m * n * ratio)


def validate_band_spec(spec: Sequence[Sequence]) -> list[list]:
    """Check a band specification ``[(bits, rank | fraction | None), ...]`` and return it as a list of lists.

    ``rank`` (int >= 0) keeps that many singular vectors (fewer if the budget runs out), ``fraction``
    (0 < float <= 1) spends that share of the layer budget, ``None`` spends whatever is left (last band only).
    """
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ConfigError(f"bands must be a non-empty list of (bits, rank | fraction | None), got {spec!r}")
    out = []
    for i, item in enumerate(spec):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(f"band {i} must be a pair (bits, rank | fraction | None), got {item!r}")
        bits, size = item
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
            raise ConfigError(f"band {i}: unsupported bit width {bits!r}; supported: {SUPPORTED_BITS}")
        if size is None:
            if i != len(spec) - 1:
                raise ConfigError(f"band {i}: only the last band may take the rest of the budget (None)")
        elif isinstance(size, bool) or not isinstance(size, (int, float)):
            raise ConfigError(f"band {i}: size must be an int rank, a float fraction or None, got {size!r}")
        elif isinstance(size, int) and size < 0:
            raise ConfigError(f"band {i}: rank must be >= 0, got {size}")
        elif isinstance(size, float) and not 0.0 < size <= 1.0:
            raise ConfigError(f"band {i}: budget fraction must be in (0, 1], got {size}")
        out.append([bits, size])
    return out


def max_rank(m: int, n: int, bits: int, group_size: int, allowance: int, cap: int) -> int:
    """Largest rank ``r <= cap`` whose band fits in ``allowance`` bytes (band bytes grow with ``r``)."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if band_nbytes(m, n, bits, mid, group_size) <= allowance:
            lo = mid
        else:
            hi = mid - 1
    return lo


def solve_ranks(
    m: int, n: int, ratio: float, spec: Sequence[Sequence], group_size: int, min_rank_share: float = 0.0
) -> list[Band]:
    """Ranks for each band of an ``m x n`` delta at ``ratio`` so that the exact stored bytes fit the budget.

    Bands are filled in order (largest singular values first); the total rank never exceeds ``min(m, n)``.
    Bands that get rank 0 are kept in the result so the layout always lists every configured band.

    ``min_rank_share`` (0 = off) bounds what the higher-precision bands may cost: when the split keeps fewer than
    that share of the ranks the last band's bit width alone would buy, the fixed-rank bands shrink together (in
    steps of 1/32 of their configured ranks, down to none) until it does. Each band pays its own per-row scales,
    zeros and word padding of ``U``, so on narrow layers or small budgets a fixed band can cost most of the tail;
    at the published design point (4096 x 4096 at 1/16 keeps 97% of the ranks) no share up to 0.95 changes anything.
    """
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"ratio must be in (0, 1], got {ratio}")
    if not 0.0 <= min_rank_share <= 1.0:
        raise ConfigError(f"min_rank_share must be in [0, 1], got {min_rank_share}")
    spec = validate_band_spec(spec)
    bands = _fill(m, n, ratio, spec, group_size)
    if min_rank_share > 0.0 and spec[-1][1] is None:
        floor = min_rank_share * _fill(m, n, ratio, spec[-1:], group_size)[0][1]
        for shrunk in shrunk_specs(spec, SHRINK_STEPS)[1:]:
            if sum(r for _, r in bands) >= floor:
                break
            bands = _fill(m, n, ratio, shrunk, group_size)
    return bands


def _fill(m: int, n: int, ratio: float, spec: Sequence[Sequence], group_size: int) -> list[Band]:
    """Fill the bands of a validated ``spec`` in order, each as large as its size and the budget left allow."""
    budget = budget_bytes(m, n, ratio)
    used_bytes, used_rank, full = 0, 0, min(m, n)
    bands: list[Band] = []
    for bits, size in spec:
        left = budget - used_bytes
        cap = full - used_rank
        if isinstance(size, float):
            left = min(left, int(size * budget))
        elif isinstance(size, int):
            cap = min(cap, size)
        r = max_rank(m, n, bits, group_size, left, cap)
        bands.append((bits, r))
        used_bytes += band_nbytes(m, n, bits, r, group_size)
        used_rank += r
    return bands


def shrunk_specs(spec: Sequence[Sequence], steps: int = SHRINK_STEPS) -> list[list[list]]:
    """``spec`` with its fixed-rank bands scaled together by ``k / steps`` for ``k = steps .. 0`` (distinct specs,
    the configured one first, the last-band-only one last)."""
    spec = validate_band_spec(spec)
    out: list[list[list]] = []
    for k in range(steps, -1, -1):
        scaled = [[b, size * k // steps if isinstance(size, int) and i < len(spec) - 1 else size]
                  for i, (b, size) in enumerate(spec)]  # fmt: skip
        if scaled not in out:
            out.append(scaled)
    return out


def safetensors_header_bound(tensors: Sequence[tuple[str, str, int]], max_bytes: int) -> int:
    """Bytes a safetensors header of ``tensors`` (``(name, dtype name, number of dims)``) can take at most, when no
    tensor and no offset exceeds ``max_bytes``: the 8-byte length, the JSON (every number written with as many
    digits as ``max_bytes`` has, ``{"__metadata__":{"format":"pt"}}`` included) and the padding to 8 bytes."""
    digits = len(str(max(int(max_bytes), 1)))
    size = len('{"__metadata__":{"format":"pt"}}')
    for name, dtype, ndim in tensors:
        shape = ",".join(["9" * digits] * ndim)
        entry = f',"{name}":{{"dtype":"{dtype}","shape":[{shape}],"data_offsets":[{"9" * digits},{"9" * digits}]}}'
        size += len(entry.encode("utf-8"))
    return 8 + size + (-size) % 8


def largest_fitting(limit: int, fits: Callable[[int], bool]) -> int:
    """The largest ``k`` in ``0..limit`` with ``fits(k)`` (``fits`` monotone: true up to some ``k``), by bisection:
    how many rows of a part a byte budget holds."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
