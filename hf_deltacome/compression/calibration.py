"""Calibration data for GPTQ: read texts, or sample them from the fine-tuned model, and tokenize into a batch.

Sources (``calibration=`` of :func:`hf_deltacome.compress`):

* a list of strings, or of records as in a ``.jsonl`` file (dicts, e.g. the rows of a ``datasets`` split);
* a ``.txt`` file, one text per non-blank line;
* a ``.jsonl`` file, one JSON object per line with ``text``, or ``prompt`` plus ``answer``/``completion``/
  ``response``, or chat ``messages`` (``[{"role": ..., "content": ...}, ...]``, rendered with the tokenizer's chat
  template when it has one);
* a ready ``(num_samples, seq_len)`` tensor of token ids;
* ``None``: the fine-tuned model writes its own calibration text (seeded sampling from a few generic chat prompts
  or from BOS: :mod:`.sampling`), so compression needs no data set and the activations look like what the fine-tune produces; a
  streamed compression (no whole model to generate with) reads the built-in generic text (:func:`generic_texts`).

The result is always a ``(num_samples, seq_len)`` LongTensor of full-length sequences (no padding), so the decoder
layers can be run on it without attention masks. Records with a response (a prompt and its answer/completion, or chat
messages ending with the assistant's turn) are read as ``(prompt, response)`` and :func:`tokenize_records` marks the
response's tokens, for measuring the fine-tune's answers apart from its prompts (``benchmarks/quality.py --kl``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from ..errors import CalibrationError, user_stacklevel
from .sampling import check_sizes, sample_from_model
from .vocab import vocab_size

DEFAULT_NUM_SAMPLES = 32
DEFAULT_SEQ_LEN = 256
CalibrationSource = Union[None, str, os.PathLike, Sequence[Union[str, dict]], torch.Tensor]
Record = Union[str, tuple[str, str]]  # a text, or (prompt, response): the text is their concatenation


@dataclass
class CalibrationData:
    """A batch of calibration token ids and where it came from (recorded in ``config.compression_info``)."""

    input_ids: torch.Tensor  # (num_samples, seq_len) int64
    source: str

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


# ---------------------------------------------------------------------------------------------- reading texts


def read_texts(source: str | os.PathLike | Sequence[str | dict], tokenizer: Any = None) -> list[str]:
    """The calibration texts of a list (strings or records), a ``.txt`` file or a ``.jsonl`` file.

    Raises `CalibrationError` naming the file (and line) when it cannot be read or holds no usable text.
    """
    return [_joined(r) for r in read_records(source, tokenizer)]


def read_records(source: str | os.PathLike | Sequence[str | dict], tokenizer: Any = None) -> list[Record]:
    """The calibration records of a source: texts, or ``(prompt, response)`` pairs where a record has a response."""
    if isinstance(source, (str, os.PathLike)):
        return _read_file(Path(source), tokenizer)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        records: list[Record] = []
        for i, item in enumerate(source):
            if isinstance(item, dict):
                item = _record(item, tokenizer, f"calibration list item {i}")
            elif not isinstance(item, str):
                raise CalibrationError(
                    f"calibration list item {i} is a {type(item).__name__}, expected a string or a record (dict)"
                )
            if _joined(item).strip():
                records.append(item)
        if not records:
            raise CalibrationError("the calibration list holds no non-empty text")
        return records
    raise CalibrationError(f"unsupported calibration source {source!r}")


def _joined(record: Record) -> str:
    return record if isinstance(record, str) else record[0] + record[1]


def _read_file(path: Path, tokenizer: Any) -> list[Record]:
    if not path.exists():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist")
    if path.is_dir():
        raise CalibrationError(f"calibration file {str(path)!r} is a directory; give a .txt or .jsonl file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CalibrationError(f"cannot read calibration file {str(path)!r}: {e}") from e
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CalibrationError(f"calibration file {str(path)!r} line {line}: not valid UTF-8 text") from e
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = (_record(obj, tokenizer, loc) for loc, obj in jsonl_objects(content, f"calibration file {str(path)!r}"))
        texts = [r for r in records if _joined(r).strip()]
    elif suffix in (".txt", ".text", ""):
        texts = [line for line in content.splitlines() if line.strip()]
    else:
        raise CalibrationError(
            f"calibration file {str(path)!r}: unsupported extension {path.suffix!r}; use .txt (one text per line) "
            "or .jsonl"
        )
    if not texts:
        raise CalibrationError(f"calibration file {str(path)!r} holds no text")
    return texts


def jsonl_objects(
    content: str, where: str, error: type[Exception] = CalibrationError
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(location, object)`` for each non-blank line of JSONL ``content``; a line that is not a JSON object raises
    ``error`` naming ``where`` (the file) and the line number."""
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        loc = f"{where} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{loc}: invalid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise error(f"{loc}: expected a JSON object, got {type(obj).__name__}")
        yield loc, obj


def _record(obj: dict, tokenizer: Any, where: str) -> Record:
    """One JSON record as a text, or as ``(prompt, response)`` when it has a response."""
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise CalibrationError(f"{where}: field 'text' must be a string")
        return obj["text"]
    if "prompt" in obj:
        for key in ("answer", "completion", "response"):
            if key in obj:
                prompt, answer = obj["prompt"], obj[key]
                if not isinstance(prompt, str) or not isinstance(answer, str):
                    raise CalibrationError(f"{where}: fields 'prompt' and {key!r} must be strings")
                return prompt + ("" if prompt.endswith((" ", "\n")) else "\n"), answer
        if isinstance(obj["prompt"], str):
            return obj["prompt"]
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            raise CalibrationError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': str}} objects")
        answered = len(messages) > 1 and messages[-1].get("role") == "assistant"
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False)
                prompt = (tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
                          if answered else None)  # fmt: skip
            except Exception as e:  # a template can reject e.g. unknown roles
                raise CalibrationError(f"{where}: the tokenizer's chat template rejected these messages: {e}") from e
            # the last answer is a response where the template renders the conversation as prompt + answer
            return (prompt, text[len(prompt) :]) if prompt and text.startswith(prompt) else text
        turns = [f"{m.get('role', 'user')}: {m['content']}" for m in messages]
        if answered:
            return "\n".join(turns[:-1]) + "\nassistant: ", messages[-1]["content"]
        return "\n".join(turns)
    raise CalibrationError(
        f"{where}: no usable field; expected 'text', 'prompt' + 'answer'/'completion', or 'messages' "
        f"(found {sorted(obj)})"
    )


