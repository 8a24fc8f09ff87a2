"""Calibration data for vision-language models: image + text records through the processor, or text only.

Image + text pairs when the user gives them (a list of ``{"image": ..., "text": ...}`` records, ``(image, text)``
tuples, or a ``.jsonl`` file whose records name image files) run through the whole VLM forward with the base model's
processor; text-only sequences otherwise (the usual text calibration). Which kind is used is logged (logger
``hf_deltacome.multimodal``) and recorded in ``config.compression_info``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compression.calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, get_calibration
from ..errors import CalibrationError

logger = logging.getLogger("hf_deltacome.multimodal")


def split_processor(tokenizer: Any = None, processor: Any = None) -> tuple[Any, Any]:
    """``(tokenizer, processor)`` from what the user passed: a processor given as ``tokenizer=`` is recognised."""
    if processor is None and tokenizer is not None and hasattr(tokenizer, "image_processor"):
        processor = tokenizer
    if processor is not None and (tokenizer is None or tokenizer is processor):
        tokenizer = getattr(processor, "tokenizer", None)
    return tokenizer, processor


# ================================================================================ calibration


@dataclass
class VLMCalibration:
    """Calibration batches for a VLM: each batch is a dict of model inputs (``input_ids``, ``pixel_values``, ...).

    ``kind`` is ``"image+text"`` or ``"text-only"``; ``source`` says where the data came from.
    """

    batches: list[dict[str, torch.Tensor]]
    source: str
    kind: str

    @property
    def num_samples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @property
    def seq_len(self) -> int:
        """The longest sample, in tokens (image placeholder tokens included)."""
        return max((int(b["input_ids"].shape[1]) for b in self.batches), default=0)

    @property
    def has_images(self) -> bool:
        return self.kind == "image+text"

    @property
    def input_ids(self) -> torch.Tensor | None:
        """All token ids as one ``(num_samples, seq_len)`` tensor for text-only data; None with images (they are
        needed with the ids, and samples differ in length)."""
        if self.has_images or not self.batches:
            return None
        return torch.cat([b["input_ids"] for b in self.batches])


@dataclass
class _Record:
    images: list[Any]
    text: str | None = None
    answer: str | None = None
    messages: list[dict] | None = None
    where: str = ""


_IMAGE_KEYS = ("image", "images")
_ANSWER_KEYS = ("answer", "completion", "response")


def _is_image(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, Image.Image)


def _record_has_image(rec: Any) -> bool:
    if isinstance(rec, (tuple, list)) and len(rec) == 2 and isinstance(rec[1], str):
        return True
    if isinstance(rec, dict):
        if any(rec.get(k) is not None for k in _IMAGE_KEYS):
            return True
        return bool(_message_images(rec.get("messages")))
    return False


def _message_images(messages: Any) -> list[Any]:
    out: list[Any] = []
    if not isinstance(messages, list):
        return out
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    payload = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
                    out.append(payload)
    return out


def _to_record(rec: Any, where: str) -> _Record:
    if isinstance(rec, (tuple, list)):
        images, text = rec
        return _Record(images=images if isinstance(images, list) else [images], text=text, where=where)
    images: list[Any] = []
    for key in _IMAGE_KEYS:
        value = rec.get(key)
        if value is not None:
            images.extend(value if isinstance(value, list) else [value])
    messages = rec.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise CalibrationError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}}")
        in_messages = _message_images(messages)
        if not images:
            images = in_messages
        if any(i is None for i in images):
            raise CalibrationError(f"{where}: an image part of 'messages' has no 'image', 'url' or 'path'")
        return _Record(images=images, messages=messages, where=where)
    text = rec.get("text", rec.get("prompt"))
    if not isinstance(text, str):
        raise CalibrationError(f"{where}: an image + text record needs 'text' (or 'prompt' or 'messages')")
    answer = next((rec[k] for k in _ANSWER_KEYS if isinstance(rec.get(k), str)), None)
    return _Record(images=images, text=text, answer=answer, where=where)


def image_text_records(calibration: Any) -> list[_Record] | None:
    """The image + text records of ``calibration``, or None when it carries no images (text-only calibration).

    Accepted: a list of ``{"image"|"images": ..., "text"|"prompt"[, "answer"] | "messages": ...}`` dicts or
    ``(image, text)`` tuples (images as PIL images or file paths), or a ``.jsonl`` file of such dicts whose image
    paths are relative to the file. Mixed lists (some records without an image) are rejected.
    """
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        if path.suffix.lower() != ".jsonl" or not path.is_file():
            return None
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CalibrationError(f"cannot read calibration file {str(path)!r}: {e}") from e
        raw = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                raw.append((json.loads(line), f"{path}:{i}"))
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{i}: invalid JSON ({e.msg})") from e
        if not any(isinstance(r, dict) and _record_has_image(r) for r, _ in raw):
            return None
        records = []
        for r, where in raw:
            if not isinstance(r, dict) or not _record_has_image(r):
                raise CalibrationError(f"{where}: record has no image, but other records of this file do")
            rec = _to_record(r, where)
            rec.images = [
                path.parent / i if isinstance(i, str) and not Path(i).is_absolute() else i for i in rec.images
            ]
            records.append(rec)
        return records
    if isinstance(calibration, torch.Tensor) or calibration is None or isinstance(calibration, (str, bytes)):
        return None
    if not isinstance(calibration, Sequence) or not calibration:
        return None
    flags = [_record_has_image(r) for r in calibration]
    if not any(flags):
        return None
    if not all(flags):
        bad = flags.index(False)
        raise CalibrationError(
            f"calibration record {bad} has no image, but other records do; give image + text records only, "
            "or plain texts only"
        )
    return [_to_record(r, f"calibration record {i}") for i, r in enumerate(calibration)]


def _load_image(value: Any, where: str) -> Any:
    if _is_image(value):
        return value.convert("RGB") if value.mode != "RGB" else value
    if isinstance(value, (str, os.PathLike)):
        from PIL import Image

        try:
            with Image.open(value) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as e:
            raise CalibrationError(f"{where}: cannot open image file {os.fspath(value)!r}: {e}") from e
    raise CalibrationError(f"{where}: an image must be a PIL image or a file path, got {type(value).__name__}")


def _strip_image_payloads(messages: list[dict]) -> list[dict]:
    """Messages with image parts reduced to ``{"type": "image"}`` (the images go to the processor separately)."""
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            content = [{"type": "image"} if p.get("type") == "image" else p for p in content]
        out.append({**msg, "content": content})
    return out


def _render(processor: Any, rec: _Record) -> str:
    """The prompt string of one record, with one image placeholder per image."""
    template = getattr(processor, "chat_template", None)
    if rec.messages is not None:
        if not template:
            raise CalibrationError(f"{rec.where}: 'messages' need a processor with a chat template")
        messages = _strip_image_payloads(rec.messages)
        prompt = processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=messages[-1]["role"] != "assistant"
        )
        return prompt[0] if isinstance(prompt, list) else prompt
    image_token = getattr(processor, "image_token", None) or "<image>"
    if image_token in rec.text or not template:
        prompt = rec.text if image_token in rec.text else image_token * len(rec.images) + "\n" + rec.text
        return prompt + (" " + rec.answer if rec.answer else "")
    messages: list[dict] = [
        {"role": "user", "content": [{"type": "image"}] * len(rec.images) + [{"type": "text", "text": rec.text}]}
    ]
    if rec.answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": rec.answer}]})
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=rec.answer is None)
    return prompt[0] if isinstance(prompt, list) else prompt


def encode_record(processor: Any, rec: _Record) -> dict[str, torch.Tensor]:
    """Processor outputs (batch of one) for one image + text record."""
    if not rec.images:
        raise CalibrationError(f"{rec.where}: no image")
    images = [_load_image(i, rec.where) for i in rec.images]
    prompt = _render(processor, rec)
    try:
        enc = processor(images=images, text=[prompt], return_tensors="pt")
    except Exception as e:  # the processor's own message says what is wrong (e.g. image-token count)
        raise CalibrationError(f"{rec.where}: the processor failed on this record: {e}") from e
    out = {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}
    if "input_ids" not in out:
        raise CalibrationError(f"{rec.where}: the processor returned no input_ids")
    return out


def _group_by_length(samples: list[dict[str, torch.Tensor]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Concatenate samples of equal length and equal non-batch shapes into batches (no padding needed)."""
    groups: dict[tuple, list[dict[str, torch.Tensor]]] = {}
    for s in samples:
        key = tuple(sorted((k, tuple(v.shape[1:])) for k, v in s.items()))
        groups.setdefault(key, []).append(s)
    batches = []
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            batches.append({k: torch.cat([s[k] for s in chunk]) for k in chunk[0]})
    return batches


