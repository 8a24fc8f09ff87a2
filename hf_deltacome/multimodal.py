"""Vision-language models (LLaVA-style ``*ForConditionalGeneration``): parts, targets, calibration, loading.

A VLM is a vision tower, a multimodal projector and a language model. Delta-CoMe treats them as follows:

* **targets** (by default): every ``nn.Linear`` in the language model's decoder layers and in the projector, plus the
  vision tower's linears *whose weights changed* (a tower the fine-tune froze is left alone). Explicit
  ``target_modules`` may select linears of any of the three parts. Everything else that changed (embeddings,
  ``lm_head``, norms, the vision embeddings, ...) is carried densely, as for text models.
* **calibration**: image + text pairs when the user gives them (a list of ``{"image": ..., "text": ...}`` records,
  ``(image, text)`` tuples, or a ``.jsonl`` file whose records name image files), run through the whole VLM
  forward with the base model's processor; text-only sequences otherwise (the usual text calibration). Which kind is
  used is logged (logger ``hf_deltacome.multimodal``) and recorded in ``config.compression_info``.
* **projector and vision tower** run outside the decoder layers. With image + text calibration their linears are
  quantized with GPTQ against input Hessians collected from one forward pass of the *fine-tuned* model (not
  sequentially, unlike the decoder layers); with text-only calibration (or ``quantizer="rtn"``) they get no
  activations and are rounded to nearest (data-free), which ``compression_info["fallbacks"]`` lists.
* **loading**: the adapter of a VLM has ``task_type=None``, so PEFT records the model class (``auto_mapping``) and
  ``PeftModel.from_pretrained(vlm_base, adapter)`` and ``peft.AutoPeftModel.from_pretrained(adapter)`` both work.
  PEFT has no ``AutoPeftModelForImageTextToText``; :class:`AutoDeltaCoMeModelForImageTextToText` fills that gap
  (loads the base with ``AutoModelForImageTextToText``). The processor and chat template come from the base
  (:func:`load_processor`). Importing this module lets ``pipeline("image-text-to-text", model=peft_model)`` accept
  a ``PeftModel`` without logging "not supported".
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN
from .errors import CalibrationError, ConfigError, IncompatibleModelsError

logger = logging.getLogger(__name__)

IMAGE_TEXT_TO_TEXT = "image-text-to-text"

# Attribute names transformers uses for the module that maps vision features into the language model's space.
PROJECTOR_NAMES = (
    "multi_modal_projector",
    "multimodal_projector",
    "mm_projector",
    "merger",
    "connector",
    "projector",
    "visual_projection",
    "vision_projection",
    "embed_vision",
    "aligner",
    "vision_adapter",
)

# Config fields that change how image features reach the language model without changing any parameter shape.
_VLM_CONFIG_KEYS = (
    "image_token_id",
    "image_token_index",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "projector_hidden_act",
    "multimodal_projector_bias",
    "image_seq_length",
    "mm_tokens_per_image",
)
_VISION_CONFIG_KEYS = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "depth", "spatial_merge_size")

LANGUAGE, PROJECTOR, VISION, OTHER = "language", "projector", "vision", "other"


# ================================================================================ detection and parts


def is_vlm(model_or_config: Any) -> bool:
    """True for a vision-language model (or its config): a config with a ``vision_config`` and a separate LM."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "vision_config", None) is None:
        return False
    if isinstance(model_or_config, nn.Module):
        try:
            vlm_parts(model_or_config)
        except ConfigError:
            return False
    return True


