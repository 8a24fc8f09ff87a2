"""``deltacome quantize MODEL --bpw 3.0 --output DIR``: AMLQ-quantize a base model (heavy imports inside)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import DeltaCoMeError


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _rank(text: str) -> Any:
    from .config import parse_error_rank

    try:
        return parse_error_rank(text)
    except DeltaCoMeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _auto_float(field: str) -> Any:
    def parse(text: str) -> Any:
        from .config import parse_auto_float

        try:
            return parse_auto_float(text, field)
        except DeltaCoMeError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _cmd_quantize(args: argparse.Namespace) -> int:
    from ..format.amlq_layout import layout_table
    from ..loading import load_model_and_tokenizer
    from .pipeline import quantize_model, save_quantized

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise DeltaCoMeError(f"--output {str(out)!r} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DeltaCoMeError(f"--output {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    if Path(args.model).is_dir() and out.resolve() == Path(args.model).resolve():
        raise DeltaCoMeError(f"--output {str(out)!r} is the input model's folder; choose a folder of its own")
    model, tokenizer = load_model_and_tokenizer(args.model, "model", args.dtype)
    if tokenizer is None and args.calibration is not None:
        raise DeltaCoMeError(f"MODEL {args.model!r} has no tokenizer to read --calibration {args.calibration!r}")
    model = quantize_model(
        model,
        args.bpw,
        calibration=args.calibration,
        tokenizer=tokenizer,
        bits=args.bits,
        group_sizes=args.group_sizes,
        error_rank=args.error_rank,
        rank_bits=args.rank_bits,
        low_bit_share=args.low_bit_share,
        damp=args.damp,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        device=args.device,
        progress=True,
    )
    save_quantized(model, out, tokenizer)
    cfg = model.config.quantization_config
    print(layout_table(cfg.layout, cfg.info, cfg.bpw, cfg.damp))
    print(f"saved to {out}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="AMLQ: quantize a base model to a target bits per weight")
    p.add_argument("model", help="full-precision causal LM: local folder or Hub id")
    p.add_argument("--bpw", type=float, required=True, help="target true bits per weight (scales, zeros, rank counted)")
    p.add_argument("--output", required=True, help="folder to write (loads with AutoModelForCausalLM)")
    p.add_argument("--calibration", default=None, help="calibration text (.txt / .jsonl); default: sampled")
    p.add_argument("--bits", type=_int_list, default=[2, 3, 4, 8], help="candidate bit widths (default 2,3,4,8)")
    p.add_argument(
        "--group-sizes", type=_int_list, default=[32, 64, 128], help="candidate group sizes (default 32,64,128)"
    )
    p.add_argument("--error-rank", type=_rank, default="auto", help="low-rank error correction: auto, 0 or a rank")
    p.add_argument("--rank-bits", type=int, choices=[4, 8], default=8, help="bits of the low-rank factors (default 8)")
    p.add_argument("--low-bit-share", type=_auto_float("low_bit_share"), default="auto",
                   help="largest share of a linear's columns at the lowest bit width, or auto (default: 0.5, no "
                        "limit only where 0.5 cannot reach --bpw)")  # fmt: skip
    p.add_argument("--damp", type=_auto_float("damp"), default="auto",
                   help="GPTQ damping, or auto (default: per linear from calibration tokens per input column, "
                        "0.1 at <= 4, 0.01 at >= 64, log-linear between)")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--device", default=None, help="where each decoder layer is processed (cpu, cuda)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(func=_cmd_quantize)
