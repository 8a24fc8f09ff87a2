"""The stored layout of an AMLQ-quantized base: one entry per packed linear, its exact bytes and true bits per weight.

An entry (saved in ``config.json`` under ``quantization_config.layout``) says what loading must allocate before any
weight is read::

    "model.layers.0.mlp.down_proj": {
        "shape": [576, 1536],          # out x in
        "unit": 128,                   # columns per precision unit (the largest group size)
        "planes": [[2, 64], [4, 128]], # the (bits, group size) precisions this linear uses
        "units": [0, 0, 1, 0, ...],    # plane of each column unit, in column order
        "rank": 8,                     # rank of the low-rank error correction L R (0 = none)
        "rank_bits": 8                 # bits of the stored L and R (4 or 8; absent = 8)
    }

A *unit* is a block of ``unit`` consecutive input columns (the last one may be shorter); every unit takes one
precision, so groups of one linear mix precisions. All units of one precision are packed, in column order, into one
plane (:mod:`.packing` format); the column permutation is rebuilt from ``units``. This module is pure arithmetic on
entries (no model): ``hf_deltacome.amlq`` builds and loads the modules, ``deltacome info`` prints the table.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch

from ..errors import ConfigError
from .packing import stored_nbytes

ALLOWED_BITS = (2, 3, 4, 8)
LOWRANK_BITS = (4, 8)  # the low-rank factors are group-quantized like the planes, at one of these widths
LOWRANK_GROUP = 128


def check_entry(name: str, entry: dict[str, Any]) -> None:
    """Raise `ConfigError` naming ``name`` if its layout entry is inconsistent."""
    try:
        m, n = (int(v) for v in entry["shape"])
        unit = int(entry["unit"])
        planes = [(int(b), int(g)) for b, g in entry["planes"]]
        units = [int(u) for u in entry["units"]]
        rank, rank_bits = int(entry.get("rank", 0)), int(entry.get("rank_bits", 8))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"AMLQ layout of {name!r} is malformed: {e!r} in {entry!r}") from e
    if m <= 0 or n <= 0 or unit <= 0 or rank < 0:
        raise ConfigError(f"AMLQ layout of {name!r}: bad shape {[m, n]}, unit {unit} or rank {rank}")
    if len(units) != math.ceil(n / unit):
        raise ConfigError(f"AMLQ layout of {name!r}: {len(units)} units for {n} columns in units of {unit}")
    if not planes or any(u < 0 or u >= len(planes) for u in units):
        raise ConfigError(f"AMLQ layout of {name!r}: unit planes {units} do not index planes {planes}")
    for b, g in planes:
        if b not in ALLOWED_BITS or g <= 0 or unit % g:
            raise ConfigError(f"AMLQ layout of {name!r}: plane ({b} bits, group {g}) does not fit units of {unit}")
    if rank > min(m, n) or rank_bits not in LOWRANK_BITS:
        raise ConfigError(f"AMLQ layout of {name!r}: rank {rank} at {rank_bits} bits (at most min{(m, n)}; bits "
                          f"one of {LOWRANK_BITS})")  # fmt: skip


def unit_spans(cols: int, unit: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the column units of a ``cols``-column weight."""
    return [(s, min(s + unit, cols)) for s in range(0, cols, unit)]


def plane_columns(entry: dict[str, Any]) -> list[torch.Tensor]:
    """The original column indices stored in each plane, in storage order (units in column order)."""
    spans = unit_spans(int(entry["shape"][1]), int(entry["unit"]))
    out: list[list[int]] = [[] for _ in entry["planes"]]
    for (s, e), p in zip(spans, entry["units"], strict=True):
        out[int(p)].extend(range(s, e))
    return [torch.tensor(c, dtype=torch.long) for c in out]


def column_groups(entry: dict[str, Any]) -> list[tuple[int, int]]:
    """``[(bits, n_cols), ...]``: the quantization groups of the weight in original column order."""
    groups = []
    for (s, e), p in zip(unit_spans(int(entry["shape"][1]), int(entry["unit"])), entry["units"], strict=True):
        bits, g = entry["planes"][int(p)]
        groups.extend((int(bits), min(int(g), e - c)) for c in range(s, e, int(g)))
    return groups


def lowrank_nbytes(m: int, n: int, rank: int, bits: int = 8) -> int:
    """Exact bytes of a rank-``rank`` correction ``L R`` (``L``: m x rank, ``R``: rank x n, ``bits`` each)."""
    if rank == 0:
        return 0
    return stored_nbytes(m, rank, bits, LOWRANK_GROUP) + stored_nbytes(rank, n, bits, LOWRANK_GROUP)


