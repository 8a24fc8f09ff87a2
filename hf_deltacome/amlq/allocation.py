"""Which precision (and low-rank rank) each quantized linear gets under a true bits-per-weight budget.

Inputs, per linear (:class:`Sensitivity`, measured by :mod:`.sensitivity` on calibration activations): the GPTQ
output error ``tr(E H Eᵀ)`` of every column *unit* at every candidate precision ``(bits, group size)``, the output
energy ``tr(W H Wᵀ)`` that normalizes it, the share of the error a rank-``k`` correction would remove, and the
linear's *end-to-end curve*: the whole model's next-token KL divergence from the full-precision model when only this
linear is quantized, at two probe errors (:func:`.sensitivity.measure_end_to_end`).

1. **Options of one linear** (:func:`linear_options`). Each unit's (bytes, error) points are reduced to their lower
   convex hull; merging the hull steps of all units by error saved per byte gives the linear's frontier of
   mixed-precision assignments, cheapest first; the same frontier without the lowest bit width and every uniform
   assignment are added (so the uniform layout of any precision is always within reach). ``low_bit_share`` drops
   the assignments that put more than that share of the columns at the lowest bit width. Each frontier point
   is combined with each candidate rank (error ``e · (1 − captured share)``), costed *exactly* (``entry_nbytes``:
   packed codes with row padding, scales, zeros, low-rank factors) and Pareto-filtered.
2. **Cost of an option**: the estimated KL it adds, read off the linear's end-to-end curve at its normalized error
   (:func:`estimated_kl`: linear below the smaller probe, log-log between the probes, and beyond the larger one
   growing at least linearly, so a 2-bit linear is charged what 2 bits measured, not an extrapolation from 3).
3. **Search** (:func:`allocate`): minimise the summed estimated KL under the byte budget: a Lagrange multiplier
   ``λ`` (each linear takes the option minimising ``KL + λ · bytes``) is binary-searched for the smallest value that
   fits ``bpw × weights / 8``, then the bytes left buy the upgrades with the best KL saved per byte. The layout's
   true bpw never exceeds the request (checked).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..format.amlq_layout import layout_bpw, lowrank_nbytes, unit_spans
from ..format.packing import stored_nbytes
from .config import AUTO_LOW_BIT_SHARES

AUTO_RANKS = (0, 8, 16, 32, 64)  # ranks the automatic choice considers (capped at a quarter of min(out, in))
_GROUP_META_BITS = 24  # float16 scale + uint8 zero per row and group
_SEARCH_STEPS = 60


@dataclass
class Sensitivity:
    """Measured sensitivity of one linear (see the module docstring)."""

    name: str
    shape: tuple[int, int]
    unit: int
    candidates: list[tuple[int, int]]  # (bits, group size)
    unit_errors: torch.Tensor  # (candidates, units): GPTQ output error tr(E H Eᵀ) of each unit at each candidate
    signal: float  # tr(W H Wᵀ)
    ranks: list[int] = field(default_factory=list)
    rank_fractions: torch.Tensor | None = None  # (candidates, ranks): error share removed by each rank
    weight: float = 1.0  # cost per unit normalized error where no curve was measured
    curve: list[tuple[float, float]] = field(default_factory=list)  # (normalized error, whole-model KL), ascending

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "unit": self.unit,
                "candidates": [list(c) for c in self.candidates], "unit_errors": self.unit_errors.tolist(),
                "signal": self.signal, "ranks": list(self.ranks),
                "rank_fractions": self.rank_fractions.tolist() if self.rank_fractions is not None else None,
                "weight": self.weight, "curve": [list(p) for p in self.curve]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sensitivity:
        fr = d.get("rank_fractions")
        return cls(name=d["name"], shape=tuple(d["shape"]), unit=int(d["unit"]),
                   candidates=[tuple(c) for c in d["candidates"]],
                   unit_errors=torch.tensor(d["unit_errors"], dtype=torch.float64), signal=float(d["signal"]),
                   ranks=list(d.get("ranks") or []), rank_fractions=torch.tensor(fr) if fr is not None else None,
                   weight=float(d.get("weight", 1.0)),
                   curve=[(float(e), float(k)) for e, k in d.get("curve") or []])  # fmt: skip


def candidate_precisions(bits: Sequence[int], group_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Every ``(bits, group size)`` pair, except 8 bits below the largest group size (no error left to save)."""
    gmax = max(group_sizes)
    out = [(int(b), int(g)) for b in sorted(set(bits)) for g in sorted(set(group_sizes)) if b < 8 or g == gmax]
    if not out:
        raise ConfigError(f"no candidate precision from bits {list(bits)} and group sizes {list(group_sizes)}")
    return out