@dataclass(frozen=True)
class VLMParts:
    """Module-name prefixes of the parts of a VLM, e.g. for ``LlavaForConditionalGeneration``:
    ``language="model.language_model"``, ``layers="model.language_model.layers"``, ``vision="model.vision_tower"``,
    ``projectors=("model.multi_modal_projector",)``."""

    language: str
    layers: str
    vision: str | None
    projectors: tuple[str, ...] = field(default_factory=tuple)

    def part_of(self, name: str) -> str:
        """``"projector"``, ``"language"`` (inside a decoder layer), ``"vision"`` or ``"other"`` for a module name."""
        if any(_under(name, p) for p in self.projectors):
            return PROJECTOR
        if re.match(re.escape(self.layers) + r"\.\d+(\.|$)", name):
            return LANGUAGE
        if self.vision is not None and _under(name, self.vision):
            return VISION
        return OTHER


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _name_of(model: nn.Module, module: Any) -> str | None:
    if module is None or module is model:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def vlm_parts(model: nn.Module) -> VLMParts:
    """Find the language model, its decoder layers, the vision tower and the projector(s) of ``model``.

    Uses transformers' ``get_decoder()`` / ``get_encoder(modality="image")`` lookups, so any VLM that follows the
    library's naming (``language_model``, ``vision_tower`` / ``visual`` / ``vision_model``, ``multi_modal_projector``
    / ``merger`` / ...) is understood. Raises `ConfigError` when ``model`` has no separate language model.
    """
    what = type(model).__name__
    get_decoder = getattr(model, "get_decoder", None)
    language = _name_of(model, get_decoder() if callable(get_decoder) else None)
    if language is None:
        raise ConfigError(f"{what} has no separate language model (get_decoder() returns the model itself)")
    get_encoder = getattr(model, "get_encoder", None)
    vision = None
    if callable(get_encoder):
        try:
            vision = _name_of(model, get_encoder(modality="image"))
        except (TypeError, ValueError):
            vision = None
    if vision is not None and (_under(language, vision) or _under(vision, language)):
        vision = None
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = getattr(text_config, "num_hidden_layers", None)
    lists = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and _under(n, language)
        and len(m) > 0
        and (n_layers is None or len(m) == n_layers)
    ]
    if not lists:
        raise ConfigError(f"cannot find the decoder layers of {what}'s language model {language!r}")
    preferred = [c for c in lists if re.search(r"(^|\.)(layers|h|blocks|layer)$", c[0])]
    layers = (preferred or lists)[0][0]
    projectors: list[str] = []
    for n, _ in model.named_modules():
        if n.rsplit(".", 1)[-1] in PROJECTOR_NAMES and not _under(n, language):
            if not any(_under(n, p) for p in projectors):
                projectors.append(n)
    return VLMParts(language=language, layers=layers, vision=vision, projectors=tuple(projectors))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and `nn.ModuleList` of the language model's decoder layers (never the vision tower's layers)."""
    parts = vlm_parts(model)
    return parts.layers, model.get_submodule(parts.layers)


# ================================================================================ checks and targets


def check_vlm_compatible(base: nn.Module, finetuned: nn.Module) -> None:
    """Raise `IncompatibleModelsError` when the fine-tune's projector, vision tower or image wiring differ from the base.

    Parameter shapes of the projector are compared here with a message of their own (a different projector usually
    means a fine-tune of another base or vision tower); config fields such as ``vision_feature_layer`` or
    ``image_token_id`` change the model without changing any shape, so they are compared too.
    """
    problems: list[str] = []
    cb, cf = base.config, finetuned.config
    for key in _VLM_CONFIG_KEYS:
        vb, vf = getattr(cb, key, None), getattr(cf, key, None)
        if vb != vf:
            problems.append(f"config.{key}: base {vb!r}, fine-tuned {vf!r}")
    vcb, vcf = getattr(cb, "vision_config", None), getattr(cf, "vision_config", None)
    if (vcb is None) != (vcf is None):
        problems.append("config.vision_config: only one of the two models is a vision-language model")
    elif vcb is not None:
        for key in _VISION_CONFIG_KEYS:
            vb, vf = getattr(vcb, key, None), getattr(vcf, key, None)
            if vb != vf:
                problems.append(f"config.vision_config.{key}: base {vb!r}, fine-tuned {vf!r}")
    try:
        pb, pf = vlm_parts(base), vlm_parts(finetuned)
    except ConfigError as e:
        raise IncompatibleModelsError(
            f"cannot split the models into vision tower, projector and language model: {e}"
        ) from e
    if pb != pf:
        problems.append(f"model parts: base {pb}, fine-tuned {pf}")
    else:
        params_f = dict(finetuned.named_parameters())
        for name, p in base.named_parameters():
            if pb.part_of(name) == PROJECTOR and name in params_f and params_f[name].shape != p.shape:
                problems.append(
                    f"multimodal projector parameter {name!r}: base shape {tuple(p.shape)}, "
                    f"fine-tuned shape {tuple(params_f[name].shape)}"
                )
    if problems:
        raise IncompatibleModelsError(
            f"the base and fine-tuned vision-language models ({type(base).__name__}) do not match "
            f"({len(problems)} difference(s)); was the fine-tune made from this base?\n  " + "\n  ".join(problems)
        )


@torch.no_grad()
def _linear_changed(a: nn.Linear, b: nn.Linear) -> bool:
    if not torch.equal(a.weight.detach().cpu(), b.weight.detach().cpu()):
        return True
    if (a.bias is None) != (b.bias is None):
        return True
    return a.bias is not None and not torch.equal(a.bias.detach().cpu(), b.bias.detach().cpu())


def select_vlm_targets(base: nn.Module, finetuned: nn.Module, config: Any) -> tuple[str, list[str]]:
    """The decoder-layers prefix and the target linears of a VLM, in module order.

    Default (``config.target_modules is None``): the language model's decoder-layer linears, the projector's
    linears, and the vision tower's linears that changed. With ``target_modules``, the matching linears of those
    three parts (a pattern selecting e.g. ``lm_head`` raises: such modules are carried densely).
    ``config.exclude_modules`` is applied last.
    """
    from .compress import _matches, _show  # the same target_modules semantics as for text models

    parts = vlm_parts(base)
    ft_modules = dict(finetuned.named_modules())
    linears = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    part = {n: parts.part_of(n) for n in linears}
    if config.target_modules is None:
        targets = [n for n in linears if part[n] in (LANGUAGE, PROJECTOR)]
        targets += [
            n
            for n in linears
            if part[n] == VISION and n in ft_modules and _linear_changed(base.get_submodule(n), ft_modules[n])
        ]
    else:
        targets = [n for n in linears if _matches(n, config.target_modules)]
        if not targets:
            available = sorted({n.rsplit(".", 1)[-1] for n in linears if part[n] != OTHER})
            raise ConfigError(
                f"target_modules={_show(config.target_modules)} matches no nn.Linear of {type(base).__name__}; "
                f"its language-model, projector and vision-tower linears are named {available}"
            )
        outside = [n for n in targets if part[n] == OTHER]
        if outside:
            raise ConfigError(
                f"target_modules={_show(config.target_modules)} selects {outside[:5]}, which are neither in the "
                f"language model's decoder layers ({parts.layers}.N), the projector ({', '.join(parts.projectors)}) "
                f"nor the vision tower ({parts.vision}); other changed modules are stored dense"
            )
    if config.exclude_modules is not None:
        targets = [n for n in targets if not _matches(n, config.exclude_modules)]
    if not targets:
        raise ConfigError("no target linear left to compress after exclude_modules")
    order = {n: i for i, n in enumerate(linears)}
    return parts.layers, sorted(set(targets), key=order.__getitem__)


def outside_layer_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The targets that are not inside a decoder layer (projector and vision-tower linears), in order."""
    parts = vlm_parts(model)
    return [t for t in targets if parts.part_of(t) != LANGUAGE]


