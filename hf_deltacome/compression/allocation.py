"""Adaptive allocation (the AMLQ idea applied to deltas): move bytes between modules by measured sensitivity, with
the model-wide total unchanged.

Each module's error is measured at several budgets (¼× … 4× its own), as the noise-to-signal ratio of its output
``||(Δ − Δ̂) X||² / ||W_f X||²``; a binary search finds the smallest error threshold at which every module taking its
cheapest budget under the threshold keeps the model-wide total within the sum of the uniform budgets; the bytes left
over go to the modules where they remove the most error per byte. The whole-model check keeps the result only if the
model's KL to the fine-tune falls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import DeltaCoMeConfig
from ..errors import DeltaCoMeError
from ..format.budget import budget_bytes
from ..progress import progress_bar
from ..quant.hessian import model_hessians
from .endtoend import EndToEndCheck
from .modules import approximation_error, entry_nbytes, module_kind, output_error, plan_entry
from .svd import reuse_svd

ALLOCATION_LEVELS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)  # budgets tried per module, x its uniform one


@dataclass
class Candidates:
    """The layouts one module may take under adaptive allocation, with their exact bytes and errors."""

    name: str
    entries: list[dict[str, Any]]
    nbytes: list[int]
    errors: list[float]
    uniform_bytes: int  # its budget under uniform allocation


def allocate(candidates: Sequence[Candidates], total_budget: int) -> tuple[list[int], float]:
    """Pick one candidate per module so that the bytes sum to at most ``total_budget``, minimising the largest error.

    Binary search on the error threshold ``τ``: each module takes its cheapest candidate with error ``≤ τ`` (its
    largest one if none is that good); the smallest ``τ`` whose total fits wins. Leftover bytes then go, one upgrade
    at a time, where they remove the most error per byte. Returns the chosen index per module and ``τ``.
    """
    if not candidates:
        return [], 0.0

    def choose(tau: float) -> list[int]:
        picks = []
        for c in candidates:
            ok = [j for j, e in enumerate(c.errors) if e <= tau]
            picks.append(
                min(ok, key=lambda j: c.nbytes[j]) if ok else max(range(len(c.errors)), key=c.nbytes.__getitem__)
            )
        return picks

    def total(picks: Sequence[int]) -> int:
        return sum(c.nbytes[j] for c, j in zip(candidates, picks, strict=True))

    floor = [min(range(len(c.nbytes)), key=c.nbytes.__getitem__) for c in candidates]
    if total(floor) > total_budget:
        raise DeltaCoMeError(
            f"adaptive allocation: even the smallest layouts take {total(floor):,} bytes, over the budget of "
            f"{total_budget:,} bytes"
        )
    taus = sorted({e for c in candidates for e in c.errors})
    lo, hi = 0, len(taus) - 1  # total(choose(taus[-1])) is the floor, which fits
    while lo < hi:
        mid = (lo + hi) // 2
        if total(choose(taus[mid])) <= total_budget:
            hi = mid
        else:
            lo = mid + 1
    tau = taus[lo]
    picks = choose(tau)
    used = total(picks)
    while True:  # spend what is left where it buys the most
        best, best_gain = None, 0.0
        for i, c in enumerate(candidates):
            j = picks[i]
            for k in range(len(c.nbytes)):
                extra = c.nbytes[k] - c.nbytes[j]
                gain = c.errors[j] - c.errors[k]
                if extra > 0 and gain > 0 and used + extra <= total_budget and gain / extra > best_gain:
                    best, best_gain = (i, k), gain / extra
        if best is None:
            break
        i, k = best
        used += candidates[i].nbytes[k] - candidates[i].nbytes[picks[i]]
        picks[i] = k
    return picks, tau


def allocate_adaptive(
    finetuned_model: nn.Module,
    config: DeltaCoMeConfig,
    ids: torch.Tensor | None,
    live: Sequence[str],
    shapes: dict[str, tuple[int, int]],
    delta_of: Any,
    ft_mods: dict[str, nn.Module],
    specs: dict[str, list[list]],
    layout: dict[str, dict[str, Any]],
    info: dict[str, Any],
    check: EndToEndCheck | None,
    kl_now: float | None,
    progress: bool,
) -> None:
    """Move budget between ``live`` modules by measured sensitivity (model-wide bytes unchanged), in ``layout``;
    with an end-to-end ``check`` the moved layout is kept only if the model's KL to the fine-tune falls."""
    if check is not None:  # activations are measured on the fine-tune itself
        check.restore()
    chunks = model_hessians(finetuned_model, live, ids, progress=progress) if ids is not None else [{}]
    by_name: dict[str, Candidates] = {}
    bar = progress_bar(len(live), progress, "Measuring sensitivity")
    for hess in chunks:
        for name in hess or live:
            if name in by_name:
                continue
            with reuse_svd():  # scoped to the module: a large model cannot hold every SVD at once
                by_name[name] = _candidates(
                    name, shapes[name], delta_of(name), ft_mods[name], hess.get(name), config, specs
                )
            bar.update(1)
        del hess
    bar.close()
    cands = [by_name[name] for name in live]
    before = {nm: layout[nm] for nm in live}
    total_budget = sum(c.uniform_bytes for c in cands)
    picks, tau = allocate(cands, total_budget)
    for c, j in zip(cands, picks, strict=True):
        entry = dict(c.entries[j])
        entry["bias"] = layout[c.name]["bias"]
        layout[c.name] = entry
    used = sum(c.nbytes[j] for c, j in zip(cands, picks, strict=True))
    one = ALLOCATION_LEVELS.index(1.0)
    info["allocation"] = {
        "strategy": "adaptive",
        "metric": "output noise-to-signal ||(dW - dW_q) X||^2 / ||W_ft X||^2"
        + ("" if ids is not None else " without activations (X = I)"),
        "threshold": tau,
        "budget_bytes": total_budget,
        "factor_bytes": used,
        "uniform_factor_bytes": sum(c.nbytes[one] for c in cands),
        "max_error": max((c.errors[j] for c, j in zip(cands, picks, strict=True)), default=0.0),
        "uniform_max_error": max((c.errors[one] for c in cands), default=0.0),
        "multipliers": {
            c.name: round(c.nbytes[j] / max(c.uniform_bytes, 1), 3) for c, j in zip(cands, picks, strict=True)
        },
    }
    if check is None or kl_now is None:
        return
    check.apply({nm: layout[nm] for nm in live})
    kl = check.kl()
    kept = kl < kl_now
    info["end_to_end"]["adaptive"] = {"kl": kl, "kept": kept}
    info["allocation"]["kept"] = kept
    if not kept:  # the per-module sensitivities moved budget where the model did not gain: keep the uniform split
        layout.update(before)


