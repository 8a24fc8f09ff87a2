"""Tiny random LLaVA models, an offline processor and synthetic fine-tunes for fast CPU tests.

API (import from other tests: ``from tiny_vlm import make_llava, make_processor, ...``):

* ``make_llava(seed=0, **overrides)`` -> a random ``LlavaForConditionalGeneration`` (CLIP vision tower of 2 layers,
  2-layer MLP projector, 2-layer Llama text model with GQA), float32, eval mode. The vision tower has as many layers
  as the text model on purpose, so code that looks for "the" decoder layers by length must pick the right list.
  ``overrides`` go into ``LlavaConfig`` (``text_config``/``vision_config`` entries are merged into the defaults).
* ``make_processor()`` -> a ``LlavaProcessor`` (CLIP image processor + word-level tokenizer + chat template) built
  from arguments, with no download.
* ``make_vlm_finetune(base, seed=0, parts=("language", "projector", "vision"))`` -> a deep copy of ``base`` whose
  linears in ``parts`` get low-rank + noise deltas (and whose norms / biases there move a little).
* ``make_image(colour, shape, size)`` -> a PIL image of a coloured shape on a white background.
* ``image_text_inputs(processor, n, seed)`` -> processor outputs (``input_ids``, ``attention_mask``,
  ``pixel_values``) for ``n`` prompts, each with one generated image.
* ``vlm_logits(model, inputs)`` and ``relative_vlm_error(model, finetune, base, inputs)`` as in ``tiny_models``.
"""

from __future__ import annotations

import copy
import random
import re

import torch
from PIL import Image, ImageDraw
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")

IMAGE_SIZE = 32
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # vision_feature_select_strategy="default" drops the CLS token

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
WORDS = [
    "USER",
    "ASSISTANT",
    ":",
    "?",
    ".",
    ",",
    "what",
    "which",
    "colour",
    "color",
    "shape",
    "is",
    "the",
    "this",
    "a",
    "an",
    "it",
    "in",
    "image",
    "picture",
    "of",
    "describe",
    *COLOURS,
    *SHAPES,
]
VOCAB_SIZE = 96  # words fill the first ids, the rest are filler tokens so random ids hit real embeddings

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def make_tokenizer():
    """A word-level fast tokenizer over ``WORDS`` (plus filler tokens), with ``<image>`` as a special token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"w{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_processor():
    """A ``LlavaProcessor`` for ``make_llava`` models, built offline (``CLIPImageProcessor`` from arguments)."""
    from transformers import LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=make_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )


def _merge(defaults: dict, overrides: dict | None) -> dict:
    return {**defaults, **(overrides or {})}


def make_llava(seed: int = 0, **overrides) -> LlavaForConditionalGeneration:
    """A tiny random LLaVA (CLIP 32x32 images in 8x8 patches, 2 vision layers, 2 text layers), float32, eval mode."""
    vision = _merge(
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=32,
        ),
        overrides.pop("vision_config", None),
    )
    text = _merge(
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        overrides.pop("text_config", None),
    )
    kwargs = dict(
        image_token_id=SPECIAL_TOKENS.index("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,  # every vision layer matters (LLaVA-1.5 uses -2, which leaves the last one unused)
        vision_feature_select_strategy="default",
        image_seq_length=NUM_IMAGE_TOKENS,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text), **kwargs)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float().eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.name_or_path = "tiny-random-llava"
    model.config._name_or_path = model.name_or_path
    return model


PART_PATTERNS = {
    "language": r"model\.language_model\.",
    "projector": r"model\.multi_modal_projector\.",
    "vision": r"model\.vision_tower\.",
}


def part_linears(model: nn.Module, part: str) -> list[str]:
    """Names of the ``nn.Linear`` modules of one part (``language`` = inside the text decoder layers)."""
    pattern = PART_PATTERNS[part] + (r"layers\.\d+\." if part == "language" else "")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.match(pattern, n)]


@torch.no_grad()
def make_vlm_finetune(
    base: nn.Module,
    seed: int = 0,
    *,
    parts: tuple[str, ...] = ("language", "projector", "vision"),
    scale: float = 0.3,
    rank: int = 4,
    decay: float = 0.8,
    noise: float = 0.02,
) -> nn.Module:
    """A deep copy of ``base`` where every linear of ``parts`` gets ``Δ = U diag(σ) Vᵀ + noise``.

    ``rank`` strong directions over a decaying tail (``||Δ||_F = scale · ||W||_F``) plus i.i.d. noise of relative size
    ``noise``; biases of those linears shift by ``0.05·ε`` and the norms inside those parts are rescaled by
    ``1 + 0.1·ε``; with ``"vision"`` the vision embeddings (class, patch, position) move too. Parts not listed stay
    bit-identical to the base.
    """
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1000 + seed)
    names = {n for p in parts for n in part_linears(ft, p)}
    prefixes = tuple(PART_PATTERNS[p].replace("\\", "") for p in parts)
    for name, module in ft.named_modules():
        if name in names:
            W = module.weight
            m, n = W.shape
            k = min(m, n)
            sigma = (torch.arange(k, dtype=torch.float32) + 1.0) ** -decay
            sigma[:rank] *= 4.0
            qu, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
            qv, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
            d = qu @ torch.diag(sigma) @ qv.t()
            d = d * (scale * W.norm() / d.norm())
            d += torch.randn(m, n, generator=g) * (noise * W.norm() / (m * n) ** 0.5)
            W.add_(d)
            if module.bias is not None:
                module.bias.add_(0.05 * torch.randn(module.bias.shape, generator=g))
        elif name.startswith(prefixes) and "norm" in type(module).__name__.lower():
            module.weight.mul_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=g))
    if "vision" in parts:  # a full fine-tune moves the patch / position / class embeddings too (nested modules)
        emb = ft.model.vision_tower.embeddings
        for p in (emb.class_embedding, emb.patch_embedding.weight, emb.position_embedding.weight):
            p.add_(0.1 * p.std() * torch.randn(p.shape, generator=g))
    return ft.eval()


def make_image(colour: str, shape: str, size: int = IMAGE_SIZE) -> Image.Image:
    """A ``size x size`` RGB image with one filled ``shape`` of ``colour`` on white."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    lo, hi = size // 6, size - size // 6
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=fill)
    elif shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=fill)
    elif shape == "triangle":
        draw.polygon([(size // 2, lo), (lo, hi), (hi, hi)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def random_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` calibration/evaluation records ``{"image": PIL image, "text": question}``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        question = rng.choice(["what colour is the shape ?", "what shape is this ?", "describe the image ."])
        out.append({"image": make_image(colour, shape), "text": question})
    return out


def image_text_inputs(processor, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor outputs for ``n`` chat prompts, each with one image (left-padded to one batch)."""
    prompts, images = [], []
    for rec in random_pairs(n, seed):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rec["text"]}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        images.append(rec["image"])
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


@torch.no_grad()
def vlm_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``model`` on ``inputs``, at the positions the attention mask keeps."""
    out = model(**inputs).logits.float()
    mask = inputs.get("attention_mask")
    return out[mask.bool()] if mask is not None else out


@torch.no_grad()
def relative_vlm_error(model: nn.Module, finetune: nn.Module, base: nn.Module, inputs: dict) -> float:
    """``||L_model − L_ft|| / ||L_ft − L_base||`` on image + text inputs (0 = exact, 1 = as bad as the base)."""
    lf = vlm_logits(finetune, inputs)
    return float((vlm_logits(model, inputs) - lf).norm() / (lf - vlm_logits(base, inputs)).norm())
