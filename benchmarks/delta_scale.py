#!/usr/bin/env python
"""How many held-out questions the fine-tune's own delta answers when scaled: ``base + α Δ`` for a few ``α``.

    python benchmarks/delta_scale.py [--task knowledge|knowledge2] [--scales 0.8,0.9,1.0,1.1] [--threads 2]

A compressed adapter can keep "more than 100%" of a fine-tune's gain (benchmarks/RESULTS.md). This measures whether
the exact delta, only shrunk or amplified, does too: if ``α < 1`` answers more questions than ``α = 1``, a method that
loses some of the delta can land above the fine-tune without being more faithful to it. Same pair, questions and
scoring as ``benchmarks/quality.py``; ``α = 0`` (the base) and ``α = 1`` (the fine-tune) are always measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/quality.py: the pair, the questions, the scoring)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="knowledge", help="knowledge (facts) or knowledge2 (facts-hot)")
    p.add_argument("--scales", default="0.8,0.9,1.0,1.1", help="comma-separated α")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        scales = sorted({0.0, 1.0, *(float(a) for a in args.scales.split(","))})
    except ValueError:
        raise SystemExit(f"--scales: comma-separated numbers, got {args.scales!r}") from None
    from transformers import AutoTokenizer

    base_path, ft_path, task, zoo = quality.load_pair(args.task)
    tokenizer = AutoTokenizer.from_pretrained(ft_path)
    base = quality.load_model(base_path).state_dict()
    model = quality.load_model(ft_path)
    finetuned = {k: v.clone() for k, v in model.state_dict().items()}
    rows = {}
    with torch.no_grad():
        for a in scales:
            model.load_state_dict({k: base[k] + a * (v - base[k]) for k, v in finetuned.items()})
            correct = sum(ok for _, _, ok in zoo.task_predictions(model, tokenizer, task, n=None, batch_size=48))
            rows[a] = (correct, zoo.answer_nll(model, tokenizer, task, n=None))
            print(f"α = {a}: {correct} right", file=sys.stderr, flush=True)
    total = len(task.eval)
    gain = rows[1.0][0] - rows[0.0][0]
    print(f"### {task.name}: the fine-tune's delta scaled ({total} held-out questions)\n")
    print("| α | right | accuracy | gain kept | answer NLL |")
    print("|---:|---:|---:|---:|---:|")
    for a, (correct, nll) in rows.items():
        kept = f"{(correct - rows[0.0][0]) / gain:.1%}" if gain else "–"
        print(f"| {a:g} | {correct} | {correct / total:.1%} | {kept} | {nll:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
