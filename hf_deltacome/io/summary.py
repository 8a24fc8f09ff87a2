"""What an adapter folder holds: exact file bytes, per-module layout, and the effective compression ratio.

Every figure is read from the files on disk (the safetensors header and ``adapter_config.json``), so the bytes
include the header, packing padding, scales, zeros, singular values and every dense extra.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PLAN_RECORDS
from ..errors import AdapterFileError
from .adapter_files import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    parse_config_json,
    read_adapter_config,
    read_safetensors_header,
    tensor_nbytes,
)

_MODULE_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.deltacome_delta\.")


@dataclass
class ModuleSummary:
    """One target linear: its shape, bands and stored bytes."""

    name: str
    shape: tuple[int, int]
    bands: list[tuple[int, int]]
    group_size: int
    nbytes: int = 0
    parts: list[str] = field(default_factory=list)  # sign bits, dare values, sparse bands (rank@bits keep p)

    @property
    def layout_text(self) -> str:
        """``rank@bits`` per band, then any baseline part."""
        return " + ".join([f"{r}@{b}b" for b, r in self.bands if r > 0 or not self.parts] + self.parts)

    @property
    def fp16_delta_bytes(self) -> int:
        return 2 * self.shape[0] * self.shape[1]

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass
class AdapterSummary:
    """Sizes and layout of one saved adapter."""

    path: str
    file_bytes: int  # adapter_model.safetensors, exactly as on disk
    config_bytes: int  # adapter_config.json
    modules: list[ModuleSummary]
    extras: dict[str, int] = field(default_factory=dict)  # dense extra tensor -> stored bytes
    extras_fp16_bytes: int = 0
    ratio_target: float | None = None
    method: str = "deltacome"
    plan: dict[str, Any] = field(default_factory=dict)  # compression_info's "search" / "allocation" records
    formats: tuple[int, ...] = (1,)  # packed-format versions of the modules (docs/FORMAT.md)

    @property
    def header_bytes(self) -> int:
        """Bytes of the file that are no tensor's data: the safetensors header (length prefix and padding included)."""
        return self.file_bytes - self.factor_bytes - sum(self.extras.values())

    @property
    def factor_bytes(self) -> int:
        return sum(m.nbytes for m in self.modules)

    @property
    def target_fp16_bytes(self) -> int:
        return sum(m.fp16_delta_bytes for m in self.modules)

    @property
    def fp16_delta_bytes(self) -> int:
        """The fp16 delta the adapter replaces: target linears plus the dense extras at 2 bytes a value."""
        return self.target_fp16_bytes + self.extras_fp16_bytes

    @property
    def factor_ratio(self) -> float:
        """Packed factors / fp16 delta of the target linears (what ``ratio`` budgets)."""
        return self.factor_bytes / max(self.target_fp16_bytes, 1)

    @property
    def effective_ratio(self) -> float:
        """Whole weights file (header and dense extras included) / fp16 delta of every stored module."""
        return self.file_bytes / max(self.fp16_delta_bytes, 1)

    def per_kind(self) -> dict[str, dict[str, Any]]:
        """Per module type (q_proj, down_proj, ...; ``parent.leaf`` where one leaf name sits under different
        parents, as GPT-2's ``attn.c_proj`` and ``mlp.c_proj``, with the experts of a mixture as one parent,
        ``experts.*.down_proj``): shape(s), bands as ``bits:rank`` and bytes."""

        def parent(name: str) -> str:
            parts = name.split(".")
            if len(parts) < 2:
                return ""
            return f"{parts[-3]}.*" if parts[-2].isdigit() and len(parts) > 2 else parts[-2]

        parents: dict[str, set[str]] = defaultdict(set)
        for m in self.modules:
            parents[m.kind].add(parent(m.name))
        out: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "bytes": 0, "layouts": set()})
        for m in self.modules:
            row = out[f"{parent(m.name)}.{m.kind}" if len(parents[m.kind]) > 1 else m.kind]
            row["count"] += 1
            row["bytes"] += m.nbytes
            layout = f"{m.shape[0]}x{m.shape[1]} " + m.layout_text
            row["layouts"].add(layout)
        return dict(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "method": self.method,
            "file_bytes": self.file_bytes,
            "config_bytes": self.config_bytes,
            "factor_bytes": self.factor_bytes,
            "dense_extra_bytes": sum(self.extras.values()),
            "header_bytes": self.header_bytes,
            "target_fp16_delta_bytes": self.target_fp16_bytes,
            "fp16_delta_bytes": self.fp16_delta_bytes,
            "ratio_target": self.ratio_target,
            "factor_ratio": self.factor_ratio,
            "effective_ratio": self.effective_ratio,
            "modules": {
                m.name: {"shape": list(m.shape), "bands": [list(b) for b in m.bands], "bytes": m.nbytes}
                for m in self.modules
            },
            "dense_extras": self.extras,
        }

    def format(self, per_module: bool = False) -> str:
        """Human-readable table."""
        lines = [
            f"adapter: {self.path}  (format {'/'.join(map(str, self.formats))}, method {self.method}, target ratio "
            f"{_frac(self.ratio_target) if self.ratio_target else 'n/a'})"
        ]
        lines.append(f"{'module type':<16}{'count':>6}  {'layout (rank@bits)':<44}{'bytes':>14}")
        for kind, row in sorted(self.per_kind().items()):
            layouts = sorted(row["layouts"])
            lines.append(f"{kind:<16}{row['count']:>6}  {layouts[0]:<44}{row['bytes']:>14,}")
            lines.extend(f"{'':<24}{lay:<44}" for lay in layouts[1:])
        if per_module:
            lines.append("")
            for m in self.modules:
                bands = m.layout_text
                lines.append(f"  {m.name:<60} {m.shape[0]}x{m.shape[1]:<8} {bands:<30} {m.nbytes:>12,}")
        lines += _plan_lines(self.plan)
        extra = sum(self.extras.values())
        lines += [
            "",
            f"packed factors           {self.factor_bytes:>14,} B  = {self.factor_ratio:.4f} of their fp16 delta "
            f"({self.target_fp16_bytes:,} B) = 1/{1 / max(self.factor_ratio, 1e-12):.1f}",
            f"dense extras ({len(self.extras):>3} tensors){extra:>14,} B",
            f"safetensors header       {self.header_bytes:>14,} B",
            f"{ADAPTER_WEIGHTS_NAME:<25}{self.file_bytes:>14,} B  (exact file size, header included)",
            f"effective ratio          {self.effective_ratio:.4f} of the fp16 delta of every stored module "
            f"({self.fp16_delta_bytes:,} B) = 1/{1 / max(self.effective_ratio, 1e-12):.1f}",
        ]
        if self.ratio_target:
            budget = int(self.ratio_target * self.target_fp16_bytes)
            verdict = "within" if self.file_bytes <= budget else f"OVER by {self.file_bytes - budget:,} B"
            lines.append(
                f"budget at {_frac(self.ratio_target)} of the target linears' fp16 delta: {budget:,} B; the file "
                f"(factors {self.factor_bytes / max(budget, 1):.1%} + extras {extra / max(budget, 1):.1%} + header "
                f"{self.header_bytes / max(budget, 1):.1%}) is {verdict}"
            )
        return "\n".join(lines)