def entry_nbytes(entry: dict[str, Any]) -> int:
    """Exact bytes every stored tensor of one quantized linear takes (planes + low-rank factors; bias excluded)."""
    m, n = (int(v) for v in entry["shape"])
    total = sum(stored_nbytes(m, len(cols), int(b), int(g))
                for (b, g), cols in zip(entry["planes"], plane_columns(entry), strict=True))  # fmt: skip
    return total + lowrank_nbytes(m, n, int(entry.get("rank", 0)), int(entry.get("rank_bits", 8)))


def layout_bpw(layout: dict[str, dict[str, Any]]) -> float:
    """True bits per weight of a layout: all stored bytes x 8 over the weights of the quantized linears."""
    weights = sum(int(e["shape"][0]) * int(e["shape"][1]) for e in layout.values())
    return 8.0 * sum(entry_nbytes(e) for e in layout.values()) / max(weights, 1)


def uniform_layout(shapes: dict[str, tuple[int, int]], bits: int, group_size: int) -> dict[str, dict[str, Any]]:
    """Every linear at one precision, no low-rank part (uniform GPTQ through the AMLQ pipeline and storage)."""
    return {name: {"shape": [m, n], "unit": group_size, "planes": [[bits, group_size]],
                   "units": [0] * math.ceil(n / group_size), "rank": 0}
            for name, (m, n) in shapes.items()}  # fmt: skip


def mean_bits(entry: dict[str, Any]) -> float:
    """Column-weighted code bits of one entry (without scales, zeros or the low-rank part)."""
    n = int(entry["shape"][1])
    spans = unit_spans(n, int(entry["unit"]))
    return sum((e - s) * entry["planes"][int(p)][0] for (s, e), p in zip(spans, entry["units"], strict=True)) / n


def describe_entry(entry: dict[str, Any]) -> str:
    """``2b/g64 x3 + 4b/g128 x2``: how many units take each precision."""
    counts: dict[int, int] = {}
    for p in entry["units"]:
        counts[int(p)] = counts.get(int(p), 0) + 1
    return " + ".join(f"{entry['planes'][p][0]}b/g{entry['planes'][p][1]} x{c}" for p, c in sorted(counts.items()))


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def layout_table(layout: dict[str, dict[str, Any]], info: dict[str, Any] | None = None,
                 bpw: float | None = None, damp: float | str | None = None) -> str:  # fmt: skip
    """Per-linear table of a layout: precision of its units, low-rank rank, true bpw and measured error."""
    info = info or {}
    errors = info.get("errors") or {}
    width = max((len(n) for n in layout), default=10)
    lines = [f"{'layer':<{width}}  {'shape':>10}  {'units (bits/group x count)':<34} {'rank':>6} {'bpw':>6} "
             f"{'rel.err':>8}"]  # fmt: skip
    for name in sorted(layout, key=_natural):
        e = layout[name]
        m, n = e["shape"]
        err = errors.get(name, {})
        rel = err.get("after_lowrank", err.get("relative_error"))
        rank = f"{int(e.get('rank', 0))}" + (f"@{int(e.get('rank_bits', 8))}b" if int(e.get("rank", 0)) else "")
        lines.append(f"{name:<{width}}  {f'{m}x{n}':>10}  {describe_entry(e):<34} {rank:>6} "
                     f"{8 * entry_nbytes(e) / (m * n):>6.3f} {'' if rel is None else f'{rel:8.4f}'}")  # fmt: skip
    ranks = [int(e.get("rank", 0)) for e in layout.values()]
    lines += ["", f"{len(layout)} quantized linears, true {layout_bpw(layout):.4f} bits per weight"
              + (f" (requested {bpw:g})" if bpw is not None else "")
              + f"; low-rank correction in {sum(1 for r in ranks if r)} linears (ranks {sorted(set(ranks))})"]
    damping = info.get("damping") or {}
    if damping:
        counts = Counter(round(float(d), 4) for d in damping.values())
        tokens = int(info.get("num_samples", 0)) * int(info.get("seq_len", 0))
        lines.append(f"GPTQ damping {damp if damp is not None else '?'}"
                     + (f" ({tokens:,} calibration tokens)" if tokens else "") + ": "
                     + ", ".join(f"{d:g} in {c} linears" for d, c in sorted(counts.items()))
                     + (f"; low_bit_share {info['low_bit_share']:g}" if "low_bit_share" in info else ""))  # fmt: skip
    ppl = info.get("calibration_perplexity") or {}
    if ppl:
        lines.append(f"calibration perplexity {ppl.get('full_precision', 0):.3f} (full precision) -> "
                     f"{ppl.get('quantized', 0):.3f} (quantized); {info.get('seconds', 0):.0f} s")  # fmt: skip
    return "\n".join(lines)
