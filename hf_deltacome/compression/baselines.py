"""The baselines Delta-CoMe is compared with, at the same byte budget: BitDelta and DARE.

* ``bitdelta`` — the sign of each delta entry with one scale per matrix (or per row), the scales refined by
  distillation against the fine-tune (:func:`.distill.distill_scales`). One bit per weight is exactly the 1/16 budget;
  below that only the output rows whose sign approximation removes the most output error keep their signs;
* ``dare`` — a random subset of the delta's entries (mask regenerated from a stored seed), rescaled by 1/keep and
  quantized; the mask keeps as many entries as the budget holds. ``deltacome-dare`` applies it to the residual of
  its bands (:func:`.modules.compress_module`), by default with *importance rates* (``dare_rates``): entry ``(i, j)`` is kept
  at rate ``∝ (R_i C_j)^RATE_EXPONENT``, where ``R_i`` and ``C_j`` are the row's and the column's output energy
  ``Σ Δ² diag(H)``, stored as a 4-bit code per row and column; the mask stays seeded (:func:`dare_factors`).

(``lowrank`` and ``svd-uniform`` are band layouts of :mod:`.svd`; see :func:`.modules.method_spec`.)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from ..config import DeltaCoMeConfig
from ..errors import DeltaCoMeError
from ..format.baseline_parts import RATE_CENTER, RATE_STEP, SparsePart, pack_rates, rate_factors, sparse_scores
from ..format.budget import budget_bytes, largest_fitting, layout_nbytes, solve_ranks
from ..format.draws import entry_draws
from ..format.packing import QuantizedMatrix, stored_nbytes
from ..format.storage import rate_nbytes, sign_part_nbytes, sparse_mask
from ..format.vq_part import vq_rows
from ..quant.masked import quantize_masked
from ..quant.rtn import quantize_rtn, unbiased
from ..quant.spill import Hessian

HYBRID_BAND_SHARE = 0.25  # deltacome-dare: share of each module's budget its bands take when band_share is not set
HYBRID_SHARES = tuple(k / 20 for k in range(19))  # band_share="auto" chooses among these (0 = DARE alone)
# importance rates: keep-rate ∝ (R_i C_j)^RATE_EXPONENT (R_i, C_j: a row's, a column's Σ Δ² diag(H)). Measured on
# the two knowledge fine-tunes (benchmarks/RESULTS.md): 1/8 keeps more of the gain and lowers the answer NLL at
# 1/128-1/32 without costing next-token agreement; 1/4 concentrates too much and costs agreement.
RATE_EXPONENT = 0.125


def rated_dare(config: DeltaCoMeConfig) -> bool:
    """Whether the DARE part of ``config``'s layouts takes importance rates (``dare_rates``; unset: all but ``dare``)."""
    return (config.dare_rates or ("uniform" if config.method == "dare" else "importance")) == "importance"


def bitdelta_rows(m: int, n: int, ratio: float, per_row: bool) -> int:
    """How many output rows keep their sign bits within the budget (all ``m`` when it fits, at 1/16 or above)."""
    budget = budget_bytes(m, n, ratio)
    return largest_fitting(m, lambda rows: sign_part_nbytes(m, n, rows, per_row) <= budget)


def hybrid_plan(
    name: str,
    m: int,
    n: int,
    ratio: float,
    config: DeltaCoMeConfig,
    spec: Sequence[Sequence],
    unchanged: bool = False,
    spectrum: torch.Tensor | None = None,
) -> tuple[list[list[int]], dict[str, Any] | None]:
    """``deltacome-dare``: the bands ``spec`` buys with ``band_share`` of the module's budget, and the DARE part of
    their residual ``Δ − U_q S V_qᵀ`` that the bytes left over (every stored byte counted) buy. ``band_share="auto"``:
    the share of ``HYBRID_SHARES`` with the least expected error (:func:`hybrid_error`) under ``spectrum``, the
    delta's singular values (without it, ``HYBRID_BAND_SHARE``)."""
    if unchanged:
        return [[int(b), 0] for b, _ in spec], None
    g, bits = config.group_size, config.uniform_bits
    budget = budget_bytes(m, n, ratio)

    def bands_for(share: float) -> list[list[int]]:
        if share <= 0.0 or int(budget * share) <= 0:
            return [[int(b), 0] for b, _ in spec]
        return [list(b) for b in solve_ranks(m, n, ratio * share, spec, g)]

    share = config.band_share
    if share == "auto" and spectrum is not None:
        layouts = {str(b): b for b in map(bands_for, HYBRID_SHARES)}.values()
        bands = min(layouts, key=lambda b: hybrid_error(m, n, b, budget, bits, g, spectrum))
    else:
        bands = bands_for(HYBRID_BAND_SHARE if share in (None, "auto") else float(share))
    left = budget - layout_nbytes(m, n, [tuple(b) for b in bands], g)
    return bands, dare_plan(name, m, n, ratio, bits, g, budget=left, rated=rated_dare(config), draw=config.mask_draw)


