"""Evaluation harness: how much of a fine-tune a compressed adapter keeps (``deltacome eval``).

For a base model plus a Delta-CoMe adapter (and optionally the fine-tune it was made from) it measures

* **perplexity** on a text file (``.txt`` read whole, ``.jsonl`` through the calibration reader), in windows of
  ``seq_len`` tokens;
* **next-token agreement** with the fine-tune: share of positions where the compressed model's greedy next token is
  the fine-tune's (needs ``finetuned``);
* **per-module relative output error** on those held-out activations: for every compressed linear,
  ``||Δ̂ x − Δ x||² / ||Δ x||²`` summed over the tokens, where ``Δ`` is the true weight delta of the fine-tune
  (needs ``finetuned``);
* **accuracy on a generation task** given as JSONL, one ``{"prompt", "answer", "regex"?}`` per line: greedy
  decoding, the answer extracted with ``regex`` (its first group, or the whole match) or else the first line of the
  completion, compared after normalising case, spaces and final punctuation.

With ``compare=True`` the same numbers are measured for the base (adapter disabled) and the fine-tune, and the share
of the fine-tune's gain over the base that the adapter keeps is reported.

lm-evaluation-harness (``pip install lm-eval``) loads adapters through PEFT, so our method must be registered (by
importing ``hf_deltacome``) before it loads one. Either run the harness through us::

    python -m hf_deltacome.evaluate lm-eval --model hf --model_args pretrained=BASE,peft=ADAPTER --tasks TASK

or, from Python, ``lm_eval.simple_evaluate(model=lm_eval_model(BASE, ADAPTER), tasks=[...])``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import jsonl_objects
from .errors import CalibrationError, ConfigError, DeltaCoMeError

DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 16384
DEFAULT_MAX_NEW_TOKENS = 32


# ================================================================================ generation task


@dataclass(frozen=True)
class TaskItem:
    """One prompt of a generation task with its reference answer and optional answer-extraction regex."""

    prompt: str
    answer: str
    regex: str | None = None


def read_task_file(path: str | os.PathLike) -> list[TaskItem]:
    """Read a JSONL task file (``prompt``, ``answer``, optional ``regex`` per line); errors name file and line."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read task file {path}: {e}") from e
    items: list[TaskItem] = []
    for where, obj in jsonl_objects(content, f"task file {path}", ConfigError):
        prompt, answer, regex = obj.get("prompt"), obj.get("answer"), obj.get("regex")
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(f"{where}: 'prompt' must be a non-empty string")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise ConfigError(f"{where}: 'answer' must be a string or a number")
        if regex is not None:
            if not isinstance(regex, str):
                raise ConfigError(f"{where}: 'regex' must be a string")
            try:
                re.compile(regex)
            except re.error as e:
                raise ConfigError(f"{where}: bad regex {regex!r}: {e}") from e
        items.append(TaskItem(prompt, answer, regex))
    if not items:
        raise ConfigError(f"task file {path} holds no items")
    return items


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace-collapsed, without surrounding quotes and final punctuation."""
    text = " ".join(text.strip().split()).casefold()
    return text.strip("\"'`").rstrip(".!?,;:").strip()


def extract_answer(completion: str, regex: str | None = None) -> str | None:
    """The answer in ``completion``: ``regex``'s first group (or whole match), else the first non-empty line."""
    if regex is not None:
        match = re.search(regex, completion)
        if match is None:
            return None
        return match.group(1) if match.groups() else match.group(0)
    for line in completion.splitlines():
        if line.strip():
            return line.strip()
    return None


def is_correct(completion: str, item: TaskItem) -> bool:
    got = extract_answer(completion, item.regex)
    return got is not None and normalize_answer(got) == normalize_answer(item.answer)


@torch.no_grad()
def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    chat: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "Generating",
) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches sorted by length; chat template with ``chat``)."""
    if tokenizer is None:
        raise ConfigError("generation needs a tokenizer; the adapter / base folder has none")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat=True but the tokenizer has no chat template")
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        if chat
        else p
        for p in prompts
    ]
    encoded = [tokenizer(t, add_special_tokens=not chat).input_ids for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = 0
    device = _device(model)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    bar = _progress(len(order), progress, desc, "item")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for r, i in enumerate(rows):
            out[i] = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
        bar.update(len(rows))
    bar.close()
    return out


def task_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[TaskItem],
    **kwargs: Any,
) -> tuple[float, list[tuple[TaskItem, str, bool]]]:
    """Exact-match accuracy (0..1) of greedy decoding on ``items``, with every ``(item, completion, correct)``."""
    if not items:
        raise ConfigError("the generation task has no items")
    completions = generate_completions(model, tokenizer, [it.prompt for it in items], **kwargs)
    results = [(it, c, is_correct(c, it)) for it, c in zip(items, completions, strict=True)]
    return sum(ok for _, _, ok in results) / len(results), results


# ================================================================================ text metrics


def read_eval_text(path: str | os.PathLike) -> str:
    """The evaluation text: a ``.jsonl`` file through the calibration reader (records joined), else the whole file."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"evaluation text {path} does not exist")
    if path.suffix == ".jsonl":
        from .calibration import read_texts

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
        from .backend import delta_forward
        from .layer import DeltaCoMeLayer

        self._delta_forward = delta_forward
        ft = dict(finetuned.named_modules())
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
    bar = _progress(windows.shape[0], progress, desc, "seq")
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


