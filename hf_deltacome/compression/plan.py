"""Planning the layout of every target: the method at one byte budget, the band split and where the bytes go.

Every method stores its factors in the format of :class:`~hf_deltacome.format.storage.PackedDelta` and fits,
counted with every stored byte, in the budget of :func:`~hf_deltacome.format.budget.budget_bytes` of each module
(or, with ``allocation="adaptive"``, in the model-wide sum of those budgets); what the modules leave unspent goes
back to the DARE parts, else to the sparse and the last bands (:mod:`.unspent`), so a file spends the whole sum:

* ``deltacome`` — SVD, singular vectors in bands of mixed precision (``config.bands``, 8/3/2 bits by default),
  GPTQ against calibration activations (:mod:`.svd`);
* ``svd-uniform`` — the same, every singular vector at ``config.uniform_bits`` bits;
* ``lowrank`` — the top singular vectors in float16 at the rank the budget buys (plain truncated SVD);
* ``bitdelta``, ``dare`` — the baselines of :mod:`.baselines`; ``deltacome-dare`` — bands for the top singular
  directions with ``band_share`` of the budget, DARE of their residual with the rest (:mod:`.baselines`);
* ``impart`` (and ``deltacome`` with ``sparse_tail``) — the last band's singular vectors kept sparse, keep-rates
  growing with the singular value (:mod:`.impart`; the delta's spectrum is read here when the weights are loaded).

With calibration data the plan is checked on the whole model (:mod:`.endtoend`): the next-token KL to the fine-tune
chooses ``min_rank_share="auto"``, and decides whether each searched split (:mod:`.search`) and the adaptive
allocation (:mod:`.allocation`) are kept.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..config import (
    RANK_SHARES,
    RESIDUAL_ALONE_MARGIN,
    RESIDUAL_BAND_BITS,
    RESIDUAL_DARE_BITS,
    RESIDUAL_MARGIN,
    RESIDUAL_SHARES,
    SVD_METHODS,
    DeltaCoMeConfig,
)
from ..format.budget import budget_bytes
from ..progress import progress_bar
from ..quant.hessian import HESSIAN_MEMORY, model_hessians
from .allocation import allocate_adaptive
from .endtoend import METRIC, EndToEndCheck
from .impart import resplit
from .low_rank import (
    fits,
    low_rank_bands,
    low_rank_entry,
    low_rank_of,
    rounding_energy,
    stores_at_least,
    strongest_directions,
)
from .modules import compress_module, module_kind, plan_entry, rtn_bands_dense, with_changes
from .search import search_specs
from .svd import reuse_svd_if_fits, svd
from .unspent import spend_unspent

PLAN_MAX_SAMPLES = 16  # calibration sequences used to measure activations for search / allocation


@torch.no_grad()
def plan_layouts(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    targets: Sequence[str],
    config: DeltaCoMeConfig,
    *,
    calibration_ids: torch.Tensor | None = None,
    bias_changed: dict[str, bool] | None = None,
    unchanged: set[str] | None = None,
    progress: bool = False,
    deltas: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None,
    device: torch.device | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The layout entry of every target (method, search and allocation applied) and a record of the choices.

    With ``calibration_ids`` (token ids) the plan is checked on the whole model (:mod:`endtoend`): the next-token KL
    to the fine-tune picks ``min_rank_share="auto"`` and decides whether each searched split and the adaptive
    allocation are kept; the search and the allocation weight their per-module errors with the input activations.
    Without data ``"auto"`` means the published split and both fall back to the plain Frobenius error.
    ``unchanged``: the targets whose weight did not change (:mod:`.changes`: within the rounding of the dtypes);
    default: those bit-identical in both models. ``deltas``: reads a target's delta and fine-tuned weight where the
    models' weights are not in memory (a streamed pair), for the check of each delta's rank (:func:`_low_ranks`),
    which computes on ``device`` (the run's work device; default: the CPU).
    """
    t0 = time.time()
    bias_changed = bias_changed or {}
    base_mods, ft_mods = dict(base_model.named_modules()), dict(finetuned_model.named_modules())
    shapes: dict[str, tuple[int, int]] = {}
    same: dict[str, bool] = {}
    for name in targets:
        lin = base_mods[name]
        shapes[name] = (lin.out_features, lin.in_features)
        if unchanged is None:
            same[name] = torch.equal(lin.weight.detach().cpu(), ft_mods[name].weight.detach().cpu())
        else:
            same[name] = name in unchanged
    info: dict[str, Any] = {}
    specs: dict[str, list[list]] = {}
    adaptive = config.allocation == "adaptive"
    auto_share = config.method in ("deltacome", "impart") and config.min_rank_share == "auto"
    auto_residual = weighs_residual(config)
    needs_data = (config.search is not None or adaptive or auto_share or auto_residual) and calibration_ids is not None
    ids = calibration_ids[:PLAN_MAX_SAMPLES] if needs_data else None
    live = [nm for nm in targets if not same[nm]]

    def delta_of(name: str) -> torch.Tensor:
        wb = base_mods[name].weight.detach().to(torch.float32).cpu()
        wf = check.original(name) if check is not None else ft_mods[name].weight  # the check edits weights in place
        return wf.detach().to(torch.float32).cpu() - wb

    check: EndToEndCheck | None = None
    read = deltas or (lambda nm: (delta_of(nm), ft_mods[nm].weight))
    low = _low_ranks(config, live, shapes, read, progress, device)
    fitting = {nm for nm, k in low.items() if fits(*shapes[nm], budget_bytes(*shapes[nm], config.ratio),
                                                   config.group_size, k)}  # fmt: skip
    if live and len(fitting) == len(live):  # every changed delta is of low rank: no split or residual to choose
        auto_share = auto_residual = False
        config = with_changes(config, min_rank_share=0.0) if config.min_rank_share == "auto" else config
        if config.search is None and not adaptive:
            ids, needs_data = None, False
    if ids is not None and config.method in SVD_METHODS:
        estimate = functools.partial(rtn_bands_dense, unbias=config.dare_fit == "unbiased")  # as the file will store
        check = EndToEndCheck(finetuned_model, ids, delta_of, estimate, input_energy=auto_residual)
    try:  # a small model keeps every delta's SVD for the whole plan (each is approximated at several layouts)
        with reuse_svd_if_fits(shapes[nm] for nm in live):
            spectra = _spectra(config, live, base_mods, delta_of)
            if auto_share:
                share = (_choose_rank_share(check, config, live, shapes, info, progress, spectra)
                         if check is not None else 0.0)  # fmt: skip
                config = with_changes(config, min_rank_share=share)
            if auto_residual and check is not None:
                stored = _StoredBands(check, finetuned_model, live, shapes, ids, progress)
                config = _choose_residual(check, config, live, shapes, info, progress, stored)
            if check is not None:
                check.restore()  # what follows measures activations of the fine-tune itself
            if config.search is not None:
                specs = search_specs(finetuned_model, config, live, shapes, delta_of, ids, info, progress)

            default = {name: plan_entry(name, *shapes[name], config.ratio, config,
                                        bias=bool(bias_changed.get(name, False)), unchanged=same[name],
                                        spectrum=spectra.get(name))
                       for name in targets}  # fmt: skip
            layout = {}
            for name in targets:
                spec = specs.get(module_kind(name, shapes[name]))
                layout[name] = default[name] if spec is None else plan_entry(
                    name, *shapes[name], config.ratio, config, spec=spec, bias=default[name]["bias"],
                    unchanged=same[name],
                )  # fmt: skip
            kl_now = None
            if check is not None and (config.search is not None or adaptive):
                chosen = info.get("rank_share")
                if chosen and config.search is None:  # just measured; the allocation re-applies its own layout
                    kl_now = chosen["kl"][str(chosen["chosen"])]
                else:  # the searched splits are swapped in on top of the configured one
                    check.apply({nm: default[nm] for nm in live})
                    kl_now = check.kl()
                info["end_to_end"] = {"metric": METRIC, "default": kl_now}
                if config.search is not None:
                    kl_now = _keep_searched_if_better(check, kl_now, layout, default, specs, live, shapes, info)
            if adaptive:
                allocate_adaptive(finetuned_model, config, ids, live, shapes, delta_of, ft_mods, specs, layout,
                                   info, check, kl_now, progress)  # fmt: skip
            ranks: dict[str, int] = {}
            banded = with_changes(config, dare_modules=None, sparse_tail=None)  # the plain split of bands
            for nm, rank in low.items():  # where the split, DARE or vector codes would store less of it
                if nm not in fitting:  # a module stored whole: its rank's strongest directions, split as configured
                    split = plan_entry(nm, *shapes[nm], config.ratio, banded, bias=layout[nm]["bias"],
                                       spectrum=spectra.get(nm))["bands"]  # fmt: skip
                    layout[nm], ranks[nm] = low_rank_entry(layout[nm], strongest_directions(split, rank)), rank
                    continue
                bands = low_rank_bands(*shapes[nm], budget_bytes(*shapes[nm], config.ratio), config.group_size, rank)
                if not stores_at_least(layout[nm], bands):
                    layout[nm], ranks[nm] = low_rank_entry(layout[nm], bands), rank
            if ranks:
                info["low_rank"] = {"modules": len(ranks), "ranks": sorted(set(ranks.values())),
                                    "bits": sorted({b for nm in ranks for b, r in layout[nm]["bands"] if r}),
                                    "strongest_directions": len(set(ranks) - fitting)}  # fmt: skip
            # what the modules leave of their budgets goes to the DARE parts, else to the sparse and the last bands
            offered = sum(budget_bytes(*shapes[nm], config.ratio) for nm in targets)
            info["unspent"] = spend_unspent(
                layout, offered, lambda nm, budget: resplit(nm, layout[nm], budget, config, spectra.get(nm)), set(ranks)
            )
    finally:
        if check is not None:
            check.restore()
    info["plan_seconds"] = round(time.time() - t0, 2)
    if needs_data:
        info["plan_samples"] = int(ids.shape[0])
    return layout, info


