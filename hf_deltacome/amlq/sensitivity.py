"""What the allocation needs to know about each decoder linear, measured once per model and calibration set.

* :func:`measure_sensitivity` walks the decoder layers once on calibration activations of the full-precision model
  (:func:`~hf_deltacome.compression.layerwalk.walk_layers`, Hessians from the one
  :class:`~hf_deltacome.quant.hessian.HessianCollector`). For each set of linears sharing an input (q/k/v,
  gate/up) one GPTQ pass per group size quantizes the stacked weights at every candidate bit width at once (GPTQ
  rows are independent given the Hessian); the per-entry GPTQ errors are split by column unit and scaled to the
  exact output error ``tr(E H Eᵀ)``; the share of that error each candidate rank would remove is measured too.
* :func:`measure_end_to_end` gives each linear its *end-to-end curve*: the next-token KL divergence of the whole
  model from the full-precision one when only that linear is round-to-nearest quantized, at two probe precisions
  (3 and 2 bits), against the probe's normalized error ``tr(E H Eᵀ) / tr(W H Wᵀ)``. Per-linear normalized errors
  are a poor guide on their own: a q/k projection with a small relative error can move attention far more than a
  v projection with a large one, and 2 bits hurt more than 3 bits predict. Each probe runs only the layers from
  the probed one on (their full-precision inputs are cached), so the pass costs about one model forward per linear
  and probe on ``E2E_SAMPLES`` sequences.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..compression.layerwalk import capture_layer_inputs, find_decoder_layers, layer_output, walk_layers
from ..errors import ConfigError
from ..format.amlq_layout import unit_spans
from ..linears import Conv1DAsLinear, on_conv1d_views
from ..progress import progress_bar
from ..quant.hessian import HessianCollector
from ..quant.rtn import quantize_rtn
from .allocation import Sensitivity, candidate_precisions, candidate_ranks
from .config import DEFAULT_DAMP, resolve_damp
from .lowrank import captured_fractions, damped_cholesky

FORWARD_BATCH_SIZE = 8  # calibration sequences per forward pass through one decoder layer
E2E_SAMPLES = 2  # calibration sequences of the end-to-end probes (their fp log-probs are held: tokens x vocabulary)
PROBES = ((3, 128), (2, 128))  # round-to-nearest probe precisions of the end-to-end curve


LINEARS = (nn.Linear, Conv1DAsLinear)  # what AMLQ quantizes: plain linears, and GPT-2's Conv1D under its stand-in


def decoder_linears(model: nn.Module, skip: Sequence[str] | None = None) -> tuple[str, nn.ModuleList, list[list[str]]]:
    """Decoder-layer prefix, the layers, and per layer the names of its linears (model order): ``nn.Linear``, and
    ``Conv1D`` under :func:`~hf_deltacome.linears.conv1d_views` (which the passes of this package run under)."""
    prefix, layers = find_decoder_layers(model)
    per_layer: list[list[str]] = [[] for _ in layers]
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    for name, module in model.named_modules():
        m = pattern.match(name)
        if m and type(module) in LINEARS and not any(name == s or name.endswith("." + s) for s in skip or ()):
            per_layer[int(m.group(1))].append(name)
    if not any(per_layer):
        raise ConfigError(f"{type(model).__name__} has no nn.Linear inside its decoder layers ({prefix}.N)")
    return prefix, layers, per_layer


def layer_hessians(layer: nn.Module, layer_prefix: str, names: Sequence[str], hidden: Any, calls: Any,
                   device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Name -> `GPTQ` accumulator of each linear of ``layer`` on the calibration inputs (shared inputs share one)."""
    modules = {n: layer.get_submodule(n[len(layer_prefix) :]) for n in names}
    with HessianCollector(modules, device=device) as collector:
        for h, (a, k) in zip(hidden, calls, strict=True):
            collector.run(lambda h=h, a=a, k=k: layer(h, *a, **k))
    return dict(collector.hessians)


