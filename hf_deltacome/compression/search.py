"""Band-split search: for each module type, the split of singular vectors into bit widths that minimises the
relative output error ``||(Δ − Δ̂) X||² / ||Δ X||²`` of a few sample layers under calibration activations ``X``
(greedy local search or a small genetic algorithm, started from the configured split and never worse than it).

The whole-model check (:mod:`.endtoend`) then keeps a searched split only where the model's KL to the fine-tune falls.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import DeltaCoMeConfig
from ..errors import ConfigError, DeltaCoMeError
from ..format.budget import Band, solve_ranks
from ..progress import progress_bar
from ..quant.hessian import model_hessians
from .modules import approximation_error, module_kind, output_error, rank_share
from .svd import reuse_svd

SEARCH_HIGH_BITS = (8, 4, 3)  # explicit bands the search sizes (largest singular values first)
SEARCH_REST_BITS = (2, 3)  # bit widths the search may give the rest of the budget
SEARCH_LAYERS = 2  # sample layers per module type the search measures its objective on
SEARCH_EVALS = 40  # distinct band splits evaluated per module type (round-to-nearest errors)
SEARCH_VERIFY = 4  # best splits measured again with GPTQ, as they will be quantized


@dataclass
class SearchResult:
    """The split chosen for one module type and how it compares with the configured one."""

    kind: str
    spec: list[list]  # band specification, usable as ``bands``
    layout: list[list[int]]  # the resulting [bits, rank] at the nominal ratio
    objective: float  # mean relative output error of the sample modules
    default_objective: float
    evaluations: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "bands": self.layout,
            "spec": self.spec,
            "objective": round(self.objective, 6),
            "default_objective": round(self.default_objective, 6),
            "evaluations": self.evaluations,
        }


Genome = tuple[int, int, int, int]  # ranks at SEARCH_HIGH_BITS, then the rest's bit width


def _genome_spec(genome: Genome) -> list[list]:
    spec: list[list] = [[b, int(r)] for b, r in zip(SEARCH_HIGH_BITS, genome[:3], strict=True)]
    spec.append([int(genome[3]), None])
    return spec


def _default_genome(bands: Sequence[Sequence], solved: Sequence[Band]) -> Genome | None:
    """The configured split (laid out as ``solved``) as a genome when it is expressible (high bands at 8/4/3 bits,
    rest at 2 or 3 bits)."""
    ranks = dict.fromkeys(SEARCH_HIGH_BITS, 0)
    rest_bits = bands[-1][0]
    if rest_bits not in SEARCH_REST_BITS or bands[-1][1] is not None:
        return None
    for b, r in solved[:-1]:
        if b not in ranks:
            return None
        ranks[b] += r
    return (ranks[8], ranks[4], ranks[3], int(rest_bits))


class _Objective:
    """Mean relative output error over sample modules of one type, cached per resulting layout."""

    def __init__(
        self,
        samples: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
        m: int,
        n: int,
        ratio: float,
        config: DeltaCoMeConfig,
        quantizer: str,
    ):
        self.samples, self.m, self.n, self.ratio, self.config = samples, m, n, ratio, config
        self.quantizer = quantizer
        self.norms = [max(output_error(d, h), 1e-30) for d, h in samples]
        self.cache: dict[tuple, float] = {}
        self.specs: dict[tuple, list[list]] = {}  # layout -> the first specification that gave it
        self.calls = 0

    def layout(self, spec: Sequence[Sequence]) -> tuple:
        return tuple(tuple(b) for b in solve_ranks(self.m, self.n, self.ratio, spec, self.config.group_size))

    def key(self, spec: Sequence[Sequence]) -> tuple:
        return tuple((b, r) for b, r in self.layout(spec) if r > 0)

    def __call__(self, spec: Sequence[Sequence]) -> float:
        key = self.key(spec)
        self.specs.setdefault(key, [list(b) for b in spec])
        if key not in self.cache:
            self.calls += 1
            entry = {"shape": [self.m, self.n], "bands": [list(b) for b in key], "group_size": self.config.group_size}
            errs = [
                approximation_error(d, h, entry, self.config, quantizer=self.quantizer) / nrm
                for (d, h), nrm in zip(self.samples, self.norms, strict=True)
            ]
            self.cache[key] = sum(errs) / len(errs)
        return self.cache[key]


def search_split(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    m: int,
    n: int,
    ratio: float,
    config: DeltaCoMeConfig,
    *,
    strategy: str = "greedy",
    kind: str = "",
    max_evals: int = SEARCH_EVALS,
    seed: int = 0,
) -> SearchResult:
    """Choose the band split of an ``m x n`` module type at ``ratio`` that minimises the mean relative output error
    of ``samples`` (``[(delta, H or None), ...]``), starting from ``config.bands``; never worse than that start."""
    if strategy not in ("greedy", "genetic"):
        raise ConfigError(f"unknown search {strategy!r}; choose 'greedy' or 'genetic'")
    if not samples:
        raise DeltaCoMeError(f"search for {kind or f'{m}x{n}'}: no sample modules")
    with reuse_svd():  # every evaluation factorizes the same few deltas
        return _search(samples, m, n, ratio, config, strategy, kind, max_evals, seed)


def _search(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    m: int,
    n: int,
    ratio: float,
    config: DeltaCoMeConfig,
    strategy: str,
    kind: str,
    max_evals: int,
    seed: int,
) -> SearchResult:
    objective = _Objective(samples, m, n, ratio, config, "rtn")
    # the configured split as plan_entry lays it out, spelled as explicit ranks where min_rank_share shrank it
    start_spec = [list(b) for b in config.bands]
    solved = solve_ranks(m, n, ratio, config.bands, config.group_size, rank_share(config))
    if tuple(solved) != objective.layout(start_spec):
        start_spec = [[b, r] for b, r in solved[:-1]] + [[solved[-1][0], start_spec[-1][1]]]
    start_value = objective(start_spec)
    start = _default_genome(config.bands, solved)
    # the most rank the budget buys (everything at the lowest width, one band: each band pays its own scales,
    # zeros and row padding, so at small budgets fewer bands can mean more rank)
    full = max(sum(r for _, r in objective.layout([[b, None]])) for b in SEARCH_REST_BITS) or min(m, n)
    if start is None:  # a hand-written split the genome cannot express: search from the published one
        start = (2, 0, min(32, full), 2)
    scale = max(full, 4)
    # single-band splits are always candidates: a coordinate search from the configured split cannot reach them
    # when its bands are fixed-rank and already eat the budget (2 x 8-bit + 32 x 3-bit at 1/64 of a small layer)
    seeds = ([start] + [(0, 0, 0, b) for b in SEARCH_REST_BITS])[: max(1, max_evals)]

    def clamp(g: Sequence[float]) -> Genome:
        return (
            max(0, min(int(round(g[0])), full)),
            max(0, min(int(round(g[1])), full)),
            max(0, min(int(round(g[2])), full)),
            int(g[3]),
        )

    def value(g: Genome) -> float:
        """The objective of ``g``; once the evaluation budget is spent, only splits already measured count."""
        spec = _genome_spec(g)
        if objective.calls >= max_evals and objective.key(spec) not in objective.cache:
            return math.inf
        return objective(spec)

    best_value, best = min((value(g), g) for g in seeds)
    if strategy == "greedy":
        step = max(1, scale // 8)
        while step >= 1 and objective.calls < max_evals:
            moves: list[Genome] = []
            for i in range(3):
                for sgn in (-1, 1):
                    g = list(best)
                    g[i] += sgn * step
                    moves.append(clamp(g))
            for rb in SEARCH_REST_BITS:
                if rb != best[3]:
                    moves.append((*best[:3], rb))
            improved = False
            for g in dict.fromkeys(moves):
                if objective.calls >= max_evals:
                    break
                v = value(g)
                if v < best_value - 1e-12:
                    best, best_value, improved = g, v, True
            if not improved:
                step //= 2
    else:
        rng = random.Random(seed)
        pop_size = 8

        def rand_genome() -> Genome:
            return clamp(
                (
                    rng.randint(0, max(1, scale // 16)),
                    rng.randint(0, max(1, scale // 4)),
                    rng.randint(0, max(1, scale // 2)),
                    rng.choice(SEARCH_REST_BITS),
                )
            )

        pop = seeds + [rand_genome() for _ in range(pop_size - len(seeds))]
        scored = sorted(((value(g), g) for g in pop), key=lambda t: t[0])
        while objective.calls < max_evals:
            calls_before = objective.calls
            children: list[Genome] = [g for _, g in scored[:2]]  # elitism
            while len(children) < pop_size:
                a = min(rng.sample(scored, 3), key=lambda t: t[0])[1]
                b = min(rng.sample(scored, 3), key=lambda t: t[0])[1]
                child = [a[i] if rng.random() < 0.5 else b[i] for i in range(4)]
                for i in range(3):
                    if rng.random() < 0.4:
                        child[i] += rng.gauss(0.0, 0.15 * scale)
                if rng.random() < 0.15:
                    child[3] = rng.choice(SEARCH_REST_BITS)
                children.append(clamp(child))
            scored = sorted(((value(g), g) for g in children), key=lambda t: t[0])
            if objective.calls == calls_before:  # the population converged: nothing new to evaluate
                break
        if scored[0][0] < best_value:
            best_value, best = scored[0]
    # The search ran on round-to-nearest errors (fast). With GPTQ the best few splits and the configured one are
    # measured again as they will really be quantized, and the best of those wins.
    ranked = sorted(objective.cache.items(), key=lambda kv: kv[1])
    final = objective
    if config.quantizer != "rtn" and any(h is not None for _, h in samples):
        final = _Objective(samples, m, n, ratio, config, config.quantizer)
        start_value = final(start_spec)
        for key, _ in ranked[:SEARCH_VERIFY]:
            final(objective.specs[key])
        ranked = sorted(final.cache.items(), key=lambda kv: kv[1])
    best_key, best_value = ranked[0]
    if best_value >= start_value:  # keep the configured split unless the search beat it
        spec, best_value = start_spec, start_value
    else:
        spec = final.specs[best_key]
    layout = [list(b) for b in objective.layout(spec)]
    return SearchResult(
        kind, spec, layout, best_value, start_value, objective.calls + (final.calls if final is not objective else 0)
    )


def search_specs(
    finetuned_model: nn.Module,
    config: DeltaCoMeConfig,
    live: Sequence[str],
    shapes: dict[str, tuple[int, int]],
    delta_of: Any,
    ids: torch.Tensor | None,
    info: dict[str, Any],
    progress: bool,
) -> dict[str, list[list]]:
    """The band split of each module type that beat the configured one on its sample layers (search_split)."""
    specs: dict[str, list[list]] = {}
    with reuse_svd():  # the sample modules are compressed many times
        by_kind: dict[str, list[str]] = defaultdict(list)
        for name in live:
            by_kind[module_kind(name, shapes[name])].append(name)
        samples = {kind: _spread(names, SEARCH_LAYERS) for kind, names in by_kind.items()}
        wanted = [nm for names in samples.values() for nm in names]
        hess = {k: v for part in model_hessians(finetuned_model, wanted, ids, progress=progress) for k, v in part.items()} if ids is not None else {}
        results = {}
        bar = progress_bar(len(samples), progress, f"Searching band splits ({config.search})")
        for kind, names in samples.items():
            m, n = shapes[names[0]]
            res = search_split(
                [(delta_of(nm), hess.get(nm)) for nm in names], m, n, config.ratio, config,
                strategy=config.search, kind=kind,
            )  # fmt: skip
            if res.objective < res.default_objective:  # else the type keeps the configured split
                specs[kind] = res.spec
            results[kind] = res.to_dict()
            bar.update(1)
        bar.close()
    info["search"] = {"strategy": config.search, "objective": "relative output error", "types": results}
    return specs


def _spread(names: Sequence[str], k: int) -> list[str]:
    """``k`` names spread evenly over the list (layers at different depths)."""
    if len(names) <= k:
        return list(names)
    return [names[round((i + 0.5) * len(names) / k - 0.5)] for i in range(k)]
