"""Compress a LLaVA-style vision-language fine-tune with Delta-CoMe and ask it about an image through pipeline().

Runs offline on a CPU in well under a minute (no download: every model, image and the processor are built here):

1. builds a tiny LLaVA (CLIP vision tower, MLP projector, Llama text model) and its processor (CLIP image processor,
   word-level tokenizer, chat template) from configs;
2. trains it as the *base*: it learns to name the colour of the shape in a picture ("what colour is the shape ?");
3. fine-tunes a copy on a new skill that needs the picture, naming a fruit of the shape's colour ("which fruit has
   this colour ?" -> cherry / lime / blueberry / banana), with the vision tower frozen as in the LLaVA recipe (so
   the adapter leaves the tower alone; ``--train-vision`` fine-tunes it too, and its changed linears are then
   compressed as well);
4. compresses fine-tune − base with Delta-CoMe, calibrated on image + text pairs, and saves the adapter;
5. reloads base + adapter from disk (processor and chat template from the base) and answers questions about new
   images through ``pipeline("image-text-to-text")``.

It prints the adapter's size, and the accuracy and answer-logit error of base, fine-tune, compressed adapter and a
data-free (round-to-nearest) adapter of the same size on held-out images.

    python examples/llava_delta.py [--output-dir DIR] [--ratio 1/4] [--steps 150] [--train-vision]

The model is tiny (64 wide), so the default ratio is 1/4: at 1/16 a 64x64 delta affords only two singular vectors
(a 4096x4096 one affords about a thousand). A 7B LLaVA uses the library default of 1/16.
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    pipeline,
)

from hf_deltacome import DeltaCoMeConfig, compress
from hf_deltacome.io.summary import summarize_adapter
from hf_deltacome.multimodal import AutoDeltaCoMeModelForImageTextToText, load_processor

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
FRUITS = {"red": "cherry", "green": "lime", "blue": "blueberry", "yellow": "banana"}
COLOUR_Q, FRUIT_Q = "what colour is the shape ?", "which fruit has this colour ?"
QUESTIONS = (COLOUR_Q, FRUIT_Q)
IMAGE_SIZE, PATCH = 32, 8
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER:"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %} {{ part['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


# ================================================================================ model, processor, data


def build_processor() -> LlavaProcessor:
    """CLIP image processor + word-level tokenizer (with ``<image>``) + chat template, from arguments."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["USER", "ASSISTANT", ":", "?", "what", "which", "fruit", "has", "this", "colour", "shape", "is", "the"]
    words += [*COLOURS, *FRUITS.values()]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<image>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_llava(vocab_size: int) -> LlavaForConditionalGeneration:
    """A tiny LLaVA: 2-layer CLIP (32x32 images, 8x8 patches), 2-layer MLP projector, 2-layer Llama (64 wide)."""
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=3,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model


