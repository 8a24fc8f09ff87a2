"""The bytes a plan's layouts leave of the modules' budgets, spent (:func:`spend_unspent`).

Each module's layout is solved within its own budget and leaves up to a quantization group (a DARE part) or a
singular vector (bands) of it unused, and a module whose weight did not change leaves all of it. Summed over a
model that is 0.1-0.7% of the file, a different amount for each method, so two methods at one ratio would write
files that differ by rounding. The plan gives those bytes back: to the DARE parts where the layout has any (a few
values at a time, to the byte), else to the last band of the band layouts (the singular vector that removes the
most of its delta per byte first, then a few vectors move between modules to land on the byte where they can).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..format.budget import band_nbytes
from ..format.packing import stored_nbytes
from .baselines import dare_values, sparse_entry
from .modules import entry_nbytes

EXACT_FILL_VALUES = 512  # the DARE parts' last step moves a part by up to this many values
LANDING_VECTORS = 2  # the bands' last step moves a module's last band by up to this many singular vectors


def spend_unspent(
    layout: dict[str, dict[str, Any]],
    offered: int,
    spectrum: Callable[[str], torch.Tensor | None] | None = None,
) -> dict[str, Any]:
    """Give the bytes the layouts leave of ``offered`` (the sum of the targets' budgets) back to them, in place: to
    their DARE parts when they have any, else to the last band of every band-only layout (``spectrum``: a module's
    delta's singular values or None, to grow first where the next singular vector carries the most energy per byte;
    without them the cheapest vectors go first). Layouts of other kinds (BitDelta signs, sparse bands) keep what they have.
    Returns the bytes offered, left before and left after, and what took them (``spent_on``)."""
    spare = offered - sum(entry_nbytes(e) for e in layout.values())
    record: dict[str, Any] = {"offered_bytes": int(offered), "unspent_before": int(spare),
                              "unspent_bytes": int(spare), "spent_on": "none"}  # fmt: skip
    if spare <= 0:
        return record
    if any(e.get("sparse") for e in layout.values()):
        record["spent_on"] = "dare" if _spend_on_dare(layout, spare) else "none"
    elif _spend_on_bands(layout, spare, spectrum or (lambda nm: None)):
        record["spent_on"] = "bands"
    record["unspent_bytes"] = int(offered - sum(entry_nbytes(e) for e in layout.values()))
    return record


def _spend_on_dare(layout: dict[str, dict[str, Any]], spare: int) -> bool:
    """The DARE parts take ``spare`` bytes, shared in proportion to each part's size, then a few parts move by a few
    values to land on the byte. Returns whether any part changed."""
    names = [nm for nm, e in layout.items() if e.get("sparse")]
    sp = {nm: layout[nm]["sparse"] for nm in names}
    size = {nm: int(layout[nm]["shape"][0]) * int(layout[nm]["shape"][1]) for nm in names}
    count = {nm: int(sp[nm]["nnz"]) for nm in names}
    fmt = {nm: (int(sp[nm]["bits"]), int(sp[nm].get("group_size", 128))) for nm in names}  # the values' bits, group

    def nbytes(nm: str, c: int) -> int:
        return stored_nbytes(1, c, *fmt[nm])

    def grow(nm: str, extra: int) -> int:  # the most values this part holds with ``extra`` more bytes
        return max(dare_values(nbytes(nm, count[nm]) + extra, *fmt[nm], size[nm]), count[nm])

    left, total = spare, sum(nbytes(nm, count[nm]) for nm in names)
    for proportional in (True, False):  # each part's share, then what the shares' rounding left, in order
        for nm in names:
            extra = spare * nbytes(nm, count[nm]) // total if proportional else left
            new = grow(nm, extra)
            left -= nbytes(nm, new) - nbytes(nm, count[nm])
            count[nm] = new
    if left > 0:  # no part grows into what is left alone: parts move by a few values each to land on it
        steps = sorted((t for t in range(-EXACT_FILL_VALUES, EXACT_FILL_VALUES + 1) if t), key=lambda t: (abs(t), t))
        options = []
        for nm in names:
            opts: dict[int, int] = {}  # bytes -> the fewest values that move this part by them
            for t in steps:
                if 0 < count[nm] + t <= size[nm]:
                    opts.setdefault(nbytes(nm, count[nm] + t) - nbytes(nm, count[nm]), t)
            options.append((nm, {d: t for d, t in opts.items() if 0 < abs(d) <= 96}))
        for nm, t in (_landing_moves(options, left) or {}).items():
            count[nm] += t
    changed = False
    for nm in names:
        if count[nm] != int(sp[nm]["nnz"]):
            m, n = layout[nm]["shape"]
            layout[nm]["sparse"] = sparse_entry(nm, m, n, count[nm], int(sp[nm]["seed"]), *fmt[nm],
                                                bool(sp[nm].get("rates")))  # fmt: skip
            changed = True
    return changed


def _spend_on_bands(
    layout: dict[str, dict[str, Any]], spare: int, spectrum: Callable[[str], torch.Tensor | None]
) -> bool:
    """The last band of every band-only layout with a changed delta grows by whole singular vectors into ``spare``
    bytes: greedily, the vector of most energy (``σ²``) per byte first, while it fits and the module has rank
    left; then up to ``LANDING_VECTORS`` vectors per module move to land on the byte where a combination does.
    Returns whether any band changed."""
    names = [nm for nm, e in layout.items() if _band_only(e)]
    shape = {nm: (int(layout[nm]["shape"][0]), int(layout[nm]["shape"][1])) for nm in names}
    group = {nm: int(layout[nm].get("group_size", 128)) for nm in names}
    bits = {nm: int(layout[nm]["bands"][-1][0]) for nm in names}
    rank = {nm: int(layout[nm]["bands"][-1][1]) for nm in names}
    fixed = {nm: sum(int(r) for _, r in layout[nm]["bands"][:-1]) for nm in names}  # the other bands' ranks
    spectra = {nm: spectrum(nm) for nm in names}

    def nbytes(nm: str, r: int) -> int:
        return band_nbytes(*shape[nm], bits[nm], r, group[nm])

    def room(nm: str, r: int) -> bool:
        return 0 <= r and fixed[nm] + r <= min(shape[nm])

    def worth(nm: str) -> float:  # energy of the next singular vector per byte (cheapest first without spectra)
        cost = nbytes(nm, rank[nm] + 1) - nbytes(nm, rank[nm])
        s = spectra.get(nm)
        k = fixed[nm] + rank[nm]
        return (float(s[k]) ** 2 if s is not None and k < len(s) else 1.0) / cost

    left = spare
    heap = [(-worth(nm), i, nm) for i, nm in enumerate(names) if room(nm, rank[nm] + 1)]
    heapq.heapify(heap)
    while heap:
        _, i, nm = heapq.heappop(heap)
        cost = nbytes(nm, rank[nm] + 1) - nbytes(nm, rank[nm])
        if cost > left:  # the bytes left only shrink: this module's next vector never fits
            continue
        rank[nm] += 1
        left -= cost
        if room(nm, rank[nm] + 1):
            heapq.heappush(heap, (-worth(nm), i, nm))
    if left > 0:  # vectors move between modules (some in, some out) so that the bytes land on what is left
        options = []
        for nm in names:
            opts = {nbytes(nm, rank[nm] + t) - nbytes(nm, rank[nm]): t
                    for t in range(-LANDING_VECTORS, LANDING_VECTORS + 1) if t and room(nm, rank[nm] + t)}  # fmt: skip
            options.append((nm, opts))
        for nm, t in (_landing_moves(options, left) or {}).items():
            rank[nm] += t
    changed = False
    for nm in names:
        if rank[nm] != int(layout[nm]["bands"][-1][1]):
            layout[nm]["bands"] = [list(b) for b in layout[nm]["bands"][:-1]] + [[bits[nm], rank[nm]]]
            changed = True
    return changed


def _band_only(entry: dict[str, Any]) -> bool:
    """Whether a layout entry is bands alone (no DARE, sign or sparse-band part) with a changed delta."""
    bands = entry.get("bands") or []
    return (bool(bands) and sum(int(r) for _, r in bands) > 0
            and not (entry.get("sparse") or entry.get("sign") or entry.get("sparse_bands")))  # fmt: skip


def _landing_moves(options: Sequence[tuple[str, dict[int, int]]], target: int) -> dict[str, int] | None:
    """One move (or none) per part, from its ``options`` (bytes -> move), whose bytes sum to ``target``: the parts
    taken in order until the sum is reachable, the fewest bytes moved among the ways found (None: unreachable)."""
    reach: dict[int, tuple[int, dict[str, int]]] = {0: (0, {})}  # bytes moved in all -> (bytes moved, moves)
    bound = 4 * max(abs(target), 96, *(abs(d) for _, opts in options for d in opts))
    for nm, opts in options:
        for total, (cost, moves) in list(reach.items()):
            for d, t in opts.items():
                if abs(total + d) <= bound and (total + d not in reach or cost + abs(d) < reach[total + d][0]):
                    reach[total + d] = (cost + abs(d), {**moves, nm: t})
        if target in reach:
            return reach[target][1]
    return None
