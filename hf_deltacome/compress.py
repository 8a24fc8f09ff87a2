"""``compress(base, finetuned, config)``: build a Delta-CoMe adapter from a fine-tune and its base.

Steps:

1. check the pair (architecture, module names, parameter shapes, vocabulary) and the config;
2. pick the target linears and plan each one's layout from the byte budget (``methods.plan_layouts``: the method,
   band-split search and adaptive allocation of the config; plain Delta-CoMe is :func:`budget.solve_ranks`);
3. every other parameter that changed (norms, embeddings, lm_head, ...) goes dense into ``modules_to_save``;
4. wrap the base with PEFT, then walk the decoder layers one at a time (GPTQ-style sequential): collect each target's
   input Hessian by running the fine-tuned layer on the compressed model's hidden states, compress each delta
   (:func:`compress_linear`: SVD, bands, GPTQ of ``Vᵀ`` then of ``U``; other methods via ``methods.compress_module``)
   and run the now-compressed layer to get the next layer's inputs. With ``quantizer="rtn"`` no data is used.

Peak memory is about base + fine-tune + one layer's activations.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, CalibrationSource, get_calibration
from .config import DeltaCoMeConfig
from .errors import ConfigError, DeltaCoMeError, IncompatibleModelsError
from .gptq import GPTQ
from .methods import svd as _svd
from .packing import QuantizedMatrix, quantize_rtn

FORWARD_BATCH_SIZE = 8  # calibration sequences per forward pass through one decoder layer
_MAX_LISTED = 20


# ================================================================================ per-module math


@torch.no_grad()
def compress_linear(
    delta: torch.Tensor,
    hessian: torch.Tensor | None,
    bands: Sequence[Sequence[int]],
    group_size: int,
    *,
    quantizer: str = "gptq",
    damp: float = 0.01,
    act_order: bool = False,
    refit_u: bool = True,
    name: str = "",
) -> list[tuple[QuantizedMatrix, QuantizedMatrix, torch.Tensor]]:
    """Compress one ``m x n`` delta into ``[(V_kᵀ, U_k, S_k), ...]``, one entry per band of non-zero rank.

    ``Δ = U S Vᵀ`` (SVD); the singular triplets are split into ``bands`` (``[(bits, rank), ...]``, largest singular
    values first). With ``quantizer="gptq"`` and an input Hessian ``H`` (``n x n``), all bands of ``Vᵀ`` are quantized
    in one GPTQ pass against ``H``; then ``U`` is quantized (bands = column segments) against the Hessian of its own
    input ``z = S V_qᵀ x``, i.e. ``A H Aᵀ`` with ``A = diag(S) V_qᵀ``. With ``refit_u`` the target for ``U`` is first
    re-solved by least squares, ``U* = Δ H Aᵀ (A H Aᵀ)⁻¹`` (ridge-damped towards the SVD's ``U``), so that ``U``
    absorbs the error of ``V_q``; then GPTQ on ``U*`` minimises the whole module's output error ``||(Δ − U_q A) X||``
    (the least-squares residual is orthogonal to what ``U`` can change). Without a Hessian (or with
    ``quantizer="rtn"``) both factors are rounded to nearest.
    """
    if delta.dim() != 2:
        raise DeltaCoMeError(f"delta of {name or 'module'} must be a matrix, got shape {tuple(delta.shape)}")
    m, n = delta.shape
    bands = [(int(b), int(r)) for b, r in bands]
    total = sum(r for _, r in bands)
    if total > min(m, n):
        raise ConfigError(f"layout of {name or 'module'}: total rank {total} exceeds min({m}, {n})")
    live = [(b, r) for b, r in bands if r > 0]
    if not live:
        return []
    if quantizer not in ("gptq", "rtn"):
        raise ConfigError(f"unknown quantizer {quantizer!r}; choose 'gptq' or 'rtn'")
    d = delta.to(torch.float32)
    U, S, Vh = _svd(d)  # cached inside methods.reuse_svd() (search, benchmarks compressing one delta many times)
    U, S, Vh = U[:, :total], S[:total], Vh[:total]
    use_gptq = quantizer == "gptq" and hessian is not None
    if use_gptq and tuple(hessian.shape) != (n, n):
        raise DeltaCoMeError(f"Hessian of {name or 'module'} has shape {tuple(hessian.shape)}, expected ({n}, {n})")

    if use_gptq:
        H = hessian.to(device=d.device, dtype=torch.float64)
        v_parts = GPTQ.from_hessian(H, name=f"{name} V").quantize_row_bands(Vh, live, group_size, damp, act_order)
        Vq = torch.cat([q.dequantize().to(d.device) for q in v_parts])
        A = S.to(torch.float64).unsqueeze(1) * Vq.to(torch.float64)  # r x n
        AH = A @ H
        Hz = AH @ A.t()  # Hessian of z = A x
        Hz = (Hz + Hz.t()) / 2
        target = U
        if refit_u:
            target = _least_squares_u(d.to(torch.float64), U.to(torch.float64), AH, Hz, damp)
            if target is None:
                target = U
        u_parts = GPTQ.from_hessian(Hz, name=f"{name} U").quantize_column_bands(
            target.to(torch.float32), live, group_size, damp, act_order=False
        )
    else:
        v_parts, u_parts = [], []
        start = 0
        for b, r in live:
            v_parts.append(quantize_rtn(Vh[start : start + r], b, group_size))
            u_parts.append(quantize_rtn(U[:, start : start + r], b, group_size))
            start += r
    out = []
    start = 0
    for (_, r), vq, uq in zip(live, v_parts, u_parts, strict=True):
        out.append((vq, uq, S[start : start + r].to(torch.float32).cpu()))
        start += r
    return out


def _least_squares_u(
    delta: torch.Tensor, u0: torch.Tensor, AH: torch.Tensor, Hz: torch.Tensor, damp: float
) -> torch.Tensor | None:
    """``argmin_U ||(Δ − U A) X||² + λ ||U − U₀||²`` = ``(Δ H Aᵀ + λ U₀)(A H Aᵀ + λI)⁻¹``; None if singular.

    The ridge pulls towards the SVD factor ``U₀`` (not towards zero), so damping never shrinks the delta;
    ``λ = damp · mean(diag(A H Aᵀ))`` as in GPTQ.
    """
    reg = Hz.clone()
    mean_diag = float(torch.diagonal(reg).mean())
    if not mean_diag > 0:
        return None
    lam = max(damp, 1e-6) * mean_diag
    torch.diagonal(reg).add_(lam)
    L, info = torch.linalg.cholesky_ex(reg)
    if int(info) != 0:
        return None
    rhs = delta @ AH.t() + lam * u0  # m x r
    sol = torch.cholesky_solve(rhs.t(), L).t()
    return sol if bool(torch.isfinite(sol).all()) else None


# ================================================================================ checks


def check_compatible(base: nn.Module, finetuned: nn.Module) -> None:
    """Raise `IncompatibleModelsError` listing every difference that makes ``finetuned − base`` meaningless."""
    problems: list[str] = []
    for role, model in (("base", base), ("fine-tuned", finetuned)):
        if _is_peft(model):
            raise IncompatibleModelsError(
                f"the {role} model is already a PEFT model ({type(model).__name__}); pass the plain transformers model"
            )
    if type(base) is not type(finetuned):
        problems.append(f"model class: base is {type(base).__name__}, fine-tuned is {type(finetuned).__name__}")
    cb, cf = getattr(base, "config", None), getattr(finetuned, "config", None)
    for attr in ("model_type", "architectures"):
        vb, vf = getattr(cb, attr, None), getattr(cf, attr, None)
        if vb is not None and vf is not None and vb != vf:
            problems.append(f"config.{attr}: base {vb!r}, fine-tuned {vf!r}")
    vb, vf = _vocab(base), _vocab(finetuned)
    if vb != vf:
        problems.append(f"vocabulary size: base {vb}, fine-tuned {vf}")
    mb = {n: type(m).__name__ for n, m in base.named_modules()}
    mf = {n: type(m).__name__ for n, m in finetuned.named_modules()}
    pb = dict(base.named_parameters(remove_duplicate=False))
    pf = dict(finetuned.named_parameters(remove_duplicate=False))
    for n in sorted(set(pb) & set(pf)):
        if pb[n].shape != pf[n].shape:
            problems.append(f"parameter {n!r}: base shape {tuple(pb[n].shape)}, fine-tuned shape {tuple(pf[n].shape)}")
    for n in sorted(set(mb) & set(mf)):
        if mb[n] != mf[n]:
            problems.append(f"module {n!r}: base is {mb[n]}, fine-tuned is {mf[n]}")

    def parent(name: str) -> str:
        return name.rpartition(".")[0]

    # a missing module is reported once, not with everything inside it
    for mine, other, where in ((mb, mf, "base"), (mf, mb, "fine-tuned model")):
        for n in sorted(set(mine) - set(other)):
            if parent(n) in other:
                problems.append(f"module {n!r} ({mine[n]}) is only in the {where}")
    for mine, other, mods, where in ((pb, pf, mf, "base"), (pf, pb, mb, "fine-tuned model")):
        for n in sorted(set(mine) - set(other)):
            if parent(n) in mods:
                problems.append(f"parameter {n!r} {tuple(mine[n].shape)} is only in the {where}")
    if problems:
        shown = problems[:_MAX_LISTED]
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise IncompatibleModelsError(
            f"the base and fine-tuned models do not match ({len(problems)} difference(s)):\n  "
            + "\n  ".join(shown)
            + more
        )


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, (PeftModel, BaseTuner))


def _vocab(model: nn.Module) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    return getattr(getattr(model, "config", None), "vocab_size", None)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and `nn.ModuleList` of the decoder layers (the list of ``num_hidden_layers`` blocks)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    n_layers = getattr(cfg, "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers)
    ]
    if not candidates:
        raise ConfigError(f"cannot find the decoder layers of {type(model).__name__} (no list of transformer blocks)")
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, nn.Module) and decoder is not model:  # a VLM: never the vision tower's layers
        own = {id(m) for m in decoder.modules()}
        candidates = [c for c in candidates if id(c[1]) in own] or candidates
    preferred = [c for c in candidates if re.search(r"(^|\.)(layers|h|blocks|layer)$", c[0])]
    name, layers = (preferred or candidates)[0]
    return name, layers


def _matches(name: str, patterns: str | set | list | None) -> bool:
    """PEFT ``target_modules`` semantics: a string is a regex (full match), a list matches exact names/suffixes."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def select_targets(model: nn.Module, config: DeltaCoMeConfig) -> tuple[str, list[str]]:
    """The decoder-layers prefix and the names of the target linears (default: every linear inside the layers)."""
    prefix, _ = find_decoder_layers(model)
    inside = re.compile(re.escape(prefix) + r"\.\d+\.")
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    in_layers = [n for n in linears if inside.match(n)]
    if config.target_modules is None:
        targets = in_layers
    else:
        matched = sorted(n for n in linears if _matches(n, config.target_modules))
        if not matched:
            available = sorted({n.rsplit(".", 1)[-1] for n in in_layers})
            raise ConfigError(
                f"target_modules={_show(config.target_modules)} matches no nn.Linear of {type(model).__name__}; "
                f"the decoder linears are named {available}"
            )
        outside = [n for n in matched if not inside.match(n)]
        if outside:
            raise ConfigError(
                f"target_modules={_show(config.target_modules)} selects {outside[:5]}, which are outside the decoder "
                f"layers ({prefix}.N); only decoder linears can be compressed (other changed modules are stored dense)"
            )
        targets = matched
    if config.exclude_modules is not None:
        targets = [n for n in targets if not _matches(n, config.exclude_modules)]
    if not targets:
        raise ConfigError("no target linear left to compress after exclude_modules")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return prefix, sorted(targets, key=order.__getitem__)


def _show(patterns: Any) -> str:
    return repr(sorted(patterns)) if isinstance(patterns, (set, list, tuple)) else repr(patterns)


# ================================================================================ dense extras


def changed_modules(base: nn.Module, finetuned: nn.Module, targets: Sequence[str]) -> tuple[list[str], dict[str, bool]]:
    """Modules (other than the targets) with a parameter that differs, and which targets' biases changed.

    Tied parameters are visited under every name, so a changed tied embedding lists both the embedding and the
    output layer (each gets its own dense copy, which keeps the result right whether or not PEFT re-ties them).
    """
    tset = set(targets)
    pb = dict(base.named_parameters(remove_duplicate=False))
    changed: list[str] = []
    bias_changed: dict[str, bool] = {}
    for pname, pf in finetuned.named_parameters(remove_duplicate=False):
        owner, _, leaf = pname.rpartition(".")
        same = torch.equal(pb[pname].detach().cpu(), pf.detach().cpu()) if pb[pname].shape == pf.shape else False
        if owner in tset:
            if leaf == "bias":
                bias_changed[owner] = not same
            continue
        if not same and owner not in changed:
            changed.append(owner)
    # a changed module inside another changed module is carried by the outer one's dense copy (PEFT cannot nest
    # modules_to_save; e.g. CLIP's vision embeddings own class_embedding and hold the changed patch/position ones)
    changed = [n for n in changed if not any(p and n.startswith(p + ".") for p in changed)]
    for name in changed:
        inner = [t for t in targets if t.startswith(name + ".")] if name else list(targets)
        if inner:
            raise ConfigError(
                f"parameter(s) owned directly by module {name!r} changed, but that module contains target linears "
                f"({inner[0]}, ...); it cannot be stored dense. Narrow target_modules or exclude it."
            )
    return changed, bias_changed


# ================================================================================ layer walk helpers


class _StopForward(Exception):
    """Raised by the last layer's recorder: nothing after the decoder layers (final norm, lm_head) is needed."""


class _LayerRecorder(nn.Module):
    """Stands in for a decoder layer during one forward pass: records its inputs, returns them unchanged."""

    def __init__(self, layer: nn.Module, store: list, last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_wrapped", layer)
        object.__setattr__(self, "_store", store)
        object.__setattr__(self, "_last", last)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._store.append((hidden_states, args, kwargs))
        if self._last:
            raise _StopForward
        return hidden_states

    def __getattr__(self, name: str) -> Any:  # attributes the model loop reads, e.g. attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _capture_layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    ids: torch.Tensor | Sequence[dict[str, torch.Tensor]],
    batch_size: int,
    device: torch.device | None,
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Hidden states entering layer 0 and the ``(args, kwargs)`` each layer is called with, per calibration batch.

    The layers are swapped for recorders that pass hidden states through untouched (the last one stops the forward
    pass), so this costs only the embedding stage; every layer's own call arguments are kept (models may give
    layers different masks). ``ids`` is a token-id tensor, or a list of ready input batches (``input_ids``,
    ``pixel_values``, ...) for vision-language models, which then run their whole forward up to the first layer.
    """
    stores: list[list] = [[] for _ in layers]
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _LayerRecorder(layer, stores[i], last=i == len(originals) - 1)
    emb_device = next(model.get_input_embeddings().parameters()).device
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    try:
        batches = ids.split(batch_size) if isinstance(ids, torch.Tensor) else ids
        for batch in batches:
            for s in stores:
                s.clear()
            inputs = {"input_ids": batch} if isinstance(batch, torch.Tensor) else batch
            try:
                model(**_to(inputs, emb_device), use_cache=False)
            except _StopForward:
                pass
            if not all(stores):
                raise DeltaCoMeError(f"{type(model).__name__} did not call its decoder layers during a forward pass")
            h = stores[0][0][0]
            hidden.append(h if device is None else h.to(device))
            for li, s in enumerate(stores):
                _, args, kwargs = s[0]
                calls[li].append((args, kwargs) if device is None else (_to(args, device), _to(kwargs, device)))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return hidden, calls


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


# ================================================================================ main entry


def compress(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    config: DeltaCoMeConfig | None = None,
    *,
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    adapter_name: str = "default",
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    processor: Any = None,
) -> Any:
    """Compress ``finetuned_model − base_model`` into a Delta-CoMe adapter and return the ``PeftModel`` (eval mode).

    ``base_model`` is wrapped in place (as with ``get_peft_model``); ``finetuned_model`` is only read.

    Args:
        config: how to compress (ratio, bands, quantizer, ...); a copy is filled with the per-module layout.
        calibration: texts (list, ``.txt``, ``.jsonl``) or a token-id tensor for GPTQ; ``None`` samples text from
            the fine-tune itself. Ignored with ``config.quantizer == "rtn"`` (data-free).
        tokenizer: needed to tokenize calibration texts; used for chat-templated prompts when sampling.
        num_samples, seq_len: size of the calibration batch.
        device: where each decoder layer is moved for its work (default: CUDA when available, else where it is);
            results stay on the base model's device and dtype.
        progress: show a progress bar over the decoder layers.
        seed: seed of calibration sampling.
        checkpoint_dir: folder where each finished decoder layer (and the calibration tokens) is checkpointed;
            a later call with the same folder and inputs skips finished layers and gives the same result.
        processor: for vision-language models (LLaVA-style; see ``multimodal.py``), the base model's processor;
            needed for image + text calibration records (``{"image": ..., "text": ...}``), which then run through the
            whole model. Without images a VLM is calibrated on text only; the choice is logged and recorded in
            ``compression_info["calibration_kind"]``. A processor passed as ``tokenizer=`` is recognised too.
    """
    import peft
    import transformers
    from peft import get_peft_model

    from . import __version__
    from .layer import DeltaCoMeLayer
    from .methods import compress_module, distill_sign_scales, plan_layouts
    from .multimodal import (
        check_vlm_compatible,
        collect_outside_hessians,
        get_vlm_calibration,
        is_vlm,
        outside_layer_targets,
        select_vlm_targets,
    )

    t0 = time.time()
    config = copy.deepcopy(config) if config is not None else DeltaCoMeConfig()
    if not isinstance(config, DeltaCoMeConfig):
        raise ConfigError(f"config must be a DeltaCoMeConfig, got {type(config).__name__}")
    vlm = not _is_peft(base_model) and not _is_peft(finetuned_model) and is_vlm(base_model)
    if vlm:  # projector / image-wiring mismatches get their own message
        check_vlm_compatible(base_model, finetuned_model)
    check_compatible(base_model, finetuned_model)
    if vlm:  # language-model and projector linears, and the vision tower's when it changed
        prefix, targets = select_vlm_targets(base_model, finetuned_model, config)
    else:
        prefix, targets = select_targets(base_model, config)
    extras, bias_changed = changed_modules(base_model, finetuned_model, targets)

    user_extras = list(config.modules_to_save or [])
    config.modules_to_save = sorted(set(user_extras) | set(extras)) or None
    config.base_model_name_or_path = getattr(base_model, "name_or_path", None) or config.base_model_name_or_path
    if config.task_type is None and type(finetuned_model).__name__.endswith("ForCausalLM"):
        config.task_type = "CAUSAL_LM"
    config.inference_mode = True
    _set_fingerprint(config, base_model)

    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else None
    device = torch.device(device) if device is not None else None

    # calibration comes from the fine-tune before the base is wrapped, so a failure leaves the base untouched
    ckpt = LayerCheckpoint(checkpoint_dir, config, adapter_name) if checkpoint_dir is not None else None
    calib = None
    if config.quantizer == "gptq":
        calib = ckpt.load_calibration() if ckpt is not None and not vlm else None
        if calib is None and vlm:  # image + text pairs when given, text otherwise (logged)
            calib = get_vlm_calibration(
                calibration, finetuned_model, tokenizer, processor, num_samples, seq_len, seed, FORWARD_BATCH_SIZE
            )
        elif calib is None:
            calib = get_calibration(
                calibration, finetuned_model, tokenizer, num_samples, seq_len, seed, progress=progress
            )
            if ckpt is not None:
                ckpt.save_calibration(calib)

    # per-module layouts from the byte budget (method, band-split search and adaptive allocation: methods.py)
    layout, plan_info = plan_layouts(
        base_model,
        finetuned_model,
        targets,
        config,
        calibration_ids=calib.input_ids if calib is not None else None,
        bias_changed=bias_changed,
        progress=progress,
    )
    config.layout = layout

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*")
        peft_model = get_peft_model(base_model, config, adapter_name=adapter_name)
    inner = peft_model.base_model.model
    _copy_dense_extras(inner, finetuned_model, config.modules_to_save or [], adapter_name)

    _, layers = find_decoder_layers(inner)
    ft_layers = finetuned_model.get_submodule(prefix)
    fallbacks: list[str] = []

    def fill(name: str, delta: torch.Tensor, hessian: torch.Tensor | None) -> None:
        entry = layout[name]
        module = inner.get_submodule(name)
        assert isinstance(module, DeltaCoMeLayer)
        packed = module.deltacome_delta[adapter_name]
        compress_module(delta, hessian, entry, config, name=name).fill(packed)
        if packed.bias is not None:
            fb = finetuned_model.get_submodule(name).bias
            bb = module.get_base_layer().bias
            packed.bias.copy_((fb.detach().float().cpu() - bb.detach().float().cpu()).to(packed.bias.device))

    # a VLM's projector and vision-tower targets run before the decoder layers: compress them first (GPTQ with the
    # fine-tune's activations on image + text calibration, else round-to-nearest), so layer 0 sees their result
    outside = outside_layer_targets(inner, targets) if vlm else []
    if outside:
        with_images = calib is not None and getattr(calib, "has_images", False)
        hess = collect_outside_hessians(finetuned_model, outside, calib.batches, device) if with_images else {}
        for name in outside:
            g = hess.get(name)
            fill(
                name,
                _delta(inner, finetuned_model, name, device or _module_device(inner.get_submodule(name))),
                g.H if g is not None else None,
            )
            if g is None and calib is not None:
                why = "no image in the calibration data" if not with_images else "no activations"
                fallbacks.append(f"{name}: {why} (round-to-nearest)")
        del hess

    layer_targets = [[t for t in targets if t.startswith(f"{prefix}.{i}.")] for i in range(len(layers))]
    bar = _progress(len(layers), progress, "Compressing layers")

    def resumed(i: int, names: Sequence[str]) -> bool:
        return ckpt is not None and ckpt.load_layer(i, {n: inner.get_submodule(n) for n in names})

    def finished(i: int, names: Sequence[str]) -> None:
        if ckpt is not None:
            ckpt.save_layer(i, {n: inner.get_submodule(n) for n in names})

    if calib is None:
        for i, names in enumerate(layer_targets):
            if not resumed(i, names):
                work = device or _module_device(layers[i])
                for name in names:
                    fill(name, _delta(inner, finetuned_model, name, work), None)
                finished(i, names)
            bar.update(1)
    else:
        batches = calib.batches if vlm else calib.input_ids
        hidden, calls = _capture_layer_inputs(inner, layers, batches, FORWARD_BATCH_SIZE, device)
        for i, names in enumerate(layer_targets):
            layer, ft_layer = layers[i], ft_layers[i]
            home, ft_home = _module_device(layer), _module_device(ft_layer)
            work = device or home
            if device is not None:
                layer.to(device)
                ft_layer.to(device)
            if not resumed(i, names):
                hessians = _collect_hessians(ft_layer, f"{prefix}.{i}.", names, hidden, calls[i], work)
                for name in names:
                    g = hessians.get(name)
                    fill(name, _delta(inner, finetuned_model, name, work), g.H if g is not None else None)
                    if g is None:
                        fallbacks.append(f"{name}: no activations (round-to-nearest)")
                del hessians
                finished(i, names)
            with torch.no_grad():
                hidden = [_layer_output(layer(h, *a, **k)) for h, (a, k) in zip(hidden, calls[i], strict=True)]
            if device is not None:
                layer.to(home)
                ft_layer.to(ft_home)
            bar.update(1)
        del hidden, calls
    bar.close()

    distill: dict[str, Any] = {}
    if config.method == "bitdelta" and config.distill_steps > 0 and calib is not None and calib.input_ids is not None:
        distill = distill_sign_scales(
            peft_model,
            finetuned_model,
            calib.input_ids,
            steps=config.distill_steps,
            adapter_name=adapter_name,
            progress=progress,
        )

    config.compression_info = {
        "calibration": calib.source if calib is not None else "none (round-to-nearest, data-free)",
        "num_samples": calib.num_samples if calib is not None else 0,
        "seq_len": calib.seq_len if calib is not None else 0,
        "seconds": round(time.time() - t0, 2),
        "method": config.method,
        "quantizer": config.quantizer,
        "refit_u": config.quantizer == "gptq" and config.method in ("deltacome", "svd-uniform"),
        "hf_deltacome": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    config.compression_info.update(plan_info)
    if vlm:
        config.compression_info["calibration_kind"] = calib.kind if calib is not None else "none (data-free)"
    if distill:
        config.compression_info["distill"] = distill
    if fallbacks:
        config.compression_info["fallbacks"] = fallbacks
    return peft_model.eval()


class LayerCheckpoint:
    """Per-decoder-layer checkpoints of a running compression, so an interrupted run can resume.

    The folder holds ``state.json`` (what the run compresses: layout-independent config fields and the base
    fingerprint; a resume with other inputs is refused), ``calibration.safetensors`` (the exact token ids, so
    sampled calibration is not drawn again) and ``layer_NNNN.safetensors`` with the packed buffers of each finished
    layer. Every file is written to a temporary name and renamed, so a kill leaves no half-written checkpoint.
    """

    def __init__(self, folder: str | os.PathLike, config: DeltaCoMeConfig, adapter_name: str) -> None:
        self.folder = Path(folder)
        self.adapter_name = adapter_name
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = (
            "ratio", "method", "bands", "min_rank_share", "group_size", "quantizer", "damp", "act_order", "search",
            "allocation",
        )  # fmt: skip
        state = {k: getattr(config, k, None) for k in keys}
        state["target_modules"] = (
            sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
        )
        state["base_fingerprint"] = config.base_fingerprint
        state_path = self.folder / "state.json"
        text = json.dumps(state, sort_keys=True, default=str)
        if state_path.exists():
            if state_path.read_text() != text:
                raise ConfigError(
                    f"checkpoint {self.folder} belongs to a compression with other settings or another base; "
                    "delete it (or pass --overwrite) to start afresh"
                )
        else:
            self._atomic(state_path, lambda tmp: tmp.write_text(text))

    @staticmethod
    def _atomic(path: Path, write: Any) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        write(tmp)
        os.replace(tmp, path)

    def load_calibration(self) -> Any:
        path = self.folder / "calibration.safetensors"
        if not path.exists():
            return None
        from safetensors.torch import load_file

        from .calibration import CalibrationData

        meta = json.loads((self.folder / "calibration.json").read_text())
        return CalibrationData(input_ids=load_file(path)["input_ids"], source=meta["source"] + " (from checkpoint)")

    def save_calibration(self, calib: Any) -> None:
        from safetensors.torch import save_file

        self._atomic(self.folder / "calibration.json", lambda tmp: tmp.write_text(json.dumps({"source": calib.source})))
        self._atomic(
            self.folder / "calibration.safetensors",
            lambda tmp: save_file({"input_ids": calib.input_ids.contiguous()}, str(tmp)),
        )

    def _layer_path(self, i: int) -> Path:
        return self.folder / f"layer_{i:04d}.safetensors"

    def load_layer(self, i: int, modules: dict[str, nn.Module]) -> bool:
        """Fill the packed buffers of layer ``i`` from its checkpoint; False when there is none."""
        path = self._layer_path(i)
        if not path.exists():
            return False
        from safetensors.torch import load_file

        tensors = load_file(path)
        for name, module in modules.items():
            packed = module.deltacome_delta[self.adapter_name]
            for key, buf in packed.state_dict().items():
                stored = tensors.get(f"{name}::{key}")
                if stored is None or stored.shape != buf.shape or stored.dtype != buf.dtype:
                    raise ConfigError(f"checkpoint {path} does not match module {name!r} ({key}); delete it to restart")
                buf.copy_(stored)
        return True

    def save_layer(self, i: int, modules: dict[str, nn.Module]) -> None:
        from safetensors.torch import save_file

        tensors = {
            f"{name}::{key}": buf.detach().cpu().contiguous()
            for name, module in modules.items()
            for key, buf in module.deltacome_delta[self.adapter_name].state_dict().items()
        }
        self._atomic(self._layer_path(i), lambda tmp: save_file(tensors, str(tmp)))


def _set_fingerprint(config: DeltaCoMeConfig, base: nn.Module) -> None:
    from .fingerprint import fingerprint_json

    config.base_fingerprint = fingerprint_json(base)


def _delta(inner: nn.Module, finetuned: nn.Module, name: str, device: torch.device) -> torch.Tensor:
    wb = inner.get_submodule(name).get_base_layer().weight
    wf = finetuned.get_submodule(name).weight
    return wf.detach().to(device, torch.float32) - wb.detach().to(device, torch.float32)


@torch.no_grad()
def _copy_dense_extras(inner: nn.Module, finetuned: nn.Module, names: Sequence[str], adapter_name: str) -> None:
    """Put the fine-tuned values into each ModulesToSaveWrapper's copy for ``adapter_name``."""
    for name in names:
        wrapper = inner.get_submodule(name)
        copies = getattr(wrapper, "modules_to_save", None)
        if copies is None or adapter_name not in copies:
            raise ConfigError(f"modules_to_save entry {name!r} was not wrapped by PEFT")
        target = copies[adapter_name]
        source = finetuned.get_submodule(name)
        src = dict(source.named_parameters(recurse=True, remove_duplicate=False))
        for pname, p in target.named_parameters(recurse=True, remove_duplicate=False):
            if pname in src:
                p.data = src[pname].detach().to(p.device, p.dtype).clone()


@torch.no_grad()
def _collect_hessians(
    ft_layer: nn.Module,
    layer_prefix: str,
    names: Sequence[str],
    hidden: Sequence[torch.Tensor],
    calls: Sequence[tuple[tuple, dict]],
    device: torch.device,
) -> dict[str, GPTQ]:
    """Run the fine-tuned layer on the compressed model's hidden states and build each target's input Hessian.

    Targets fed by the same tensor (q/k/v, gate/up) share one Hessian.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        sub = ft_layer.get_submodule(name[len(layer_prefix) :])

        def hook(_m: nn.Module, inp: tuple, _out: Any, name: str = name) -> None:
            seen[name] = inp[0]

        handles.append(sub.register_forward_hook(hook))
    hessians: dict[str, GPTQ] = {}
    try:
        for h, (a, k) in zip(hidden, calls, strict=True):
            seen.clear()
            ft_layer(h, *a, **k)
            groups: list[tuple[torch.Tensor, list[str]]] = []
            for name, x in seen.items():
                for gx, members in groups:
                    if gx is x:
                        members.append(name)
                        break
                else:
                    groups.append((x, [name]))
            for x, members in groups:
                owner = next((hessians[m] for m in members if m in hessians), None)
                if owner is None:
                    owner = GPTQ(x.shape[-1], device=device, name=members[0])
                owner.add_batch(x.to(device))
                for m in members:
                    hessians[m] = owner
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def _progress(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar (with ETA) over ``total`` steps; silent when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled)
