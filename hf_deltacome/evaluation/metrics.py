"""How much of a fine-tune a compressed adapter keeps (``deltacome eval``).

For a base model plus a Delta-CoMe adapter (and optionally the fine-tune it was made from) it measures

* **perplexity** on a text file (``.txt`` read whole, ``.jsonl`` through the calibration reader), in windows of
  ``seq_len`` tokens;
* **next-token agreement** with the fine-tune: share of positions where the compressed model's greedy next token is
  the fine-tune's (needs ``finetuned``);
* **per-module relative output error** on those held-out activations: for every compressed linear,
  ``||Δ̂ x − Δ x||² / ||Δ x||²`` summed over the tokens, where ``Δ`` is the true weight delta of the fine-tune
  (needs ``finetuned``);
* **accuracy on a generation task** (:mod:`.tasks`).

With ``compare=True`` the same numbers are measured for the base (adapter disabled) and the fine-tune, and the share
of the fine-tune's gain over the base that the adapter keeps is reported.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backend import delta_forward
from ..compression.calibration import read_texts
from ..errors import CalibrationError, ConfigError
from ..layer import DeltaCoMeLayer
from ..linears import is_conv1d, named_linears
from ..progress import progress_bar
from .generation import DEFAULT_MAX_NEW_TOKENS
from .tasks import TaskItem, read_task_file, task_accuracy

DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 16384


def read_eval_text(path: str | os.PathLike) -> str:
    """The evaluation text: a ``.jsonl`` file through the calibration reader (records joined), else the whole file."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"evaluation text {path} does not exist")
    if path.suffix == ".jsonl":
        return "\n\n".join(read_texts(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read evaluation text {path}: {e}") from e
    if not text.strip():
        raise CalibrationError(f"evaluation text {path} is empty")
    return text


def token_windows(
    tokenizer: Any, text: str, seq_len: int = DEFAULT_SEQ_LEN, max_tokens: int = DEFAULT_MAX_TOKENS
) -> torch.Tensor:
    """``text`` tokenized and cut into non-overlapping windows of ``seq_len`` tokens (at most ``max_tokens`` in all).

    A text shorter than one window gives a single shorter window.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
    if len(ids) < 2:
        raise CalibrationError("the evaluation text has fewer than 2 tokens")
    if len(ids) < seq_len:
        return torch.tensor([ids], dtype=torch.long)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


class ModuleErrorMeter:
    """Hooks on every compressed linear of a PEFT model measuring ``||Δ̂ x − Δ x||²`` and ``||Δ x||²`` per module.

    ``Δ`` (fine-tuned minus base weight, and bias) is taken from ``finetuned``; ``Δ̂ x`` is the adapter's output
    computed the way the model computes it (packed factors through the backend).
    """

    def __init__(self, model: nn.Module, finetuned: nn.Module, adapter_name: str | None = None) -> None:
        self._delta_forward = delta_forward
        ft = named_linears(finetuned)  # a fused experts module: one linear per expert, as the adapter's
        self.err: dict[str, float] = {}
        self.ref: dict[str, float] = {}
        self._handles = []
        self._true: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name, mod in model.named_modules():
            if not isinstance(mod, DeltaCoMeLayer):
                continue
            adapter = adapter_name or mod.active_adapters[0]
            if adapter not in mod.deltacome_delta:
                continue
            short = _strip_peft_prefix(name)
            if short not in ft:
                raise ConfigError(f"the fine-tuned model has no module {short!r} to compare the adapter with")
            base = mod.get_base_layer()
            wf, wb = ft[short].weight, base.weight
            if wf.shape != wb.shape:
                raise ConfigError(f"module {short!r}: fine-tuned weight {tuple(wf.shape)} vs base {tuple(wb.shape)}")
            d = wf.detach().to(wb.device, torch.float32) - wb.detach().to(torch.float32)
            d = d.t() if is_conv1d(base) else d  # out x in, as the packed delta
            bias = None
            if base.bias is not None and getattr(ft[short], "bias", None) is not None:
                bias = ft[short].bias.detach().to(base.bias.device, torch.float32) - base.bias.detach().float()
            self._true[short] = (d, bias)
            self.err[short], self.ref[short] = 0.0, 0.0
            self._handles.append(mod.register_forward_hook(self._hook(short, mod.deltacome_delta[adapter])))

    def _hook(self, name: str, packed: Any) -> Any:
        def fn(_m: nn.Module, inp: tuple, _out: Any) -> None:
            x = inp[0].detach().to(torch.float32)
            d, bias = self._true[name]
            true = x @ d.t()
            if bias is not None:
                true = true + bias
            approx = self._delta_forward(x, packed).to(torch.float32)
            self.err[name] += float((approx - true).square().sum())
            self.ref[name] += float(true.square().sum())

        return fn

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def relative_errors(self) -> dict[str, float]:
        return {n: (self.err[n] / self.ref[n] if self.ref[n] > 0 else 0.0) for n in self.err}


@torch.no_grad()
def text_metrics(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    finetuned: nn.Module | None = None,
    module_errors: bool = False,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "Perplexity",
) -> dict[str, Any]:
    """Perplexity of ``model`` on token ``windows``; with ``finetuned`` also next-token agreement and (with
    ``module_errors``) the per-module relative output errors of the adapter on these activations."""
    device = _device(model)
    meter = ModuleErrorMeter(model, finetuned) if (module_errors and finetuned is not None) else None
    nll, count, agree = 0.0, 0, 0
    bar = progress_bar(windows.shape[0], progress, desc, "seq")
    try:
        for batch in windows.split(batch_size):
            logits = model(input_ids=batch.to(device)).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1)
            target = batch[:, 1:].to(lp.device)
            nll -= float(lp.gather(-1, target.unsqueeze(-1)).sum())
            count += target.numel()
            if finetuned is not None:
                ft_logits = finetuned(input_ids=batch.to(_device(finetuned))).logits
                agree += int((ft_logits[:, :-1].argmax(-1).to(lp.device) == logits[:, :-1].argmax(-1)).sum())
            bar.update(batch.shape[0])
    finally:
        bar.close()
        if meter is not None:
            meter.close()
    out: dict[str, Any] = {"perplexity": math.exp(nll / max(count, 1)), "tokens": count}
    if finetuned is not None:
        out["agreement"] = agree / max(count, 1)
    if meter is not None:
        out["module_errors"] = meter.relative_errors()
    return out


# ================================================================================ report


@dataclass
class EvalReport:
    """Results of one evaluation (``None`` where a metric was not asked for or not measurable)."""

    perplexity: float | None = None
    agreement: float | None = None
    accuracy: float | None = None
    tokens: int = 0
    task_items: int = 0
    module_errors: dict[str, float] = field(default_factory=dict)
    reference: dict[str, dict[str, float | None]] = field(default_factory=dict)  # "base" / "finetuned" rows
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gain_kept(self) -> float | None:
        """Share of the fine-tune's accuracy gain over the base that the adapter keeps (needs the reference rows)."""
        b = self.reference.get("base", {}).get("accuracy")
        f = self.reference.get("finetuned", {}).get("accuracy")
        if self.accuracy is None or b is None or f is None or f == b:
            return None
        return (self.accuracy - b) / (f - b)

    def to_dict(self) -> dict[str, Any]:
        return {
            "perplexity": self.perplexity,
            "agreement": self.agreement,
            "accuracy": self.accuracy,
            "gain_kept": self.gain_kept,
            "tokens": self.tokens,
            "task_items": self.task_items,
            "reference": self.reference,
            "module_errors": self.module_errors,
        }

    def format(self, worst: int = 10) -> str:
        """Human-readable summary; ``worst`` modules with the largest relative output error are listed."""

        def f(v: float | None, pct: bool = False) -> str:
            if v is None:
                return "-"
            return f"{100 * v:.2f}%" if pct else f"{v:.4f}"

        rows = [("adapter", self.perplexity, self.agreement, self.accuracy)]
        for name in ("base", "finetuned"):
            if name in self.reference:
                r = self.reference[name]
                rows.append((name, r.get("perplexity"), r.get("agreement"), r.get("accuracy")))
        lines = [f"{'model':<12}{'perplexity':>12}{'agreement':>12}{'accuracy':>12}"]
        for name, ppl, agr, acc in rows:
            lines.append(f"{name:<12}{f(ppl):>12}{f(agr, True):>12}{f(acc, True):>12}")
        lines.append(f"tokens scored: {self.tokens:,}; task items: {self.task_items:,}")
        if self.gain_kept is not None:
            lines.append(f"fine-tune gain kept (accuracy): {100 * self.gain_kept:.1f}%")
        if self.module_errors:
            errs = sorted(self.module_errors.items(), key=lambda kv: -kv[1])
            mean = sum(self.module_errors.values()) / len(self.module_errors)
            lines.append(
                f"relative output error per module on held-out activations: mean {mean:.4f} over {len(errs)} modules"
            )
            for name, e in errs[:worst]:
                lines.append(f"  {name:<60} {e:.4f}")
        return "\n".join(lines)


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    *,
    finetuned: nn.Module | None = None,
    text: str | os.PathLike | None = None,
    task: str | os.PathLike | Sequence[TaskItem] | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 4,
    chat: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    task_batch_size: int = 16,
    max_items: int | None = None,
    compare: bool = False,
    progress: bool = True,
) -> EvalReport:
    """Evaluate a base + adapter ``model`` (a ``PeftModel``); see the module docstring for the metrics.

    ``text`` is a text file; ``task`` a JSONL file or a list of `TaskItem`; ``compare`` also evaluates the base
    (adapter disabled) and ``finetuned``.
    """
    if text is None and task is None:
        raise ConfigError("nothing to evaluate: give a text file (perplexity, agreement, module errors) or a task")
    report = EvalReport()
    windows = None
    if text is not None:
        if tokenizer is None:
            raise ConfigError("perplexity needs a tokenizer; the adapter / base folder has none")
        windows = token_windows(tokenizer, read_eval_text(text), seq_len, max_tokens)
        m = text_metrics(
            model, windows, finetuned=finetuned, module_errors=True, batch_size=batch_size, progress=progress
        )
        report.perplexity, report.agreement, report.tokens = m["perplexity"], m.get("agreement"), m["tokens"]
        report.module_errors = m.get("module_errors", {})
    items: list[TaskItem] | None = None
    if task is not None:
        items = list(read_task_file(task) if isinstance(task, (str, os.PathLike)) else task)[:max_items]
        gen = dict(chat=chat, max_new_tokens=max_new_tokens, batch_size=task_batch_size, progress=progress)
        report.accuracy, results = task_accuracy(model, tokenizer, items, **gen, desc="Task (adapter)")
        report.task_items = len(items)
        report.predictions = [
            {"prompt": it.prompt, "answer": it.answer, "completion": c, "correct": ok} for it, c, ok in results
        ]
    if compare:
        refs: list[tuple[str, Any]] = []
        if hasattr(model, "disable_adapter"):
            refs.append(("base", model))
        if finetuned is not None:
            refs.append(("finetuned", finetuned))
        for name, ref_model in refs:
            row: dict[str, float | None] = {}
            ctx = ref_model.disable_adapter() if name == "base" else contextlib.nullcontext()
            with ctx:
                if windows is not None:
                    ft = finetuned if name == "base" else None
                    m = text_metrics(
                        ref_model,
                        windows,
                        finetuned=ft,
                        batch_size=batch_size,
                        progress=progress,
                        desc=f"Perplexity ({name})",
                    )
                    row["perplexity"] = m["perplexity"]
                    row["agreement"] = m.get("agreement", 1.0 if name == "finetuned" else None)
                if items is not None:
                    row["accuracy"], _ = task_accuracy(ref_model, tokenizer, items, **gen, desc=f"Task ({name})")
            report.reference[name] = row
    return report


def _strip_peft_prefix(name: str) -> str:
    """``base_model.model.<name>`` (inside a ``PeftModel``) -> ``<name>`` (inside the plain model)."""
    prefix = "base_model.model."
    return name[len(prefix) :] if name.startswith(prefix) else name


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
