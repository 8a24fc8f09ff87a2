"""One target linear: its layout entry from the byte budget, its compression into factors, and the output error
of an approximation (what the search and the allocation compare)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import RESIDUAL_DARE_BITS, SVD_METHODS, DeltaCoMeConfig
from ..errors import ConfigError, DeltaCoMeError
from ..format.budget import budget_bytes, layout_nbytes, solve_ranks
from ..format.packing import QuantizedMatrix, stored_nbytes
from ..format.storage import (
    FORMAT_VERSION,
    HASH_FORMAT,
    SPARSE_BANDS_HASH_FORMAT,
    VQ_FORMAT,
    PackedDelta,
    rate_nbytes,
    sign_part_nbytes,
    sparse_band_nbytes,
    vq_part_nbytes,
)  # fmt: skip
from ..format.vq_part import VectorPart
from ..quant.rtn import quantize_rtn
from ..quant.spill import Hessian, SpilledHessian
from ..quant.vq import vq_fit
from .baselines import (
    DareFactors,
    bitdelta_factors,
    bitdelta_rows,
    dare_factors,
    dare_plan,
    hybrid_plan,
    rated_dare,
    vq_plan,
)
from .impart import compress_sparse_bands, sparse_split
from .svd import compress_linear, remembered, svd


def method_spec(config: DeltaCoMeConfig) -> list[list]:
    """The band specification ``[(bits, rank | fraction | None), ...]`` of an SVD method."""
    if config.method in ("deltacome", "impart", "deltacome-dare"):
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
    spectrum: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` layout entry of one ``m x n`` target at ``ratio`` for ``config.method``.

    The configured split gets the config's ``min_rank_share`` (``"auto"`` counts as 0 here: ``plan_layouts``
    resolves it); a searched ``spec`` is used as found. ``impart`` and ``sparse_tail`` make the last band sparse
    (:func:`.impart.sparse_split`; ``spectrum``: the delta's singular values, for ImPart's keep-rates and for
    ``deltacome-dare``'s ``band_share="auto"``)."""
    entry: dict[str, Any] = {"shape": [m, n], "bands": [], "group_size": config.group_size, "bias": bool(bias),
                             "format": FORMAT_VERSION}  # fmt: skip
    if config.stores_whole(name) and config.method not in ("dare", "vq"):
        if config.full_rank == "vq" and (unchanged or vq_plan(name, m, n, ratio)):
            config = with_changes(config, method="vq")
        else:  # DARE: as asked, or where the budget does not pay for a codebook (tiny test models)
            config = with_changes(config, method="dare", uniform_bits=RESIDUAL_DARE_BITS,
                                  dare_rates=config.dare_rates or "uniform")  # fmt: skip
    method = config.method
    if method in SVD_METHODS:
        share = rank_share(config) if spec is None and method in ("deltacome", "impart") else 0.0
        spec = spec if spec is not None else method_spec(config)
        if unchanged:
            entry["bands"] = [[int(b), 0] for b, _ in spec]
        else:
            entry["bands"] = [list(b) for b in solve_ranks(m, n, ratio, spec, config.group_size, share)]
            if method == "impart" or (method == "deltacome" and config.sparse_tail is not None):
                entry["bands"], entry["sparse_bands"] = sparse_split(
                    name, m, n, budget_bytes(m, n, ratio), entry["bands"], config, spectrum
                )
    elif method == "bitdelta":
        rows = 0 if unchanged else bitdelta_rows(m, n, ratio, config.bitdelta_scale == "row")
        if rows:
            entry["sign"] = {"rows": rows, "scale": config.bitdelta_scale}
    elif method == "dare":
        sparse = None if unchanged else dare_plan(name, m, n, ratio, config.uniform_bits, config.group_size,
                                                  rated=rated_dare(config), draw=config.mask_draw)  # fmt: skip
        if sparse:
            entry["sparse"] = sparse
    elif method == "vq":
        vq = None if unchanged else vq_plan(name, m, n, ratio, draw=config.mask_draw)
        if vq:
            entry["vq"], entry["format"] = vq, VQ_FORMAT
    elif method == "deltacome-dare":
        spec = spec if spec is not None else method_spec(config)
        entry["bands"], sparse = hybrid_plan(name, m, n, ratio, config, spec, unchanged, spectrum)
        if sparse:
            entry["sparse"] = sparse
    else:
        raise ConfigError(f"unknown method {method!r}")
    if entry.get("sparse"):  # every DARE part written has hashed draws (`sparse_entry`), rated or not
        entry["format"] = HASH_FORMAT
    if entry.get("sparse_bands"):  # ... and every sparse band (`.impart.sparse_split`)
        entry["format"] = SPARSE_BANDS_HASH_FORMAT
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
        total += rate_nbytes(m, n) if sparse.get("rates") else 0
    for band in entry.get("sparse_bands", []):
        total += sparse_band_nbytes(int(band["bits"]), int(band["rank"]), band["nnz"], g)
    vq = entry.get("vq")
    if vq:
        total += vq_part_nbytes(n, int(vq["rows"]), int(vq["dim"]), int(vq.get("codes", 16)))
    return total