# ================================================================================ loading


def load_adapter_model(
    base: str, adapter: str, *, dtype: str = "float32", device: str | None = None
) -> tuple[nn.Module, Any]:
    """``PeftModel.from_pretrained(base, adapter)`` with our method registered, and a tokenizer (adapter's or base's)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .cli import load_model_and_tokenizer  # importing the package registers our method with PEFT

    if not Path(adapter).is_dir():
        raise ConfigError(f"--adapter {adapter!r}: no such adapter folder")
    model, tokenizer = load_model_and_tokenizer(base, "base", dtype)
    if device:
        model.to(device)
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    except (OSError, ValueError, TypeError):
        pass
    return peft_model, tokenizer


def lm_eval_model(pretrained: str, adapter: str, **kwargs: Any) -> Any:
    """An lm-evaluation-harness ``HFLM`` of ``pretrained`` with our ``adapter`` (loaded through PEFT).

    Importing ``hf_deltacome`` registers the method first, which is all the harness needs. ``kwargs`` go to
    ``HFLM`` (``batch_size``, ``device``, ``dtype``, ...). Use it as ``lm_eval.simple_evaluate(model=..., tasks=...)``.
    """
    import hf_deltacome  # noqa: F401  (registers DELTACOME with PEFT)

    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise DeltaCoMeError("lm-evaluation-harness is not installed: pip install lm-eval") from e
    return HFLM(pretrained=pretrained, peft=adapter, **kwargs)


def lm_eval_cli(argv: Sequence[str] | None = None) -> None:
    """Run lm-evaluation-harness's command line with our method registered (``--model_args ...,peft=ADAPTER``)."""
    import hf_deltacome  # noqa: F401  (registers DELTACOME with PEFT)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise DeltaCoMeError("lm-evaluation-harness is not installed: pip install lm-eval") from e
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


# ================================================================================ command line


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.text is None and args.task is None:
        raise ConfigError("deltacome eval needs --text (perplexity, agreement, module errors) and/or --task")
    model, tokenizer = load_adapter_model(args.base, args.adapter, dtype=args.dtype, device=args.device)
    finetuned = None
    if args.finetuned:
        from .cli import load_model_and_tokenizer

        finetuned, _ = load_model_and_tokenizer(args.finetuned, "finetuned", args.dtype)
        if args.device:
            finetuned.to(args.device)
    elif args.compare:
        raise ConfigError("--compare needs --finetuned")
    report = evaluate_model(
        model,
        tokenizer,
        finetuned=finetuned,
        text=args.text,
        task=args.task,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        max_items=args.max_items,
        compare=args.compare,
        progress=not args.no_progress,
    )
    print(report.format(worst=args.worst))
    if args.json:
        out = report.to_dict()
        out["predictions"] = report.predictions
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``deltacome eval``."""
    p = subparsers.add_parser(
        "eval",
        help="perplexity, next-token agreement, per-module output error and task accuracy of base + adapter",
        description=(
            "Evaluate BASE + ADAPTER. lm-evaluation-harness: python -m hf_deltacome.evaluate lm-eval --model hf "
            "--model_args pretrained=BASE,peft=ADAPTER --tasks TASK"
        ),
    )
    p.add_argument("--base", required=True, help="base model: local folder or Hub id")
    p.add_argument("--adapter", required=True, help="Delta-CoMe adapter folder")
    p.add_argument("--finetuned", default=None, help="the fine-tune: enables agreement and per-module errors")
    p.add_argument("--text", default=None, help="held-out text (.txt read whole, .jsonl records) for perplexity")
    p.add_argument("--task", default=None, help="generation task, JSONL of {prompt, answer, regex?}")
    p.add_argument("--chat", action="store_true", help="wrap task prompts in the tokenizer's chat template")
    p.add_argument("--compare", action="store_true", help="also evaluate the base and the fine-tune (gain kept)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per perplexity window")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="at most this many text tokens")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--max-items", type=int, default=None, help="evaluate only the first N task items")
    p.add_argument("--worst", type=int, default=10, help="list this many modules with the largest output error")
    p.add_argument("--json", default=None, help="also write the report (and predictions) to this JSON file")
    p.add_argument("--device", default=None, help="cpu or cuda (default: where the model loads)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)


# ================================================================================ helpers


def _strip_peft_prefix(name: str) -> str:
    """``base_model.model.<name>`` (inside a ``PeftModel``) -> ``<name>`` (inside the plain model)."""
    prefix = "base_model.model."
    return name[len(prefix) :] if name.startswith(prefix) else name


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str, unit: str) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) > 1 and sys.argv[1] == "lm-eval":
        lm_eval_cli(sys.argv[2:])
    else:
        from .cli import main

        sys.exit(main(["eval", *sys.argv[1:]]))
