"""The bytes a plan's layouts leave of the modules' budgets, spent (:func:`spend_unspent`).

Each module's layout is solved within its own budget and leaves up to a quantization group (a DARE part) or a
singular vector (bands, sparse bands) of it unused, and a module whose weight did not change leaves all of it.
Summed over a model that is 0.1-3% of the file, a different amount for each method, so two methods at one ratio
would write files that differ by rounding. The plan gives those bytes back: to the DARE parts where the layout
has any (a few values at a time, to the byte); else to the sparse bands (each such module planned again with more
bytes), then to the last band of the band-only layouts (the singular vector of most expected energy per byte
first, then a few vectors move between modules to land on the byte where they can).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..format.budget import band_nbytes
from ..format.packing import stored_nbytes
from ..format.vq_part import vq_rows
from .baselines import dare_values, sparse_entry
from .impart import MODEL_DECAY
from .modules import entry_nbytes

EXACT_FILL_VALUES = 512  # the DARE parts' last step moves a part by up to this many values
LANDING_VECTORS = 2  # the bands' last step moves a module's last band by up to this many singular vectors
LANDING_WINDOW = 1 << 16  # ... and searches sums within this many bytes (larger vectors: no landing step)


def spend_unspent(
    layout: dict[str, dict[str, Any]],
    offered: int,
    resplit: Callable[[str, int], dict[str, Any]] | None = None,
    complete: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Give the bytes the layouts leave of ``offered`` (the sum of the targets' budgets) back to them, in place: to
    their DARE parts when they have any; else to the layouts with sparse bands (ImPart, ``sparse_tail``), each
    planned again by ``resplit(name, budget)`` with its share of the bytes added to what it holds, and then to the
    last band of every band-only layout (:func:`_spend_on_bands`) but those ``complete`` (a delta of low rank stored
    whole: a singular vector more would be noise). BitDelta's signs keep what they have. Returns
    the bytes offered, left before and left after, and what took them (``spent_on``: ``"dare"``, ``"sparse
    bands"``, ``"bands"``, both of the latter joined by ``+``, or ``"none"``)."""
    spare = offered - sum(entry_nbytes(e) for e in layout.values())
    record: dict[str, Any] = {"offered_bytes": int(offered), "unspent_before": int(spare),
                              "unspent_bytes": int(spare), "spent_on": "none"}  # fmt: skip
    if spare <= 0:
        return record
    takers = []
    if any(e.get("sparse") for e in layout.values()):
        takers += ["dare"] if _spend_on_dare(layout, spare) else []
    elif any(e.get("vq") for e in layout.values()):
        takers += ["vq"] if _spend_on_vq(layout, spare) else []
    else:
        if resplit is not None and _spend_on_sparse_bands(layout, spare, resplit):
            takers.append("sparse bands")
        left = offered - sum(entry_nbytes(e) for e in layout.values())
        if left > 0 and _spend_on_bands(layout, left, complete):
            takers.append("bands")
    record["spent_on"] = "+".join(takers) or "none"
    record["unspent_bytes"] = int(offered - sum(entry_nbytes(e) for e in layout.values()))
    return record