@dataclass
class ModuleFactors:
    """The compressed factors of one target: bands ``(Vᵀ_k, U_k, S_k)``, BitDelta sign bits, DARE values, sparse
    bands ``(V values, U values, S_k, Vᵀ_k dense, Uᵀ_k dense)``, vector codes ``(indices, codebook, scale)``."""

    bands: list[tuple[QuantizedMatrix, QuantizedMatrix, torch.Tensor]] = field(default_factory=list)
    sign: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # (positive k x n, scale, rows)
    sparse: DareFactors | None = None
    sparse_bands: list[tuple] = field(default_factory=list)
    vq: tuple[torch.Tensor, torch.Tensor, float] | None = None

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
            self.sparse.store(packed.sparse)
        if len(self.sparse_bands) != len(packed.sparse_bands):
            raise DeltaCoMeError(f"{len(self.sparse_bands)} sparse bands for a delta with {len(packed.sparse_bands)}")
        for band, (vq, uq, s, _, _) in zip(packed.sparse_bands, self.sparse_bands):
            band.set(vq, uq, s)
        if (self.vq is None) != (packed.vq is None):
            raise DeltaCoMeError("compressed factors and the layout entry disagree on the vq part")
        if self.vq is not None:
            packed.vq.set(*self.vq)

    def dense(self, m: int, n: int, sparse_entry: dict | None = None, vq_entry: dict | None = None) -> torch.Tensor:
        """The dense ``m x n`` approximation of the delta these factors store (``vq_entry``: the layout's ``vq``
        part, for its rotations)."""
        w = torch.zeros(m, n, dtype=torch.float32)
        for vq, uq, s in self.bands:  # uq holds U_kᵀ (format 2)
            w += (uq.dequantize().cpu().t() * s.cpu()) @ vq.dequantize().cpu()
        for _, _, s, vt, ut in self.sparse_bands:
            w += (ut.t() * s) @ vt
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
            w += self.sparse.dense(m, n, sparse_entry)
        if self.vq is not None:
            if vq_entry is None:
                raise DeltaCoMeError("the dense form of a vq part needs its layout entry (rows, dim, seed)")
            part = VectorPart.from_layout(m, n, vq_entry)
            part.set(*self.vq)
            w += part.delta_weight()
        return w