def _low_ranks(config: DeltaCoMeConfig, live: Sequence[str], shapes: dict[str, tuple[int, int]],
               read: Callable[[str], tuple[torch.Tensor, torch.Tensor]], progress: bool,
               device: torch.device | None = None) -> dict[str, int]:  # fmt: skip
    """``deltacome``: the rank of each changed target whose delta is of low rank (:func:`.low_rank.low_rank_of`; ``read``
    gives its delta and fine-tuned weight), e.g. a merged LoRA's, which it then stores as that many singular triplets
    at the most bits that fit (:func:`.low_rank.low_rank_bands`; the bytes left are not spent: there is no more); for
    a target the config stores whole, also a rank that does not fit (kept as the split's strongest directions)."""
    if config.method != "deltacome" or not live:
        return {}
    bar = progress_bar(len(live), progress, "Checking the deltas' ranks", unit="module")
    out: dict[str, int] = {}
    for nm in live:
        delta, weight = read(nm)
        delta = delta.to(device) if device is not None else delta
        rank = low_rank_of(delta, budget_bytes(*shapes[nm], config.ratio), config.group_size, rounding_energy(weight),
                           beyond_budget=config.stores_whole(nm))  # fmt: skip
        if rank is not None:
            out[nm] = rank
        del delta, weight
        bar.update(1)
    bar.close()
    return out


