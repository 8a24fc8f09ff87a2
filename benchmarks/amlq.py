#!/usr/bin/env python
"""AMLQ on SmolLM2-135M: held-out perplexity against true bits per weight, and a Delta-CoMe adapter on the AMLQ base.

    python benchmarks/amlq.py [--cells amlq:3.0,gptq:3:128,...] [--stack amlq:3.0,gptq:3:128] [--out DIR]

Part 1 (base). SmolLM2-135M-Instruct (``zoo.load_smollm2``) quantized by

* ``amlq:T``: AMLQ at target true bpw ``T`` (``error_rank="auto"``), ``amlq0:T`` without the low-rank part,
  ``amlq:gptq:B:G``: AMLQ at exactly the true bpw of uniform GPTQ ``B`` bits / group ``G`` (matched comparison);
  the sensitivity pass (GPTQ errors + end-to-end probes) is measured once, cached and shared by every AMLQ cell;
* ``gptq:B:G``: our uniform GPTQ through the same pipeline (same calibration, damping, act-order, GPTQ-sequential);
* ``rtn:B:G``: round-to-nearest (``quant.rtn.quantize_rtn``) with the same storage, simulated (dequantized weights);
* ``hqq:B:G``: HQQ (an external library, data-free), simulated the same way, float16 scale and zero per group.

Text: the Python reference manual shipped with CPython (``pydoc_data.topics``, human-written prose). Calibration:
``--num-samples`` windows of ``--seq-len`` tokens from its second half; held-out: ``--eval-windows`` windows from its
start (disjoint). True bpw counts every stored byte of the quantized decoder linears (codes with row padding, fp16
scales, uint8 zeros, low-rank factors) over their weights; the (tied) embeddings stay fp32 for every method.

Part 2 (stack, ``--stack``: quantized bases given as cells, saved in the AMLQ format by their cell): the ``facts``
knowledge fine-tune compressed with Delta-CoMe at 1/16 against the fp base and against the quantized base (loaded with ``AutoModelForCausalLM.from_pretrained`` from the saved folder), each
adapter loaded with ``PeftModel.from_pretrained`` onto that AMLQ base; exact-match accuracy on the first ``--n-eval``
held-out questions; gain kept = (acc - acc_fp_base) / (acc_finetune - acc_fp_base).

Every finished cell is cached as JSON in ``--out``: a rerun (or a second process) skips it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))  # the demo zoo

import zoo  # noqa: E402

from hf_deltacome.amlq.allocation import Sensitivity  # noqa: E402
from hf_deltacome.amlq.pipeline import perplexity, quantize_model, save_quantized  # noqa: E402
from hf_deltacome.amlq.sensitivity import decoder_linears, measure_end_to_end, measure_sensitivity  # noqa: E402
from hf_deltacome.format.amlq_layout import layout_bpw, uniform_layout  # noqa: E402
from hf_deltacome.format.packing import stored_nbytes  # noqa: E402
from hf_deltacome.quant.rtn import quantize_rtn  # noqa: E402

DEFAULT_CELLS = "rtn:3:128,rtn:2:128,amlq:3.0,gptq:3:128,amlq:gptq:3:128,gptq:2:128,amlq:2.5,amlq0:3.0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default=DEFAULT_CELLS, help="comma-separated cells, in order (module docstring)")
    p.add_argument("--stack", default="amlq:3.0", help="quantized bases of the stack, as cells (empty: no stack)")
    p.add_argument("--out", default=None, help="cache folder (default: <zoo cache>/amlq-bench)")
    p.add_argument("--num-samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows")
    p.add_argument("--group-sizes", default="64,128", help="AMLQ candidate group sizes (CLI default: 32,64,128)")
    p.add_argument("--low-bit-share", type=float, default=0.5, help="AMLQ low_bit_share")
    p.add_argument("--n-eval", type=int, default=120, help="held-out facts questions of the stack")
    p.add_argument("--wait", action="store_true", help="stack: wait for another process to save the AMLQ bases")
    p.add_argument("--report-only", action="store_true", help="print the tables from the cached cells only")
    return p.parse_args(argv)


def cached(path: Path, make: Any) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    record = make()
    path.write_text(json.dumps(record, indent=1))
    return record


def text_windows(tok: Any, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, held-out) token windows of the Python reference manual; disjoint halves."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids, dtype=torch.long)
    half, L = len(ids) // 2, args.seq_len
    held = ids[: args.eval_windows * L].view(args.eval_windows, L)
    calib = ids[half : half + args.num_samples * L].view(args.num_samples, L)
    return calib, held


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    _, _, per_layer = decoder_linears(model)
    mods = dict(model.named_modules())
    return {n: (mods[n].out_features, mods[n].in_features) for names in per_layer for n in names}


def rtn(w: torch.Tensor, bits: int, gs: int) -> tuple[torch.Tensor, int]:
    """Round-to-nearest with our storage: (dequantized weight, stored bytes)."""
    return quantize_rtn(w, bits, gs).dequantize(), stored_nbytes(*w.shape, bits, gs)


def hqq(w: torch.Tensor, bits: int, gs: int) -> tuple[torch.Tensor, int]:
    """HQQ (``pip install hqq``, data-free half-quadratic quantization): (dequantized weight, bytes), the bytes
    counted as ``bits`` per weight plus a float16 scale and a float16 zero per group (HQQ's own meta-data dtype)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    q = HQQLinear(lin, BaseQuantizeConfig(nbits=bits, group_size=gs), compute_dtype=torch.float32, device="cpu")
    m, n = w.shape
    return q.dequantize().float().reshape(w.shape), m * -(-n * bits // 8) + 4 * m * -(-n // gs)


# ------------------------------------------------------------------------------------------------ part 1


def sensitivity(out: Path, ctx: dict[str, Any]) -> list[Sensitivity]:
    """The shared sensitivity pass (GPTQ errors, then the end-to-end curves), cached in ``out``."""

    def make() -> dict:
        t0 = time.time()
        sens = measure_sensitivity(ctx["fp"], ctx["calib"], bits=(2, 3, 4, 8), group_sizes=ctx["group_sizes"],
                                   progress=False)  # fmt: skip
        t1 = time.time()
        measure_end_to_end(ctx["fp"], ctx["calib"], sens, progress=False)
        return {"gptq_seconds": round(t1 - t0, 1), "end_to_end_seconds": round(time.time() - t1, 1),
                "items": [s.to_dict() for s in sens]}  # fmt: skip

    blob = cached(out / "sensitivity.json", make)
    ctx["sensitivity_seconds"] = blob["gptq_seconds"] + blob["end_to_end_seconds"]
    return [Sensitivity.from_dict(d) for d in blob["items"]]


def base_dir(out: Path, cell: str) -> Path:
    return out / f"base-{cell.replace(':', '_')}"


def run_cell(cell: str, out: Path, ctx: dict[str, Any]) -> dict:
    kind, _, rest = cell.partition(":")
    shapes = linear_shapes(ctx["fp"])

    def make() -> dict:
        model = copy.deepcopy(ctx["fp"])
        t0 = time.time()
        record: dict[str, Any] = {"cell": cell}
        if kind in ("rtn", "hqq"):
            bits, gs = (int(v) for v in rest.split(":"))
            mods, nbytes = dict(model.named_modules()), 0
            with torch.no_grad():
                for name in shapes:
                    w = mods[name].weight
                    dq, b = (rtn if kind == "rtn" else hqq)(w.detach().float(), bits, gs)
                    w.data = dq.to(w.dtype)
                    nbytes += b
            record |= {"method": kind.upper(), "config": f"{bits}b g{gs}",
                       "true_bpw": 8 * nbytes / sum(m * n for m, n in shapes.values())}  # fmt: skip
        elif kind == "gptq":
            bits, gs = (int(v) for v in rest.split(":"))
            quantize_model(model, 16.0, calibration=ctx["calib"], layout=uniform_layout(shapes, bits, gs),
                           progress=False)  # fmt: skip
            record |= {"method": "GPTQ uniform (ours)", "config": f"{bits}b g{gs}",
                       "true_bpw": model.config.quantization_config.info["true_bpw"]}  # fmt: skip
        else:  # amlq / amlq0 at a target, or matched to a uniform configuration
            if rest.startswith("gptq:"):
                bits, gs = (int(v) for v in rest.split(":")[1:])
                target = layout_bpw(uniform_layout(shapes, bits, gs))
            else:
                target = float(rest)
            quantize_model(model, target, calibration=ctx["calib"], error_rank="auto" if kind == "amlq" else 0,
                           group_sizes=ctx["group_sizes"], low_bit_share=ctx["low_bit_share"],
                           sensitivity=ctx["sens"](), progress=False)  # fmt: skip
            cfg = model.config.quantization_config
            layout = cfg.layout
            note = f", low_bit_share {ctx['low_bit_share']:g}" if ctx["low_bit_share"] != 0.5 else ""
            record |= {"method": "AMLQ" if kind == "amlq" else "AMLQ w/o low-rank",
                       "config": f"target {target:.3f}{note}",
                       "true_bpw": cfg.info["true_bpw"], "estimated_kl": cfg.info.get("estimated_kl"),
                       "rank_layers": sum(1 for e in layout.values() if e["rank"]),
                       "mean_code_bits": cfg.info["mean_code_bits"], "layout": layout}  # fmt: skip

        record["seconds"] = round(time.time() - t0, 1)
        if cell in ctx["stack"] and kind != "rtn" and kind != "hqq" and "low_bit_share" not in record["config"]:
            save_quantized(model, base_dir(out, cell), ctx["tok"])
        record["perplexity"] = perplexity(model, ctx["held"])
        return record

    variant = f"-lbs{ctx['low_bit_share']:g}" if kind.startswith("amlq") and ctx["low_bit_share"] != 0.5 else ""
    rec = cached(out / f"cell-{cell.replace(':', '_')}{variant}.json", make)
    print(f"{rec['method']:<20} {rec['config']:<14} {rec['true_bpw']:.3f} bpw  ppl {rec['perplexity']:10.3f}  "
          f"({rec['seconds']:.0f} s)", flush=True)  # fmt: skip
    return rec


# ------------------------------------------------------------------------------------------------ part 2


def run_stack(out: Path, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_deltacome import DeltaCoMeConfig, compress
    from hf_deltacome.amlq import set_dequant_cache

    task, tok = zoo.get_task("facts"), ctx["tok"]
    ft = AutoModelForCausalLM.from_pretrained(zoo.finetune(task), dtype=torch.float32).eval()
    eos = tok.eos_token or ""
    calib = [task.render(tok, ex) + ex.answer + eos for ex in task.train]  # what benchmarks/quality.py uses
    cfg = DeltaCoMeConfig(ratio=1 / 16)

    def acc(key: str, build: Any) -> float:
        def make() -> dict:
            model = build()
            set_dequant_cache(model, True)  # evaluation speed only
            return {"accuracy": zoo.task_accuracy(model, tok, task, n=args.n_eval, batch_size=40)}

        value = cached(out / f"stack-{key}.json", make)["accuracy"]
        print(f"stack {key}: {100 * value:.1f}%", flush=True)
        return value

    def adapter(key: str, base: Any) -> Path:
        folder = out / f"adapter-{key}"
        if not (folder / "adapter_config.json").is_file():
            compress(base(), ft, cfg, calibration=calib, tokenizer=tok, num_samples=16, seq_len=128,
                     progress=False).save_pretrained(folder)  # fmt: skip
        return folder

    def load(path: Path) -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    res = {"finetune": acc("finetune", lambda: ft), "fp_base": acc("fp-base", lambda: copy.deepcopy(ctx["fp"]))}
    fp_adapter = adapter("fp", lambda: copy.deepcopy(ctx["fp"]))
    res["fp+fp_adapter"] = acc("fp+fp-adapter", lambda: PeftModel.from_pretrained(copy.deepcopy(ctx["fp"]), fp_adapter))
    for cell in ctx["stack"]:
        qdir = base_dir(out, cell)
        while args.wait and not (qdir / "config.json").is_file():
            time.sleep(20)  # another process (part 1) is quantizing this base
        if not (qdir / "config.json").is_file():
            (out / f"cell-{cell.replace(':', '_')}.json").unlink(missing_ok=True)
            run_cell(cell, out, ctx)
        res[cell] = acc(f"{cell}", lambda qdir=qdir: load(qdir))
        res[f"{cell}+fp_adapter"] = acc(f"{cell}+fp-adapter",
                                        lambda qdir=qdir: PeftModel.from_pretrained(load(qdir), fp_adapter))  # fmt: skip
        q_adapter = adapter(cell.replace(":", "_"), lambda qdir=qdir: load(qdir))
        res[f"{cell}+q_adapter"] = acc(f"{cell}+q-adapter",
                                       lambda qdir=qdir, a=q_adapter: PeftModel.from_pretrained(load(qdir), a))  # fmt: skip
    return res


# ------------------------------------------------------------------------------------------------ output


def base_table(records: list[dict], fp_ppl: float) -> str:
    lines = ["| method | config | true bpw | held-out ppl | time s |", "|---|---|---:|---:|---:|",
             f"| *fp32 base* | – | 32 | {fp_ppl:.3f} | – |"]  # fmt: skip
    for r in sorted(records, key=lambda r: (r["true_bpw"], r["method"])):
        what = r["config"] + (f" (rank>0 in {r['rank_layers']} linears)" if r.get("rank_layers") else "")
        lines.append(f"| {r['method']} | {what} | {r['true_bpw']:.3f} | {r['perplexity']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def stack_table(res: dict[str, float], stack: list[str]) -> str:
    base, ft = res["fp_base"], res["finetune"]

    def kept(a: float) -> str:
        return f"{100 * (a - base) / (ft - base):.1f}%" if ft != base else "–"

    rows = [("fine-tune (fp32)", "finetune"), ("fp base", "fp_base"), ("fp base + adapter (fp-made)", "fp+fp_adapter")]
    for c in stack:
        rows += [(f"{c} base alone", c), (f"{c} + adapter made against the fp base", f"{c}+fp_adapter"),
                 (f"{c} + adapter made against this quantized base", f"{c}+q_adapter")]  # fmt: skip
    lines = ["| model | facts accuracy | gain kept |", "|---|---:|---:|"]
    lines += [f"| {name} | {100 * res[k]:.1f}% | {kept(res[k])} |" for name, k in rows if k in res]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out or (zoo.cache_dir() / "amlq-bench"))
    out.mkdir(parents=True, exist_ok=True)
    fp, tok = zoo.load_smollm2()
    fp.eval()
    calib, held = text_windows(tok, args)
    ctx: dict[str, Any] = {"fp": fp, "tok": tok, "calib": calib, "held": held,
                           "group_sizes": [int(g) for g in args.group_sizes.split(",")],
                           "low_bit_share": args.low_bit_share,
                           "stack": [c for c in args.stack.split(",") if c]}  # fmt: skip
    memo: list[list[Sensitivity]] = []
    ctx["sens"] = lambda: memo[0] if memo else memo.append(sensitivity(out, ctx)) or memo[0]
    fp_ppl = cached(out / "fp.json", lambda: {"perplexity": perplexity(fp, held)})["perplexity"]
    t0 = time.time()
    if args.report_only:
        records = [json.loads(p.read_text()) for p in sorted(out.glob("cell-*.json"))]
        stack = {p.stem[6:].replace("-adapter", "_adapter").replace("-", "_"): json.loads(p.read_text())["accuracy"]
                 for p in out.glob("stack-*.json")}  # fmt: skip
    else:
        records = [run_cell(c, out, ctx) for c in args.cells.split(",") if c]
        stack = run_stack(out, ctx, args) if ctx["stack"] else {}
    print(base_table(records, fp_ppl))
    if (out / "sensitivity.json").is_file():
        blob = json.loads((out / "sensitivity.json").read_text())
        print(f"\nAMLQ sensitivity pass (shared by every AMLQ cell, not in their times): {blob['gptq_seconds']:.0f} s "
              f"GPTQ errors + {blob['end_to_end_seconds']:.0f} s end-to-end probes")  # fmt: skip
    if {"finetune", "fp_base"} <= set(stack):
        print("\n" + stack_table(stack, ctx["stack"]))
    print(f"\n{time.time() - t0:.0f} s wall (this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
