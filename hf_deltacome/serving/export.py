"""Export a Delta-CoMe adapter as a plain PEFT LoRA (``deltacome export --format lora``) for vLLM, TGI and any PEFT.

PEFT's ``peft.tuners.lora.conversion.convert_to_lora`` turns tuner layers that implement ``get_delta_weight`` into
LoRA factors by a dense SVD of every ``out x in`` delta, at one global rank (or energy threshold). Our deltas are
already factored, ``Δ = Σ_k U_k diag(S_k) V_kᵀ`` of known rank ``r``, so we take the same route without forming
``Δ``: QR of the stacked factors and an ``r x r`` SVD give the exact (or, with ``rank``, the optimally truncated)
factors, each module at its own rank (PEFT's ``rank_pattern`` / ``alpha_pattern``, scaling 1), with the singular
values split evenly between ``lora_A`` and ``lora_B`` so that float16 keeps them. The output follows PEFT's LoRA
conventions (``LoraConfig``, ``base_model.model.<module>.lora_{A,B}.weight`` keys) and loads with plain PEFT.

* Everything else the adapter carries densely (changed norms, embeddings, ...) goes along as LoRA
  ``modules_to_save`` so that the LoRA reproduces the adapter; ``drop_extras=True`` leaves them out for servers that
  refuse ``modules_to_save`` (vLLM), at the cost reported as the logits error.
* An adapter of fused mixture-of-experts weights (one linear per expert, :mod:`hf_deltacome.linears`) is refused:
  a LoRA's modules would not exist on the fused base.
* A bias delta (fine-tunes of models with linear biases, e.g. Qwen2's q/k/v) becomes PEFT's ``lora_bias``.
* A module stored as DARE values or sign bits (the default's MLP, ``dare``, ``bitdelta``, a DARE residual) is full
  rank: it takes PEFT's route, the SVD of its dense delta, at ``min(out, in)`` when exact (a LoRA larger than its
  float16 delta; ``rank`` truncates, at the error reported). ``deltacome merge`` keeps such modules exact at the
  dense size.

The LoRA stores ``rank·(in+out)`` 16-bit values per module where the adapter stores 2-8 bits per value plus scales,
so it is several times larger; the reported weight error is exact (computed from the factors).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import ConfigError
from ..format.storage import PackedDelta
from ..io.adapter_files import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    DELTA_MARKER,
    STATE_DICT_PREFIX,
    packed_delta,
    read_adapter,
)
from ..io.atomic import check_output_folder, write_folder
from .output import check_new_output, local_adapter_folder

PathLike = Union[str, os.PathLike]
VLLM_MAX_LORA_RANK = 512  # the largest --max-lora-rank vLLM accepts (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_LORA_RANK = 16
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoraExport:
    """What :func:`export_lora` wrote and what it costs against the Delta-CoMe adapter."""

    path: Path
    rank: int  # the largest module rank (LoraConfig.r)
    ranks: dict[str, int]
    full_ranks: dict[str, int]  # each module's rank in the adapter
    weight_error: float  # ||ΔW_lora − ΔW||_F / ||ΔW||_F over every target module (truncation and rounding)
    worst_module: tuple[str, float]
    lora_bytes: int
    adapter_bytes: int
    dtype: str
    extras: list[str] = field(default_factory=list)
    extras_dropped: bool = False
    lora_bias: bool = False
    logits_error: Optional[float] = None  # ||L_lora − L_adapter|| / ||L_adapter − L_base|| (with a base)

    @property
    def truncated(self) -> list[str]:
        return [n for n, r in self.ranks.items() if r < self.full_ranks[n]]

    def format(self) -> str:
        ranks = sorted(self.ranks.values())
        lines = [
            f"LoRA written to {self.path}: {len(self.ranks)} modules, rank {ranks[0]}-{ranks[-1]} ({self.dtype})",
            f"  size: {self.lora_bytes / 1e6:,.2f} MB, {self.lora_bytes / max(self.adapter_bytes, 1):.1f}x the "
            f"Delta-CoMe adapter ({self.adapter_bytes / 1e6:,.2f} MB): a LoRA keeps 16-bit factors",
            f"  weight error vs the adapter: {self.weight_error:.2e} relative "
            f"(worst module {self.worst_module[0]}: {self.worst_module[1]:.2e})",
        ]
        if self.truncated:
            lines.append(f"  --rank {self.rank} truncated {len(self.truncated)} of {len(self.ranks)} modules")
        if self.logits_error is not None:
            lines.append(f"  logits error vs the adapter: {self.logits_error:.2e} of the adapter's effect on the base")
        if self.extras and self.extras_dropped:
            lines.append(f"  dense extras dropped ({len(self.extras)} modules, e.g. {self.extras[0]})")
        elif self.extras:
            lines.append(
                f"  dense extras carried as LoRA modules_to_save: {len(self.extras)} modules (e.g. {self.extras[0]}); "
                "plain PEFT applies them; vLLM refuses LoRAs with modules_to_save: export with --drop-extras "
                "(its cost: the logits error with --base) or serve the merged model"
            )
        if self.lora_bias:
            lines.append("  bias deltas carried as PEFT lora_bias (vLLM does not apply LoRA biases)")
        cap = "within" if self.rank <= VLLM_MAX_LORA_RANK else "ABOVE"
        lines.append(
            f"  vLLM: --enable-lora --max-lora-rank {_vllm_rank(self.rank)} (default {VLLM_DEFAULT_LORA_RANK}; "
            f"rank {self.rank} is {cap} vLLM's cap of {VLLM_MAX_LORA_RANK}"
            + (": pass --rank to truncate)" if self.rank > VLLM_MAX_LORA_RANK else ")")
        )
        return "\n".join(lines)


def _vllm_rank(rank: int) -> int:
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


Exact = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # the dense delta, or (u, v) with Δ = u v


def exact_delta(delta: PackedDelta) -> Exact:
    """The delta exactly, in float64, in the smallest form that holds it: the dense ``out x in`` matrix where it is
    full rank (DARE values or sign bits), else ``(u, v)`` with ``Δ = u v`` (``u`` = each band's ``U S``, ``out x r``;
    ``v`` its ``Vᵀ``, ``r x in``; ``r = 0`` without bands)."""
    if delta.full_rank:
        return delta.delta_weight(torch.float64)
    bands = delta.low_rank_bands
    u = [b.ut_dense(torch.float64).t() * b.s.to(torch.float64) for b in bands]
    v = [b.vt_dense(torch.float64) for b in bands]
    empty = torch.zeros(0, dtype=torch.float64)
    return (torch.cat(u, dim=1) if u else empty.new_zeros(delta.out_features, 0),
            torch.cat(v, dim=0) if v else empty.new_zeros(0, delta.in_features))  # fmt: skip


@torch.no_grad()
def lora_factors(
    delta: PackedDelta, rank: Optional[int] = None, exact: Optional[Exact] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, S)`` in float64 with ``B @ A`` the best rank-``rank`` approximation of the delta (exact without
    ``rank``): ``A`` is ``k x in``, ``B`` is ``out x k``, ``S`` all singular values of the delta (length ``r``).

    Bands alone are factored through their ranks (no ``out x in`` matrix). A delta with DARE values or sign bits is
    full rank: the SVD of its dense matrix, ``min(out, in)`` singular vectors when exact. ``exact``: the delta's
    :func:`exact_delta` where the caller has it already."""
    exact = exact_delta(delta) if exact is None else exact
    if isinstance(exact, torch.Tensor):
        x, s, yt = torch.linalg.svd(exact, full_matrices=False)
    elif not exact[0].shape[1]:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty.new_zeros(0, delta.in_features), empty.new_zeros(delta.out_features, 0), empty
    else:
        u, v = exact
        qu, ru = torch.linalg.qr(u)  # u = qu ru
        qv, rv = torch.linalg.qr(v.t())  # vᵀ = qv rv, so Δ = qu (ru rvᵀ) qvᵀ
        x, s, yt = torch.linalg.svd(ru @ rv.t())
        x, yt = qu @ x, yt @ qv.t()
    k = len(s) if rank is None else min(rank, len(s))
    root = s[:k].sqrt()
    return root[:, None] * yt[:k], x[:, :k] * root, s