def candidate_ranks(shape: tuple[int, int], error_rank: int | str) -> list[int]:
    """Ranks considered for a linear of ``shape``: ``[0]``, ``[N]`` (fixed) or the automatic set."""
    if error_rank == "auto":
        cap = min(shape) // 4
        return [r for r in AUTO_RANKS if r <= cap] or [0]
    rank = int(error_rank)
    return [min(rank, min(shape))] if rank else [0]


def estimated_kl(sens: Sensitivity, normalized_error: float) -> float:
    """The whole-model KL this linear adds at ``normalized_error`` (``tr(E H Eᵀ) / tr(W H Wᵀ)``), from its curve."""
    e = max(float(normalized_error), 0.0)
    pts = [(pe, pk) for pe, pk in sens.curve if pe > 0 and pk > 0]
    if not pts:
        return sens.weight * e
    if e <= pts[0][0]:
        return pts[0][1] * e / pts[0][0]  # small errors: second order, KL linear in the error energy
    for (e0, k0), (e1, k1) in zip(pts, pts[1:], strict=False):
        if e <= e1:
            return k0 * math.exp(math.log(k1 / k0) * math.log(e / e0) / math.log(e1 / e0)) if e1 > e0 else k1
    slope = 1.0
    if len(pts) > 1 and pts[-1][0] > pts[-2][0]:
        slope = min(max(math.log(pts[-1][1] / pts[-2][1]) / math.log(pts[-1][0] / pts[-2][0]), 1.0), 3.0)
    return pts[-1][1] * (e / pts[-1][0]) ** slope


@dataclass
class _Option:
    nbytes: int
    error: float  # estimated output error tr(E H Eᵀ) after the low-rank part
    units: list[int]  # candidate index of each unit
    rank: int
    cost: float = 0.0  # estimated KL


def _plane_bytes(rows: int, cols: int, assignment: Sequence[int], cands: Sequence[tuple[int, int]], unit: int) -> int:
    counts: dict[int, int] = {}
    for (s, e), c in zip(unit_spans(cols, unit), assignment, strict=True):
        counts[c] = counts.get(c, 0) + (e - s)
    return sum(stored_nbytes(rows, n, *cands[c]) for c, n in counts.items())


def _frontier(sens: Sensitivity, usable: Sequence[int] | None = None) -> list[list[int]]:
    """Mixed-precision assignments of the units, cheapest first (merged lower convex hulls of the units), using only
    the candidate indices ``usable`` (default: all)."""
    m, n = sens.shape
    cands, errs = sens.candidates, sens.unit_errors.to(torch.float64)
    spans = unit_spans(n, sens.unit)
    approx = [[m * ((e - s) * b + math.ceil((e - s) / g) * _GROUP_META_BITS) for b, g in cands] for s, e in spans]
    steps: list[tuple[float, int, int]] = []  # (error saved per bit, unit, candidate)
    start: list[int] = []
    usable = list(range(len(cands))) if usable is None else list(usable)
    for u in range(len(spans)):
        pts = sorted(usable, key=lambda c: (approx[u][c], float(errs[c, u])))
        hull = [pts[0]]
        for c in pts[1:]:
            if float(errs[c, u]) >= float(errs[hull[-1], u]):
                continue  # costs more, saves nothing
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                s_ab = (float(errs[a, u]) - float(errs[b, u])) / max(approx[u][b] - approx[u][a], 1e-9)
                s_bc = (float(errs[b, u]) - float(errs[c, u])) / max(approx[u][c] - approx[u][b], 1e-9)
                if s_bc < s_ab:
                    break
                hull.pop()  # b is not on the convex hull
            hull.append(c)
        start.append(hull[0])
        for a, b in zip(hull[:-1], hull[1:], strict=False):
            steps.append(((float(errs[a, u]) - float(errs[b, u])) / max(approx[u][b] - approx[u][a], 1e-9), u, b))
    steps.sort(key=lambda t: -t[0])
    frontier = [list(start)]
    for _, u, c in steps:
        frontier.append(list(frontier[-1]))
        frontier[-1][u] = c
    return frontier


