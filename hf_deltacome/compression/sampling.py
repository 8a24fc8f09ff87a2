"""Calibration text sampled from the fine-tuned model itself, for a compression given no calibration data.

The fine-tune continues a few chat-templated generic requests and a bare BOS (seeded, top-p sampling, EOS suppressed
so every sequence runs to full length), batched and left-padded through ``model.generate``. The draw is made by
`NucleusSampling`, a logits processor for greedy search, not by ``generate``'s own sampler: that one sorts the whole
vocabulary and calls ``multinomial`` at every step, a quarter of the sampling time on a CPU for SmolLM2's 49k tokens
(benchmarks/RESULTS.md); the nucleus is the same, drawn from a generator of its own (the global RNG is left alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import CalibrationError
from ..progress import progress_bar

GENERATION_BATCH_SIZE = 32  # sequences a generate call: the default 32 in one (0.72x the time of two 16s on SmolLM2
# on a CPU, the per-step cost of generate and of small products amortised; benchmarks/sampling_speed.py)

# Generic prompts for self-generated calibration text: varied registers so the activations are not one-topic.
GENERIC_PROMPTS = (
    "Tell me something interesting about the history of science.",
    "Write a short story about a journey.",
    "Explain step by step how to solve a math word problem.",
    "Write a Python function and explain how it works.",
    "What are the pros and cons of living in a big city?",
    "Summarize the main ideas of a famous book.",
    "Give me some practical advice for learning a new language.",
    "Describe how the human body fights an infection.",
)

NUCLEUS_CANDIDATES = 8192  # tokens ranked a step; a row whose nucleus is wider is ranked in full (at top-p 0.95
# SmolLM2's nucleus was wider than 256 tokens at 124 of 127 steps, than 2048 at 30, than 8192 at none)


class NucleusSampling:
    """Top-p sampling as a ``generate`` logits processor for greedy search (``do_sample=False``): each step keeps
    the smallest set of most probable tokens whose probability reaches ``top_p`` (as transformers' top-p warper
    keeps it), draws one of them in proportion to its probability (Gumbel-max, a generator seeded with ``seed``) and leaves
    only that token finite, so greedy search takes it. Only the top `NUCLEUS_CANDIDATES` tokens are ranked unless
    the nucleus is wider."""

    def __init__(self, top_p: float, temperature: float, seed: int) -> None:
        if not 0.0 < top_p <= 1.0 or not temperature > 0.0:
            raise CalibrationError(f"sampling needs 0 < top_p <= 1 and temperature > 0, got {top_p}, {temperature}")
        self.top_p, self.temperature, self.seed = top_p, temperature, int(seed)
        self.generator: torch.Generator | None = None  # made on the logits' device (the last layer's, under a map)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        top, index = logp.topk(min(NUCLEUS_CANDIDATES, logp.shape[-1]), dim=-1)  # most probable first
        if bool((top.exp().sum(-1) < self.top_p).any()):  # the nucleus reaches past the candidates
            top, index = logp.sort(dim=-1, descending=True)
        p = top.exp()
        inside = (p.cumsum(-1) - p) < self.top_p  # the mass before a token is under top_p: the first always is
        if self.generator is None or self.generator.device != top.device:
            self.generator = torch.Generator(device=top.device).manual_seed(self.seed)
        u = torch.rand(top.shape, generator=self.generator, device=top.device).clamp_(min=1e-20)
        pick = torch.where(inside, top - torch.log(-torch.log(u)), float("-inf")).argmax(-1, keepdim=True)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, index.gather(-1, pick), 0.0)


def check_sizes(num_samples: int, seq_len: int) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise CalibrationError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise CalibrationError(f"seq_len must be an integer >= 2, got {seq_len!r}")


def _prompt_ids(model: Any, tokenizer: Any, seq_len: int) -> list[list[int]]:
    """Token ids of the generation prompts: chat-templated generic prompts, else BOS (else token 0)."""
    prompts: list[list[int]] = []
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        for p in GENERIC_PROMPTS:
            try:
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
                )
            except Exception:
                continue
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            if ids and isinstance(ids[0], list):
                ids = ids[0]
            ids = [int(i) for i in ids]
            if 0 < len(ids) < seq_len // 2:
                prompts.append(ids)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    if isinstance(bos, (list, tuple)):
        bos = bos[0] if bos else None
    # also sample from a bare BOS: free-running text, not only chat answers
    prompts.append([int(bos) if bos is not None else 0])
    return prompts


@torch.no_grad()
def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as one left-padded batch: ``(input_ids, attention_mask)``, both ``(len(rows), longest)``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def sample_from_model(
    model: Any,
    tokenizer: Any,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = GENERATION_BATCH_SIZE,
    progress: bool = False,
) -> torch.Tensor:
    """Let ``model`` (the fine-tune) write ``num_samples`` sequences of ``seq_len`` tokens (seeded sampling).

    Rows cycle through chat-templated generic requests and a bare BOS (a batch mixes them, left-padded); EOS is
    suppressed so every sequence runs to full length; tokens are drawn by `NucleusSampling` from a generator seeded
    with ``seed`` (the global RNG is left alone). ``progress`` shows a bar over the sequences (generation is the slow
    part of a default, data-free compression on a CPU).
    """
    from transformers import LogitsProcessorList

    check_sizes(num_samples, seq_len)
    if not hasattr(model, "generate"):
        raise CalibrationError(
            f"cannot sample calibration text from a {type(model).__name__} (no generate()); pass calibration="
        )
    prompts = _prompt_ids(model, tokenizer, seq_len)
    device = next(model.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if pad is None:
        pad = eos if not isinstance(eos, (list, tuple)) else (eos[0] if eos else 0)
    if pad is None:
        pad = 0
    was_training = model.training
    model.eval()
    # row i gets prompt i mod P; a batch mixes prompts, left-padded, so every prompt is used at any batch size
    rows = [prompts[i % len(prompts)] for i in range(num_samples)]
    out: list[torch.Tensor] = []
    sampler = NucleusSampling(top_p, temperature, seed)
    bar = progress_bar(num_samples, progress, "Sampling calibration text", unit="seq")
    try:
        for start in range(0, num_samples, batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(p) for p in batch)
            ids, mask = left_pad(batch, int(pad))
            new = seq_len - min(len(p) for p in batch)  # the shortest prompt still reaches seq_len
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,  # greedy over what the sampler leaves: one token a row
                logits_processor=LogitsProcessorList([sampler]),
                temperature=None,
                top_p=None,
                top_k=None,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=pad,
                eos_token_id=eos,
            ).cpu()
            if gen.shape[1] < width + new:  # generate stopped early (min_new_tokens should prevent it)
                raise CalibrationError(
                    f"the model generated {gen.shape[1] - width} new tokens, expected {new}; pass calibration="
                )
            for i, p in enumerate(batch):
                out.append(gen[i, width - len(p) :][:seq_len])
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return torch.stack(out)