def shared_groups(names: Sequence[str], hessians: dict[str, Any]) -> list[list[str]]:
    """Names grouped by the Hessian object they share (same input tensor)."""
    groups: dict[int, list[str]] = {}
    for name in names:
        if name in hessians:
            groups.setdefault(id(hessians[name]), []).append(name)
    return list(groups.values())


def trace_error(E: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(E H Eᵀ)`` (output error energy), float64."""
    E = E.to(torch.float64)
    return float(((E @ H.to(device=E.device, dtype=torch.float64)) * E).sum())


@torch.no_grad()
@on_conv1d_views
def measure_sensitivity(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    bits: Sequence[int],
    group_sizes: Sequence[int],
    error_rank: int | str = "auto",
    damp: float | str = DEFAULT_DAMP,
    act_order: bool = True,
    skip: Sequence[str] | None = None,
    device: torch.device | None = None,
    progress: bool = True,
) -> list[Sensitivity]:
    """Per-linear GPTQ errors at every candidate precision and low-rank gains (module docstring). The model is not
    modified. ``damp``: as in :func:`~hf_deltacome.amlq.quantize_model` (``"auto"``: per shared input, from its
    calibration tokens per column), so the errors measured are those the quantization will make. Cost: one GPTQ
    pass per group size per shared input, all bit widths stacked as rows."""
    cands = candidate_precisions(bits, group_sizes)
    unit = max(group_sizes)
    prefix, layers, per_layer = decoder_linears(model, skip)
    out: list[Sensitivity] = []

    def visit(i: int, hidden: Any, calls: Any, work: torch.device) -> None:
        lp = f"{prefix}.{i}."
        hessians = layer_hessians(layers[i], lp, per_layer[i], hidden, calls, work)
        for group in shared_groups(per_layer[i], hessians):
            out.extend(_group_sensitivity(model, group, hessians[group[0]], cands, unit, error_rank, damp, act_order,
                                          work))  # fmt: skip

    walk_layers(model, list(layers), input_ids, visit, batch_size=FORWARD_BATCH_SIZE, device=device,
                progress=progress)  # fmt: skip
    return out


def _group_sensitivity(model: nn.Module, group: list[str], g: Any, cands: list[tuple[int, int]], unit: int,
                       error_rank: int | str, damp: float | str, act_order: bool, work: torch.device) -> list[Sensitivity]:  # fmt: skip
    damp = resolve_damp(damp, g.nsamples, g.H.shape[0])
    C = damped_cholesky(g.H.cpu(), damp)
    Ws = [model.get_submodule(n).weight.detach().to(work, torch.float32) for n in group]
    rows = [w.shape[0] for w in Ws]
    W = torch.cat(Ws)
    spans = unit_spans(W.shape[1], unit)
    errs = {nm: torch.zeros(len(cands), len(spans), dtype=torch.float64) for nm in group}
    ranks = {nm: [r for r in candidate_ranks(tuple(w.shape), error_rank) if r] for nm, w in zip(group, Ws, strict=True)}
    fracs = {nm: torch.zeros(len(cands), len(ranks[nm])) for nm in group}
    for gs in sorted({c[1] for c in cands}):
        here = [(ci, b) for ci, (b, s) in enumerate(cands) if s == gs]
        bands = g.quantize_row_bands(W.repeat(len(here), 1), [(b, W.shape[0]) for _, b in here], gs, damp, act_order)
        entry_err = g.last_errors.to(torch.float64)
        for k, ((ci, _), band) in enumerate(zip(here, bands, strict=True)):
            dq = band.dequantize().to(W.device)
            r0 = 0
            for nm, r, w in zip(group, rows, Ws, strict=True):
                E = (w - dq[r0 : r0 + r]).cpu()
                block = entry_err[k * W.shape[0] + r0 : k * W.shape[0] + r0 + r]
                per_unit = torch.stack([block[:, s:e].sum() for s, e in spans])
                exact = trace_error(E, g.H.cpu())
                errs[nm][ci] = per_unit * (exact / max(float(per_unit.sum()), 1e-300))
                if ranks[nm] and cands[ci][0] < 8:
                    fracs[nm][ci] = torch.tensor(captured_fractions(E, C, ranks[nm]))
                r0 += r
    return [Sensitivity(name=nm, shape=tuple(w.shape), unit=unit, candidates=list(cands), unit_errors=errs[nm],
                        signal=trace_error(w.cpu(), g.H.cpu()), ranks=ranks[nm],
                        rank_fractions=fracs[nm] if ranks[nm] else None)
            for nm, w in zip(group, Ws, strict=True)]  # fmt: skip


class _Replay(nn.Module):
    """Stands in for the decoder layers before the probed one: returns the cached input of the probed layer."""

    def __init__(self, layer: nn.Module, output: torch.Tensor | None) -> None:
        super().__init__()
        object.__setattr__(self, "_wrapped", layer)
        object.__setattr__(self, "_output", output)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self._output is None else self._output

    def __getattr__(self, name: str) -> Any:  # attributes the model loop reads, e.g. attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)


@torch.no_grad()
@on_conv1d_views
def measure_end_to_end(
    model: nn.Module,
    input_ids: torch.Tensor,
    sensitivities: Sequence[Sensitivity],
    *,
    num_samples: int = E2E_SAMPLES,
    probes: Sequence[tuple[int, int]] = PROBES,
    progress: bool = True,
) -> None:
    """Fill each `Sensitivity.curve` with ``(normalized error, KL)`` of every probe (module docstring).

    Normalized errors use Hessians from every calibration sequence; the KL (mean over tokens of
    ``KL(full precision || probed)`` for the next token) uses the first ``num_samples``. The model is restored.
    """
    by_name = {s.name: s for s in sensitivities}
    prefix, layers, per_layer = decoder_linears(model)
    ids = input_ids[:num_samples]
    device = next(model.parameters()).device
    rel: dict[str, list[float]] = {}

    def visit(i: int, hidden: Any, calls: Any, work: torch.device) -> None:
        names = [n for n in per_layer[i] if n in by_name]
        hessians = layer_hessians(layers[i], f"{prefix}.{i}.", names, hidden, calls, work)
        for name in names:
            W = model.get_submodule(name).weight.detach().float()
            H, signal = hessians[name].H, max(trace_error(W, hessians[name].H), 1e-30)
            rel[name] = [trace_error(W - quantize_rtn(W, b, g).dequantize().to(W.device), H) / signal for b, g in probes]

    walk_layers(model, list(layers), input_ids, visit, batch_size=FORWARD_BATCH_SIZE, device=None, progress=False)
    hidden, calls = capture_layer_inputs(model, layers, ids, len(ids), None)
    inputs = []  # the full-precision input of every layer on the probe sequences
    h = hidden[0]
    for i, layer in enumerate(layers):
        inputs.append(h)
        a, k = calls[i][0]
        h = layer_output(layer(h, *a, **k))
    del hidden, calls

    def log_probs() -> torch.Tensor:
        return torch.log_softmax(model(input_ids=ids.to(device), use_cache=False).logits.float(), -1)

    ref = log_probs()
    p_ref = ref.exp()
    originals = list(layers)
    total = sum(len(n) for n in per_layer)
    bar = progress_bar(total * len(probes), progress, "AMLQ end-to-end probes", unit="probe")
    try:
        for i, names in enumerate(per_layer):
            for j in range(i):  # layers before i replay their cached output: only layers i.. run
                layers[j] = _Replay(originals[j], inputs[i] if j == i - 1 else None)
            for name in (n for n in names if n in by_name):
                lin = model.get_submodule(name)
                original = lin.weight.data
                curve = []
                try:
                    for (b, g), e in zip(probes, rel[name], strict=True):
                        lin.weight.data = quantize_rtn(original.float(), b, g).dequantize().to(original)
                        kl = float((p_ref * (ref - log_probs())).sum(-1).mean())
                        curve.append((e, max(kl, 1e-12)))
                        bar.update(1)
                finally:
                    lin.weight.data = original
                by_name[name].curve = sorted(curve)
    finally:
        for j, layer in enumerate(originals):
            layers[j] = layer
        bar.close()
