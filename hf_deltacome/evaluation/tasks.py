"""Generation tasks: JSONL prompts with reference answers, scored by exact match after normalisation."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compression.calibration import jsonl_objects
from ..errors import ConfigError
from .generation import generate_completions


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