def linear_options(sens: Sensitivity, error_rank: int | str = "auto", *, low_bit_share: float = 1.0,
                   rank_bits: int = 8) -> list[_Option]:  # fmt: skip
    """Pareto-optimal (bytes, estimated KL) options of one linear, cheapest first (see the module docstring).

    ``error_rank``: ``"auto"`` tries every measured rank, ``0`` none, ``N`` rank ``N`` wherever a unit is below 8
    bits. ``low_bit_share``: the largest share of the columns allowed at the lowest candidate bit width.
    """
    m, n = sens.shape
    cands, errs = sens.candidates, sens.unit_errors.to(torch.float64)
    spans = unit_spans(n, sens.unit)
    low = min(b for b, _ in cands)
    wanted = candidate_ranks(sens.shape, error_rank)
    missing = [r for r in wanted if r and r not in sens.ranks]
    if missing:
        raise ConfigError(f"error_rank={error_rank!r} needs rank(s) {missing} for {sens.name}, but the sensitivity "
                          f"pass measured ranks {sens.ranks}; measure again with this error_rank")  # fmt: skip
    fr = sens.rank_fractions
    # the merged hulls of all candidates, the same without the lowest bit width (the hull of all candidates may reach
    # low_bit_share's limit only through upgrades elsewhere), and every uniform assignment (so the uniform layout of
    # each precision is always in the allocation's reach: it can only be matched or beaten in estimated KL)
    frontier = _frontier(sens) + _frontier(sens, [c for c, (b, _) in enumerate(cands) if b != low])
    frontier += [[c] * len(spans) for c in range(len(cands))]
    allowed = [a for a in frontier
               if sum(e - s for (s, e), c in zip(spans, a, strict=True) if cands[c][0] == low) <= low_bit_share * n]
    options: list[_Option] = []
    for assign in allowed or frontier[-1:]:
        unit_err = [float(errs[c, u]) for u, c in enumerate(assign)]
        err = sum(unit_err)
        plane_bytes = _plane_bytes(m, n, assign, cands, sens.unit)
        all8 = all(cands[c][0] >= 8 for c in assign)
        for r in wanted:
            if r and all8:
                continue
            e = err
            if r:
                ri = sens.ranks.index(r)
                share = sum(ue * float(fr[c, ri]) for ue, c in zip(unit_err, assign, strict=True)) / max(err, 1e-300)
                e = err * (1.0 - min(max(share, 0.0), 1.0))
            opt = _Option(plane_bytes + lowrank_nbytes(m, n, r, rank_bits), e, assign, r)
            opt.cost = estimated_kl(sens, e / max(sens.signal, 1e-30))
            options.append(opt)
    options.sort(key=lambda o: (o.nbytes, o.cost))
    pareto: list[_Option] = []
    for o in options:
        if not pareto or o.cost < pareto[-1].cost:
            pareto.append(o)
    return pareto


def _entry(sens: Sensitivity, opt: _Option, rank_bits: int) -> dict[str, Any]:
    used = sorted(set(opt.units), key=lambda c: sens.candidates[c])
    index = {c: i for i, c in enumerate(used)}
    entry = {"shape": list(sens.shape), "unit": sens.unit, "planes": [list(sens.candidates[c]) for c in used],
             "units": [index[c] for c in opt.units], "rank": opt.rank}  # fmt: skip
    if opt.rank and rank_bits != 8:
        entry["rank_bits"] = rank_bits
    return entry


def _cheapest_text(sensitivities: Sequence[Sensitivity], error_rank: int | str, rank_bits: int, weights: int) -> str:
    """``"the cheapest reachable is X bpw (low_bit_share 1)"``: what the precisions allow with no share limit."""
    nbytes = sum(linear_options(s, error_rank, low_bit_share=1.0, rank_bits=rank_bits)[0].nbytes for s in sensitivities)
    return f"the cheapest reachable is {8 * nbytes / weights:.3f} bpw (low_bit_share 1)"


