"""Scale distillation: a compressed adapter's stored scales refined against the fine-tune's next-token distribution.

The codes, masks and layout stay as compression wrote them, so the file's bytes, format and loading path do not
change; only float values already in the file move: BitDelta's sign scales (as published), and with ``bands`` each
band's singular values ``S_k`` and the per-group scales of ``V_kᵀ`` and ``U_kᵀ``. A multiplier per group scales
that group's dequantized values ``(q − z)·scale``, so the factors are the fixed ``q − z`` (unpacked once) times the
learned scales, and each step's factors are handed to the forward pass as the delta's pinned factors
(:data:`~hf_deltacome.format.blob.PINNED_FACTORS`, read by :func:`~hf_deltacome.backend.torch_delta_forward`): no
code is unpacked and no mask regenerated per step. Adam works on log-multipliers, so each scale keeps its sign and
moves in proportion to its size. Sparse bands (ImPart, the sparse tail) learn their ``S_k`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..config import DeltaCoMeConfig
from ..errors import CalibrationError
from ..format.blob import PINNED_FACTORS, BlobStore
from ..format.decoded import dequant_cache
from ..format.storage import DeltaBand
from ..progress import progress_bar

CHECK_SEQUENCES = 8  # calibration sequences the KL is measured on before and after distilling the bands
# below this KL (nats a token, on those sequences) the bands are not distilled: on SmolLM2's knowledge deltas with
# the MLP as DARE the cells that started at 0.004-0.015 (1/8, 1/16) ended 1.8-12x above where they started, those
# from 0.024 up (1/32, 1/64) fell 2.0-2.8x; trying costs a forward and backward pass of the model a step
# (benchmarks/RESULTS.md). With vector-coded modules (full_rank="vq") from VQ_MIN_KL: `facts` 1/32 started at
# 0.015-0.018 and fell 3x, for 1.9 points of next-token agreement; a try that does not lower the KL is not kept
MIN_KL = 0.02
VQ_MIN_KL = 0.005
TEACHER_CACHE_BYTES = 1 << 30  # the fine-tune's log-probabilities are kept across steps when they fit in this
SIGN_STEP = (4, 128)  # sequences x tokens a step of BitDelta's sign-scale distillation
BAND_STEP = (1, 256)  # ... and when bands are distilled: every calibration token is seen, at half the cost a step
# of SIGN_STEP takes (a step is one forward and backward pass of the whole model)
LR = 0.01  # Adam's step on the log-multipliers (1% of a scale a step at first). 0.003 from a KL of 0.003 lowered
# the KL at 1/16 too but less at 1/64, and moved held-out answers by +2 / -2 over five cells; a linear decay from
# 0.01 still raised it at 1/16 (benchmarks/RESULTS.md, reading at 8ce48de-6e3f63c)


def distills_bands(config: DeltaCoMeConfig) -> bool:
    """Whether a compression with ``config`` distils its bands' scales (``distill_bands``; ``None``: the default
    method does, the baselines stay as published)."""
    if config.distill_steps <= 0:
        return False
    return config.distill_bands if config.distill_bands is not None else config.method == "deltacome"


def distills(config: DeltaCoMeConfig) -> bool:
    """Whether a compression with ``config`` distils anything: BitDelta's sign scales or the bands' scales."""
    return config.distill_steps > 0 and (config.method == "bitdelta" or distills_bands(config))


class _Scale:
    """One stored float tensor being distilled: its log-multiplier and how to write it back."""

    def __init__(self, store: BlobStore, key: str, device: torch.device) -> None:
        stored = store.part(key)
        self.store, self.key = store, key
        self.start = stored.detach().to(device, torch.float32).clone()
        self.log = torch.zeros_like(self.start, requires_grad=True)

    def value(self) -> torch.Tensor:
        return self.start * torch.exp(self.log)

    def write(self) -> None:
        stored = self.store.part(self.key)
        value = self.value().detach()
        if stored.dtype == torch.float16:
            value = value.clamp(-65504.0, 65504.0)
        stored.copy_(value.to(stored.device, stored.dtype))  # in place: the saved bytes change


class _Factor:
    """One band factor (``rank x cols``) as fixed ``q − z`` times learned group scales, or fixed as it is stored."""

    def __init__(self, factor, device: torch.device, learn: bool, stored: Callable[[], torch.Tensor]) -> None:
        self.scale = None
        if learn:
            m = factor.matrix()
            g, cols = m.group_size, m.shape[1]
            zero = m.zeros.to(torch.float32).repeat_interleave(g, dim=1)[:, :cols]
            self.fixed = (m.int_codes().to(torch.float32) - zero).to(device)
            self.scale = _Scale(factor._store, factor._prefix + "scales", device)
            self.group, self.cols = g, cols
        else:
            self.fixed = stored().to(device, torch.float32)

    def dense(self) -> torch.Tensor:
        if self.scale is None:
            return self.fixed
        return self.fixed * self.scale.value().repeat_interleave(self.group, dim=1)[:, : self.cols]


class _Delta:
    """The learned scales of one packed delta and the factors ``(A, B)`` they give (``x @ A @ B``, as cached)."""

    def __init__(self, delta, device: torch.device, bands: bool) -> None:
        self.delta, self.scales, self.bands = delta, [], []
        if delta.sign is not None:
            self.sign = _Scale(delta, delta.sign._prefix + "scale", device)
            self.scales.append(self.sign)
        else:
            self.sign = None
        if not bands:
            return
        for band in delta.low_rank_bands:
            learn = isinstance(band, DeltaBand) and band.u_transposed and band.bits != 16
            s = _Scale(delta, band._prefix + "s", device)
            v = _Factor(band.v, device, learn, band.vt_dense)
            u = _Factor(band.u, device, learn, band.ut_dense)
            self.bands.append((s, v, u))
            self.scales += [s] + [f.scale for f in (v, u) if f.scale is not None]

    def pin(self) -> None:
        """Compute the next forward pass with the current scales (differentiable)."""
        if self.sign is not None:
            self.delta.override(self.sign.key, self.sign.value())
        if self.bands:
            a = torch.cat([v.dense() * s.value()[:, None] for s, v, _ in self.bands]).t()
            b = torch.cat([u.dense() for _, _, u in self.bands])
            self.delta.override(PINNED_FACTORS, (a, b))

    def unpin_and_write(self) -> None:
        self.delta.override(PINNED_FACTORS, None)
        if self.sign is not None:
            self.delta.override(self.sign.key, None)
        with torch.no_grad():
            for scale in self.scales:
                scale.write()


def _deltas(model: nn.Module, adapter_name: str) -> Iterator:
    for mod in model.modules():
        deltas = getattr(mod, "deltacome_delta", None)
        if deltas is not None and adapter_name in deltas:
            yield deltas[adapter_name]


def _teacher(finetuned: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    device = next(finetuned.parameters()).device
    with torch.no_grad():
        return torch.log_softmax(finetuned(input_ids=batch.to(device)).logits.float(), -1)


def _kl(model: nn.Module, deltas: list[_Delta], batches: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """The fine-tune's next-token KL to ``model`` with the current scales, per token, over ``batches``."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for d in deltas:
            d.pin()
        device = deltas[0].delta.blob.device
        for batch, target in zip(batches, targets, strict=True):
            logp = torch.log_softmax(model(input_ids=batch.to(device)).logits.float(), -1)
            total += float(nn.functional.kl_div(logp, target.to(logp.device), log_target=True, reduction="sum"))
            tokens += batch.numel()
    return total / max(tokens, 1)


