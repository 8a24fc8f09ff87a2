"""Compression time of the default against an earlier revision's, side by side on this machine.

Usage: ``python benchmarks/compress_time.py [--task knowledge2] [--ratio 1/32] [--revisions c41bc35,worktree]
[--repeats 1] [--threads 2]``

Issue 14 asks that compressing SmolLM2 stays within 2x the time it took when the issue was filed (revision
``c41bc35``, its default). Times on this machine drift by 15-20% between runs and differ between machines, so both
revisions compress the same pair, with the same calibration records, one after the other (ABAB with ``--repeats``),
nothing else running: each in a fresh interpreter that imports ``hf_deltacome`` from its own checkout (a detached
``git worktree`` of the revision; ``worktree`` is this checkout as it stands). Only the ``compress()`` call is timed
(SVDs, planning, GPTQ, distillation), as in ``quality.py``'s "compress s"; the written bytes are printed beside it.
The pair is ``quality.py``'s zoo fine-tune (built and cached on first use, ~25 min); like ``quality.py`` it needs
this checkout's library (``PYTHONPATH=<this checkout>`` where another one is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "c41bc35"  # the default when issue 14 was filed


def child(args: argparse.Namespace) -> None:
    """Compress once with the default config of the ``hf_deltacome`` on ``PYTHONPATH`` and print one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_deltacome

    torch.set_num_threads(args.threads)
    tree = Path(os.environ["PYTHONPATH"].split(os.pathsep)[0]).resolve()
    if not Path(hf_deltacome.__file__).resolve().is_relative_to(tree):
        sys.exit(f"hf_deltacome imported from {hf_deltacome.__file__}, not from {tree}")
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    ft = AutoModelForCausalLM.from_pretrained(args.ft, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.ft)
    records = json.loads(Path(args.calib).read_text())
    cfg = hf_deltacome.DeltaCoMeConfig(ratio=args.ratio)
    t0 = time.perf_counter()
    model = hf_deltacome.compress(base, ft, cfg, calibration=records, tokenizer=tokenizer, num_samples=args.num_samples,
                                  seq_len=args.seq_len, progress=False)  # fmt: skip
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        size = (Path(out) / "adapter_model.safetensors").stat().st_size
    written = model.peft_config["default"]
    print(json.dumps({"seconds": seconds, "bytes": size, "plan_seconds": written.compression_info.get("plan_seconds"),
                      "dare_modules": getattr(written, "dare_modules", None)}))  # fmt: skip


def checkout(rev: str, keep: list[Path]) -> Path:
    """This checkout for ``worktree``, else a detached worktree of ``rev`` (removed at the end)."""
    if rev == "worktree":
        return ROOT
    folder = Path(tempfile.mkdtemp(prefix=f"compress-time-{rev}-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(folder), rev], check=True)
    keep.append(folder)
    return folder


def check_args(args: argparse.Namespace) -> list[str]:
    """The revisions to time, after refusing bad flags by name before any model loads."""
    from hf_deltacome import ConfigError, parse_ratio

    try:
        parse_ratio(args.ratio)
    except ConfigError as e:
        sys.exit(f"--ratio: {e}")
    for flag in ("repeats", "threads", "num_samples", "seq_len"):
        if getattr(args, flag) < 1:
            sys.exit(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    revisions = [r.strip() for r in args.revisions.split(",") if r.strip()]
    if not revisions:
        sys.exit(f"--revisions: comma-separated revisions, got {args.revisions!r}")
    for rev in revisions:
        found = rev == "worktree" or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "-q",
                                                     f"{rev}^{{commit}}"], capture_output=True).returncode == 0  # fmt: skip
        if not found:
            sys.exit(f"--revisions: {rev!r} is not a commit of {ROOT} (nor 'worktree', this checkout as it stands)")
    return revisions


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="knowledge2", help="quality.py's zoo task (default knowledge2: facts-hot)")
    p.add_argument("--ratio", default="1/32")
    p.add_argument("--revisions", default=f"{REFERENCE},worktree", help="comma-separated; the first is the reference")
    p.add_argument("--repeats", type=int, default=1, help="rounds of every revision, in turn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--ft", help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    revisions = check_args(args)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "examples"))
    import quality

    base_path, ft_path, task, _ = quality.load_pair(args.task)
    from transformers import AutoTokenizer

    # plain strings (each rendered prompt + answer + EOS, quality.py's token stream): what every revision reads
    records = [r["prompt"] + r["completion"] for r in quality.calibration_texts(task, AutoTokenizer.from_pretrained(ft_path))]
    trees: list[Path] = []
    rows: dict[str, list[dict]] = {rev: [] for rev in revisions}
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calibration.json"
        calib.write_text(json.dumps(records))
        try:
            folders = {rev: checkout(rev, trees) for rev in revisions}
            for round_ in range(args.repeats):
                for rev in revisions:
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--base", str(base_path), "--ft",
                           str(ft_path), "--calib", str(calib), "--ratio", args.ratio, "--threads", str(args.threads),
                           "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len)]  # fmt: skip
                    env = {**os.environ, "PYTHONPATH": str(folders[rev]), "PYTHONSAFEPATH": "1"}
                    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
                    if r.returncode != 0:
                        sys.exit(f"{rev}: compression failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
                    rows[rev].append(json.loads(r.stdout.strip().splitlines()[-1]))
                    print(f"round {round_ + 1} {rev}: {rows[rev][-1]['seconds']:.1f} s", flush=True)
        finally:
            for folder in trees:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=False)
    ref = sum(r["seconds"] for r in rows[revisions[0]]) / len(rows[revisions[0]])
    print(f"\n{args.task} at {args.ratio}, {args.threads} threads, {args.repeats} round(s), the default config\n")
    print("| revision | compress s (each round) | mean | vs " + revisions[0] + " | plan s | bytes |")
    print("|---|---|---:|---:|---:|---:|")
    for rev in revisions:
        times = [r["seconds"] for r in rows[rev]]
        mean = sum(times) / len(times)
        plan = ", ".join(str(r["plan_seconds"]) for r in rows[rev])
        print(f"| {rev} | {', '.join(f'{t:.1f}' for t in times)} | {mean:.1f} | {mean / ref:.2f}x | {plan} | "
              f"{rows[rev][-1]['bytes']:,} |")  # fmt: skip


if __name__ == "__main__":
    main()