@torch.no_grad()
def compress_module(
    delta: torch.Tensor,
    hessian: Hessian | None,
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
    if isinstance(hessian, SpilledHessian) and (entry.get("sign") or entry.get("sparse_bands") or entry.get("vq")):
        hessian = hessian.load()  # these parts read the whole matrix
    if entry.get("sign"):
        out.sign = bitdelta_factors(delta, hessian, int(entry["sign"]["rows"]), entry["sign"].get("scale") == "row")
    if entry.get("sparse"):  # DARE of the whole delta (dare), of what the stored bands leave (deltacome-dare)
        fit = hessian if config.dare_fit == "gptq" else None  # the rescaled values rounded by GPTQ, same mask
        out.sparse = dare_factors(delta.detach().float().cpu() - out.dense(m, n) if out.bands else delta,
                                  entry["sparse"], hessian_diag(hessian), fit=fit, name=name,
                                  unbias=config.dare_fit == "unbiased")  # fmt: skip
    if any(b["rank"] > 0 for b in entry.get("sparse_bands", [])):
        out.sparse_bands = compress_sparse_bands(delta, hessian, entry, out.dense(m, n), quantizer=config.quantizer,
                                                 damp=config.damp)  # fmt: skip
    vq = entry.get("vq")
    if vq:
        fit = hessian if config.quantizer == "gptq" else None  # codes chosen for the output, as GPTQ's rounding
        out.vq = vq_factors(delta.detach().float().cpu() - out.dense(m, n) if out.bands else delta, vq, fit, name=name)
    return out


def output_error(err: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """``||E X||²`` summed over calibration inputs, as ``tr(E H Eᵀ)`` (``||E||_F²`` without ``H``)."""
    e = err.to(torch.float64)
    if hessian is None:
        return float((e * e).sum())
    H = hessian.to(device=e.device, dtype=torch.float64)
    return float(((e @ H) * e).sum())


def approximation_error(
    delta: torch.Tensor,
    hessian: Hessian | None,
    entry: dict[str, Any],
    config: DeltaCoMeConfig,
    *,
    quantizer: str | None = None,
) -> float:
    """``||(Δ − Δ̂) X||²`` of the factors ``entry`` buys for ``delta`` (``quantizer`` overrides the config's)."""
    m, n = delta.shape
    cfg = config
    if quantizer is not None and quantizer != config.quantizer:
        cfg = with_changes(config, quantizer=quantizer)
    d = delta.detach().to(torch.float32).cpu()
    if not any(r > 0 for _, r in entry.get("bands", [])) and not has_extra_parts(entry):
        return output_error(d, hessian)
    if cfg.quantizer == "rtn" and (entry.get("bands") or entry.get("sparse_bands")) and not (
        entry.get("sign") or entry.get("sparse")
    ):
        approx = rtn_bands_dense(d, entry)  # fast path: reuses the cached SVD
    else:
        approx = compress_module(d, hessian, entry, cfg).dense(m, n, entry.get("sparse"), entry.get("vq"))
    return output_error(d - approx, hessian)


def has_extra_parts(entry: dict[str, Any]) -> bool:
    """True when the entry stores more than dense bands (sign bits, sparse values, sparse bands, vector codes)."""
    return bool(entry.get("sign") or entry.get("sparse") or entry.get("sparse_bands") or entry.get("vq"))


def hessian_diag(hessian: Hessian | None) -> torch.Tensor | None:
    """The diagonal of an input second moment (spilled ones read back), for DARE's importance rates."""
    if hessian is None:
        return None
    return (hessian.load() if isinstance(hessian, SpilledHessian) else hessian).diagonal().float().cpu()


def rtn_bands_dense(
    d: torch.Tensor, entry: dict[str, Any], hessian_diag: torch.Tensor | None = None, *, unbias: bool = False
) -> torch.Tensor:
    """The dense round-to-nearest approximation of ``d`` by the entry's bands, dense and sparse, and by the DARE
    part of what they leave (``deltacome-dare``, the residual the whole-model check weighs; importance rates from
    ``hessian_diag``, the check's input energies, else from the delta alone; ``unbias``: its values
    stretched as ``dare_fit="unbiased"`` stores them)."""
    U, S, Vh = svd(d)
    w = torch.zeros_like(d)
    start = 0
    for b, r in entry.get("bands", []):
        if r <= 0:
            continue
        sl = slice(start, start + r)
        start += r
        if b == 16:
            vq, uq = Vh[sl].to(torch.float16).float(), U[:, sl].to(torch.float16).float()
        else:
            g = entry["group_size"]
            vq, uq = quantize_rtn(Vh[sl], b, g).dequantize(), quantize_rtn(U[:, sl].t(), b, g).dequantize().t()
        w += (uq * S[sl]) @ vq
    if entry.get("sparse_bands"):
        for _, _, s, vt, ut in compress_sparse_bands(d, None, entry, w, quantizer="rtn"):
            w += (ut.t() * s) @ vt
    sparse = entry.get("sparse")
    if sparse:
        w += dare_factors(d - w, sparse, hessian_diag, unbias=unbias).dense(*d.shape, sparse).to(w.device)
    vq = entry.get("vq")
    if vq:
        w += ModuleFactors(vq=vq_factors(d - w, vq)).dense(*d.shape, vq_entry=vq).to(w.device)
    return w


def vq_factors(
    delta: torch.Tensor, vq: dict[str, Any], hessian: torch.Tensor | None = None, *, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The codes, codebook and scale of a ``vq`` part for ``delta``, fitted to the output with ``hessian`` (see
    :func:`~hf_deltacome.quant.vq.vq_fit`); data-free ones are fitted once per delta and part inside
    :func:`.svd.reuse_svd`, so the plan's whole-model check and the compression store the same codes."""
    args = (int(vq["rows"]), int(vq["dim"]), int(vq.get("codes", 16)), int(vq["seed"]))
    if hessian is not None:
        return vq_fit(delta, *args, hessian=hessian, name=name)
    return remembered("vq", delta.to(torch.float32), lambda: vq_fit(delta, *args), *args)


def with_changes(config: DeltaCoMeConfig, **changes: Any) -> DeltaCoMeConfig:
    """A shallow copy of ``config`` with ``changes`` set (no re-validation: the values come from the library)."""
    cfg = copy.copy(config)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg
