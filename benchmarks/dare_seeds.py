#!/usr/bin/env python
"""How far a seeded method's held-out questions move with its random seed alone.

    python benchmarks/dare_seeds.py [--task knowledge2] [--method dare] [--ratio 1/32] [--seeds 0,1,2,3,4]

DARE's mask (and ImPart's) comes from a seed derived from each module's name, so one run of ``benchmarks/quality.py``
is one draw. This compresses the same pair with the same method and bytes under other draws (``mask_draw=k`` derives
every module's seed from ``name#k``; ``k = 0`` is the name alone, what every other run uses; ``mask_draws=1``, so the
default does not choose among draws itself), loads each adapter with
``PeftModel.from_pretrained`` and counts the held-out questions it answers right, as ``quality.py`` does (and how
many of them the fine-tune answers right too: the rest are questions the fine-tune gets wrong that the compression's
error turned right): how many of
the questions that separate two methods in one draw a redraw moves. Each draw's next-token KL to the fine-tune on
the calibration text (the sequences the library's end-to-end check runs: data a user has at hand), over all their
tokens (what the check scores) and over the answers' tokens, is printed beside its count and its next-token agreement
with the fine-tune on ``quality.py``'s held-out text: whether the draw the default picks by that KL (``mask_draws``)
is a good one.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/quality.py: the pair, the questions, the scoring, the method variants)

from hf_deltacome.compression.calibration import read_records, tokenize_records  # noqa: E402
from hf_deltacome.compression.endtoend import (  # noqa: E402
    E2E_BATCH,
    E2E_SAMPLES,
    mean_kl,
    next_token_kls,
    next_token_log_probs,
    response_positions,
)
from hf_deltacome.compression.pipeline import compress  # noqa: E402

CALIBRATION = {"num_samples": 16, "seq_len": quality.SEQ_LEN}  # as benchmarks/quality.py calibrates: compress and the KL read it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="knowledge2", help="knowledge (facts) or knowledge2 (facts-hot)")
    p.add_argument("--method", default="dare", help="a benchmarks/quality.py method variant with a seeded mask")
    p.add_argument("--ratio", default="1/32")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated draws (0: the one every other run uses)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.method not in quality.VARIANTS:
        raise SystemExit(f"unknown method {args.method!r}; choose from {sorted(quality.VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ratio = float(Fraction(args.ratio))
        seeds = [int(k) for k in args.seeds.split(",")]
    except (ValueError, ZeroDivisionError):
        raise SystemExit(f"--ratio is a fraction such as 1/32 and --seeds comma-separated integers, got "
                         f"{args.ratio!r} and {args.seeds!r}") from None  # fmt: skip
    from peft import PeftModel
    from transformers import AutoTokenizer

    base_path, ft_path, task, zoo = quality.load_pair(args.task)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base, ft = quality.load_model(base_path), quality.load_model(ft_path)
    calib = quality.calibration_texts(task, tokenizer)
    ft_ok = [ok for _, _, ok in zoo.task_predictions(ft, tokenizer, task, n=None, batch_size=48)]
    ft_right = sum(ft_ok)
    ids, mask = tokenize_records(read_records(calib, tokenizer), tokenizer, **CALIBRATION)  # what compress reads
    batches = list(ids[:E2E_SAMPLES].split(E2E_BATCH))  # what its end-to-end check runs
    answers = list(response_positions(mask[:E2E_SAMPLES]).split(E2E_BATCH))  # the answers' tokens in them
    reference = [next_token_log_probs(ft, b) for b in batches]
    # quality.py's held-out text and its agreement column: the fine-tune's greedy next tokens there
    windows = quality.heldout_windows(task, tokenizer)
    ft_argmax = quality.text_scores(ft, windows, None)[2]
    rows = []
    for k in seeds:
        cfg = quality.variant_config(args.method, ratio, mask_draw=k, mask_draws=1)
        model = compress(copy.deepcopy(base), ft, cfg, calibration=calib, tokenizer=tokenizer, progress=False,
                         **CALIBRATION)  # fmt: skip
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            del model
            size = (Path(folder) / "adapter_model.safetensors").stat().st_size
            loaded = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
            right = [ok for _, _, ok in zoo.task_predictions(loaded, tokenizer, task, n=None, batch_size=48)]
            kls = next_token_kls(reference, loaded, batches)  # one pass for the whole text's mean and the answers'
            kl, kl_answers = mean_kl(kls), mean_kl(kls, answers)
            agreement = quality.text_scores(loaded, windows, ft_argmax)[1]
        kept = quality.kept_answers(right, ft_ok)  # of the fine-tune's right answers
        rows.append((k, size, sum(right), kl, kl_answers, agreement, kept))
        print(f"draw {k}: {sum(right)} right ({kept} of the fine-tune's {ft_right}), agreement "
              f"{100 * agreement:.1f}%, calibration KL {kl:.5f}, answers KL {kl_answers:.5f}, {size:,} B",
              file=sys.stderr, flush=True)  # fmt: skip
    print(f"### {task.name}: `{args.method}` at {args.ratio}, one row per draw of its masks ({len(task.eval)} "
          f"held-out questions; the fine-tune answers {ft_right})\n")  # fmt: skip
    print("| draw | true bytes | right | vs the fine-tune | of its right answers | beyond them | agreement | "
          "calibration KL | answers KL |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, size, right, kl, kl_answers, agreement, kept in rows:
        print(f"| {k} | {size:,} | {right} | {right - ft_right:+d} | {kept} | {right - kept} | "
              f"{100 * agreement:.1f}% | {kl:.5f} | {kl_answers:.5f} |")
    counts = [row[2] for row in rows]
    by_kl, by_answers = min(rows, key=lambda row: row[3]), min(rows, key=lambda row: row[4])
    print(f"\nright: {min(counts)}-{max(counts)}, mean {sum(counts) / len(counts):.1f}; the draw of lowest "
          f"calibration KL (draw {by_kl[0]}) answers {by_kl[2]}, of lowest answers KL (draw {by_answers[0]}) "
          f"{by_answers[2]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
