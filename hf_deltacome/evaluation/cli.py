"""``deltacome eval`` and ``deltacome lm-eval`` (parsers import nothing heavy; commands import what they need)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.text is None and args.task is None:
        raise ConfigError("deltacome eval needs --text (perplexity, agreement, module errors) and/or --task")
    from ..backend import check_device
    from ..loading import load_adapter_model, load_model_and_tokenizer
    from .metrics import evaluate_model

    if args.device is not None:
        check_device(args.device, "--device")

    model, tokenizer = load_adapter_model(args.base, args.adapter, dtype=args.dtype, device=args.device)
    finetuned = None
    if args.finetuned:
        finetuned, _ = load_model_and_tokenizer(args.finetuned, "finetuned", args.dtype)
        if args.device:
            finetuned.to(args.device)
    elif args.compare:
        raise ConfigError("--compare needs --finetuned")
    report = evaluate_model(
        model,
        tokenizer,
        finetuned=finetuned,
        text=args.text,
        task=args.task,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        max_items=args.max_items,
        compare=args.compare,
        progress=not args.no_progress,
    )
    print(report.format(worst=args.worst))
    if args.json:
        out = report.to_dict()
        out["predictions"] = report.predictions
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``deltacome eval`` and ``deltacome lm-eval``."""
    p = subparsers.add_parser(
        "eval",
        help="perplexity, next-token agreement, per-module output error and task accuracy of base + adapter",
        description=(
            "Evaluate BASE + ADAPTER. lm-evaluation-harness: deltacome lm-eval --model hf "
            "--model_args pretrained=BASE,peft=ADAPTER --tasks TASK"
        ),
    )
    p.add_argument("--base", required=True, help="base model: local folder or Hub id")
    p.add_argument("--adapter", required=True, help="Delta-CoMe adapter folder")
    p.add_argument("--finetuned", default=None, help="the fine-tune: enables agreement and per-module errors")
    p.add_argument("--text", default=None, help="held-out text (.txt read whole, .jsonl records) for perplexity")
    p.add_argument("--task", default=None, help="generation task, JSONL of {prompt, answer, regex?}")
    p.add_argument("--chat", action="store_true", help="wrap task prompts in the tokenizer's chat template")
    p.add_argument("--compare", action="store_true", help="also evaluate the base and the fine-tune (gain kept)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=16384, help="at most this many text tokens (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per task item (default: %(default)s)")
    p.add_argument("--max-items", type=int, default=None, help="evaluate only the first N task items")
    p.add_argument("--worst", type=int, default=10, help="list this many modules with the largest output error (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the report (and predictions) to this JSON file")
    p.add_argument("--device", default=None, help="cpu or cuda (default: where the model loads)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the models are loaded in (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)
    lm = subparsers.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness with Delta-CoMe adapters (arguments as for lm_eval)",
        description="lm-evaluation-harness's command line with our PEFT method registered, e.g. deltacome lm-eval "
        "--model hf --model_args pretrained=BASE,peft=ADAPTER --tasks TASK",
    )
    lm.add_argument("harness_args", nargs=argparse.REMAINDER, help="arguments for lm_eval")
    lm.set_defaults(func=_cmd_lm_eval)


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from .lm_eval import lm_eval_cli

    lm_eval_cli(args.harness_args)
    return 0
