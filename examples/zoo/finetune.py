"""Fine-tunes of the cached SmolLM2 on a built-in task (full, or a LoRA merged; made once on CPU, cached), and task
accuracy."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch

from hf_deltacome.errors import ConfigError
from hf_deltacome.evaluation.generation import generate_greedy
from hf_deltacome.io.atomic import atomic_dir

from .smollm2 import FINETUNE_FILE, SOURCE_FILE, ZOO_FORMAT, _remove_stale, _sha256_files, cache_dir, smollm2_path
from .tasks import TASK_VERSION, Example, FinetuneSettings, Task, get_task


def _encode_example(tokenizer: Any, task: Task, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + end-of-turn, and labels (-100 on the prompt), tokenized as at inference."""
    prompt_ids = tokenizer(task.render(tokenizer, example), add_special_tokens=False).input_ids
    answer_ids = tokenizer(example.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _right_padded(batch: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """``(input_ids, labels, attention_mask)`` of ``(ids, labels)`` pairs, right-padded (labels with -100)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, : len(ids)], labels[row, : len(lab)] = torch.tensor(ids), torch.tensor(lab)
        attention[row, : len(ids)] = 1
    return input_ids, labels, attention


def _base_identity(base: Path) -> str:
    src = base / SOURCE_FILE
    if src.is_file():
        return json.loads(src.read_text())["weights_sha256"]
    weights = sorted(base.glob("*.safetensors")) or sorted(base.glob("*.bin"))
    if not weights:
        raise ConfigError(f"base model directory {base} holds no *.safetensors or *.bin weights")
    return _sha256_files(weights)


def _resolve(task: Task, **overrides: Any) -> FinetuneSettings:
    values = {k: v for k, v in overrides.items() if v is not None}
    settings = FinetuneSettings(**{**task.settings.__dict__, **values})
    if settings.steps < 1 or settings.batch_size < 1:
        raise ConfigError(f"steps and batch_size must be >= 1, got {settings.steps} and {settings.batch_size}")
    if not (settings.lr > 0 and math.isfinite(settings.lr)):
        raise ConfigError(f"lr must be a positive number, got {settings.lr!r}")
    if not 0 <= settings.warmup < 1:
        raise ConfigError(f"warmup must be a fraction in [0, 1), got {settings.warmup!r}")
    return settings


def finetune_path(
    task: Union[str, Task],
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    base: Optional[Union[str, Path]] = None,
    lora_rank: Optional[int] = None,
) -> Path:
    """Where :func:`finetune` with these arguments caches its result (the directory may not exist yet)."""
    task = get_task(task)
    settings = _resolve(task, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    base_path = Path(base) if base is not None else smollm2_path()
    key = {
        "format": ZOO_FORMAT,
        "task": task.name,
        "task_version": TASK_VERSION,
        "task_seed": task.seed,
        "settings": settings.__dict__,
        "base": _base_identity(base_path),
    }
    if lora_rank:  # (absent for a full fine-tune: its cache key is the one it always had)
        key["lora_rank"] = int(lora_rank)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "finetunes" / f"{task.name}{f'-lora{lora_rank}' if lora_rank else ''}-{digest}"


def finetune(
    task: Union[str, Task],
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    base: Optional[Union[str, Path]] = None,
    progress: bool = True,
    lora_rank: Optional[int] = None,
) -> Path:
    """Full fine-tune (or a LoRA merged: ``lora_rank``) of the base (SmolLM2-135M-Instruct by default) on ``task``;
    returns the model directory.

    Every decoder weight (attention, MLP, norms) is trained with AdamW (linear warm-up then linear decay, gradient
    clipping at ``max_grad_norm``) on the task's train split, loss on the answer tokens only. The token embeddings
    (tied to ``lm_head`` in SmolLM2) are frozen, so the whole delta lives in the decoder, where Delta-CoMe compresses
    it. Runs on CPU in float32; the result is cached under ``cache_dir()/finetunes`` by a hash of the task, the
    hyper-parameters and the base weights, and written atomically. ``None`` arguments take the task's defaults
    (``get_task(task).settings``): the skill task takes about 2-3 minutes on 2 cores, the knowledge task under 10.

    ``lora_rank``: a LoRA of that rank (``lora_alpha`` twice it) on every decoder linear is trained instead (the
    same loop; ``lr`` as given) and merged into the weights (PEFT's ``merge_and_unload``): the fine-tune a merged
    LoRA checkpoint is, with a delta of that rank in every linear and none in the norms.
    """
    task = get_task(task)
    settings = _resolve(task, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    base_path = Path(base) if base is not None else smollm2_path()
    if lora_rank is not None and lora_rank < 1:
        raise ConfigError(f"lora_rank must be >= 1, got {lora_rank}")
    final = finetune_path(task, settings.steps, settings.lr, settings.batch_size, settings.seed, base_path, lora_rank)
    if (final / FINETUNE_FILE).is_file():
        return final
    _remove_stale(final, FINETUNE_FILE)

    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0, cpu0 = time.time(), time.process_time()
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)
    decoder, head = getattr(model, model.base_model_prefix), model.get_output_embeddings()
    head.weight.requires_grad_(False)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = int(settings.warmup * settings.steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    encoded: dict[int, tuple[list[int], list[int]]] = {}  # tokenized on first use: a run may see few examples
    rng = random.Random(settings.seed)
    order: list[int] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    losses: list[float] = []
    bar = tqdm(range(settings.steps), desc=f"fine-tune {task.name}", disable=not progress)
    for _ in bar:
        if len(order) < settings.batch_size:
            fresh = list(range(len(task.train)))
            rng.shuffle(fresh)
            order += fresh
        for i in order[: settings.batch_size]:
            if i not in encoded:
                encoded[i] = _encode_example(tokenizer, task, task.train[i])
        input_ids, labels, attention = _right_padded([encoded[i] for i in order[: settings.batch_size]], pad)
        del order[: settings.batch_size]
        # Run the LM head only where there is a target: the prompt positions need no logits.
        hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    if lora_rank:
        model = model.merge_and_unload()
    train_seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0

    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "format": ZOO_FORMAT,
            "task": task.name,
            "task_version": TASK_VERSION,
            "task_seed": task.seed,
            "settings": settings.__dict__,
            "base": str(base_path),
            "base_weights_sha256": _base_identity(base_path),
            "frozen": ["embeddings (tied lm_head)"] + (["norms", "the linears' weights"] if lora_rank else []),
            **({"lora": {"rank": lora_rank, "alpha": 2 * lora_rank, "merged": True}} if lora_rank else {}),
            "train_seconds": round(train_seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "threads": torch.get_num_threads(),
            "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "losses": [round(x, 4) for x in losses],
        }
        (tmp / FINETUNE_FILE).write_text(json.dumps(record, indent=2))
    return final


# --------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def task_predictions(
    model: Any,
    tokenizer: Any,
    task: Union[str, Task],
    n: Optional[int] = None,
    batch_size: int = 32,
    split: str = "eval",
    progress: bool = False,
) -> list[tuple[Example, str, bool]]:
    """Greedy completions of the first ``n`` examples of ``split``: ``[(example, completion, correct), ...]``.

    Generation stops at the end-of-turn token or after the task's ``max_new_tokens``. ``model`` is any causal LM
    with ``generate`` (a plain model or a ``PeftModel``).
    """
    task = get_task(task)
    examples = task.split(split)[: n if n is not None else None]
    encoded = [tokenizer(task.render(tokenizer, ex), add_special_tokens=False).input_ids for ex in examples]
    completions = generate_greedy(model, tokenizer, encoded, max_new_tokens=task.max_new_tokens, batch_size=batch_size,
                                  progress=progress, desc=f"Scoring on {task.name!r}")  # fmt: skip
    return [(ex, c, task.score(c, ex)) for ex, c in zip(examples, completions, strict=True)]


def _answer_logits(
    model: Any, tokenizer: Any, task: Task, n: Optional[int], batch_size: int, split: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(logits, targets, keep)`` of the first ``n`` examples of ``split`` teacher-forced in right-padded batches:
    next-token logits, the tokens they predict, and which of those are reference-answer tokens."""
    examples = task.split(split)[: n if n is not None else None]
    if not examples:
        raise ConfigError(f"task {task.name!r} split {split!r} has no examples to score")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = [_encode_example(tokenizer, task, ex) for ex in examples[start : start + batch_size]]
        input_ids, labels, attention = _right_padded(batch, pad)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, :-1].float()
        targets = labels[:, 1:].to(device)
        yield logits, targets, targets != -100


@torch.no_grad()
def answer_nll(
    model: Any,
    tokenizer: Any,
    task: Union[str, Task],
    n: Optional[int] = None,
    batch_size: int = 32,
    split: str = "eval",
) -> float:
    """Mean negative log-likelihood (nats per token) of the reference answers (+ end of turn) given their prompts.

    Scored on the first ``n`` examples of ``split`` with the tokenization of training (prompt as rendered, answer
    tokens after it): how sure the model is of the right answer, which greedy accuracy alone does not show.
    """
    total, count = 0.0, 0
    for logits, targets, keep in _answer_logits(model, tokenizer, get_task(task), n, batch_size, split):
        total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


@torch.no_grad()
def answer_margins(
    model: Any,
    tokenizer: Any,
    task: Union[str, Task],
    n: Optional[int] = None,
    batch_size: int = 32,
    split: str = "eval",
) -> list[float]:
    """For each of the first ``n`` examples of ``split``, how close ``model`` is to another answer: the least, over
    the reference answer's tokens (teacher-forced, end of turn included), of the logit of the reference token minus
    the best other logit. Positive where greedy decoding reproduces the reference; near zero on a close call, a
    question any small change to the weights can flip either way.
    """
    margins: list[float] = []
    for logits, targets, keep in _answer_logits(model, tokenizer, get_task(task), n, batch_size, split):
        safe = targets.clamp(min=0)[..., None]
        gap = logits.gather(-1, safe)[..., 0] - logits.scatter(-1, safe, float("-inf")).amax(-1)
        margins += gap.masked_fill(~keep, float("inf")).amin(-1).tolist()
    return margins


def task_accuracy(
    model: Any,
    tokenizer: Any,
    task: Union[str, Task],
    n: Optional[int] = 128,
    batch_size: int = 32,
    split: str = "eval",
    progress: bool = False,
) -> float:
    """Exact-match accuracy (0..1) of greedy decoding on the first ``n`` held-out examples of ``task``."""
    results = task_predictions(model, tokenizer, task, n=n, batch_size=batch_size, split=split, progress=progress)
    if not results:
        raise ConfigError(f"task {get_task(task).name!r} split {split!r} has no examples to score")
    return sum(ok for _, _, ok in results) / len(results)
