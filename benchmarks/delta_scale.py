#!/usr/bin/env python
"""How many held-out questions the fine-tune's own delta answers when scaled: ``base + α Δ`` for a few ``α``.

    python benchmarks/delta_scale.py [--task knowledge|knowledge2] [--scales 0.8,0.9,1.0,1.1] [--threads 2]
                                     [--methods dare-2,deltacome --ratio 1/8]

A compressed adapter can keep "more than 100%" of a fine-tune's gain (benchmarks/RESULTS.md). This measures whether
the exact delta, only shrunk or amplified, does too: if ``α < 1`` answers more questions than ``α = 1``, a method that
loses some of the delta can land above the fine-tune without being more faithful to it. Same pair, questions and
scoring as ``benchmarks/quality.py``; ``α = 0`` (the base) and ``α = 1`` (the fine-tune) are always measured.

``--methods`` then places each method on that scale: it compresses the pair as ``quality.py`` does (draw 0 of any
mask), merges what it stores and prints, per module type, the scale of the exact delta that the stored one projects
to, ``α̂ = <Δ̂, Δ> / ||Δ||²``, beside its relative squared error ``||Δ̂ − Δ||² / ||Δ||²``: a method with ``α̂ < 1``
everywhere stores a shrunk delta plus noise, whatever its error.
"""

from __future__ import annotations

import argparse
import copy
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/quality.py: the pair, the questions, the scoring)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="knowledge", help="knowledge (facts) or knowledge2 (facts-hot)")
    p.add_argument("--scales", default="0.8,0.9,1.0,1.1", help="comma-separated α")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", default="", help="comma-separated quality.py methods to place on the scale")
    p.add_argument("--ratio", default="1/8", help="their ratio, a fraction such as 1/32")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in quality.VARIANTS]
    if unknown:
        raise SystemExit(f"--methods: unknown method(s) {unknown}; known: {sorted(quality.VARIANTS)}")
    try:
        ratio = float(Fraction(args.ratio))
    except (ValueError, ZeroDivisionError):
        raise SystemExit(f"--ratio is a fraction such as 1/32, got {args.ratio!r}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        scales = sorted({0.0, 1.0, *(float(a) for a in args.scales.split(","))})
    except ValueError:
        raise SystemExit(f"--scales: comma-separated numbers, got {args.scales!r}") from None
    from transformers import AutoTokenizer

    base_path, ft_path, task, zoo = quality.load_pair(args.task)
    tokenizer = AutoTokenizer.from_pretrained(ft_path)
    base_model = quality.load_model(base_path)
    base = base_model.state_dict()
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
    if methods:
        print(f"\n### what each method stores at {args.ratio}, as a scale of the exact delta\n")
        print("| method | module | α̂ = <Δ̂, Δ> / ‖Δ‖² | ‖Δ̂ − Δ‖² / ‖Δ‖² |")
        print("|---|---|---:|---:|")
        model.load_state_dict(finetuned)  # the fine-tune again, after the last α
    for m in methods:
        for kind, (alpha, err) in stored_scale(m, ratio, base_model, model, task, tokenizer).items():
            print(f"| {m} | {kind} | {alpha:.3f} | {err:.3f} |", flush=True)
    return 0


def projection(stored: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per module type (a name's last-but-one part, ``q_proj``), ``(<Δ̂, Δ> / ||Δ||², ||Δ̂ − Δ||² / ||Δ||²)`` summed
    over that type's matrices; ``stored`` and ``exact`` map the same names to ``Δ̂`` and ``Δ``."""
    sums: dict[str, list[float]] = {}
    for name, d in exact.items():
        d, dh = d.double(), stored[name].double()
        acc = sums.setdefault(name.split(".")[-2], [0.0, 0.0, 0.0])
        acc[0] += float((dh * d).sum())
        acc[1] += float((d * d).sum())
        acc[2] += float((dh - d).square().sum())
    return {kind: (dot / dd, err / dd) for kind, (dot, dd, err) in sorted(sums.items()) if dd > 0}


def stored_scale(
    method: str, ratio: float, base: Any, ft: Any, task: Any, tokenizer: Any
) -> dict[str, tuple[float, float]]:
    """:func:`projection` of what ``method`` stores at ``ratio`` (compressed as ``quality.py`` does, mask draw 0,
    merged into a copy of ``base``) against the fine-tune's delta, over every 2-D weight the fine-tune changed but
    the embeddings and the head."""
    from hf_deltacome.compression.pipeline import compress

    before = base.state_dict()
    cfg = quality.variant_config(method, ratio, mask_draws=1)
    model = compress(copy.deepcopy(base), ft, cfg, calibration=quality.calibration_texts(task, tokenizer),
                     tokenizer=tokenizer, progress=False, num_samples=16, seq_len=quality.SEQ_LEN)  # fmt: skip
    merged = model.merge_and_unload().state_dict()
    exact, stored = {}, {}
    for name, w in ft.state_dict().items():
        if w.dim() != 2 or "embed" in name or "lm_head" in name or torch.equal(w, before[name]):
            continue
        exact[name], stored[name] = w - before[name], merged[name] - before[name]
    return projection(stored, exact)


if __name__ == "__main__":
    raise SystemExit(main())