def hybrid_error(
    m: int, n: int, bands: Sequence[Sequence[int]], budget: int, bits: int, group_size: int, spectrum: torch.Tensor
) -> float:
    """Expected ``||Δ − Δ̂||²`` of bands + DARE of their residual ``Δ − U_q S V_qᵀ``: what DARE sparsifies (the
    energy past the bands' rank and the bands' rounding, taken as ``3 / (2^b − 1)²`` of their energy: two factors,
    each rounded over ~6 standard deviations in ``2^b − 1`` steps) times ``1/keep − 1``, DARE's rescaling noise at
    the keep-rate the bytes left buy. Unbiased, as DARE is: the bands' rounding is noise, not a bias."""
    s2 = spectrum.to(torch.float64).square()
    residual, start = 0.0, 0
    for b, r in bands:
        residual += float(s2[start : start + r].sum()) * 3.0 / (2**b - 1) ** 2
        start += r
    residual += float(s2[start:].sum())
    values = dare_values(budget - layout_nbytes(m, n, [tuple(b) for b in bands], group_size), bits, group_size, m * n)
    return residual * (m * n / values - 1.0) if values else residual


def dare_values(budget: int, bits: int, group_size: int, cap: int) -> int:
    """How many DARE values (``bits``, groups of ``group_size``, one row) fit ``budget`` bytes, at most ``cap``."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if stored_nbytes(1, mid, bits, group_size) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def mask_seed(name: str, draw: int = 0) -> int:
    """The seed of a module's masks in draw ``draw`` (``DeltaCoMeConfig.mask_draw``): from the module's name alone
    (draw 0) or from ``name#draw``. The seed is stored in the layout, so a loader never derives it."""
    return zlib.crc32((name if not draw else f"{name}#{draw}").encode()) & 0x7FFFFFFF


def dare_plan(
    name: str, m: int, n: int, ratio: float, bits: int, group_size: int, *, budget: int | None = None,
    rated: bool = False, draw: int = 0,
) -> dict[str, Any] | None:  # fmt: skip
    """The ``sparse`` part of a DARE layout holding as many values as the budget does (``budget`` bytes when given,
    e.g. what the bands of ``deltacome-dare`` leave; else the module's at ``ratio``; :func:`sparse_entry`).
    ``rated``: importance rates; their codes and threshold are paid first."""
    budget = budget_bytes(m, n, ratio) if budget is None else int(budget)
    count = dare_values(budget - (rate_nbytes(m, n) if rated else 0), bits, group_size, m * n)
    if count <= 0:
        return None
    return sparse_entry(name, m, n, count, mask_seed(name, draw), bits, group_size, rated)


VQ_CODE_BITS = 4  # vq: a 4-bit code (16-entry codebook) a vector of dim = 4 / (bits a weight the budget allows)


def vq_plan(name: str, m: int, n: int, ratio: float, *, budget: int | None = None, draw: int = 0) -> dict | None:
    """The ``vq`` part of a layout: 4-bit codes of ``dim``-dim vectors, ``dim`` the weights a code the budget
    (``budget`` bytes, else the module's at ``ratio``) pays for, to the nearest divisor of ``n`` (a vector then never
    straddles two rows, so the codes can be fitted to the output a block of columns at a time: `quant/vq.py`), and as
    many of the rotated rows as the budget holds beside the codebook (at 1/32, 8-dim vectors and all but 0.5% of the
    rows)."""
    budget = budget_bytes(m, n, ratio) if budget is None else int(budget)
    if budget <= 0:
        return None
    target = VQ_CODE_BITS * m * n / (8 * budget)  # nearest by ratio: the rows take up what it misses
    dim = min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(math.log(d / target)))
    rows = vq_rows(m, n, dim, budget, 1 << VQ_CODE_BITS)
    if rows <= 0:
        return None
    return {"dim": dim, "codes": 1 << VQ_CODE_BITS, "rows": rows, "seed": mask_seed(name, draw)}


