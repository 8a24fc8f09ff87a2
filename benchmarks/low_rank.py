#!/usr/bin/env python
"""A merged LoRA as the fine-tune: what the default stores of a delta of low rank, against what it stored before.

    python benchmarks/low_rank.py [--task facts] [--rank 16] [--lr 2e-3] [--ratios 1/16,1/32,1/64] [--n-eval N]
                                  [--bfloat16 | --float16] [--variants default,lowrank,...]

The fine-tune is a LoRA of rank ``--rank`` on every decoder linear of SmolLM2-135M-Instruct, trained on the task's
training split by ``zoo.finetune(..., lora_rank=R)`` (the full fine-tune's loop; cached) and merged into the weights:
a checkpoint whose delta has rank R in every linear (``--bfloat16``: merged into the base in bfloat16 and rounded
there once, as a merged LoRA from the Hub usually is: its delta is the LoRA plus that rounding; ``--float16`` the
same in float16; ``--rank 0``: the task's full fine-tune instead, to see what the rule does to a delta that is not a
LoRA's). At each ratio:

* ``default``: ``compress`` as it runs now; every delta of low rank (``compression.low_rank.low_rank_of``) is stored
  as its R singular triplets at the most bits that fit, and the bytes it does not need are left unspent;
* ``default, rank rule off``: the same with that rule switched off (what the default stored before: the MLP as
  2-bit DARE from 1/8 down, the attention's bands split 8/3/2 bits over as many ranks as the budget buys);
* ``default, one-pass probe``: the default with the rank probe's power iteration switched off (what it was
  before ``ee34adc``);
* ``default, whole where the rank does not fit``: the default storing a module it would store whole (the MLP's
  DARE, the attention's output projections from 1/64 down) as DARE where the delta's rank does not fit at 3 bits,
  as before ``low_rank_of(..., beyond_budget=True)`` (since then: the split's strongest directions up to the rank);
* ``lowrank``: the plain truncated SVD in float16 at the rank the budget buys (what storing the LoRA's factors as
  they are amounts to, at that budget).

Each adapter is saved, loaded back onto a fresh base with ``PeftModel.from_pretrained`` and scored on the held-out
split: true bytes of ``adapter_model.safetensors``, next-token agreement with the fine-tune on the held-out text,
held-out questions answered right, compression seconds. One thread count for the whole run (``--threads``); run it
alone on the machine.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import quality as Q  # noqa: E402

import hf_deltacome.compression.low_rank as low_rank  # noqa: E402
import hf_deltacome.compression.plan as plan  # noqa: E402
from hf_deltacome import DeltaCoMeConfig, parse_ratio  # noqa: E402
from hf_deltacome.compression.pipeline import compress  # noqa: E402

VARIANTS = {"default": "default", "rule-off": "default, rank rule off", "one-pass": "default, one-pass probe",
            "lowrank": "lowrank", "beyond-off": "default, whole where the rank does not fit"}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="facts", help="built-in task (default: %(default)s)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank; 0: the full fine-tune (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 2e-3 for a LoRA, the task's own for its full fine-tune)")
    p.add_argument("--ratios", default="1/16,1/32,1/64", help="comma-separated ratios (default: %(default)s)")
    p.add_argument("--n-eval", type=int, default=None, help="held-out questions to score (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    dtype = p.add_mutually_exclusive_group()
    dtype.add_argument("--bfloat16", dest="dtype", action="store_const", const=torch.bfloat16, default=torch.float32,
                       help="the base in bfloat16 and the fine-tune merged into it, rounded once (a merged LoRA as "
                            "the Hub ships one: its delta is the LoRA plus that rounding)")
    dtype.add_argument("--float16", dest="dtype", action="store_const", const=torch.float16,
                       help="the same in float16")  # fmt: skip
    p.add_argument("--variants", default="default,rule-off,lowrank",
                   help=f"comma-separated, of {', '.join(VARIANTS)} (default: %(default)s)")
    args = p.parse_args(argv)
    if args.rank < 0 or args.threads < 1:
        p.error("--rank must be >= 0 and --threads >= 1")
    args.variants = args.variants.split(",")
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    args.ratios = [parse_ratio(r) for r in args.ratios.split(",")]
    return args


@torch.no_grad()
def merged_rounded(base: torch.nn.Module, ft: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``ft``'s delta against ``base`` (both float32) added to ``base`` rounded to ``dtype``, the sum rounded there
    once: a LoRA merged into a bfloat16 (or float16) checkpoint."""
    fine, full = dict(ft.named_parameters()), dict(base.named_parameters())
    out = copy.deepcopy(base).to(dtype)
    for name, p in out.named_parameters():
        p.copy_((p.float() + (fine[name].float() - full[name].float())).to(dtype))
    return out


def within_budget(*args: Any, **kwargs: Any) -> int | None:
    """``low_rank_of`` asked for a rank that fits in the budget only, as the plan asked before."""
    return low_rank.low_rank_of(*args, **{**kwargs, "beyond_budget": False})