# ---------------------------------------------------------------------------------------------- tokenizing


def tokenize_texts(
    texts: Sequence[Record],
    tokenizer: Any,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
) -> torch.Tensor:
    """Tokenize ``texts`` into a ``(num_samples, seq_len)`` batch of full-length sequences.

    Texts are joined into one token stream (EOS between them), cut into ``seq_len`` chunks and ``num_samples``
    chunks are picked at random (seeded). Too little text gives fewer samples (or shorter ones), with a warning.
    """
    # joined: a record's prompt is not tokenized on its own (compress has no use for the responses' mask)
    return tokenize_records([_joined(t) for t in texts], tokenizer, num_samples, seq_len, seed)[0]


def tokenize_records(
    records: Sequence[Record],
    tokenizer: Any,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`tokenize_texts` of records, and the mask of the tokens that belong to responses (``None`` when no record
    has one). A response's tokens are those of the whole text past the prompt's own tokens (a token that straddles the
    boundary counts as the response's), and the EOS after it."""
    if tokenizer is None:
        raise CalibrationError("calibration texts need a tokenizer; pass tokenizer= (or token ids as a tensor)")
    check_sizes(num_samples, seq_len)
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    in_response: list[bool] = []
    for record in records:
        text, answered = _joined(record), not isinstance(record, str)
        try:
            ids = [int(i) for i in tokenizer(text)["input_ids"]]
            prompt = tokenizer(record[0])["input_ids"] if answered else []
        except Exception as e:
            raise CalibrationError(f"the tokenizer failed on calibration text {text[:60]!r}: {e}") from e
        shared = 0  # the prompt's tokens, as they appear at the start of the whole text
        while shared < min(len(ids), len(prompt)) and ids[shared] == prompt[shared]:
            shared += 1
        stream.extend(ids)
        in_response.extend(answered and i >= shared for i in range(len(ids)))
        if eos is not None and (not ids or ids[-1] != eos):
            stream.append(int(eos))
            in_response.append(answered)
    total = len(stream)
    if total < 2:
        raise CalibrationError(f"calibration texts give only {total} token(s); need at least 2")
    width = min(seq_len, total)
    usable = (total // width) * width
    chunks = torch.tensor(stream[:usable], dtype=torch.long).view(-1, width)
    mask = torch.tensor(in_response[:usable], dtype=torch.bool).view(-1, width) if any(in_response) else None
    if chunks.shape[0] < num_samples or total < seq_len:
        warnings.warn(
            f"calibration texts give only {total} tokens; using one sequence of {total} tokens instead of "
            f"{num_samples} x {seq_len}" if total < seq_len else
            f"calibration texts give only {chunks.shape[0]} sequences of {seq_len} tokens (asked for {num_samples})",
            stacklevel=user_stacklevel(),
        )  # fmt: skip
        return chunks, mask
    pick = torch.randperm(chunks.shape[0], generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values
    return chunks[pick], mask[pick] if mask is not None else None


def generic_texts() -> list[str]:
    """The built-in generic calibration text (``generic_text.txt``: about 8,000 tokens of original prose, dialogue,
    code, worked problems and instructions; one text per paragraph), for runs that cannot sample from the fine-tune."""
    from importlib.resources import files

    content = files(__package__).joinpath("generic_text.txt").read_text(encoding="utf-8")
    return [p.strip("\n") for p in content.split("\n\n") if p.strip()]


# ---------------------------------------------------------------------------------------------- entry point


def get_calibration(
    calibration: CalibrationSource,
    model: Any,
    tokenizer: Any = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    progress: bool = False,
) -> CalibrationData:
    """Resolve any calibration source into a batch of token ids for ``model`` (the fine-tune)."""
    check_sizes(num_samples, seq_len)
    if calibration is None:
        ids = sample_from_model(model, tokenizer, num_samples, seq_len, seed, progress=progress)
        source = "sampled from the fine-tuned model"
    elif isinstance(calibration, torch.Tensor):
        ids = calibration
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.is_floating_point() or ids.shape[1] < 1:
            raise CalibrationError(
                f"calibration tensor must be (num_samples, seq_len) token ids, got {ids.dtype} {tuple(ids.shape)}"
            )
        ids = ids.long().cpu()
        source = f"token tensor {tuple(ids.shape)}"
    else:
        texts = read_records(calibration, tokenizer)
        ids = tokenize_texts(texts, tokenizer, num_samples, seq_len, seed)
        if isinstance(calibration, (str, os.PathLike)):
            source = f"file {os.fspath(calibration)}"
        else:
            source = f"list of {len(texts)} texts"
    vocab = vocab_size(model)
    if vocab is not None and ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise CalibrationError(
            f"calibration token ids range over [{int(ids.min())}, {int(ids.max())}] but the model's vocabulary has "
            f"{vocab} entries; is the tokenizer the model's own?"
        )
    return CalibrationData(ids.contiguous(), source)
