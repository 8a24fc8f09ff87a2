"""Deltas of low rank (a merged LoRA's): found by their spectrum, stored as their rank alone.

The default's layouts are made for a full fine-tune's long tail: the 8/3/2-bit split of the bands quantizes a few
directions at 3 and 2 bits and spends the rest on the tail, DARE keeps a random share of every entry. A merged LoRA's
delta has the LoRA's rank and nothing else: the plan (:func:`.plan.plan_layouts`) asks :func:`low_rank_of` for each
changed delta's rank and stores it as :func:`low_rank_bands` says, unless the method's layout already gives those
directions as many bits (:func:`stores_at_least`); where its rank does not fit at 3 bits and the method would store
the module whole (DARE, vector codes), as the split's strongest directions (:func:`strongest_directions`).
docs/METHOD.md §1.10; measured in ``benchmarks/low_rank.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..format.budget import band_nbytes, max_rank
from ..format.storage import FORMAT_VERSION

LOW_RANK_BITS = (8, 4, 3)  # a delta of low rank stores its singular triplets at the first of these that fits
LOW_RANK_TAIL = 1e-4  # ... when its rank leaves at most this share of its energy
ROUNDING_TAIL = 1.25  # ... or at most this many times the energy of its checkpoint's rounding (16-bit weights),
ROUNDING_SHARE = 0.05  # where that rounding is at most this share of the delta's energy (else the delta is of its size)
LOW_RANK_SHARE = 0.25  # a delta of low rank has at most this share of the ranks its shape allows
PROBE_SEED = 0x10A
POWER_ITERATIONS = 1  # of the range finder: without, rounding noise hides a bfloat16 merged LoRA's weak directions


def rounding_energy(weight: torch.Tensor) -> float:
    """The expected energy of the rounding a 16-bit checkpoint put into ``weight`` (``Σ ulp² / 12`` over its
    entries) when every value lies on the bfloat16 (else float16) grid; 0 otherwise (a float32 checkpoint)."""
    w = weight.detach().to(torch.float32)
    for dtype, bits in ((torch.bfloat16, 7), (torch.float16, 10)):
        if weight.dtype == dtype or torch.equal(w.to(dtype).to(torch.float32), w):
            _, exponent = torch.frexp(w)
            ulp = torch.ldexp(torch.ones_like(w), exponent - 1 - bits)
            return float(ulp.double().square().sum() / 12)
    return 0.0


@torch.no_grad()
def low_rank_of(
    delta: torch.Tensor, nbytes: int, group_size: int, rounding: float = 0.0, *, beyond_budget: bool = False
) -> int | None:
    """The rank ``k`` of ``delta`` when it is of low rank for ``nbytes`` bytes (``None``: it is not): ``k`` singular
    triplets fit at ``LOW_RANK_BITS[-1]`` bits, ``k`` is at most ``LOW_RANK_SHARE`` of the ranks the shape allows (a
    LoRA's rank is a small share of them; a full fine-tune's delta at a generous ratio keeps the method's layout),
    and they leave at most ``LOW_RANK_TAIL`` of its energy, or at most ``ROUNDING_TAIL`` times ``rounding``
    (:func:`rounding_energy` of the fine-tune's weight: what is left is the checkpoint's rounding, as for a LoRA
    merged into bfloat16 weights) where that is at most ``ROUNDING_SHARE`` of the delta's energy (a delta about the
    size of its rounding, as a short full fine-tune saved in bfloat16 can be, mostly rounds to zero: the expected
    rounding energy says nothing of it). :func:`low_rank_bands` then stores those ``k`` alone, at the most bits that
    fit, where the configured split would quantize them at 3 or 2 bits and spend the rest on directions the delta
    does not have, and DARE would drop its entries at random. A full fine-tune's delta (a long tail) is not of low
    rank: of SmolLM2's `dates` and `facts` fine-tunes no module is at 1/4-1/128 (at 1/8 at least 0.2% of each
    module's energy lies beyond the rank 3 bits store); saved in 16 bits, a few whose tail is within their rounding
    (7 of `facts`' 210 in bfloat16 at 1/4-1/8, 5 of `dates`' in float16: docs/METHOD.md §1.10).

    The singular values are exact where the rank asked is over half the matrix's, else from a seeded randomized
    range finder with ``POWER_ITERATIONS`` power iterations (four products with the delta, a few milliseconds on
    SmolLM2's layers): values at most the true ones, so the tail it sees is at least the true tail. Without the
    iteration the rounding of a LoRA merged into bfloat16 weights blurs the LoRA's weaker directions in the few
    columns a small budget asks for: of such a delta's 210 modules one pass found 153 at 1/32 and 2 at 1/64 where
    the exact spectrum finds 210 and 163; one iteration finds those (``benchmarks/low_rank.py``).

    ``beyond_budget``: ``k`` may be more than fit in ``nbytes`` (up to ``LOW_RANK_SHARE`` of the ranks), for a
    module the method would store whole (DARE, vector codes): a delta of low rank is then better stored as its
    strongest directions (:func:`strongest_directions`) than as a random share of its entries."""
    m, n = delta.shape
    share = int(LOW_RANK_SHARE * min(m, n))
    cap = share if beyond_budget else max_rank(m, n, LOW_RANK_BITS[-1], group_size, nbytes, share)
    d = delta.detach().to(torch.float32)
    energy = float(d.double().square().sum())
    if cap == 0 or energy == 0.0:
        return None
    q = min(cap + 8, min(m, n))
    if 2 * q > min(m, n):
        s = torch.linalg.svdvals(d)[:cap]
    else:
        probe = torch.randn(n, q, generator=torch.Generator().manual_seed(PROBE_SEED)).to(d.device)
        basis = torch.linalg.qr(d @ probe).Q
        for _ in range(POWER_ITERATIONS):
            basis = torch.linalg.qr(d @ (d.T @ basis)).Q
        s = torch.linalg.svdvals(basis.T @ d)[:cap]
    tail = energy - torch.cumsum(s.double().cpu().square(), 0)  # tail[i]: the energy beyond rank i + 1
    allowed = LOW_RANK_TAIL * energy
    if rounding <= ROUNDING_SHARE * energy:
        allowed = max(allowed, ROUNDING_TAIL * rounding)
    within = (tail <= allowed).nonzero()
    return int(within[0]) + 1 if len(within) else None


def fits(m: int, n: int, nbytes: int, group_size: int, rank: int) -> bool:
    """Whether ``rank`` singular triplets of an ``m x n`` delta fit in ``nbytes`` at ``LOW_RANK_BITS[-1]`` bits."""
    return band_nbytes(m, n, LOW_RANK_BITS[-1], rank, group_size) <= nbytes


def strongest_directions(bands: Sequence[Sequence[int]], rank: int) -> list[list[int]]:
    """``bands`` (the method's split) trimmed to a delta's ``rank`` strongest directions: how a delta of low rank is
    stored where its rank does not fit at ``LOW_RANK_BITS[-1]`` bits and the method would store the module whole
    (DARE keeps a few percent of its entries at random, about that share of a low rank's energy). Bands past
    ``rank`` would quantize directions the delta does not have."""
    out, left = [], rank
    for b, r in bands:
        out.append([int(b), min(int(r), left)])
        left -= out[-1][1]
    return out


def low_rank_bands(m: int, n: int, nbytes: int, group_size: int, rank: int) -> list[list[int]]:
    """The bands of a delta of ``rank`` in ``nbytes``: all ``rank`` singular triplets at the first width of
    ``LOW_RANK_BITS`` they fit at, the largest of them at the width before where the bytes allow."""
    bits = next(b for b in LOW_RANK_BITS if band_nbytes(m, n, b, rank, group_size) <= nbytes)
    if bits == LOW_RANK_BITS[0]:
        return [[bits, rank]]
    higher = LOW_RANK_BITS[LOW_RANK_BITS.index(bits) - 1]
    top = max(a for a in range(rank + 1)
              if band_nbytes(m, n, higher, a, group_size) + band_nbytes(m, n, bits, rank - a, group_size) <= nbytes)
    return [[higher, top], [bits, rank - top]]


def stores_at_least(entry: dict[str, Any], bands: Sequence[Sequence[int]]) -> bool:
    """Whether ``entry`` is bands alone that give each singular triplet of ``bands`` at least its bits (a configured
    split that stores a delta of that rank as well already: it is kept)."""
    if any(entry.get(k) for k in ("sparse", "sparse_bands", "vq", "sign")):
        return False
    mine = [int(b) for b, r in entry.get("bands", []) for _ in range(int(r))]
    wanted = [int(b) for b, r in bands for _ in range(int(r))]
    return len(mine) >= len(wanted) and all(x >= y for x, y in zip(mine, wanted))


def low_rank_entry(entry: dict[str, Any], bands: Sequence[Sequence[int]]) -> dict[str, Any]:
    """``entry`` (any method's) as ``bands`` alone."""
    return {"shape": list(entry["shape"]), "bands": [list(b) for b in bands], "group_size": entry["group_size"],
            "bias": bool(entry.get("bias", False)), "format": FORMAT_VERSION}  # fmt: skip
