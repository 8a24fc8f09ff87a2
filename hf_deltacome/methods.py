"""Compression methods at one byte budget, the band-split search and the adaptive allocation across modules.

Every method stores its factors in the adapter format of `factors.PackedDelta` and fits, counted with every stored
byte, in the budget of :func:`budget.budget_bytes` of each module (or, with ``allocation="adaptive"``, in the
model-wide sum of those budgets):

* ``deltacome`` — SVD, singular vectors in bands of mixed precision (``config.bands``, 8/3/2 bits by default),
  GPTQ against calibration activations;
* ``svd-uniform`` — the same, every singular vector at ``config.uniform_bits`` bits;
* ``lowrank`` — the top singular vectors in float16 at the rank the budget buys (plain truncated SVD);
* ``bitdelta`` — the sign of each delta entry with one scale per matrix (or per row, ``bitdelta_scale="row"``),
  the scales refined by distillation against the fine-tune (:func:`distill_sign_scales`). One bit per weight is
  exactly the 1/16 budget; it does not fit below that, so only the output rows whose sign approximation removes the
  most output error keep their signs (and their index is stored);
* ``dare`` — a random subset of the delta's entries (mask regenerated from a stored seed), rescaled by 1/keep and
  quantized at ``uniform_bits`` bits; keep is the largest the budget allows.

Search (``config.search``): for each module type (name and shape), the band split — how many singular vectors at
8, 4 and 3 bits, and whether the rest get 2 or 3 bits — that minimises the relative output error
``||(Δ − Δ̂) X||² / ||Δ X||²`` of a few sample layers under calibration activations ``X``; greedy local search or a
small genetic algorithm, both started from (and never worse than) the configured split.

Adaptive allocation (``config.allocation="adaptive"``; the AMLQ idea applied to deltas): each module's error is
measured at several budgets (¼× … 4× its own), as the noise-to-signal ratio of its output
``||(Δ − Δ̂) X||² / ||W_f X||²``; a binary search finds the smallest error threshold at which every module taking its
cheapest budget under the threshold keeps the model-wide total within the sum of the uniform budgets; the bytes left
over go to the modules where they remove the most error per byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .budget import Band, budget_bytes, layout_nbytes, solve_ranks
from .config import RANK_SHARES, SVD_METHODS, DeltaCoMeConfig
from .endtoend import METRIC, EndToEndCheck
from .errors import CalibrationError, ConfigError, DeltaCoMeError
from .factors import PackedDelta, sign_part_nbytes, sparse_mask
from .packing import QuantizedMatrix, quantize_rtn, stored_nbytes

# adaptive allocation: budgets tried per module, as multiples of its uniform budget
ALLOCATION_LEVELS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
SEARCH_HIGH_BITS = (8, 4, 3)  # explicit bands the search sizes (largest singular values first)
SEARCH_REST_BITS = (2, 3)  # bit widths the search may give the rest of the budget
SEARCH_LAYERS = 2  # sample layers per module type the search measures its objective on
SEARCH_EVALS = 40  # distinct band splits evaluated per module type (round-to-nearest errors)
SEARCH_VERIFY = 4  # best splits measured again with GPTQ, as they will be quantized
PLAN_MAX_SAMPLES = 16  # calibration sequences used to measure activations for search / allocation
SVD_CACHE_BYTES = 4 << 30  # planning keeps every delta's SVD when they fit in this (float32, ~2x the delta)
HESSIAN_MEMORY = 2 << 30  # bytes of input Hessians held at once while planning (more layers: more passes)


# ================================================================================ layouts and bytes


def method_spec(config: DeltaCoMeConfig) -> list[list]:
    """The band specification ``[(bits, rank | fraction | None), ...]`` of an SVD method."""
    if config.method == "deltacome":
        return [list(b) for b in config.bands]
    if config.method == "lowrank":
        return [[16, None]]
    if config.method == "svd-uniform":
        return [[int(config.uniform_bits), None]]
    raise ConfigError(f"method {config.method!r} has no band specification")


def rank_share(config: DeltaCoMeConfig) -> float:
    """The config's ``min_rank_share`` as a number (``"auto"`` before ``plan_layouts`` has chosen one: 0)."""
    share = config.min_rank_share
    return float(share) if isinstance(share, (int, float)) else 0.0