def _plan_lines(plan: dict[str, Any]) -> list[str]:
    """How the layout was chosen (band-split search, adaptive allocation); records of an unexpected shape (a
    hand-edited ``compression_info``) are reported as unreadable rather than failing the whole summary."""
    try:
        return _plan_text(plan)
    except (TypeError, ValueError, AttributeError, KeyError):
        return ["", f"compression_info records {sorted(plan)} are not in the expected format (hand-edited?)"]


def _plan_text(plan: dict[str, Any]) -> list[str]:
    lines = []
    budget = plan.get("budget")
    if isinstance(budget, dict) and budget.get("factor_ratio"):
        lines += [
            "",
            f"planned for the whole file: {budget.get('file_budget_bytes', 0):,} B, of which header <= "
            f"{budget.get('header_bytes_bound', 0):,} B, dense extras {budget.get('dense_extra_bytes', 0):,} B, "
            f"bias deltas {budget.get('bias_bytes', 0):,} B; the packed factors got the rest, "
            f"1/{1 / budget['factor_ratio']:.1f} of their fp16 delta",
        ]
    unspent = plan.get("unspent")
    if isinstance(unspent, dict) and unspent.get("offered_bytes"):
        names = {"dare": "the DARE parts", "vq": "the vq parts", "sparse bands": "the sparse bands",
                 "bands": "the last bands"}
        taker = " and ".join(names.get(t, t) for t in str(unspent.get("spent_on", "dare")).split("+") if t != "none")
        lines.append(
            f"the modules' budgets sum to {unspent['offered_bytes']:,} B; {unspent.get('unspent_bytes', 0):,} B "
            f"left unspent ({unspent.get('unspent_before', 0):,} B before "
            + (f"{taker} took what the modules left)" if taker else "anything took it back)")
        )
    low = plan.get("low_rank")
    if isinstance(low, dict) and low.get("modules"):
        ranks = low.get("ranks") or [0]
        lines.append(
            f"{low['modules']} module(s) of low rank (a merged LoRA's, say) stored as their rank alone "
            f"({min(ranks)}-{max(ranks)}, at {'/'.join(str(b) for b in sorted(low.get('bits') or [], reverse=True))} "
            "bits): the rest of their budget is left, there is no more to store"
        )
        if low.get("strongest_directions"):
            lines.append(f"  ({low['strongest_directions']} of them, whose rank does not fit at 3 bits, keep the "
                         "split's strongest directions up to their rank instead of DARE or vector codes)")
    search, e2e = plan.get("search"), plan.get("end_to_end")
    share = plan.get("rank_share")
    if isinstance(share, dict):
        kls = ", ".join(f"{k}: {v:.4g}" for k, v in (share.get("kl") or {}).items())
        lines += ["", f"min_rank_share {share.get('chosen')} (auto), by {share.get('metric')}: {kls}"]
    residual = plan.get("residual")
    if isinstance(residual, dict):
        kls = ", ".join(f"{k}: {v:.4g}" for k, v in (residual.get("kl") or {}).items())
        chosen = residual.get("chosen")
        what = ("the bands alone" if chosen == "none" else
                f"{residual.get('band_bits')}-bit bands with {chosen} of each budget, "
                f"{residual.get('dare_bits')}-bit DARE of their residual")  # fmt: skip
        why = residual.get("fallback") or f"band share -> {residual.get('metric')}: {kls}"
        shares = {k: v for k, v in (residual.get("kl") or {}).items() if k != "none"}
        if chosen in (0, 0.0) and shares and min(shares.values()) < shares.get("0.0", 0.0):
            why += f" (DARE alone: bands did not bring its KL under {residual.get('alone_margin')}x)"
        if "bands_as_stored" in residual:
            why += f"; the bands alone as GPTQ stores them: {residual['bands_as_stored']:.4g}"
        elif "margin" in residual:
            why += f"; a residual must reach {residual['margin']}x of the bands'"
            if residual.get("why_margin"):
                why += f" ({residual['why_margin']})"
        lines += ["", f"residual (auto): {what}; {why}"]
        draws = residual.get("draws")
        if isinstance(draws, dict):
            kls = ", ".join(f"{k}: {v:.4g}" for k, v in (draws.get("kl") or {}).items())
            lines.append(f"DARE masks: draw {draws.get('chosen')} of {len(draws.get('kl') or {})}, by KL: {kls}")
    if isinstance(search, dict):
        lines += ["", f"band split search ({search.get('strategy')}), relative output error default -> chosen:"]
        verdicts = (e2e.get("search") or {}) if isinstance(e2e, dict) else {}
        for kind, r in sorted((search.get("types") or {}).items()):
            bands = " + ".join(f"{rank}@{bits}b" for bits, rank in r.get("bands", []) if rank)
            line = f"  {kind:<22} {bands:<36} {r.get('default_objective', 0):.5f} -> {r.get('objective', 0):.5f}"
            v = verdicts.get(kind)
            if isinstance(v, dict) and not v.get("same_as_default"):
                line += f"  whole-model KL {v.get('kl', 0):.4g}: " + ("kept" if v.get("kept") else "default kept")
            lines.append(line)
    alloc = plan.get("allocation")
    if isinstance(alloc, dict):
        mult = list((alloc.get("multipliers") or {}).values())
        lines += [
            "",
            f"allocation: {alloc.get('strategy')} ({alloc.get('metric')}); module budgets "
            f"{min(mult, default=1):.2f}x..{max(mult, default=1):.2f}x of uniform, model-wide "
            f"{alloc.get('factor_bytes', 0):,} of {alloc.get('budget_bytes', 0):,} B; worst module error "
            f"{alloc.get('uniform_max_error', 0):.4g} (uniform) -> {alloc.get('max_error', 0):.4g}",
        ]
        adaptive = e2e.get("adaptive") if isinstance(e2e, dict) else None
        if isinstance(adaptive, dict):
            verdict = "kept" if adaptive.get("kept") else "not kept: every module stays at its uniform budget"
            lines.append(f"  whole-model KL {adaptive.get('kl', 0):.4g}: {verdict}")
    if isinstance(e2e, dict):
        lines.append(
            f"whole-model check: {e2e.get('metric')}, configured split {e2e.get('default', 0):.4g}; a searched split"
            " or moved budget is kept only where it lowers it"
        )
    distill = plan.get("distill")
    if isinstance(distill, dict) and distill.get("skipped"):
        lines += ["", f"scale distillation: skipped ({distill['skipped']})"]
    elif isinstance(distill, dict) and "steps" in distill:
        line = f"scale distillation: {distill['steps']} steps over {distill.get('scales', 0):,} stored scales"
        check = distill.get("check_kl")
        if isinstance(check, dict) and check.get("skipped"):
            line = f"scale distillation: not tried, KL to the fine-tune on calibration text {check['before']:.4g}"
            line += f" ({check['skipped']})"
        elif isinstance(check, dict):
            verdict = "kept" if check.get("kept") else "not kept: the scales stay as compressed"
            line += f"; KL to the fine-tune on calibration text {check['before']:.4g} -> {check['after']:.4g}, {verdict}"
        lines += ["", line]
    return lines