def _spend_on_sparse_bands(
    layout: dict[str, dict[str, Any]], spare: int, resplit: Callable[[str, int], dict[str, Any]]
) -> bool:
    """Every layout with sparse bands is planned again with its share of ``spare`` (in proportion to its bytes,
    what earlier modules could not use carried on) added to what it holds; a second pass offers each the rest. A
    new layout is kept only where it grows within what it was offered. Returns whether any layout changed."""
    names = [nm for nm, e in layout.items() if e.get("sparse_bands")]
    held = {nm: entry_nbytes(layout[nm]) for nm in names}
    total, spent, so_far, changed = sum(held.values()), 0, 0, False
    for last_pass in (False, True):
        for nm in names:
            so_far += held[nm] if not last_pass else 0
            offer = (spare * so_far // total if not last_pass else spare) - spent
            if offer <= 0:
                continue
            now = entry_nbytes(layout[nm])
            entry = resplit(nm, now + offer)
            grown = entry_nbytes(entry) - now
            if 0 < grown <= offer:
                layout[nm], spent, changed = entry, spent + grown, True
    return changed


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
        for nm, t in (_landing_moves(options, left, 4 * max(left, 96)) or {}).items():
            count[nm] += t
    changed = False
    for nm in names:
        if count[nm] != int(sp[nm]["nnz"]):
            m, n = layout[nm]["shape"]
            layout[nm]["sparse"] = sparse_entry(nm, m, n, count[nm], int(sp[nm]["seed"]), *fmt[nm],
                                                bool(sp[nm].get("rates")))  # fmt: skip
            changed = True
    return changed


def _spend_on_vq(layout: dict[str, dict[str, Any]], spare: int) -> bool:
    """The vq parts take ``spare`` bytes as more rotated rows, shared in proportion to each part's size, then what
    the shares' rounding left, in order. Returns whether any part changed."""
    names = [nm for nm, e in layout.items() if e.get("vq")]
    size = {nm: entry_nbytes({"shape": layout[nm]["shape"], "vq": layout[nm]["vq"]}) for nm in names}
    left, total, changed = spare, sum(size.values()), False
    for proportional in (True, False):
        for nm in names:
            m, n = layout[nm]["shape"]
            vq = layout[nm]["vq"]
            extra = spare * size[nm] // total if proportional else left
            rows = vq_rows(m, n, int(vq["dim"]), size[nm] + extra, int(vq.get("codes", 16)))
            if rows > int(vq["rows"]):
                layout[nm]["vq"] = {**vq, "rows": rows}
                new = entry_nbytes({"shape": [m, n], "vq": layout[nm]["vq"]})
                left -= new - size[nm]
                size[nm], changed = new, True
    return changed


def _spend_on_bands(layout: dict[str, dict[str, Any]], spare: int, complete: set[str] | frozenset[str]) -> bool:
    """The last band of every band-only layout with a changed delta grows by whole singular vectors into ``spare``
    bytes: greedily, the vector of most expected energy per byte first, while it fits and the module has rank
    left; then up to ``LANDING_VECTORS`` vectors per module move to land on the byte where a combination does.

    The energy is ImPart's model spectrum (``σ_k² = (k + 1)^(-2·MODEL_DECAY)``, :mod:`.impart`), not the delta's
    own: a streamed run plans before it reads the weights, and a streamed and a loaded run must write the same
    file. So the vectors go first to the modules that keep the fewest vectors for their cost.
    Returns whether any band changed."""
    names = [nm for nm, e in layout.items() if _band_only(e) and nm not in complete]
    shape = {nm: (int(layout[nm]["shape"][0]), int(layout[nm]["shape"][1])) for nm in names}
    group = {nm: int(layout[nm].get("group_size", 128)) for nm in names}
    bits = {nm: int(layout[nm]["bands"][-1][0]) for nm in names}
    rank = {nm: int(layout[nm]["bands"][-1][1]) for nm in names}
    fixed = {nm: sum(int(r) for _, r in layout[nm]["bands"][:-1]) for nm in names}  # the other bands' ranks

    def nbytes(nm: str, r: int) -> int:
        return band_nbytes(*shape[nm], bits[nm], r, group[nm])

    def room(nm: str, r: int) -> bool:
        return 0 <= r and fixed[nm] + r <= min(shape[nm])

    def worth(nm: str) -> float:  # the model energy of the next singular vector per byte
        return (fixed[nm] + rank[nm] + 1) ** (-2 * MODEL_DECAY) / (nbytes(nm, rank[nm] + 1) - nbytes(nm, rank[nm]))

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
        moves = [abs(d) for _, opts in options for d in opts]
        bound = 4 * max(left, *moves) if moves else 0
        # a sum no combination reaches (every vector's bytes share a factor the target lacks), or vectors so large
        # that the search would not stay small: left as it is, under one vector of any module
        if moves and left % math.gcd(*moves) == 0 and bound <= LANDING_WINDOW:
            for nm, t in (_landing_moves(options, left, bound) or {}).items():
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


def _landing_moves(
    options: Sequence[tuple[str, dict[int, int]]], target: int, bound: int
) -> dict[str, int] | None:
    """One move (or none) per part, from its ``options`` (bytes -> move), whose bytes sum to ``target``: the parts
    taken in order until the sum is reachable, the fewest bytes moved among the ways found, every partial sum
    within ``bound`` bytes of none (None: unreachable)."""
    reach: dict[int, tuple[int, dict[str, int]]] = {0: (0, {})}  # bytes moved in all -> (bytes moved, moves)
    for nm, opts in options:
        for total, (cost, moves) in list(reach.items()):
            for d, t in opts.items():
                if abs(total + d) <= bound and (total + d not in reach or cost + abs(d) < reach[total + d][0]):
                    reach[total + d] = (cost + abs(d), {**moves, nm: t})
        if target in reach:
            return reach[target][1]
    return None