def module_kind(name: str, shape: Sequence[int]) -> str:
    """The module type the search shares a split across: leaf name and shape, e.g. ``q_proj:576x576``."""
    return f"{name.rsplit('.', 1)[-1]}:{shape[0]}x{shape[1]}"


def bitdelta_rows(m: int, n: int, ratio: float, per_row: bool) -> int:
    """How many output rows keep their sign bits within the budget (all ``m`` when it fits, at 1/16 or above)."""
    budget = budget_bytes(m, n, ratio)
    lo, hi = 0, m
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sign_part_nbytes(m, n, mid, per_row) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def dare_plan(name: str, m: int, n: int, ratio: float, bits: int, group_size: int) -> dict[str, Any] | None:
    """The ``sparse`` part of a DARE layout: the largest keep rate whose sampled mask's values fit the budget."""
    budget = budget_bytes(m, n, ratio)
    lo, hi = 0, m * n
    while lo < hi:  # most values that fit
        mid = (lo + hi + 1) // 2
        if stored_nbytes(1, mid, bits, group_size) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return None
    seed = zlib.crc32(name.encode()) & 0x7FFFFFFF
    keep = min(1.0, lo / (m * n))
    for _ in range(50):  # the sampled count scatters around keep·m·n: shrink keep until the sample fits
        nnz = int(sparse_mask(m, n, keep, seed).sum())
        if 0 < nnz <= lo:
            return {"nnz": nnz, "keep": keep, "seed": seed, "bits": bits, "group_size": group_size}
        keep *= 1.0 - max(2.0 / math.sqrt(max(lo, 1)), 1e-4)
    raise DeltaCoMeError(f"{name}: cannot draw a DARE mask that fits {budget} bytes")  # pragma: no cover


def plan_entry(
    name: str,
    m: int,
    n: int,
    ratio: float,
    config: DeltaCoMeConfig,
    *,
    spec: Sequence[Sequence] | None = None,
    bias: bool = False,
    unchanged: bool = False,
) -> dict[str, Any]:
    """The ``adapter_config.json`` layout entry of one ``m x n`` target at ``ratio`` for ``config.method``.

    The configured split gets the config's ``min_rank_share`` (``"auto"`` counts as 0 here: ``plan_layouts``
    resolves it); a searched ``spec`` is used as found."""
    entry: dict[str, Any] = {"shape": [m, n], "bands": [], "group_size": config.group_size, "bias": bool(bias)}
    method = config.method
    if method in SVD_METHODS:
        share = rank_share(config) if spec is None and method == "deltacome" else 0.0
        spec = spec if spec is not None else method_spec(config)
        if unchanged:
            entry["bands"] = [[int(b), 0] for b, _ in spec]
        else:
            entry["bands"] = [list(b) for b in solve_ranks(m, n, ratio, spec, config.group_size, share)]
    elif method == "bitdelta":
        rows = 0 if unchanged else bitdelta_rows(m, n, ratio, config.bitdelta_scale == "row")
        if rows:
            entry["sign"] = {"rows": rows, "scale": config.bitdelta_scale}
    elif method == "dare":
        sparse = None if unchanged else dare_plan(name, m, n, ratio, config.uniform_bits, config.group_size)
        if sparse:
            entry["sparse"] = sparse
    else:
        raise ConfigError(f"unknown method {method!r}")
    return entry


def entry_nbytes(entry: dict[str, Any]) -> int:
    """Exact stored bytes of a layout entry's factors (bands, sign bits, sparse values; the bias delta excluded)."""
    m, n = entry["shape"]
    g = entry.get("group_size", 128)
    total = layout_nbytes(m, n, [tuple(b) for b in entry.get("bands", [])], g)
    sign = entry.get("sign")
    if sign:
        total += sign_part_nbytes(m, n, int(sign["rows"]), sign.get("scale", "matrix") == "row")
    sparse = entry.get("sparse")
    if sparse:
        total += stored_nbytes(1, int(sparse["nnz"]), int(sparse["bits"]), int(sparse.get("group_size", g)))
    return total


