#!/usr/bin/env python
"""AMLQ on SmolLM2-135M: held-out perplexity against true bits per weight, and a Delta-CoMe adapter on the AMLQ base.

    python benchmarks/amlq.py [--cells amlq:3.0,gptq:3:128,...] [--stack amlq:3.0,gptq:3:128] [--out DIR]
                              [--damp auto|F] [--low-bit-share auto|F] [--skip-stack] [--plot PNG]
                              [--base smollm2|smollm2-moe]

Part 1 (base). SmolLM2-135M-Instruct (``zoo.load_smollm2``), or with ``--base smollm2-moe`` its sparse upcycling to
4 experts (``zoo.smollm2_moe_path``, fused experts quantized one linear per expert like every other linear),
quantized by

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

Every finished cell (the sensitivity pass, each base, adapter and stack accuracy too) is cached in ``--out`` under
a name carrying the hash of *everything that changes its result*: the token ids of the calibration and held-out
windows (so the text, tokenizer, ``--num-samples``, ``--seq-len``, ``--eval-windows``), the full-precision weights,
the method's settings (damping, bits, group sizes, ``low_bit_share``, error rank, target, act-order), the torch /
transformers / HQQ versions, and the code of the modules the result comes from (parsed, so comments and docstrings
do not count). A rerun (or a second process) skips a cell only when all of these are the same; the settings are
stored in each record. The end-to-end curves of the sensitivity pass do not depend on the damping or the group
sizes and are cached on their own.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
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

import hf_deltacome  # noqa: E402
from hf_deltacome.amlq.allocation import Sensitivity  # noqa: E402
from hf_deltacome.amlq.config import parse_auto_float  # noqa: E402
from hf_deltacome.amlq.pipeline import perplexity, quantize_model, save_quantized  # noqa: E402
from hf_deltacome.amlq.sensitivity import (  # noqa: E402
    E2E_SAMPLES,
    PROBES,
    decoder_linears,
    measure_end_to_end,
    measure_sensitivity,
)
from hf_deltacome.format.amlq_layout import layout_bpw, uniform_layout  # noqa: E402
from hf_deltacome.format.packing import stored_nbytes  # noqa: E402
from hf_deltacome.quant.rtn import quantize_rtn  # noqa: E402

DEFAULT_CELLS = ("rtn:2:128,rtn:3:128,hqq:2:64,hqq:3:128,gptq:2:128,gptq:3:128,amlq:2.5,amlq:3.0,amlq:gptq:3:128,"
                 "amlq0:3.0,gptq:4:128,amlq:gptq:4:128,rtn:4:128,hqq:4:128,hqq:3:64,amlq:3.5,amlq:4.0,amlq0:2.5,"
                 "amlq0:4.0,amlq0:gptq:3:128,amlq0:3.5,amlq:2.75,amlq0:2.75")
BITS = (2, 3, 4, 8)
# the code each kind of result comes from (paths under hf_deltacome/); the stack depends on the whole package
CODE = {
    "rtn": ["quant/rtn.py", "format/packing.py"],
    "calibrated": ["quant/gptq.py", "quant/hessian.py", "quant/rtn.py", "format/packing.py", "format/amlq_layout.py",
                   "amlq/allocation.py", "amlq/config.py", "amlq/lowrank.py", "amlq/pipeline.py", "amlq/linear.py",
                   "amlq/sensitivity.py", "compression/layerwalk.py", "compression/calibration.py", "linears.py"],
    "e2e": ["amlq/sensitivity.py", "quant/hessian.py", "quant/rtn.py", "compression/layerwalk.py"],
    "stack": ["."],
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default=DEFAULT_CELLS, help="comma-separated cells, in order (module docstring)")
    p.add_argument("--base", default="smollm2", choices=("smollm2", "smollm2-moe"),
                   help="smollm2-moe: SmolLM2 sparsely upcycled to 4 experts, top 2 (zoo.smollm2_moe_path), its "
                        "fused experts quantized one linear per expert; no stack")  # fmt: skip
    p.add_argument("--stack", default=None,
                   help="quantized bases of the stack, as cells (empty: no stack; default amlq:3.0,amlq:4.0)")
    p.add_argument("--out", default=None, help="cache folder (default: <zoo cache>/amlq-bench)")
    p.add_argument("--num-samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows")
    p.add_argument("--group-sizes", default="64,128", help="AMLQ candidate group sizes (CLI default: 32,64,128)")
    p.add_argument("--low-bit-share", type=lambda t: parse_auto_float(t, "low_bit_share"), default="auto",
                   help="AMLQ low_bit_share (default auto: 0.5, no limit only where 0.5 cannot reach the target)")
    p.add_argument("--damp", type=lambda t: parse_auto_float(t, "damp"), default="auto",
                   help="GPTQ damping of AMLQ and uniform GPTQ (default auto: from calibration tokens per column)")
    p.add_argument("--skip-stack", action="store_true", help="save the --stack bases but do not run the stack")
    p.add_argument("--plot", default=None,
                   help="perplexity against true bpw, PNG (empty: none; default benchmarks/amlq[_moe].png)")
    p.add_argument("--n-eval", type=int, default=120, help="held-out facts questions of the stack")
    p.add_argument("--wait", action="store_true", help="stack: wait for another process to save the AMLQ bases")
    p.add_argument("--report-only", action="store_true", help="print the tables from the cached cells only")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one process at a time)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    moe = args.base == "smollm2-moe"
    if moe and args.stack:
        p.error("--stack runs the facts fine-tune of SmolLM2 itself: not with --base smollm2-moe")
    args.stack = "" if moe else ("amlq:3.0,amlq:4.0" if args.stack is None else args.stack)
    if args.plot is None:
        args.plot = str(ROOT / "benchmarks" / ("amlq_moe.png" if moe else "amlq.png"))
    return args


def cached(path: Path, make: Any) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    if REPORT_ONLY:
        raise FileNotFoundError(path)
    record = make()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return record


REPORT_ONLY = False


def _code_digest(rel: str) -> str:
    """Hash of the parsed code of ``hf_deltacome/<rel>`` (a file, or every ``.py`` under a folder), docstrings and
    comments left out: a rewording does not invalidate the cache, a changed expression does."""
    root = Path(hf_deltacome.__file__).parent
    files = sorted((root / rel).rglob("*.py")) if (root / rel).is_dir() else [root / rel]
    h = hashlib.sha256()
    for f in files:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                    isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]  # fmt: skip
        h.update(f.relative_to(root).as_posix().encode() + ast.dump(tree).encode())
    return h.hexdigest()[:12]


def settings_key(settings: dict[str, Any]) -> str:
    """Short hash of a settings record (see the module docstring)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def common_settings(fp: nn.Module, calib: torch.Tensor, held: torch.Tensor) -> dict[str, Any]:
    """What every cell depends on: the model's weights, the token windows, the library versions."""
    import transformers

    h = hashlib.sha256()
    for name, t in sorted(fp.state_dict().items()):
        h.update(name.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    ids = {k: hashlib.sha256(v.numpy().tobytes()).hexdigest()[:12] for k, v in (("calib", calib), ("held", held))}
    return {"weights": h.hexdigest()[:12], "calibration_ids": ids["calib"], "held_out_ids": ids["held"],
            "calibration_shape": list(calib.shape), "held_out_shape": list(held.shape),
            "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip


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


def cell_settings(cell: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """Everything the result of ``cell`` depends on (its cache key); see the module docstring."""
    kind, _, rest = cell.partition(":")
    common = {k: v for k, v in ctx["common"].items() if kind not in ("rtn", "hqq") or not k.startswith("calibration")}
    if kind in ("rtn", "hqq"):
        extra = {"code": _code_digest_all(CODE["rtn"])}
        if kind == "hqq":
            import hqq

            extra["hqq"] = hqq.__version__
        return {"cell": cell, **common, **extra}
    calibrated = {"damp": ctx["damp"], "act_order": True, "code": _code_digest_all(CODE["calibrated"])}
    if kind == "gptq":
        return {"cell": cell, **common, **calibrated}
    return {"cell": cell, **common, **calibrated, "bits": list(BITS), "group_sizes": ctx["group_sizes"],
            "low_bit_share": ctx["low_bit_share"], "error_rank": "auto" if kind == "amlq" else 0, "rank_bits": 8,
            "sensitivity": sensitivity_settings(ctx)}  # fmt: skip


def sensitivity_settings(ctx: dict[str, Any], e2e_only: bool = False) -> dict[str, Any]:
    e2e = {**ctx["common"], "e2e_samples": E2E_SAMPLES, "probes": [list(p) for p in PROBES],
           "code": _code_digest_all(CODE["e2e"])}  # fmt: skip
    if e2e_only:
        return e2e
    return {**ctx["common"], "damp": ctx["damp"], "bits": list(BITS), "group_sizes": ctx["group_sizes"],
            "error_rank": "auto", "act_order": True, "code": _code_digest_all(CODE["calibrated"]), "e2e": e2e}  # fmt: skip


def _code_digest_all(rels: list[str]) -> str:
    return hashlib.sha256("".join(_code_digest(r) for r in rels).encode()).hexdigest()[:12]


def sensitivity(out: Path, ctx: dict[str, Any]) -> list[Sensitivity]:
    """The shared sensitivity pass (GPTQ errors, then the end-to-end curves), cached in ``out`` (the curves apart:
    they depend on neither the damping nor the candidate precisions)."""
    e2e_set, set_ = sensitivity_settings(ctx, e2e_only=True), sensitivity_settings(ctx)
    holder: list[list[Sensitivity]] = []

    def make_errors() -> dict:
        t0 = time.time()
        sens = measure_sensitivity(ctx["fp"], ctx["calib"], bits=BITS, group_sizes=ctx["group_sizes"],
                                   damp=ctx["damp"], progress=False)  # fmt: skip
        holder.append(sens)
        return {"settings": set_, "gptq_seconds": round(time.time() - t0, 1),
                "items": [s.to_dict() for s in sens]}  # fmt: skip

    blob = cached(out / f"sensitivity-{settings_key(set_)}.json", make_errors)
    sens = holder[0] if holder else [Sensitivity.from_dict(d) for d in blob["items"]]

    def make_curves() -> dict:
        t0 = time.time()
        probe = [Sensitivity.from_dict(s.to_dict()) for s in sens]
        measure_end_to_end(ctx["fp"], ctx["calib"], probe, progress=False)
        return {"settings": e2e_set, "end_to_end_seconds": round(time.time() - t0, 1),
                "curves": {s.name: [list(p) for p in s.curve] for s in probe}}  # fmt: skip

    curves = cached(out / f"e2e-{settings_key(e2e_set)}.json", make_curves)
    for s in sens:
        s.curve = [(float(e), float(k)) for e, k in curves["curves"][s.name]]
    ctx["sensitivity_seconds"] = (blob["gptq_seconds"], curves["end_to_end_seconds"])
    return sens


def cell_key(cell: str, ctx: dict[str, Any]) -> str:
    return f"{cell.replace(':', '_')}-{settings_key(cell_settings(cell, ctx))}"


def base_dir(out: Path, cell: str, ctx: dict[str, Any]) -> Path:
    return out / f"base-{cell_key(cell, ctx)}"


def run_cell(cell: str, out: Path, ctx: dict[str, Any]) -> dict | None:
    kind, _, rest = cell.partition(":")
    shapes = linear_shapes(ctx["fp"])

    def make() -> dict:
        if kind.startswith("amlq"):
            ctx["sens"]()  # the shared sensitivity pass, timed on its own (not in the cell's seconds)
        model = copy.deepcopy(ctx["fp"])
        t0 = time.time()
        record: dict[str, Any] = {"cell": cell, "settings": cell_settings(cell, ctx)}
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
                           damp=ctx["damp"], progress=False)  # fmt: skip
            record |= {"method": "GPTQ uniform (ours)", "config": f"{bits}b g{gs}",
                       "true_bpw": model.config.quantization_config.info["true_bpw"]}  # fmt: skip
        else:  # amlq / amlq0 at a target, or matched to a uniform configuration
            if rest.startswith("gptq:"):
                bits, gs = (int(v) for v in rest.split(":")[1:])
                target = layout_bpw(uniform_layout(shapes, bits, gs))
            else:
                target = float(rest)
            quantize_model(model, target, calibration=ctx["calib"], error_rank="auto" if kind == "amlq" else 0,
                           group_sizes=ctx["group_sizes"], low_bit_share=ctx["low_bit_share"], damp=ctx["damp"],
                           sensitivity=ctx["sens"](), progress=False)  # fmt: skip
            cfg = model.config.quantization_config
            layout, share = cfg.layout, cfg.info.get("low_bit_share")
            note = f", low_bit_share {share:g}" if share is not None and share != 0.5 else ""
            record |= {"method": "AMLQ" if kind == "amlq" else "AMLQ w/o low-rank",
                       "config": f"target {target:.3f}{note}",
                       "true_bpw": cfg.info["true_bpw"], "estimated_kl": cfg.info.get("estimated_kl"),
                       "low_bit_share": share, "rank_layers": sum(1 for e in layout.values() if e["rank"]),
                       "mean_code_bits": cfg.info["mean_code_bits"], "layout": layout}  # fmt: skip
        if kind in ("gptq", "amlq", "amlq0"):
            info = model.config.quantization_config.info
            record["damping"] = sorted({round(float(d), 4) for d in info["damping"].values()})
            record["calibration_perplexity"] = info["calibration_perplexity"]
        record["seconds"] = round(time.time() - t0, 1)
        if cell in ctx["stack"] and kind not in ("rtn", "hqq"):
            save_quantized(model, base_dir(out, cell, ctx), ctx["tok"])
        record["perplexity"] = perplexity(model, ctx["held"])
        return record

    try:
        rec = cached(out / f"cell-{cell_key(cell, ctx)}.json", make)
    except FileNotFoundError:
        return None
    damping = f"  damp {rec['damping']}" if rec.get("damping") else ""
    print(f"{rec['method']:<20} {rec['config']:<14} {rec['true_bpw']:.3f} bpw  ppl {rec['perplexity']:10.3f}  "
          f"({rec['seconds']:.0f} s){damping}", flush=True)  # fmt: skip
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
    common = {**ctx["common"], "finetune": common_settings(ft, ctx["calib"], ctx["held"])["weights"],
              "delta_config": cfg.to_dict() if hasattr(cfg, "to_dict") else repr(cfg), "n_eval": args.n_eval,
              "compress_samples": [16, 128], "code": _code_digest_all(CODE["stack"])}  # fmt: skip

    def acc(name: str, build: Any, **deps: Any) -> float | None:
        def make() -> dict:
            model = build()
            set_dequant_cache(model, True)  # evaluation speed only
            return {"settings": {**common, **deps},
                    "accuracy": zoo.task_accuracy(model, tok, task, n=args.n_eval, batch_size=40)}  # fmt: skip

        try:
            value = cached(out / f"stack-{name.replace(':', '_')}-{settings_key({**common, **deps})}.json",
                           make)["accuracy"]  # fmt: skip
        except FileNotFoundError:
            return None
        print(f"stack {name}: {100 * value:.1f}%", flush=True)
        return value

    def adapter(name: str, make_base: Any, **deps: Any) -> Path:
        folder = out / f"adapter-{name}-{settings_key({**common, **deps})}"
        if not (folder / "adapter_config.json").is_file() and not REPORT_ONLY:
            compress(make_base(), ft, cfg, calibration=calib, tokenizer=tok, num_samples=16, seq_len=128,
                     progress=False).save_pretrained(folder)  # fmt: skip
        return folder

    def load(path: Path) -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    res = {"finetune": acc("finetune", lambda: ft), "fp_base": acc("fp-base", lambda: copy.deepcopy(ctx["fp"]))}
    fp_adapter = adapter("fp", lambda: copy.deepcopy(ctx["fp"]))
    res["fp+fp_adapter"] = acc("fp+fp-adapter", lambda: PeftModel.from_pretrained(copy.deepcopy(ctx["fp"]), fp_adapter),
                               adapter=fp_adapter.name)  # fmt: skip
    for cell in ctx["stack"]:
        qdir, base = base_dir(out, cell, ctx), {"base": cell_key(cell, ctx)}
        while args.wait and not (qdir / "config.json").is_file():
            time.sleep(20)  # another process (part 1) is quantizing this base
        if not (qdir / "config.json").is_file():
            if REPORT_ONLY:
                continue
            (out / f"cell-{cell_key(cell, ctx)}.json").unlink(missing_ok=True)
            run_cell(cell, out, ctx)
        res[cell] = acc(f"{cell}", lambda qdir=qdir: load(qdir), **base)
        res[f"{cell}+fp_adapter"] = acc(f"{cell}+fp-adapter",
                                        lambda qdir=qdir: PeftModel.from_pretrained(load(qdir), fp_adapter),
                                        adapter=fp_adapter.name, **base)  # fmt: skip
        q_adapter = adapter(cell.replace(":", "_"), lambda qdir=qdir: load(qdir), **base)
        res[f"{cell}+q_adapter"] = acc(f"{cell}+q-adapter",
                                       lambda qdir=qdir, a=q_adapter: PeftModel.from_pretrained(load(qdir), a),
                                       adapter=q_adapter.name, **base)  # fmt: skip
    return {k: v for k, v in res.items() if v is not None}


# ------------------------------------------------------------------------------------------------ output


def base_table(records: list[dict], fp_ppl: float) -> str:
    lines = ["| method | config | true bpw | held-out ppl | damping | time s |", "|---|---|---:|---:|---|---:|",
             f"| *fp32 base* | – | 32 | {fp_ppl:.3f} | – | – |"]  # fmt: skip
    for r in sorted(records, key=lambda r: (r["true_bpw"], r["method"])):
        what = r["config"] + (f" (rank>0 in {r['rank_layers']} linears)" if r.get("rank_layers") else "")
        damp = "/".join(f"{d:g}" for d in r.get("damping") or []) or "–"
        lines.append(f"| {r['method']} | {what} | {r['true_bpw']:.3f} | {r['perplexity']:.3f} | {damp} | "
                     f"{r['seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def plot(records: list[dict], fp_ppl: float, path: str, model: str = "SmolLM2-135M-Instruct") -> None:
    """Held-out perplexity (log scale) against true bpw, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"AMLQ": "o-", "AMLQ w/o low-rank": "x--", "GPTQ uniform (ours)": "s-", "RTN": "^:", "HQQ": "v:"}
    for method, style in styles.items():
        pts = sorted((r["true_bpw"], r["perplexity"]) for r in records if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=method)
    ax.axhline(fp_ppl, color="grey", lw=0.8, label=f"fp32 ({fp_ppl:.1f})")
    ax.set(xlabel="true bits per weight (codes, scales, zeros, low-rank factors)", ylabel="held-out perplexity",
           yscale="log", title=f"{model}: perplexity against true bpw")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    global REPORT_ONLY
    args = parse_args(argv)
    REPORT_ONLY = args.report_only
    torch.set_num_threads(args.threads)
    out = Path(args.out or (zoo.cache_dir() / "amlq-bench"))
    out.mkdir(parents=True, exist_ok=True)
    if args.base == "smollm2-moe":  # its fused experts as one linear per expert, for good (what AMLQ quantizes)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hf_deltacome.linears import unfuse_experts

        fp = AutoModelForCausalLM.from_pretrained(zoo.smollm2_moe_path(), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(zoo.smollm2_moe_path())
        unfuse_experts(fp, keep=True)
    else:
        fp, tok = zoo.load_smollm2()
    fp.eval()
    calib, held = text_windows(tok, args)
    ctx: dict[str, Any] = {"fp": fp, "tok": tok, "calib": calib, "held": held,
                           "group_sizes": [int(g) for g in args.group_sizes.split(",")],
                           "low_bit_share": args.low_bit_share, "damp": args.damp,
                           "common": common_settings(fp, calib, held),
                           "stack": [c for c in args.stack.split(",") if c]}  # fmt: skip
    memo: list[list[Sensitivity]] = []
    ctx["sens"] = lambda: memo[0] if memo else memo.append(sensitivity(out, ctx)) or memo[0]
    fp_key = settings_key({k: v for k, v in ctx["common"].items() if not k.startswith("calibration")})
    REPORT_ONLY, report_only = False, REPORT_ONLY
    fp_ppl = cached(out / f"fp-{fp_key}.json", lambda: {"perplexity": perplexity(fp, held)})["perplexity"]
    REPORT_ONLY = report_only
    t0 = time.time()
    records = [r for r in (run_cell(c, out, ctx) for c in args.cells.split(",") if c) if r is not None]
    stack = run_stack(out, ctx, args) if ctx["stack"] and not args.skip_stack else {}
    print(base_table(records, fp_ppl))
    shapes = linear_shapes(fp)
    total = sum(m * n for m, n in shapes.values())
    experts = sum(m * n for k, (m, n) in shapes.items() if ".experts." in k)
    params = sum(p.numel() for p in fp.parameters())
    print(f"\nQuantized (every cell): {len(shapes)} decoder linears, {total:,} weights of the model's {params:,} "
          f"parameters ({100 * total / params:.1f}%), {experts:,} of them in fused experts")  # fmt: skip
    sens_file = out / f"sensitivity-{settings_key(sensitivity_settings(ctx))}.json"
    e2e_file = out / f"e2e-{settings_key(sensitivity_settings(ctx, e2e_only=True))}.json"
    if sens_file.is_file() and e2e_file.is_file():
        gptq_s = json.loads(sens_file.read_text())["gptq_seconds"]
        e2e_s = json.loads(e2e_file.read_text())["end_to_end_seconds"]
        print(f"\nAMLQ sensitivity pass (shared by every AMLQ cell, not in their times): {gptq_s:.0f} s "
              f"GPTQ errors + {e2e_s:.0f} s end-to-end probes")  # fmt: skip
    if {"finetune", "fp_base"} <= set(stack):
        print("\n" + stack_table(stack, ctx["stack"]))
    if args.plot and records:
        model = "SmolLM2-135M-Instruct, 4 experts top 2" if args.base == "smollm2-moe" else "SmolLM2-135M-Instruct"
        plot(records, fp_ppl, args.plot, model)
    print(f"\n{time.time() - t0:.0f} s wall (this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