def weighs_residual(config: DeltaCoMeConfig) -> bool:
    """Whether ``residual="auto"`` weighs DARE residuals: the configured split of ``deltacome`` (no ``search``,
    uniform allocation, no ``sparse_tail``) and no ``dare_modules`` (their DARE part is there already)."""
    return (config.method == "deltacome" and config.residual == "auto" and config.search is None
            and config.allocation != "adaptive" and config.sparse_tail is None and not config.dare_leaves)  # fmt: skip


def _spectra(
    config: DeltaCoMeConfig, live: Sequence[str], base_mods: dict[str, nn.Module], delta_of: Any
) -> dict[str, torch.Tensor]:
    """Singular values of each changed delta, for ImPart's keep-rates and ``deltacome-dare``'s ``band_share="auto"``
    (none for other methods, or when the weights are not in memory: a streamed run plans with the model spectrum of
    :mod:`.impart`, the hybrid with its default share)."""
    wanted = config.method == "impart" or (config.method == "deltacome-dare" and config.band_share == "auto")
    if not wanted or any(base_mods[nm].weight.is_meta for nm in live):
        return {}
    return {nm: svd(delta_of(nm))[1] for nm in live}


def _kls(
    check: EndToEndCheck,
    candidates: dict[Any, DeltaCoMeConfig],
    live: Sequence[str],
    shapes: dict[str, tuple[int, int]],
    title: str,
    progress: bool = False,
    spectra: dict[str, torch.Tensor] | None = None,
) -> dict[Any, float]:
    """The whole model's KL to the fine-tune with every live target at the layout each candidate config plans (a
    layout equal to an earlier candidate's is not measured again)."""
    kls: dict[Any, float] = {}
    seen: dict[str, Any] = {}
    bar = progress_bar(len(candidates), progress, title, unit="layout")
    for label, cfg in candidates.items():
        bar.update(1)
        layouts = {nm: plan_entry(nm, *shapes[nm], cfg.ratio, cfg, spectrum=(spectra or {}).get(nm)) for nm in live}
        key = str(sorted((nm, e["bands"], e.get("sparse_bands"), e.get("sparse"), e.get("vq"))
                         for nm, e in layouts.items()))  # fmt: skip
        if key in seen:  # the same layout as an earlier candidate: nothing new to measure
            kls[label] = kls[seen[key]]
            continue
        seen[key] = label
        check.apply(layouts)
        kls[label] = check.kl()
    bar.close()
    return kls


