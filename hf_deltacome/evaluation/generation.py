"""The one batched greedy generator: left-padded batches sorted by length, through ``model.generate``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..compression.sampling import left_pad
from ..errors import ConfigError
from ..progress import progress_bar

DEFAULT_MAX_NEW_TOKENS = 32


@torch.no_grad()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    encoded: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "Generating",
) -> list[str]:
    """Greedy completions (decoded, special tokens skipped) of token-id prompts ``encoded``.

    Prompts are left-padded and batched by length (short with short, so padding costs little); generation stops at
    the tokenizer's end-of-sequence token or after ``max_new_tokens``. ``model`` is any causal LM with ``generate``
    (a plain model or a ``PeftModel``), run in eval mode.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = 0
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    bar = progress_bar(len(order), progress, desc, "item")
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = left_pad([encoded[i] for i in rows], pad)
            width = ids.shape[1]
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
    finally:
        bar.close()
        model.train(was_training)
    return out


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
    """Greedy completions of text ``prompts`` (wrapped in the tokenizer's chat template with ``chat``)."""
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
    return generate_greedy(model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, desc=desc)  # fmt: skip