def _part_texts(entry: dict[str, Any]) -> list[str]:
    """Layout of the parts beside the dense bands (``format.baseline_parts``: `SignPart`, `SparsePart`;
    ``format.sparse_bands``: `SparseBand`; ``format.vq_part``: `VectorPart`)."""
    out = []
    sign = entry.get("sign")
    if isinstance(sign, dict):
        out.append(f"sign@1b x {sign.get('rows')} rows ({sign.get('scale', 'matrix')} scale)")
    sparse = entry.get("sparse")
    if isinstance(sparse, dict):
        rates = ", importance rates" if sparse.get("rates") else ""
        out.append(f"{sparse.get('nnz')} values@{sparse.get('bits')}b (keep {float(sparse.get('keep', 0)):.3f}{rates})")
    for band in entry.get("sparse_bands", []):  # impart / the sparse tail: rank, bits and keep-rate of each level
        if isinstance(band, dict) and band.get("rank"):
            out.append(f"{band.get('rank')}@{band.get('bits')}b keep {float(band.get('keep', 0)):.2f}")
    vq = entry.get("vq")
    if isinstance(vq, dict):  # format.vq_part: rotated rows kept, vector dim, codebook size
        rows = f"{vq.get('rows')}/{entry['shape'][0]} rows" if isinstance(entry.get("shape"), list) else "rows"
        out.append(f"vq {rows} in {vq.get('dim')}-dim vectors, {vq.get('codes', 16)} codes")
    return out