def load_base(ctx: dict) -> torch.nn.Module:
    model = Q.load_model(ctx["base_path"])
    return model.to(ctx["dtype"])


def run(variant: str, ratio: float, ctx: dict, folder: Path) -> dict:
    cfg = DeltaCoMeConfig(ratio=ratio, method="lowrank" if variant == "lowrank" else "deltacome")
    saved = low_rank.LOW_RANK_TAIL, low_rank.ROUNDING_TAIL
    if variant == "default, rank rule off":
        low_rank.LOW_RANK_TAIL = low_rank.ROUNDING_TAIL = -math.inf
    iterations = low_rank.POWER_ITERATIONS
    if variant == "default, one-pass probe":
        low_rank.POWER_ITERATIONS = 0
    if variant == "default, whole where the rank does not fit":
        plan.low_rank_of = within_budget
    try:
        t = time.time()
        model = compress(load_base(ctx), ctx["ft"], cfg, calibration=ctx["calib"],
                         tokenizer=ctx["tokenizer"], progress=False)  # fmt: skip
        seconds = time.time() - t
    finally:
        low_rank.LOW_RANK_TAIL, low_rank.ROUNDING_TAIL = saved
        low_rank.POWER_ITERATIONS = iterations
        plan.low_rank_of = low_rank.low_rank_of
    model.save_pretrained(folder)
    layout = model.peft_config["default"].layout
    del model
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(load_base(ctx), folder).eval()
    scores = score(loaded, ctx)
    kinds = sorted({"DARE" if e.get("sparse") else "+".join(f"{b}b x{r}" for b, r in e["bands"] if r)
                    for e in layout.values()})  # fmt: skip
    return {**scores, "bytes": (folder / "adapter_model.safetensors").stat().st_size, "seconds": seconds,
            "layouts": kinds}  # fmt: skip


@torch.no_grad()
def score(model: torch.nn.Module, ctx: dict) -> dict:
    _, agreement, _ = Q.text_scores(model, ctx["windows"], ctx["ft_argmax"])
    right = Q.item_scores(model, ctx["tokenizer"], ctx, ctx["n_eval"]).count("1")
    return {"agreement": agreement, "right": right}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import zoo
    from transformers import AutoTokenizer

    task = zoo.get_task(args.task)
    base_path = zoo.smollm2_path()
    lr = 2e-3 if args.lr is None and args.rank else args.lr  # a full fine-tune's default: the task's own
    ft_path = zoo.finetune(task, lr=lr, lora_rank=args.rank or None)
    tokenizer = AutoTokenizer.from_pretrained(ft_path)
    ft = Q.load_model(ft_path)
    if args.dtype != torch.float32:
        ft = merged_rounded(Q.load_model(base_path), ft, args.dtype)
    windows = Q.heldout_windows(task, tokenizer)
    _, _, ft_argmax = Q.text_scores(ft, windows, None)
    ctx = {"base_path": base_path, "ft": ft, "tokenizer": tokenizer, "windows": windows, "ft_argmax": ft_argmax,
           "zoo": zoo, "task": task, "n_eval": args.n_eval, "calib": Q.calibration_texts(task, tokenizer),
           "dtype": args.dtype}  # fmt: skip
    ref = {"fine-tune": score(ft, ctx), "base": score(load_base(ctx), ctx)}
    lora_bytes = sum(args.rank * sum(m.weight.shape) * 2 for n, m in ft.named_modules()
                     if isinstance(m, torch.nn.Linear) and ".layers." in n)  # fmt: skip
    what = f"merged LoRA of rank {args.rank} on every decoder linear" if args.rank else "full fine-tune"
    print(f"\n{what} of SmolLM2-135M-Instruct, task {task.name!r}"
          f"{f', merged into the {str(args.dtype)[6:]} base and rounded once' if args.dtype != torch.float32 else ''} "
          f"(lr {lr or 'the task default'}; revision {Q.code_revision()}; {args.threads} threads)"
          f"{f'; its factors in float16: {lora_bytes:,} B' if args.rank else ''}", flush=True)  # fmt: skip
    print(f"base answers {ref['base']['right']}, the fine-tune {ref['fine-tune']['right']} of "
          f"{len(task.eval[: args.n_eval])} held-out questions\n", flush=True)  # fmt: skip
    print("| ratio | variant | true bytes | right | agreement | compress s | layouts |")
    print("|---|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            for i, variant in enumerate(VARIANTS[v] for v in args.variants):
                r = run(variant, ratio, ctx, Path(tmp) / f"{ratio}-{i}")
                print(f"| 1/{1 / ratio:g} | {variant} | {r['bytes']:,} | {r['right']} | {100 * r['agreement']:.1f}% | "
                      f"{r['seconds']:.0f} | {'; '.join(r['layouts'])[:80]} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