def _candidates(
    name: str,
    shape: tuple[int, int],
    delta: torch.Tensor,
    ft_module: nn.Module,
    hessian: torch.Tensor | None,
    config: DeltaCoMeConfig,
    specs: dict[str, list[list]],
) -> Candidates:
    """Layouts of one module at every allocation level, with exact bytes and output noise-to-signal ratios."""
    m, n = shape
    spec = specs.get(module_kind(name, shape))  # a searched split keeps its ranks; the rest band absorbs the change
    signal = max(output_error(ft_module.weight.detach().to(torch.float32).cpu(), hessian), 1e-30)
    entries, nbytes, errors = [], [], []
    for level in ALLOCATION_LEVELS:
        ratio = min(1.0, config.ratio * level)
        entry = plan_entry(name, m, n, ratio, config, spec=spec)
        entries.append(entry)
        nbytes.append(entry_nbytes(entry))
        errors.append(approximation_error(delta, hessian, entry, config, quantizer="rtn") / signal)
    for j in range(1, len(errors)):  # more bytes never hurt: keep the error curve monotone
        if nbytes[j] >= nbytes[j - 1]:
            errors[j] = min(errors[j], errors[j - 1])
    return Candidates(name, entries, nbytes, errors, budget_bytes(m, n, config.ratio))