def _frac(r: float) -> str:
    return f"1/{1 / r:.4g}" if r < 1 else "1"


def summarize_adapter(path: str | os.PathLike) -> AdapterSummary:
    """Summarize a saved adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    path = Path(path)
    cfg_path, w_path = path / ADAPTER_CONFIG_NAME, path / ADAPTER_WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise AdapterFileError(f"{path} is not a Delta-CoMe adapter folder: {p.name} is missing")
    config = read_adapter_config(cfg_path)  # validated: every field of the right type, errors name the file
    layout = config.layout
    header, _ = read_safetensors_header(w_path)
    modules = {
        name: ModuleSummary(
            name=name,
            shape=tuple(entry["shape"]),
            bands=[tuple(b) for b in entry["bands"]],
            parts=_part_texts(entry),
            group_size=entry.get("group_size", config.group_size),
        )
        for name, entry in layout.items()
    }
    extras: dict[str, int] = {}
    extras_fp16 = 0
    for key, (dtype, shape) in header.items():
        nbytes = tensor_nbytes(dtype, shape)
        match = _MODULE_RE.match(key)
        if match and match.group("module") in modules:
            modules[match.group("module")].nbytes += nbytes
        else:
            extras[key] = nbytes
            extras_fp16 += 2 * math.prod(shape)
    return AdapterSummary(
        path=str(path),
        file_bytes=w_path.stat().st_size,
        config_bytes=cfg_path.stat().st_size,
        modules=list(modules.values()),
        extras=extras,
        extras_fp16_bytes=extras_fp16,
        ratio_target=config.ratio,
        method=config.method,
        plan={k: v for k, v in config.compression_info.items() if k in PLAN_RECORDS},
        formats=tuple(sorted({int(e.get("format", 1)) for e in config.layout.values()})) or (1,),
    )


def quantized_base_summary(path: str | os.PathLike, as_json: bool = False) -> str | None:
    """The per-linear table of an AMLQ-quantized model folder (``config.json`` whose ``quantization_config`` has
    ``quant_method == "amlq"``), or ``None`` when ``path`` is not one (e.g. an adapter folder)."""
    from ..format.amlq_layout import check_entry, layout_table

    path = Path(path)
    cfg_path = path / "config.json"
    if (path / ADAPTER_CONFIG_NAME).is_file() or not cfg_path.is_file():
        return None
    try:
        cfg = parse_config_json(cfg_path.read_bytes(), str(cfg_path))
    except OSError as e:
        raise AdapterFileError(f"{cfg_path}: cannot be read ({e})") from e
    quant = cfg.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "amlq":
        return None
    layout = quant.get("layout")
    if not isinstance(layout, dict) or not layout:
        raise AdapterFileError(f"{cfg_path}: the AMLQ quantization_config has no layout")
    for name, entry in layout.items():
        check_entry(name, entry)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    if as_json:
        quant = {k: v for k, v in quant.items() if k != "source_fingerprint"}
        return json.dumps({"path": str(path), "weights_file_bytes": weights, **quant}, indent=2)
    head = f"AMLQ quantized model: {path} ({cfg.get('model_type')}, {weights:,} B of safetensors)"
    return head + "\n" + layout_table(layout, quant.get("info"), quant.get("bpw"), quant.get("damp"))