# ================================================================================ SVD reuse

_SVD_CACHE: dict[bytes, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


@contextlib.contextmanager
def reuse_svd() -> Iterator[None]:
    """Within this block, :func:`svd` remembers each delta's SVD (by content), so planning, compressing and
    compressing again at other ratios factorize each delta once. Holds the factors in memory until the block ends."""
    global _SVD_CACHE
    outer = _SVD_CACHE
    if outer is None:
        _SVD_CACHE = {}
    try:
        yield
    finally:
        if outer is None:
            _SVD_CACHE = None


def svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, Vh)`` of a float32 matrix (cached inside :func:`reuse_svd`)."""
    d = delta.detach().to(torch.float32)
    key = None
    if _SVD_CACHE is not None:
        h = hashlib.blake2b(digest_size=20)
        h.update(str((tuple(d.shape), str(d.device))).encode())
        h.update(d.contiguous().cpu().numpy().tobytes())
        key = h.digest()
        hit = _SVD_CACHE.get(key)
        if hit is not None:
            return hit
    out = torch.linalg.svd(d, full_matrices=False)
    if key is not None:
        _SVD_CACHE[key] = (out[0], out[1], out[2])
    return out[0], out[1], out[2]


# ================================================================================ per-module compression


@dataclass
class ModuleFactors:
    """The compressed factors of one target: bands ``(Vᵀ_k, U_k, S_k)``, BitDelta sign bits, DARE values."""

    bands: list[tuple[QuantizedMatrix, QuantizedMatrix, torch.Tensor]] = field(default_factory=list)
    sign: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # (positive k x n, scale, rows)
    sparse: QuantizedMatrix | None = None

    def fill(self, packed: PackedDelta) -> None:
        """Copy the factors into the buffers of a `PackedDelta` built from the same layout entry."""
        if len(self.bands) != len(packed.bands):
            raise DeltaCoMeError(f"{len(self.bands)} compressed bands for a delta with {len(packed.bands)} bands")
        for k, (vq, uq, s) in enumerate(self.bands):
            packed.set_band(k, vq, uq, s)
        if (self.sign is None) != (packed.sign is None) or (self.sparse is None) != (packed.sparse is None):
            raise DeltaCoMeError("compressed factors and the layout entry disagree on the sign / sparse parts")
        if self.sign is not None:
            packed.sign.set(*self.sign)
        if self.sparse is not None:
            packed.sparse.values.set(self.sparse)

    def dense(self, m: int, n: int, sparse_entry: dict | None = None) -> torch.Tensor:
        """The dense ``m x n`` approximation of the delta these factors store."""
        w = torch.zeros(m, n, dtype=torch.float32)
        for vq, uq, s in self.bands:
            w += (uq.dequantize().cpu() * s.cpu()) @ vq.dequantize().cpu()
        if self.sign is not None:
            pos, scale, rows = self.sign
            part = (pos.to(torch.float32) * 2 - 1).cpu() * (scale.cpu().view(-1, 1) if scale.numel() > 1 else scale)
            if rows is None:
                w += part
            else:
                w[rows.long().cpu()] += part
        if self.sparse is not None:
            if sparse_entry is None:
                raise DeltaCoMeError("the dense form of a sparse part needs its layout entry (seed, keep)")
            mask = sparse_mask(m, n, sparse_entry["keep"], sparse_entry["seed"])
            w[mask] += self.sparse.dequantize().reshape(-1).cpu()
        return w


@torch.no_grad()
def compress_module(
    delta: torch.Tensor,
    hessian: torch.Tensor | None,
    entry: dict[str, Any],
    config: DeltaCoMeConfig,
    *,
    name: str = "",
) -> ModuleFactors:
    """Compress one ``m x n`` delta into the factors its layout ``entry`` (from :func:`plan_entry`) describes.

    ``hessian`` is the ``n x n`` second moment of the module's input on calibration data (``None``: data-free).
    """
    m, n = delta.shape
    if list(entry["shape"]) != [m, n]:
        raise DeltaCoMeError(f"{name or 'module'}: delta of shape {(m, n)} does not match its layout {entry['shape']}")
    out = ModuleFactors()
    if any(r > 0 for _, r in entry.get("bands", [])):
        from .compress import compress_linear

        quantizer = "rtn" if config.method == "lowrank" else config.quantizer  # fp16 vectors: nothing to round
        parts = compress_linear(
            delta,
            hessian,
            entry["bands"],
            entry["group_size"],
            quantizer=quantizer,
            damp=config.damp,
            act_order=config.act_order,
            name=name,
        )
        out.bands = list(parts)
    if entry.get("sign"):
        out.sign = bitdelta_factors(delta, hessian, int(entry["sign"]["rows"]), entry["sign"].get("scale") == "row")
    if entry.get("sparse"):
        out.sparse = dare_factors(delta, entry["sparse"])
    return out


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


def dare_factors(delta: torch.Tensor, sparse: dict[str, Any]) -> QuantizedMatrix:
    """DARE: the entries of ``delta`` under the seeded mask, divided by ``keep``, quantized (RTN) as one row."""
    m, n = delta.shape
    mask = sparse_mask(m, n, sparse["keep"], sparse["seed"])
    if int(mask.sum()) != int(sparse["nnz"]):
        raise DeltaCoMeError(f"DARE mask of a {m}x{n} delta keeps {int(mask.sum())} entries, layout says {sparse}")
    values = delta.detach().to(torch.float32).cpu()[mask] / float(sparse["keep"])
    return quantize_rtn(values.view(1, -1), int(sparse["bits"]), int(sparse.get("group_size", 128)))


# ================================================================================ activations and errors


def output_error(err: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """``||E X||²`` summed over calibration inputs, as ``tr(E H Eᵀ)`` (``||E||_F²`` without ``H``)."""
    e = err.to(torch.float64)
    if hessian is None:
        return float((e * e).sum())
    H = hessian.to(device=e.device, dtype=torch.float64)
    return float(((e @ H) * e).sum())


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    names: Sequence[str],
    input_ids: torch.Tensor,
    *,
    batch_size: int = 4,
    max_bytes: int = HESSIAN_MEMORY,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Input second moments ``H = mean x xᵀ`` of the linears ``names`` of ``model`` on ``input_ids``.

    Linears fed by the same tensor (q/k/v, gate/up) share one ``H`` object.
    """
    out: dict[str, torch.Tensor] = {}
    for part in iter_hessians(model, names, input_ids, batch_size=batch_size, max_bytes=max_bytes, progress=progress):
        out.update(part)
    return out