# ================================================================================ processor / tokenizer


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
    from .calibration import get_calibration

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


# ================================================================================ Hessians outside the decoder


class _StopForward(Exception):
    """Raised by a pre-hook on the first decoder layer: everything before the language model has run."""


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def collect_outside_hessians(
    finetuned: nn.Module,
    names: Sequence[str],
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Input Hessians (`GPTQ` accumulators) of the projector / vision-tower ``names``, from the fine-tuned model.

    Runs the fine-tune's forward on each image + text batch with hooks on those linears and stops at its first
    decoder layer (projector and vision tower run before the language model in every supported VLM), so the
    language model itself is not evaluated. Targets that see no input are absent from the result.
    """
    from .gptq import GPTQ

    if not names:
        return {}
    parts = vlm_parts(finetuned)
    first_layer = finetuned.get_submodule(parts.layers)[0]
    hessians: dict[str, GPTQ] = {}
    handles = []

    def stop(_m: nn.Module, _args: Any, _kwargs: Any) -> None:
        raise _StopForward

    for name in names:
        module = finetuned.get_submodule(name)

        def hook(m: nn.Module, inp: tuple, _out: Any, name: str = name) -> None:
            x = inp[0]
            if name not in hessians:
                hessians[name] = GPTQ(x.shape[-1], device=device or x.device, name=name)
            hessians[name].add_batch(x)

        handles.append(module.register_forward_hook(hook))
    handles.append(first_layer.register_forward_pre_hook(stop, with_kwargs=True))
    emb_device = next(finetuned.get_input_embeddings().parameters()).device
    was_training = finetuned.training
    finetuned.eval()
    try:
        for batch in batches:
            try:
                finetuned(**_to(batch, emb_device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        finetuned.train(was_training)
    return hessians


# ================================================================================ loading


def register_pipeline_support() -> None:
    """Let ``pipeline("image-text-to-text", model=peft_model)`` accept a ``PeftModel`` without an error log.

    transformers keeps a per-task list of PEFT wrapper classes it accepts; image-text-to-text has none, although
    the generic ``PeftModel`` (our VLM adapters' class) forwards ``generate`` to the wrapped model and works.
    """
    try:
        from transformers.pipelines import base as pipeline_base
    except ImportError:  # pragma: no cover
        return
    supported = getattr(pipeline_base, "SUPPORTED_PEFT_TASKS", None)
    if isinstance(supported, dict):
        names = supported.setdefault(IMAGE_TEXT_TO_TEXT, [])
        if "PeftModel" not in names:
            names.append("PeftModel")


def _adapter_config(adapter: str | os.PathLike) -> dict:
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{os.fspath(adapter)!r} is not an adapter folder (no adapter_config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {str(path)!r}: {e}") from e


def _base_path(adapter: str | os.PathLike) -> str:
    if not (Path(adapter) / "adapter_config.json").is_file():
        return os.fspath(adapter)  # a base model folder or Hub id itself
    base = _adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise ConfigError(
            f"{os.fspath(adapter)}/adapter_config.json has no base_model_name_or_path; pass the base model explicitly"
        )
    return base


def _check_local(name_or_path: str, what: str) -> None:
    """A path that looks local must be an existing folder (else transformers reports a confusing Hub-id error)."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.path.exists(name_or_path)
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise ConfigError(f"{what} {name_or_path!r}: no such folder")


def load_processor(adapter_or_base: str | os.PathLike, **kwargs: Any) -> Any:
    """The processor (image processor, tokenizer, chat template) of the adapter's base model.

    ``adapter_or_base`` is an adapter folder (its ``base_model_name_or_path`` is used) or a base model folder / id.
    """
    from transformers import AutoProcessor

    base = _base_path(adapter_or_base)
    _check_local(base, "base model")
    try:
        return AutoProcessor.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the processor of base model {base!r}: {e}") from e


class AutoDeltaCoMeModelForImageTextToText:
    """``AutoPeftModel``-style loader for Delta-CoMe adapters of image-text-to-text models.

    PEFT 0.21 has no ``AutoPeftModelForImageTextToText``. ``peft.AutoPeftModel.from_pretrained(adapter)`` also works
    for our VLM adapters (they record the model class); this class loads the base with transformers'
    ``AutoModelForImageTextToText`` instead and accepts a base model (instance or path) to use in place of the one
    recorded in ``adapter_config.json``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is used through its from_pretrained() class method")

    @classmethod
    def from_pretrained(
        cls,
        adapter: str | os.PathLike,
        base_model: nn.Module | str | os.PathLike | None = None,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """Load the base VLM (``base_model`` or the adapter's recorded base) and apply the adapter on top.

        ``model_kwargs`` (``dtype``, ``device_map``, ...) go to ``AutoModelForImageTextToText.from_pretrained``.
        """
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText

        from . import DeltaCoMeConfig  # noqa: F401 - registers the method with PEFT

        register_pipeline_support()
        if base_model is None or isinstance(base_model, (str, os.PathLike)):
            path = os.fspath(base_model) if base_model is not None else _base_path(adapter)
            _check_local(path, "base model")
            try:
                base_model = AutoModelForImageTextToText.from_pretrained(path, **model_kwargs)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot load base model {path!r} as an image-text-to-text model: {e}") from e
        if not is_vlm(base_model):
            raise ConfigError(f"{type(base_model).__name__} is not a vision-language model")
        return PeftModel.from_pretrained(base_model, adapter, adapter_name=adapter_name, is_trainable=is_trainable)


def is_vlm_checkpoint(name_or_path: str) -> bool:
    """True when the model at ``name_or_path`` is a VLM that ``AutoModelForImageTextToText`` loads."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return False
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and is_vlm(config)


def load_vlm_and_processor(name_or_path: str, dtype: Any = "auto", device_map: str | None = None) -> tuple[Any, Any]:
    """Load a VLM with ``AutoModelForImageTextToText`` and its processor (None when it has none), eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, device_map=device_map)
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        processor = None
    return model.eval(), processor


register_pipeline_support()

__all__ = [
    "AutoDeltaCoMeModelForImageTextToText",
    "VLMCalibration",
    "VLMParts",
    "check_vlm_compatible",
    "collect_outside_hessians",
    "decoder_layers",
    "get_vlm_calibration",
    "image_text_records",
    "is_vlm",
    "is_vlm_checkpoint",
    "load_processor",
    "load_vlm_and_processor",
    "outside_layer_targets",
    "register_pipeline_support",
    "select_vlm_targets",
    "split_processor",
    "vlm_parts",
]