def sparse_entry(
    name: str, m: int, n: int, count: int, seed: int, bits: int, group_size: int, rated: bool
) -> dict[str, Any]:
    """The ``sparse`` part of a DARE layout with room for ``count`` values, its draws hashed (format 5, so that a GPU
    kernel replays the mask: `format/draws.py`). Uniform: the threshold ``keep`` is the
    seeded draw just past ``count``, so the mask keeps exactly that many (fewer only on a tie) and the budget is
    filled, not left to a Bernoulli count's scatter. ``rated``: ``nnz`` is the values' capacity (the mask, chosen
    when the delta is seen, keeps at most that many)."""
    if rated:
        return {"nnz": count, "keep": count / (m * n), "seed": seed, "bits": bits, "group_size": group_size,
                "rates": "importance", "draws": "hash"}  # fmt: skip
    keep, nnz = _uniform_threshold(m, n, count, seed)
    if nnz == 0:  # pragma: no cover - a draw of exactly 0.0 at the boundary
        raise DeltaCoMeError(f"{name}: cannot draw a DARE mask that keeps {count} of {m * n} entries")
    return {"nnz": nnz, "keep": keep, "seed": seed, "bits": bits, "group_size": group_size, "draws": "hash"}


@lru_cache(maxsize=4096)
def _uniform_threshold(m: int, n: int, count: int, seed: int) -> tuple[float, int]:
    """The uniform mask's threshold (the ``(count+1)``-th smallest seeded draw: exactly the ``count`` draws below it
    are kept, fewer on a tie) and how many it keeps. Remembered: the plan lays out each module once per candidate
    split it weighs, and drawing and sorting the scores was 5% of a default compression of SmolLM2."""
    if count >= m * n:
        return 1.0, m * n
    scores = sparse_scores(m, n, seed, draws="hash").flatten()
    keep = torch.kthvalue(scores, count + 1).values  # a draw d / 2^24, exact: u < keep is the mask's d < cut
    return float(keep), int((scores < keep).sum())