def distill_scales(
    model: nn.Module,
    finetuned_model: nn.Module,
    input_ids: torch.Tensor | None,
    *,
    bands: bool = False,
    steps: int = 50,
    lr: float = LR,
    batch_size: int | None = None,
    seq_len: int | None = None,
    adapter_name: str = "default",
    progress: bool = False,
    min_kl: float | None = None,
) -> dict[str, Any]:
    """Refine the stored scales of ``model``'s adapter by distillation; returns the loss of the first and last steps
    and how many scales were learned.

    Minimises the KL divergence from the fine-tune's next-token distribution to the compressed model's on
    ``input_ids`` (cut to ``seq_len`` tokens, ``batch_size`` sequences a step; by default `BAND_STEP` with ``bands``,
    else `SIGN_STEP`), with Adam over log-multipliers of
    the scales (BitDelta's sign scales; with ``bands`` also every band's ``S_k`` and group scales). The refined
    values are written into the adapter's stored bytes in place at the end (also if a step fails). With ``bands``
    the KL over the first ``CHECK_SEQUENCES`` batches is measured before and after, and the scales are kept only if
    it fell (otherwise the stored values stay as compressed: on SmolLM2 at 1/8-1/16, where the bands leave little
    error, single-sequence steps raised it); under ``min_kl`` (default ``MIN_KL``) no step is taken."""
    with torch.no_grad():
        found = list(_deltas(model, adapter_name))
        device = found[0].blob.device if found else torch.device("cpu")
        deltas = [d for d in (_Delta(delta, device, bands) for delta in found) if d.scales]
    if not deltas or steps <= 0:
        return {}
    if input_ids is None or input_ids.numel() == 0:
        raise CalibrationError("scale distillation needs calibration token ids")
    default_batch, default_len = BAND_STEP if bands else SIGN_STEP
    batch_size, seq_len = batch_size or default_batch, seq_len or default_len
    params = [scale.log for d in deltas for scale in d.scales]
    opt = torch.optim.Adam(params, lr=lr)
    batches = list(input_ids[:, :seq_len].split(batch_size))
    vocab = getattr(getattr(finetuned_model, "config", None), "vocab_size", None) or 0
    keep = sum(b.numel() for b in batches) * vocab * 4 <= TEACHER_CACHE_BYTES
    teacher: dict[int, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    first = last = None
    check: dict[str, float] = {}
    bar = progress_bar(steps, progress, "Distilling scales")

    def target_of(i: int) -> torch.Tensor:
        target = teacher.get(i)
        if target is None:
            target = _teacher(finetuned_model, batches[i])
            if keep:
                teacher[i] = target
        return target

    n_check = min(CHECK_SEQUENCES, len(batches)) if bands else 0
    with dequant_cache.uncapped():  # DARE parts' and vector codes' decoded forms kept for every step
        try:
            if n_check:
                check["before"] = _kl(model, deltas, batches[:n_check], [target_of(i) for i in range(n_check)])
                least = MIN_KL if min_kl is None else min_kl
                if check["before"] < least:
                    steps, check["kept"] = 0, False
                    check["skipped"] = f"under {least}: the bands are left as compressed"
            for step in range(steps):
                i = step % len(batches)
                target = target_of(i)
                with torch.enable_grad():
                    for d in deltas:
                        d.pin()
                    logp = torch.log_softmax(model(input_ids=batches[i].to(device)).logits.float(), -1)
                    loss = nn.functional.kl_div(logp, target.to(logp.device), log_target=True, reduction="batchmean")
                    loss = loss / batches[i].shape[1]
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                last = float(loss.detach())
                first = last if first is None else first
                bar.update(1)
            if n_check and steps:
                check["after"] = _kl(model, deltas, batches[:n_check], [target_of(i) for i in range(n_check)])
                check["kept"] = check["after"] < check["before"]
                if not check["kept"]:
                    with torch.no_grad():
                        for p in params:
                            p.zero_()  # back to the scales as compressed
        finally:
            for d in deltas:
                d.unpin_and_write()
            for delta in found:
                delta.forget("csr_t")  # the DARE parts' transposes the backward passes used
            bar.close()
            model.train(was_training)
    out = {"first_loss": first, "last_loss": last, "steps": steps, "scales": sum(p.numel() for p in params)}
    if check:
        out["check_kl"] = check
    return out


def distill_layer(
    layer: nn.Module,
    finetuned_layer: nn.Module,
    hidden: list[torch.Tensor],
    calls: list[tuple[tuple, dict]],
    *,
    bands: bool = True,
    steps: int = 50,
    lr: float = LR,
    adapter_name: str = "default",
) -> dict[str, Any]:
    """Refine the stored scales of one compressed decoder layer's adapter against the fine-tune's same layer: what a
    streamed run can do without the whole models (:func:`distill_scales` needs both).

    Minimises the layer's output error ``‖layer(h) − finetuned_layer(h)‖²`` (relative to the teacher's output
    energy) over the calibration hidden states ``hidden`` entering the layer (the compressed layers before it
    already applied), one batch a step, with the same log-multipliers as :func:`distill_scales`; the scales are kept
    only if the error over every batch fell. Returns the error before and after and whether the scales were kept."""
    from .layerwalk import floats_to, layer_output

    with torch.no_grad():
        found = list(_deltas(layer, adapter_name))
        device = found[0].blob.device if found else torch.device("cpu")
        deltas = [d for d in (_Delta(delta, device, bands) for delta in found) if d.scales]
    if not deltas or steps <= 0 or not hidden:
        return {}
    dtype = next((p.dtype for p in finetuned_layer.parameters() if p.is_floating_point()), None)
    with torch.no_grad():  # a fine-tune saved in another dtype runs in its own, as when its Hessians are collected
        targets = [layer_output(finetuned_layer(floats_to(h, dtype), *floats_to(a, dtype), **floats_to(k, dtype))).float()
                   for h, (a, k) in zip(hidden, calls, strict=True)]  # fmt: skip
    energy = [float(t.pow(2).mean()) or 1.0 for t in targets]

    def error(j: int) -> torch.Tensor:
        h, (a, k) = hidden[j], calls[j]
        return (layer_output(layer(h, *a, **k)).float() - targets[j]).pow(2).mean() / energy[j]

    def total() -> float:
        with torch.no_grad():
            for d in deltas:
                d.pin()
            return sum(float(error(j)) for j in range(len(hidden))) / len(hidden)

    params = [scale.log for d in deltas for scale in d.scales]
    opt = torch.optim.Adam(params, lr=lr)
    out: dict[str, Any] = {}
    with dequant_cache.uncapped():
        try:
            out["before"] = total()
            for step in range(steps):
                with torch.enable_grad():
                    for d in deltas:
                        d.pin()
                    loss = error(step % len(hidden))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            out["after"] = total()
            out["kept"] = out["after"] < out["before"]
            if not out["kept"]:
                with torch.no_grad():
                    for p in params:
                        p.zero_()
        finally:
            for d in deltas:
                d.unpin_and_write()
            for delta in found:
                delta.forget("csr_t")
    return out


def layerwise_record(results: list[dict[str, Any]]) -> dict[str, Any]:
    """``compression_info["distill"]`` of a streamed run's :func:`distill_layer` results (empty if none ran)."""
    done = [r for r in results if r]
    if not done:
        return {}
    return {"layerwise": len(done), "kept": sum(bool(r["kept"]) for r in done),
            "error_before": sum(r["before"] for r in done) / len(done),
            "error_after": sum(min(r["before"], r["after"]) for r in done) / len(done)}  # fmt: skip