def allocate(
    sensitivities: Sequence[Sensitivity],
    bpw: float,
    error_rank: int | str = "auto",
    *,
    low_bit_share: float | str = 1.0,
    rank_bits: int = 8,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The layout minimising the summed estimated KL within ``bpw`` (module docstring), and a record of the choice.

    ``low_bit_share="auto"`` tries ``AUTO_LOW_BIT_SHARES`` in order (0.5, then no limit) and keeps the first whose
    cheapest layout fits ``bpw``: the cap is a safety margin against many columns at the lowest bit width, dropped
    only when it would make the request impossible. An unreachable ``bpw`` raises `ConfigError` naming the cheapest
    reachable true bpw (with the share that reaches it)."""
    if not sensitivities:
        raise ConfigError("nothing to quantize: no linear layer was measured")
    weights = sum(s.shape[0] * s.shape[1] for s in sensitivities)
    budget = math.floor(bpw * weights / 8)
    shares = list(AUTO_LOW_BIT_SHARES) if low_bit_share == "auto" else [float(low_bit_share)]
    cheapest_at: dict[float, int] = {}
    for share in shares:
        opts = {s.name: linear_options(s, error_rank, low_bit_share=share, rank_bits=rank_bits)
                for s in sensitivities}  # fmt: skip
        cheapest_at[share] = sum(os_[0].nbytes for os_ in opts.values())
        if cheapest_at[share] <= budget:
            break
    else:
        floor = "" if 1.0 in cheapest_at else "; " + _cheapest_text(sensitivities, error_rank, rank_bits, weights)
        tried = ", ".join(f"{8 * b / weights:.3f} bpw at low_bit_share {s:g}" for s, b in cheapest_at.items())
        raise ConfigError(
            f"{bpw} bits per weight is below the cheapest layout these precisions allow ({tried}{floor}); "
            "allow larger group sizes or a lower bit width, a larger low_bit_share (or 'auto'), or raise the target"
        )
    low_bit_share = share

    def pick(lam: float) -> dict[str, int]:
        return {n: min(range(len(os_)), key=lambda i: os_[i].cost + lam * os_[i].nbytes) for n, os_ in opts.items()}

    def total(choice: dict[str, int]) -> int:
        return sum(opts[n][i].nbytes for n, i in choice.items())

    slopes = [(a.cost - b.cost) / max(b.nbytes - a.nbytes, 1) for os_ in opts.values() for a, b in zip(os_, os_[1:])]
    lo = math.log(max(min(slopes, default=1e-30), 1e-300)) - 1.0  # every linear at its best option: too many bytes
    hi = math.log(max(max(slopes, default=1.0), 1e-300)) + 1.0  # every linear at its cheapest option: fits
    if total(pick(math.exp(lo))) <= budget:
        hi = lo
    for _ in range(_SEARCH_STEPS):  # invariant: pick(exp(hi)) fits
        if hi - lo < 1e-6:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total(pick(math.exp(mid))) <= budget else (mid, hi)
    choice = pick(math.exp(hi))
    used = total(choice)
    while True:  # spend what is left on the upgrades that save the most estimated KL per byte
        best: tuple[float, str, int] | None = None
        for name, i in choice.items():
            os_ = opts[name]
            for j in range(i + 1, len(os_)):
                extra = os_[j].nbytes - os_[i].nbytes
                if used + extra <= budget:
                    gain = (os_[i].cost - os_[j].cost) / max(extra, 1)
                    if best is None or gain > best[0]:
                        best = (gain, name, j)
        if best is None or best[0] <= 0:
            break
        _, name, j = best
        used += opts[name][j].nbytes - opts[name][choice[name]].nbytes
        choice[name] = j
    by_name = {s.name: s for s in sensitivities}
    layout = {name: _entry(by_name[name], opts[name][i], rank_bits) for name, i in choice.items()}
    true_bpw = layout_bpw(layout)
    if true_bpw > bpw + 1e-9:  # pragma: no cover - guarded by construction
        raise ConfigError(f"internal error: allocation gives {true_bpw:.4f} bpw for a {bpw} target")
    info = {"target_bpw": bpw, "true_bpw": true_bpw, "multiplier": math.exp(hi), "low_bit_share": low_bit_share,
            "estimated_kl": sum(opts[n][i].cost for n, i in choice.items()),
            "estimated_errors": {n: opts[n][i].error / max(by_name[n].signal, 1e-30) for n, i in choice.items()}}
    return layout, info