def _relative_error2(a: torch.Tensor, b: torch.Tensor, exact: Exact) -> tuple[float, float]:
    """``(||b a − Δ||², ||Δ||²)`` against the delta's :func:`exact_delta`; from the factors (no ``out x in``
    matrix) where that is bands alone."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    if isinstance(exact, torch.Tensor):
        return float(((b @ a - exact) ** 2).sum()), float((exact**2).sum())
    u, v = exact
    norm2 = float(torch.trace((u.t() @ u) @ (v @ v.t())))
    approx2 = float(torch.trace((b.t() @ b) @ (a @ a.t())))
    cross = float(torch.trace((b.t() @ u) @ (v @ a.t())))
    return max(approx2 - 2 * cross + norm2, 0.0), norm2


def export_lora(
    adapter: PathLike,
    output: PathLike,
    *,
    rank: Optional[int] = None,
    dtype: str = "float16",
    drop_extras: bool = False,
    base: Optional[PathLike] = None,
    overwrite: bool = False,
) -> LoraExport:
    """Write the LoRA form of the Delta-CoMe ``adapter`` (folder or Hub id) to ``output``.

    ``rank`` caps every module's rank (truncated SVD; ``None`` keeps each module's full rank, exact up to
    ``dtype``). With ``base`` (folder or Hub id) the LoRA and the adapter are also run on it and their relative
    logits error is reported.
    """
    from peft import LoraConfig

    from ..io.summary import summarize_adapter

    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {rank}")
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out = check_new_output(output, [("adapter", adapter), ("base", base)], overwrite=overwrite)
    check_output_folder(out, {"adapter": adapter, "--base": base})  # a LoRA is an adapter: never beside a model
    folder = local_adapter_folder(adapter)
    config, state = read_adapter(folder)
    fused = (config.compression_info or {}).get("fused_experts")
    if fused:
        raise ConfigError(
            f"{folder}: the adapter compresses the fused mixture-of-experts weights of {fused[0]}"
            f"{f' and {len(fused) - 1} more' if len(fused) > 1 else ''} one linear per expert; a PEFT LoRA cannot "
            "target single experts of the fused 3-D weights: merge the adapter into the base instead (`deltacome merge`)"
        )
    torch_dtype = _DTYPES[dtype]

    tensors: dict[str, torch.Tensor] = {}
    ranks, full_ranks, errors = {}, {}, {}
    total_err2 = total_norm2 = 0.0
    with_bias = {name for name, entry in config.layout.items() if entry.get("bias")}
    for name in sorted(config.layout):
        delta = packed_delta(config, state, name)  # DARE values and sign bits: the SVD of the dense delta
        exact = exact_delta(delta)  # built once for the factors and their error
        a, b, s = lora_factors(delta, rank, exact)
        full_ranks[name] = len(s)
        if a.shape[0] == 0:
            if name not in with_bias:
                continue  # nothing changed here
            a, b = a.new_zeros(1, delta.in_features), b.new_zeros(delta.out_features, 1)
        a, b = a.to(torch_dtype).contiguous(), b.to(torch_dtype).contiguous()
        err2, norm2 = _relative_error2(a, b, exact) if len(s) else (0.0, 0.0)
        total_err2, total_norm2 = total_err2 + err2, total_norm2 + norm2
        errors[name] = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
        ranks[name] = a.shape[0]
        key = f"{STATE_DICT_PREFIX}{name}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
        if with_bias:
            bias = delta.bias if delta.bias is not None else torch.zeros(delta.out_features)
            tensors[f"{key}.lora_B.bias"] = bias.to(torch_dtype).contiguous()
    if not ranks:
        raise ConfigError(f"{folder}: the adapter has no low-rank module to export")

    extras = sorted(config.modules_to_save or [])
    if not drop_extras:
        for key, t in state.items():
            if DELTA_MARKER not in key:  # dense extras are stored under PEFT's modules_to_save keys already
                tensors[key] = t.contiguous()
    top = max(ranks.values())
    pattern = {n: r for n, r in ranks.items() if r != top}
    lora_config = LoraConfig(
        r=top,
        lora_alpha=top,  # scaling alpha / r = 1: the factors carry the whole delta
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        modules_to_save=None if drop_extras or not extras else extras,
        lora_bias=bool(with_bias),
        fan_in_fan_out=bool(config.compression_info.get("fan_in_fan_out")),  # targets are Conv1D (GPT-2), in x out
        lora_dropout=0.0,
        base_model_name_or_path=config.base_model_name_or_path,
        task_type=config.task_type,
    )
    source_bytes = summarize_adapter(folder).file_bytes

    def fill(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config.to_dict().items()}
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_card(config, folder, adapter, top, dtype, drop_extras))

    write_folder(out, fill, stale=["README.md"])
    worst = max(errors.items(), key=lambda kv: kv[1])
    report = LoraExport(
        path=out,
        rank=top,
        ranks=ranks,
        full_ranks=full_ranks,
        weight_error=math.sqrt(total_err2 / total_norm2) if total_norm2 > 0 else 0.0,
        worst_module=worst,
        lora_bytes=(out / ADAPTER_WEIGHTS_NAME).stat().st_size,
        adapter_bytes=source_bytes,
        dtype=dtype,
        extras=extras,
        extras_dropped=drop_extras,
        lora_bias=bool(with_bias),
    )
    if base is not None:
        report.logits_error = lora_logits_error(base, folder, out)
    return report


@torch.no_grad()
def lora_logits_error(base: PathLike, adapter: PathLike, lora: PathLike, *, num: int = 4, seq_len: int = 64) -> float:
    """``||L_lora − L_adapter|| / ||L_adapter − L_base||`` on ``num x seq_len`` random tokens (seed 0)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.fspath(base), dtype=torch.float32).eval()
    fresh = copy.deepcopy(model)  # the LoRA goes onto a base of its own: ours is injected into `model` in place
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (num, seq_len), generator=g)
    base_logits = model(input_ids=ids).logits.double()
    ours_logits = PeftModel.from_pretrained(model, os.fspath(adapter))(input_ids=ids).logits.double()
    del model
    lora = PeftModel.from_pretrained(fresh, os.fspath(lora))
    lora_logits = lora(input_ids=ids).logits.double()
    return float((lora_logits - ours_logits).norm() / (ours_logits - base_logits).norm().clamp_min(1e-30))


def _card(config: Any, folder: Path, adapter: PathLike, rank: int, dtype: str, dropped: bool) -> str:
    base = config.base_model_name_or_path or "the base model"
    extras = "dense extras left out (--drop-extras)" if dropped else "dense extras as `modules_to_save`"
    return (
        f"---\nbase_model: {base}\nlibrary_name: peft\ntags: [lora, deltacome]\n---\n\n"
        f"# LoRA export of a Delta-CoMe adapter\n\n"
        f"Exported by hf-deltacome from `{os.fspath(adapter)}` ({config.method}, ratio {config.ratio:g}): "
        f"rank up to {rank}, {dtype} factors, {extras}. Loads with plain PEFT:\n\n"
        "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, PATH)\n```\n"
    )