def bitdelta_factors(
    delta: torch.Tensor, hessian: torch.Tensor | None, rows: int, per_row: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sign bits, scale(s) and kept rows of a BitDelta approximation ``Δ[rows] ≈ α ⊙ sign(Δ[rows])``.

    Scales are the least-squares ones under the input second moment ``H`` (``α_i = Δ_i H s_iᵀ / s_i H s_iᵀ``;
    without ``H`` this is BitDelta's ``mean |Δ|``). When not every row fits, the rows kept are those whose sign
    approximation removes the most output error, ``(Δ_i H s_iᵀ)² / s_i H s_iᵀ``.
    """
    d = delta.detach().to(torch.float32)
    m, n = d.shape
    s = torch.where(d >= 0, 1.0, -1.0)
    if hessian is not None:
        H = hessian.to(device=d.device, dtype=torch.float32)
        num = ((d @ H) * s).sum(1)
        den = ((s @ H) * s).sum(1).clamp_min(1e-30)
    else:
        num = d.abs().sum(1)
        den = torch.full((m,), float(n), device=d.device)
    if rows < m:
        keep = torch.topk(num.square() / den, rows).indices.sort().values
    else:
        keep = None
    sel = keep if keep is not None else slice(None)
    if per_row:
        scale = (num[sel] / den[sel]).clamp_min(0.0)
    else:
        scale = (num[sel].sum() / den[sel].sum()).clamp_min(0.0).reshape(1)
    positive = d[sel] >= 0
    return positive.cpu(), scale.cpu(), (keep.to(torch.int32).cpu() if keep is not None else None)


@dataclass
class DareFactors:
    """What a DARE part stores: the kept values (``1 x nnz``), and for importance rates the packed rate codes and
    the mask threshold (``format.baseline_parts.SparsePart``)."""

    values: QuantizedMatrix
    rates: torch.Tensor | None = None
    threshold: float | None = None
    mask: torch.Tensor | None = field(default=None, repr=False)  # the mask drawn here (not stored: regenerated)

    def store(self, part: SparsePart) -> None:
        """Write these factors into a `SparsePart` of the same layout entry (a module's, or one of its own)."""
        if (self.rates is None) == part.rated:
            raise DeltaCoMeError("compressed DARE values and the layout entry disagree on importance rates")
        part.values.set(self.values)
        if self.rates is not None:
            part.set_rates(self.rates, self.threshold)

    def part(self, m: int, n: int, entry: dict[str, Any]) -> SparsePart:
        """A `SparsePart` of its own holding these factors: what the loader reads (its mask, its dense delta)."""
        part = SparsePart.from_layout(m, n, entry)
        self.store(part)
        return part

    def dense(self, m: int, n: int, entry: dict[str, Any]) -> torch.Tensor:
        """The dense ``m x n`` delta these values store (float32, CPU), as the loader reads it: the loader's mask
        comes from the same seed, rates and float32 threshold as the one drawn here (tests/test_dare_rates.py), so
        that one is used when held instead of drawing it again."""
        if self.mask is None:
            return self.part(m, n, entry).delta_weight().cpu()
        w = torch.zeros(m, n, dtype=torch.float32)
        w[self.mask] = self.values.dequantize().reshape(-1).cpu()[: int(self.mask.sum())]
        return w


def rate_codes(energy: torch.Tensor) -> torch.Tensor:
    """4-bit codes of ``energy^RATE_EXPONENT`` (one per row or column) on a log2 grid of ``RATE_STEP`` centred on
    their geometric mean; a row or column with no energy gets the lowest rate."""
    live = energy > 0
    f = RATE_EXPONENT * torch.log2(energy.to(torch.float64).clamp_min(1e-300))
    center = float(f[live].mean()) if bool(live.any()) else 0.0
    codes = torch.round((f - center) / RATE_STEP) + RATE_CENTER
    return torch.where(live, codes, torch.zeros_like(codes)).clamp(0, 15).to(torch.uint8)


# GPTQ damping of DARE's values under dare_fit="gptq": on the prototype of benchmarks/RESULTS.md (reading at 8545dfa)
# 0.1 left less held-out output error than the bands' 0.01
DARE_FIT_DAMP = 0.1


def dare_factors(
    delta: torch.Tensor,
    sparse: dict[str, Any],
    hessian_diag: torch.Tensor | None = None,
    *,
    fit: Hessian | None = None,
    name: str = "",
    unbias: bool = False,
) -> DareFactors:
    """DARE: the entries of ``delta`` under the seeded mask, divided by their keep-rate, quantized as one row. With
    importance rates (``sparse["rates"]``) the rates come from the delta and the input second moment's diagonal
    ``hessian_diag`` (none: every input counts alike), and the threshold keeps at most ``nnz`` entries.

    The values are rounded to nearest (each group's grid clipped to its least squared error: the rescaled values are
    heavy-tailed; with ``unbias``, ``dare_fit="unbiased"``, each group's scale then stretched so that the stored
    values are not shrunk, :func:`~hf_deltacome.quant.rtn.unbiased`), or with ``fit`` (the full input second moment,
    ``dare_fit="gptq"``) by GPTQ on the mask
    (:func:`~hf_deltacome.quant.masked.quantize_masked`): same layout and bytes. The target stays the rescaled,
    unbiased matrix either way: fitting the kept entries to ``delta`` itself shrinks it (benchmarks/RESULTS.md)."""
    m, n = delta.shape
    d = delta.detach().to(torch.float32).cpu()
    if sparse.get("rates") is None:
        mask = sparse_mask(m, n, sparse["keep"], sparse["seed"], draws=entry_draws(sparse))
        if int(mask.sum()) != int(sparse["nnz"]):
            raise DeltaCoMeError(f"DARE mask of a {m}x{n} delta keeps {int(mask.sum())} entries, layout says {sparse}")
        values = (d[mask] / float(sparse["keep"])).view(1, -1)
        return DareFactors(_round_values(values, mask, sparse, fit, name, unbias), mask=mask)
    h = torch.ones(n) if hessian_diag is None else hessian_diag.detach().to(torch.float64).cpu().clamp_min(0)
    energy = d.to(torch.float64).square() * h.view(1, -1)
    packed = pack_rates(rate_codes(energy.sum(1)), rate_codes(energy.sum(0)))
    a, b = rate_factors(packed, m, n)
    scores = sparse_scores(m, n, sparse["seed"], (a, b), entry_draws(sparse))
    cap = int(sparse["nnz"])
    if cap >= m * n:  # every entry fits: a finite threshold above every score (a file holds no inf)
        threshold = 2.0 / (float(a.min()) * float(b.min()))
    else:
        threshold = float(scores.flatten().kthvalue(cap + 1).values)
    mask = scores < torch.tensor(threshold, dtype=torch.float32)
    rate = (threshold * a.to(torch.float64).view(-1, 1) * b.to(torch.float64).view(1, -1)).clamp(max=1.0)
    values = torch.zeros(1, cap)
    values[0, : int(mask.sum())] = (d.to(torch.float64)[mask] / rate[mask]).to(torch.float32)
    return DareFactors(_round_values(values, mask, sparse, fit, name, unbias), packed, threshold, mask)


def _round_values(
    values: torch.Tensor, mask: torch.Tensor, sparse: dict[str, Any], fit: Hessian | None, name: str, unbias: bool
) -> QuantizedMatrix:
    """DARE's row of rescaled ``values`` (kept entries of ``mask`` in row-major order, zero-padded) quantized."""
    bits, g = int(sparse["bits"]), int(sparse.get("group_size", 128))
    if fit is None:
        rounded = quantize_rtn(values, bits, g, clip=True)
        return unbiased(rounded, values) if unbias else rounded
    target = torch.zeros(mask.shape)
    target[mask] = values[0, : int(mask.sum())]
    return quantize_masked(fit, target, mask, bits, g, values.shape[1], damp=DARE_FIT_DAMP, name=name)[0]