def draw(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A ``shape`` of ``colour`` (side and position slightly random) on a white background."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    side = rng.randint(14, 24)
    x0 = min(max((IMAGE_SIZE - side) // 2 + rng.randint(-3, 3), 0), IMAGE_SIZE - 1 - side)
    y0 = min(max((IMAGE_SIZE - side) // 2 + rng.randint(-3, 3), 0), IMAGE_SIZE - 1 - side)
    box = [x0, y0, x0 + side, y0 + side]
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return img


def sample(rng: random.Random, question: str) -> tuple[Image.Image, str, str]:
    """A random picture, the question, and its one-word answer."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    return draw(colour, shape, rng), question, colour if question == COLOUR_Q else FRUITS[colour]


def chat(question: str, image: Image.Image | None = None, answer: str | None = None) -> list[dict]:
    user = [{"type": "image", "image": image} if image is not None else {"type": "image"}]
    messages = [{"role": "user", "content": [*user, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def make_dataset(processor: LlavaProcessor, question: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` encoded examples of one question (equal lengths, no padding); labels cover the answer and ``</s>``."""
    rng = random.Random(seed)
    items = [sample(rng, question) for _ in range(n)]
    prompt = processor.apply_chat_template(chat(question), add_generation_prompt=True, tokenize=False)
    texts = [processor.apply_chat_template(chat(question, answer=a), tokenize=False) for _, _, a in items]
    data = dict(processor(images=[i for i, _, _ in items], text=texts, return_tensors="pt"))
    n_prompt = len(processor(images=[items[0][0]], text=[prompt], return_tensors="pt")["input_ids"][0])
    data["labels"] = data["input_ids"].clone()
    data["labels"][:, :n_prompt] = -100
    return data


def train(model, processor, schedule: list[str], steps: int, seed: int, lr: float = 3e-3, freeze_vision=False):
    """AdamW on batches of 32 drawn from 1024 pre-encoded examples per question; ``schedule`` cycles the questions."""
    datasets = {q: make_dataset(processor, q, 1024, seed + i) for i, q in enumerate(dict.fromkeys(schedule))}
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(not freeze_vision)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses: dict[str, float] = {}
    for step in range(steps):
        question = schedule[step % len(schedule)]
        idx = torch.randint(0, 1024, (32,), generator=gen)
        loss = model(**{key: v[idx] for key, v in datasets[question].items()}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses[question] = 0.9 * losses.get(question, loss.item()) + 0.1 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            shown = ", ".join(f"{q!r} {v:.3f}" for q, v in losses.items())
            print(f"   step {step + 1:4d}  loss {shown}", flush=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


@torch.no_grad()
def answer_logit_error(model, finetuned, base, processor, n: int = 64, seed: int = 54321) -> float:
    """``||L − L_ft|| / ||L_ft − L_base||`` of the answer logits on held-out fruit questions (0 = the fine-tune)."""
    rng = random.Random(seed)
    items = [sample(rng, FRUIT_Q) for _ in range(n)]
    prompt = processor.apply_chat_template(chat(FRUIT_Q), add_generation_prompt=True, tokenize=False)
    enc = dict(processor(images=[i for i, _, _ in items], text=[prompt] * n, return_tensors="pt"))
    lf, lb, lm = (m(**enc).logits[:, -1].float() for m in (finetuned, base, model))
    return float((lm - lf).norm() / (lf - lb).norm())


@torch.no_grad()
def accuracy(model, processor, question: str, n: int = 96, seed: int = 12345) -> float:
    """Share of held-out images whose greedy one-word answer is right."""
    rng = random.Random(seed)
    items = [sample(rng, question) for _ in range(n)]
    prompt = processor.apply_chat_template(chat(question), add_generation_prompt=True, tokenize=False)
    enc = processor(images=[i for i, _, _ in items], text=[prompt] * n, return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}
    next_token = model(**enc).logits[:, -1].argmax(-1)
    said = processor.tokenizer.convert_ids_to_tokens(next_token.tolist())
    return sum(s == a for s, (_, _, a) in zip(said, items)) / n


# ================================================================================ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default=None, help="where to write base/ and adapter/ (default: a temp dir)")
    ap.add_argument("--ratio", default="1/4", help="Delta-CoMe compression ratio (default 1/4 for this tiny model)")
    ap.add_argument("--steps", type=int, default=150, help="training steps of the base, and of the fine-tune")
    ap.add_argument("--train-vision", action="store_true", help="also fine-tune the vision tower")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="llava_delta_"))
    t0 = time.time()

    processor = build_processor()
    torch.manual_seed(args.seed)
    print("1. base: a tiny LLaVA trained to name the colour of the shape")
    base = train(build_llava(len(processor.tokenizer)), processor, [COLOUR_Q], args.steps, seed=args.seed)
    print(
        "2. fine-tune: also learns to name a fruit of that colour"
        + ("" if args.train_vision else " (vision tower frozen)")
    )
    finetuned = train(
        copy.deepcopy(base),
        processor,
        [FRUIT_Q, FRUIT_Q, COLOUR_Q],
        args.steps,
        args.seed + 1,
        freeze_vision=not args.train_vision,
    )

    # the base lives on disk, as a downloaded one would: the adapter records its path for loading later
    base.save_pretrained(out / "base")
    processor.save_pretrained(out / "base")
    reference = base  # compress() wraps the base it is given in place: give it a fresh copy
    base = AutoModelForImageTextToText.from_pretrained(out / "base").eval()

    print(f"3. compress fine-tune − base with Delta-CoMe at ratio {args.ratio}, calibrated on image + text pairs")
    rng = random.Random(args.seed + 2)
    calibration = []
    for _ in range(32):
        image, question, answer = sample(rng, rng.choice(QUESTIONS))
        calibration.append({"image": image, "text": question, "answer": answer})
    config = DeltaCoMeConfig(ratio=args.ratio, group_size=32)
    t1 = time.time()
    model = compress(base, finetuned, config, calibration=calibration, processor=processor, progress=False)
    model.save_pretrained(out / "adapter")
    info = model.peft_config["default"].compression_info
    print(f"   calibration: {info['calibration']}; compressed in {time.time() - t1:.1f} s")
    vision = [m for m in model.peft_config["default"].layout if ".vision_tower." in m]
    print(f"   vision-tower linears in the adapter: {len(vision)}")
    print("\n" + summarize_adapter(out / "adapter").format())
    # the same budget without data (round-to-nearest), for comparison
    rtn_config = DeltaCoMeConfig(ratio=args.ratio, group_size=32, quantizer="rtn")
    rtn = compress(AutoModelForImageTextToText.from_pretrained(out / "base"), finetuned, rtn_config, progress=False)

    rows = {"base": reference, "fine-tune": finetuned, "Delta-CoMe, GPTQ on image+text": model}
    rows["Delta-CoMe, data-free (RTN)"] = rtn.eval()
    print(f"\n   {'on 96 held-out images':34s} colour acc  fruit acc  answer-logit error vs fine-tune")
    for name, m in rows.items():
        c, f = (accuracy(m, processor, q) for q in QUESTIONS)
        e = answer_logit_error(m, finetuned, reference, processor)
        print(f"   {name:34s} {c:9.0%} {f:10.0%}  {e:8.3f}")

    print("\n4. reload base + adapter from disk and ask through pipeline('image-text-to-text')")
    del model, base, finetuned, rtn, reference, rows
    reloaded = AutoDeltaCoMeModelForImageTextToText.from_pretrained(out / "adapter").eval()
    pipe = pipeline("image-text-to-text", model=reloaded, processor=load_processor(out / "adapter"))
    rng = random.Random(args.seed + 3)
    for colour, shape in [("red", "triangle"), ("blue", "circle"), ("yellow", "square")]:
        image = draw(colour, shape, rng)
        for question in (FRUIT_Q, COLOUR_Q):
            reply = pipe(text=chat(question, image), generate_kwargs=dict(max_new_tokens=3, do_sample=False))
            said = reply[0]["generated_text"][-1]["content"].strip()
            print(f"   {f'[{colour} {shape}]':18s} {question:30s} -> {said}")
    print(f"\nfiles in {out}; {time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