@torch.no_grad()
def iter_hessians(
    model: nn.Module,
    names: Sequence[str],
    input_ids: torch.Tensor,
    *,
    batch_size: int = 4,
    max_bytes: int = HESSIAN_MEMORY,
    progress: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Like :func:`collect_hessians`, in chunks of at most ``max_bytes`` of Hessians, one pass over the data each,
    so a large model never holds every module's ``H`` at once."""
    modules = dict(model.named_modules())
    missing = [nm for nm in names if nm not in modules]
    if missing:
        raise ConfigError(f"cannot measure activations of {missing[:3]}: no such module in {type(model).__name__}")
    chunks: list[list[str]] = [[]]
    used = 0
    for nm in names:
        size = modules[nm].in_features ** 2 * 4
        if chunks[-1] and used + size > max_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(nm)
        used += size
    device = next(model.parameters()).device
    bar = _progress(len(chunks) * math.ceil(input_ids.shape[0] / batch_size), progress, "Measuring activations")
    for chunk in chunks:
        acc = _SecondMoments()
        handles = [modules[nm].register_forward_hook(acc.hook(nm)) for nm in chunk]
        try:
            for batch in input_ids.split(batch_size):
                acc.batch_inputs.clear()
                model(input_ids=batch.to(device), use_cache=False)
                acc.count += batch.numel()
                bar.update(1)
        finally:
            acc.batch_inputs.clear()
            for h in handles:
                h.remove()
        out: dict[str, torch.Tensor] = {}
        for nm in chunk:
            owner = acc.alias.get(nm, nm)
            if owner not in acc.sums and owner not in out:
                raise CalibrationError(f"module {nm} saw no input during the calibration forward passes")
            if owner not in out:
                out[owner] = (acc.sums.pop(owner) / max(acc.count, 1)).cpu()
            out[nm] = out[owner]
        yield out
    bar.close()


class _SecondMoments:
    """Forward hooks summing ``x xᵀ`` per module input; modules that get the very same tensor share one sum."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}
        self.count = 0
        self.batch_inputs: list[tuple[torch.Tensor, str]] = []  # held for the batch, so no address is reused

    def hook(self, name: str) -> Any:
        def fn(_m: nn.Module, inp: tuple, _out: Any) -> None:
            x = inp[0]
            if name in self.alias:
                return
            owner = next((nm for t, nm in self.batch_inputs if t is x), None)
            if owner is not None:
                self.alias[name] = owner
                return
            self.batch_inputs.append((x, name))
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
            if name not in self.sums:
                self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
            self.sums[name].addmm_(x2.t(), x2)

        return fn


def approximation_error(
    delta: torch.Tensor,
    hessian: torch.Tensor | None,
    entry: dict[str, Any],
    config: DeltaCoMeConfig,
    *,
    quantizer: str | None = None,
) -> float:
    """``||(Δ − Δ̂) X||²`` of the factors ``entry`` buys for ``delta`` (``quantizer`` overrides the config's)."""
    m, n = delta.shape
    cfg = config
    if quantizer is not None and quantizer != config.quantizer:
        cfg = _with(config, quantizer=quantizer)
    d = delta.detach().to(torch.float32).cpu()
    if not any(r > 0 for _, r in entry.get("bands", [])) and not entry.get("sign") and not entry.get("sparse"):
        return output_error(d, hessian)
    if cfg.quantizer == "rtn" and entry.get("bands") and not entry.get("sign") and not entry.get("sparse"):
        approx = _rtn_bands_dense(d, entry)  # fast path: reuses the cached SVD
    else:
        approx = compress_module(d, hessian, entry, cfg).dense(m, n, entry.get("sparse"))
    return output_error(d - approx, hessian)


def _rtn_bands_dense(d: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    U, S, Vh = svd(d)
    w = torch.zeros_like(d)
    start = 0
    for b, r in entry["bands"]:
        if r <= 0:
            continue
        sl = slice(start, start + r)
        start += r
        if b == 16:
            vq, uq = Vh[sl].to(torch.float16).float(), U[:, sl].to(torch.float16).float()
        else:
            g = entry["group_size"]
            vq, uq = quantize_rtn(Vh[sl], b, g).dequantize(), quantize_rtn(U[:, sl], b, g).dequantize()
        w += (uq * S[sl]) @ vq
    return w


def _with(config: DeltaCoMeConfig, **changes: Any) -> DeltaCoMeConfig:
    import copy

    cfg = copy.copy(config)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


# ================================================================================ band-split search


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


# ================================================================================ adaptive allocation


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


# ================================================================================ planning a whole model


@torch.no_grad()
def plan_layouts(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    targets: Sequence[str],
    config: DeltaCoMeConfig,
    *,
    calibration_ids: torch.Tensor | None = None,
    bias_changed: dict[str, bool] | None = None,
    progress: bool = False,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The layout entry of every target (method, search and allocation applied) and a record of the choices.

    With ``calibration_ids`` (token ids) the plan is checked on the whole model (:mod:`endtoend`): the next-token KL
    to the fine-tune picks ``min_rank_share="auto"`` and decides whether each searched split and the adaptive
    allocation are kept; the search and the allocation weight their per-module errors with the input activations.
    Without data ``"auto"`` means the published split and both fall back to the plain Frobenius error.
    """
    t0 = time.time()
    bias_changed = bias_changed or {}
    base_mods, ft_mods = dict(base_model.named_modules()), dict(finetuned_model.named_modules())
    shapes: dict[str, tuple[int, int]] = {}
    unchanged: dict[str, bool] = {}
    for name in targets:
        lin = base_mods[name]
        shapes[name] = (lin.out_features, lin.in_features)
        unchanged[name] = torch.equal(lin.weight.detach().cpu(), ft_mods[name].weight.detach().cpu())
    info: dict[str, Any] = {}
    specs: dict[str, list[list]] = {}
    adaptive = config.allocation == "adaptive"
    auto_share = config.method == "deltacome" and config.min_rank_share == "auto"
    needs_data = (config.search is not None or adaptive or auto_share) and calibration_ids is not None
    ids = calibration_ids[:PLAN_MAX_SAMPLES] if needs_data else None
    live = [nm for nm in targets if not unchanged[nm]]

    def delta_of(name: str) -> torch.Tensor:
        wb = base_mods[name].weight.detach().to(torch.float32).cpu()
        wf = check.original(name) if check is not None else ft_mods[name].weight  # the check edits weights in place
        return wf.detach().to(torch.float32).cpu() - wb

    check: EndToEndCheck | None = None
    if ids is not None and config.method in SVD_METHODS:
        check = EndToEndCheck(finetuned_model, ids, delta_of, _rtn_bands_dense)
    # a small model keeps every delta's SVD for the whole plan (each is approximated at several layouts)
    small = sum(shapes[nm][0] * shapes[nm][1] for nm in live) * 8 <= SVD_CACHE_BYTES
    try:
        with reuse_svd() if small else contextlib.nullcontext():
            if auto_share:
                share = _choose_rank_share(check, config, live, shapes, info) if check is not None else 0.0
                config = _with(config, min_rank_share=share)
                if check is not None:
                    check.restore()  # what follows measures activations of the fine-tune itself
            if config.search is not None:
                specs = _search_specs(finetuned_model, config, live, shapes, delta_of, ids, info, progress)

            default = {name: plan_entry(name, *shapes[name], config.ratio, config,
                                        bias=bool(bias_changed.get(name, False)), unchanged=unchanged[name])
                       for name in targets}  # fmt: skip
            layout = {}
            for name in targets:
                spec = specs.get(module_kind(name, shapes[name]))
                layout[name] = default[name] if spec is None else plan_entry(
                    name, *shapes[name], config.ratio, config, spec=spec, bias=default[name]["bias"],
                    unchanged=unchanged[name],
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
                _allocate_adaptive(finetuned_model, config, ids, live, shapes, delta_of, ft_mods, specs, layout,
                                   info, check, kl_now, progress)  # fmt: skip
    finally:
        if check is not None:
            check.restore()
    info["plan_seconds"] = round(time.time() - t0, 2)
    if needs_data:
        info["plan_samples"] = int(ids.shape[0])
    return layout, info


def _search_specs(
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
        hess = collect_hessians(finetuned_model, wanted, ids, progress=progress) if ids is not None else {}
        results = {}
        bar = _progress(len(samples), progress, f"Searching band splits ({config.search})")
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


def _choose_rank_share(
    check: EndToEndCheck,
    config: DeltaCoMeConfig,
    live: Sequence[str],
    shapes: dict[str, tuple[int, int]],
    info: dict[str, Any],
) -> float:
    """``min_rank_share="auto"``: the share in ``RANK_SHARES`` whose layout brings the whole model closest to the
    fine-tune (ties: the smaller share, nearer the published bands).

    Per-module reconstruction error cannot make this choice: on a knowledge fine-tune it rates the published bands
    2-3x better than one 2-bit band at 1/32, while the model keeps more of the fine-tune with the 2-bit band
    (benchmarks/RESULTS.md); a delta dominated by a few directions goes the other way."""
    kls: dict[float, float] = {}
    seen: dict[str, float] = {}
    for share in RANK_SHARES:
        cfg = _with(config, min_rank_share=share)
        layouts = {nm: plan_entry(nm, *shapes[nm], cfg.ratio, cfg) for nm in live}
        key = str(sorted((nm, e["bands"]) for nm, e in layouts.items()))
        if key in seen:  # the same layout as a smaller share: nothing new to measure
            kls[share] = kls[seen[key]]
            continue
        seen[key] = share
        check.apply(layouts)
        kls[share] = check.kl()
    best = min(RANK_SHARES, key=lambda sh: (kls[sh], sh))
    info["rank_share"] = {
        "chosen": best,
        "metric": METRIC,
        "kl": {str(sh): kls[sh] for sh in RANK_SHARES},
    }
    return best


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


def _allocate_adaptive(
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
    chunks = iter_hessians(finetuned_model, live, ids, progress=progress) if ids is not None else [{}]
    by_name: dict[str, Candidates] = {}
    bar = _progress(len(live), progress, "Measuring sensitivity")
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


def _spread(names: Sequence[str], k: int) -> list[str]:
    """``k`` names spread evenly over the list (layers at different depths)."""
    if len(names) <= k:
        return list(names)
    return [names[round((i + 0.5) * len(names) / k - 0.5)] for i in range(k)]


# ================================================================================ BitDelta scale distillation


def distill_sign_scales(
    model: nn.Module,
    finetuned_model: nn.Module,
    input_ids: torch.Tensor,
    *,
    steps: int = 50,
    lr: float = 0.01,
    batch_size: int = 4,
    seq_len: int = 128,
    adapter_name: str = "default",
    progress: bool = False,
) -> dict[str, float]:
    """Refine every BitDelta scale of ``model`` (a PEFT model holding sign parts) by distillation.

    Minimises the KL divergence from the fine-tune's next-token distribution to the compressed model's on
    ``input_ids`` (cut to ``seq_len`` tokens), with Adam over log-multipliers of the scales (so each scale stays
    positive and moves in proportion to its size). Returns the loss of the first and last steps.
    """
    parts = [
        mod.deltacome_delta[adapter_name].sign
        for mod in model.modules()
        if hasattr(mod, "deltacome_delta")
        and adapter_name in mod.deltacome_delta
        and mod.deltacome_delta[adapter_name].sign is not None
    ]
    if not parts or steps <= 0:
        return {}
    if input_ids is None or input_ids.numel() == 0:
        raise CalibrationError("BitDelta scale distillation needs calibration token ids")
    device = parts[0].scale.device
    base_scales = [p.scale.detach().clone() for p in parts]
    logs = [torch.zeros_like(s, requires_grad=True) for s in base_scales]
    opt = torch.optim.Adam(logs, lr=lr)
    batches = list(input_ids[:, :seq_len].split(batch_size))
    ft_device = next(finetuned_model.parameters()).device
    was_training = model.training
    model.eval()
    first, last = None, None
    bar = _progress(steps, progress, "Distilling BitDelta scales")
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            with torch.no_grad():
                target = torch.log_softmax(finetuned_model(input_ids=batch.to(ft_device)).logits.float(), -1)
            for p, s0, lg in zip(parts, base_scales, logs, strict=True):
                p._buffers["scale"] = s0 * torch.exp(lg)
            with torch.enable_grad():
                logits = model(input_ids=batch.to(device)).logits.float()
                logp = torch.log_softmax(logits, -1)
                loss = torch.nn.functional.kl_div(logp, target.to(logp.device), log_target=True, reduction="batchmean")
                loss = loss / batch.shape[1]
                opt.zero_grad()
                loss.backward()
                opt.step()
            value = float(loss.detach())
            first = value if first is None else first
            last = value
            bar.update(1)
    finally:
        with torch.no_grad():
            for p, s0, lg in zip(parts, base_scales, logs, strict=True):
                p._buffers["scale"] = (s0 * torch.exp(lg.detach())).to(torch.float32).contiguous()
        bar.close()
        model.train(was_training)
    return {"first_loss": first, "last_loss": last, "steps": steps}


# ================================================================================ helpers


def _progress(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar (with ETA) over ``total`` steps; silent when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled)