def _choose_rank_share(
    check: EndToEndCheck,
    config: DeltaCoMeConfig,
    live: Sequence[str],
    shapes: dict[str, tuple[int, int]],
    info: dict[str, Any],
    progress: bool = False,
    spectra: dict[str, torch.Tensor] | None = None,
) -> float:
    """``min_rank_share="auto"``: the share in ``RANK_SHARES`` whose layout brings the whole model closest to the
    fine-tune (ties: the smaller share, nearer the published bands).

    Per-module reconstruction error cannot make this choice: on a knowledge fine-tune it rates the published bands
    2-3x better than one 2-bit band at 1/32, while the model keeps more of the fine-tune with the 2-bit band
    (benchmarks/RESULTS.md); a delta dominated by a few directions goes the other way."""
    candidates = {share: with_changes(config, min_rank_share=share) for share in RANK_SHARES}
    kls = _kls(check, candidates, live, shapes, "Choosing the band split (min_rank_share)", progress, spectra)
    best = min(RANK_SHARES, key=lambda sh: (kls[sh], sh))
    info["rank_share"] = {"chosen": best, "metric": METRIC, "kl": {str(sh): kls[sh] for sh in RANK_SHARES}}
    return best


class _StoredBands:
    """The whole model's KL to the fine-tune with every live target's bands as the pipeline stores them: GPTQ (with
    ``U``'s refit) against input Hessians gathered on the fine-tune itself.

    Round-to-nearest rates 2-3-bit bands 3-5x worse than what GPTQ stores (facts-hot at 1/32: 0.48 against 0.11),
    while a DARE residual, whose DARE part no quantizer improves, is rated within 10% of what is stored; so the
    bands alone are weighed as stored. The Hessians come from the plan's calibration sequences that the check does
    not measure on: GPTQ fitted to the very tokens it is scored on flatters the bands (facts-hot at 1/64: 0.41 in
    sample, 0.43 out of sample, DARE alone 0.44; the bands keep 23 fewer held-out questions there). :meth:`kl` gives ``None`` (and :attr:`why_not`) when there are no
    such sequences, or when the Hessians of every target (counted without sharing) would pass ``HESSIAN_MEMORY``.
    """

    def __init__(self, check: EndToEndCheck, model: nn.Module, live: Sequence[str],
                 shapes: dict[str, tuple[int, int]], ids: torch.Tensor, progress: bool) -> None:  # fmt: skip
        self.check, self.model, self.live, self.shapes, self.progress = check, model, live, shapes, progress
        self.ids = ids[check.num_samples :]
        self.why_not = ""

    def kl(self, config: DeltaCoMeConfig) -> float | None:
        if not len(self.ids):
            self.why_not = f"no calibration sequences beyond the check's {self.check.num_samples} to fit GPTQ on"
            return None
        if sum(self.shapes[nm][1] ** 2 * 4 for nm in self.live) > HESSIAN_MEMORY:
            self.why_not = f"the targets' input Hessians would pass {HESSIAN_MEMORY >> 30} GiB"
            return None
        self.check.restore()  # the Hessians are of the fine-tune's own activations, as in the layer walk
        hessians: dict[str, torch.Tensor] = {}
        for part in model_hessians(self.model, self.live, self.ids, max_bytes=HESSIAN_MEMORY, progress=self.progress):
            hessians.update(part)
        bar = progress_bar(len(self.live), self.progress, "Weighing the bands as GPTQ stores them", unit="module")

        def stored(name: str, delta: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
            bar.update(1)
            return compress_module(delta, hessians[name], entry, config, name=name).dense(*delta.shape)

        try:
            self.check.apply({nm: plan_entry(nm, *self.shapes[nm], config.ratio, config) for nm in self.live}, stored)
        finally:
            bar.close()
        return self.check.kl()


def _choose_residual(
    check: EndToEndCheck,
    config: DeltaCoMeConfig,
    live: Sequence[str],
    shapes: dict[str, tuple[int, int]],
    info: dict[str, Any],
    progress: bool = False,
    stored: _StoredBands | None = None,
) -> DeltaCoMeConfig:
    """``residual="auto"``: the bands alone (the split chosen so far) or ``RESIDUAL_SHARES`` of each module's budget
    in ``RESIDUAL_BAND_BITS``-bit bands and a ``RESIDUAL_DARE_BITS``-bit DARE of their residual with the rest,
    whichever brings the whole model closest to the fine-tune. The residuals are rated by the check (round to
    nearest); when the best of them beats the bands so rated, the bands are rated again as GPTQ stores them
    (:class:`_StoredBands`) and kept if they beat the residual. DARE alone (share 0) stands unless a layout with
    bands brings its KL down to ``RESIDUAL_ALONE_MARGIN``, bands in the residual or the bands alone as stored (the
    KL is measured on text the fine-tune learned, where a few bands reproduce memorised text, while held-out
    paraphrases need DARE's share of every entry). Without the Hessians for the stored bands a residual must reach
    ``RESIDUAL_MARGIN`` of the bands' rounded KL. With ``mask_draws > 1`` a kept residual then gets the best of that
    many draws of its masks (:func:`_choose_draw`). Returns the config that plans it.

    A delta that stores facts spreads over many singular directions: at 1/64-1/128 a seeded random share of every
    entry (no rank limit, no index bytes) keeps more of it than the few ranks the bytes buy, and two bits buy twice
    the entries of four (benchmarks/RESULTS.md, facts-hot). A delta that a few directions carry keeps the bands."""
    chosen = info.get("rank_share")
    candidates = {
        share: with_changes(config, method="deltacome-dare", bands=[[RESIDUAL_BAND_BITS, None]], band_share=share,
                            uniform_bits=RESIDUAL_DARE_BITS)  # fmt: skip
        for share in RESIDUAL_SHARES
    }
    if not chosen:  # the bands' KL was not just measured by _choose_rank_share
        candidates = {"none": config, **candidates}
    kls = _kls(check, candidates, live, shapes, "Weighing a DARE residual (residual='auto')", progress)
    kl_bands = kls.pop("none") if not chosen else chosen["kl"][str(chosen["chosen"])]
    best = min(RESIDUAL_SHARES, key=lambda sh: (kls[sh], -sh))
    if best > 0 and 0.0 in kls and kls[best] > RESIDUAL_ALONE_MARGIN * kls[0.0]:
        best = 0.0  # the bands' narrow win on the calibration text is not one on held-out questions
    record = {"metric": METRIC, "band_bits": RESIDUAL_BAND_BITS, "dare_bits": RESIDUAL_DARE_BITS,
              "alone_margin": RESIDUAL_ALONE_MARGIN}  # fmt: skip
    kl_stored = stored.kl(config) if stored is not None and kls[best] < kl_bands else None
    if kl_stored is not None:  # against DARE alone the bands need its margin (calibration text flatters them)
        keep = kl_stored >= (RESIDUAL_ALONE_MARGIN if best == 0.0 else 1.0) * kls[best]
        record["bands_as_stored"] = kl_stored
    else:
        keep = kls[best] <= RESIDUAL_MARGIN * kl_bands
        if kls[best] < kl_bands:
            record.update(margin=RESIDUAL_MARGIN, why_margin=stored.why_not if stored is not None else "")
    info["residual"] = {"chosen": best if keep else "none", **record,
                        "kl": {"none": kl_bands, **{str(sh): kls[sh] for sh in RESIDUAL_SHARES}}}  # fmt: skip
    if not keep:
        return config
    return _choose_draw(check, candidates[best], kls[best], live, shapes, info["residual"], progress)


def _choose_draw(
    check: EndToEndCheck,
    config: DeltaCoMeConfig,
    kl_first: float,
    live: Sequence[str],
    shapes: dict[str, tuple[int, int]],
    record: dict[str, Any],
    progress: bool = False,
) -> DeltaCoMeConfig:
    """The kept DARE layout under ``config.mask_draws`` draws of its masks (``mask_draw`` onwards; ``kl_first`` is
    the first's KL, just measured): the draw of least KL to the fine-tune. One draw moves a 1/128 knowledge delta by
    up to 7 of 240 held-out questions; the KL tracked them on facts-hot, not on facts (benchmarks/RESULTS.md)."""
    first = config.mask_draw
    if config.mask_draws <= 1:
        return config
    others = {k: with_changes(config, mask_draw=k) for k in range(first + 1, first + config.mask_draws)}
    kls = {first: kl_first, **_kls(check, others, live, shapes, "Drawing the DARE masks (mask_draws)", progress)}
    best = min(kls, key=lambda k: (kls[k], k))
    record["draws"] = {"chosen": best, "kl": {str(k): kl for k, kl in kls.items()}}
    return others[best] if best != first else config


def _keep_searched_if_better(
    check: EndToEndCheck,
    kl_now: float,
    layout: dict[str, dict[str, Any]],
    default: dict[str, dict[str, Any]],
    specs: dict[str, list[list]],
    live: Sequence[str],
    shapes: dict[str, tuple[int, int]],
    info: dict[str, Any],
) -> float:
    """Swap in each module type's searched split, one type at a time, and keep it only where the model's KL to the
    fine-tune falls; a type whose split does not pay goes back to the configured split. Returns the KL reached."""
    verdicts = {}
    for kind in sorted(specs):
        names = [nm for nm in live if module_kind(nm, shapes[nm]) == kind]
        swapped = {nm: layout[nm] for nm in names if layout[nm]["bands"] != default[nm]["bands"]}
        if not swapped:
            verdicts[kind] = {"kl": kl_now, "kept": True, "same_as_default": True}
            continue
        before = check.snapshot(list(swapped))
        check.apply(swapped)
        kl = check.kl()
        kept = kl < kl_now
        verdicts[kind] = {"kl": kl, "kept": kept}
        if kept:
            kl_now = kl
        else:
            check.rollback(before)
            specs.pop(kind)
            for nm in swapped:
                layout[nm] = default[nm]
    info["end_to_end"]["search"] = verdicts
    info["end_to_end"]["after_search"] = kl_now
    return kl_now