def get_vlm_calibration(
    calibration: Any,
    model: nn.Module,
    tokenizer: Any = None,
    processor: Any = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    batch_size: int = 8,
) -> VLMCalibration:
    """Calibration batches for the VLM ``model`` (the fine-tune): image + text pairs when given, else text only.

    Image + text records are rendered with the processor's chat template (or ``<image>\\n`` + text when it has none),
    encoded one by one and used whole (``seq_len`` applies to text-only data); at most ``num_samples`` records are
    used (a seeded random pick). Anything else (texts, files, token ids, ``None`` = sample text from the fine-tune)
    is text calibration, exactly as for a text model. Logs which kind is used.
    """
    tokenizer, processor = split_processor(tokenizer, processor)
    records = image_text_records(calibration)
    if records is not None:
        if processor is None or not hasattr(processor, "image_processor"):
            raise CalibrationError(
                "image + text calibration needs the base model's processor (image processor + tokenizer); "
                "pass processor= (e.g. AutoProcessor.from_pretrained(base))"
            )
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise CalibrationError(f"num_samples must be a positive integer, got {num_samples!r}")
        if len(records) > num_samples:
            keep = sorted(random.Random(seed).sample(range(len(records)), num_samples))
            records = [records[i] for i in keep]
        dtype = next(model.parameters()).dtype  # pixel values in the model's dtype, as pipelines pass them
        samples = [
            {k: v.to(dtype) if v.is_floating_point() else v for k, v in encode_record(processor, r).items()}
            for r in records
        ]
        source = (
            f"file {os.fspath(calibration)}"
            if isinstance(calibration, (str, os.PathLike))
            else f"list of {len(records)} image + text records"
        )
        result = VLMCalibration(_group_by_length(samples, batch_size), f"{source} (image + text)", "image+text")
        logger.info(
            "calibrating %s on %d image + text pairs from %s (up to %d tokens each)",
            type(model).__name__,
            result.num_samples,
            source,
            result.seq_len,
        )
        return result
    data = get_calibration(calibration, model, tokenizer, num_samples, seq_len, seed)
    batches = [{"input_ids": b} for b in data.input_ids.split(batch_size)]
    result = VLMCalibration(batches, f"{data.source} (text only)", "text-only")
    logger.info(
        "calibrating %s on text only (%d sequences of %d tokens, %s): no images were given, so the projector "
        "and vision-tower targets are rounded to nearest",
        type(model).__name__,
        data.num_samples,
        data.seq_len,
        data.source,
    )
    return result
