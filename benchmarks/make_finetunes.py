"""Build and cache the built-in SmolLM2-135M fine-tunes, and report time and held-out accuracy per task.

    python benchmarks/make_finetunes.py                       # both tasks, default hyper-parameters
    python benchmarks/make_finetunes.py --tasks facts --eval 240
    python benchmarks/make_finetunes.py --tasks dates --steps 40 --lr 2e-4

Each fine-tune is cached under ``~/.cache/hf_deltacome/finetunes`` (``$HF_DELTACOME_CACHE``) by a hash of task,
hyper-parameters and base; a cached one is reused and its recorded training time shown. Other benchmarks get the
same directories with ``zoo.finetune(task)`` (examples/zoo).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import hf_deltacome  # noqa: F401  (before transformers: registers the PEFT method)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import zoo  # noqa: E402

# isort: split
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging


def _dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(zoo.TASKS), choices=sorted(zoo.TASKS))
    parser.add_argument("--steps", type=int, default=None, help="override the task's default steps")
    parser.add_argument("--lr", type=float, default=None, help="override the task's default learning rate")
    parser.add_argument("--batch-size", type=int, default=None, help="override the task's default batch size")
    parser.add_argument("--eval", type=int, default=None, help="held-out examples to score (default: all)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()

    t = time.time()
    base_path = zoo.smollm2_path()
    print(f"base: {base_path} ({_dir_bytes(base_path) / 1e6:,.0f} MB, ready in {time.time() - t:.0f}s)")
    tok = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()

    results = []
    for name in args.tasks:
        task = zoo.get_task(name)
        path = zoo.finetune_path(task, args.steps, args.lr, args.batch_size)
        cached = (path / zoo.FINETUNE_FILE).is_file()
        t = time.time()
        zoo.finetune(task, steps=args.steps, lr=args.lr, batch_size=args.batch_size)
        wall = time.time() - t
        record = json.loads((path / zoo.FINETUNE_FILE).read_text())
        ft = AutoModelForCausalLM.from_pretrained(path).eval()
        t = time.time()
        acc_base = zoo.task_accuracy(base, tok, task, n=args.eval)
        acc_ft = zoo.task_accuracy(ft, tok, task, n=args.eval)
        eval_s = time.time() - t
        n = len(task.eval) if args.eval is None else min(args.eval, len(task.eval))
        row = {
            "task": task.name,
            "kind": task.kind,
            "path": str(path),
            "cached": cached,
            "settings": record["settings"],
            "train_seconds": record["train_seconds"],
            "cpu_seconds": record.get("cpu_seconds"),
            "threads": record.get("threads"),
            "final_loss": record["final_loss"],
            "eval_examples": n,
            "eval_seconds": round(eval_s, 1),
            "accuracy_base": acc_base,
            "accuracy_finetune": acc_ft,
            "cache_bytes": _dir_bytes(path),
        }
        results.append(row)
        s = record["settings"]
        print(
            f"{task.name} ({task.kind}): {s['steps']} steps x batch {s['batch_size']}, lr {s['lr']:g}; "
            f"trained in {record['train_seconds']:.0f}s wall / {record.get('cpu_seconds', float('nan')):.0f}s CPU "
            f"({'cached, ' if cached else ''}this call {wall:.0f}s); loss {record['final_loss']:.3f}; "
            f"{row['cache_bytes'] / 1e6:,.0f} MB at {path}"
        )
        print(f"    held-out accuracy on {n} examples: base {acc_base:.1%} -> fine-tune {acc_ft:.1%}  ({eval_s:.0f}s)")
        del ft

    print()
    print(f"{'task':<8}{'kind':<11}{'train s':>9}{'base':>8}{'fine-tune':>11}")
    for r in results:
        print(
            f"{r['task']:<8}{r['kind']:<11}{r['train_seconds']:>9.0f}{r['accuracy_base']:>8.1%}"
            f"{r['accuracy_finetune']:>11.1%}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
