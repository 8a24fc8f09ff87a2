#!/usr/bin/env python
"""Sampling calibration text from the fine-tune: ``generate``'s own top-p sampler against `NucleusSampling`.

    python benchmarks/sampling_speed.py [--model DIR] [--num-samples 32] [--seq-len 256] [--repeats 2]

What ``compress`` runs when it is given no calibration data (`hf_deltacome.compression.sampling`): the fine-tune
continues the generic prompts, ``--num-samples`` sequences of ``--seq-len`` tokens, top-p 0.95. Three ways sample
the same nucleus from the same prompts through the same ``generate`` call: ``generate(do_sample=True, top_p=...)``
in batches of 16 (what compress ran before `NucleusSampling`: it sorts the whole vocabulary and calls
``multinomial`` each step), greedy search over what `NucleusSampling` leaves (top-k candidates, Gumbel-max) in
batches of 16, and the same in batches of ``GENERATION_BATCH_SIZE`` (what compress runs). They run in turn,
``--repeats`` times each, on the threads torch has; the table gives each one's best time and its ratio to the
first. ``--model`` defaults to the quickstart's fine-tune (SmolLM2-135M-Instruct on ``dates``, built and cached by
``examples/zoo``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def generate_sampled(model: Any, tokenizer: Any, num_samples: int, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """The batches `sample_from_model` makes, drawn by ``generate``'s own top-p sampler (the global RNG, seed 0)."""
    from hf_deltacome.compression.sampling import _prompt_ids, left_pad

    prompts = _prompt_ids(model, tokenizer, seq_len)
    rows = [prompts[i % len(prompts)] for i in range(num_samples)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for start in range(0, num_samples, batch_size):
            batch = rows[start : start + batch_size]
            ids, mask = left_pad(batch, int(pad))
            new = seq_len - min(len(p) for p in batch)
            out.append(model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95,
                                      top_k=0, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad,
                                      eos_token_id=tokenizer.eos_token_id))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="fine-tuned model folder (default: the quickstart's dates fine-tune)")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.seq_len < 2 or args.repeats < 1:
        raise SystemExit("--num-samples and --repeats must be >= 1, --seq-len >= 2")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: not a saved model folder (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_deltacome.compression.sampling import GENERATION_BATCH_SIZE, sample_from_model

    if args.model is None:
        from zoo import finetune

        args.model = finetune("dates")
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    n, length = args.num_samples, args.seq_len
    ways = {
        "generate(do_sample=True, top_p=0.95), batches of 16 (before)":
            lambda: generate_sampled(model, tokenizer, n, length, 16),
        "NucleusSampling, batches of 16": lambda: sample_from_model(model, tokenizer, n, length, batch_size=16),
        f"NucleusSampling, batches of {GENERATION_BATCH_SIZE} (what compress runs)":
            lambda: sample_from_model(model, tokenizer, n, length),
    }  # fmt: skip
    best = {name: float("inf") for name in ways}
    for _ in range(args.repeats):
        for name, run in ways.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    ref = best[next(iter(ways))]
    print(f"{args.num_samples} x {args.seq_len} tokens, {torch.get_num_threads()} threads, {Path(args.model).name}")
    print(f"| sampler | best of {args.repeats} (s) | time / generate's |\n|---|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.1f} | {seconds / ref:.2f} |")


if __name__ == "__main__":
    main()
