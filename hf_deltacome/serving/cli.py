"""``deltacome serve | export | merge``: argparse registration (``add_parser``) and the commands.

Only the standard library is imported here; torch, transformers, FastAPI and uvicorn are imported inside the
command functions, so ``deltacome --help`` stays fast and works without the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ConfigError

API_KEY_ENV = "DELTACOME_API_KEY"


def _named_adapter(text: str) -> tuple[str, str]:
    """``--adapter NAME=PATH_OR_HUB_ID``."""
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER_OR_HUB_ID, got {text!r}")
    return name, source


def _served_base_name(base: str) -> str:
    """The base's model name in the API: a Hub id as given, a local folder by its name."""
    path = Path(base).expanduser()
    return path.resolve().name if path.is_dir() else base


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"deltacome serve needs FastAPI and uvicorn: pip install 'hf-deltacome[serve]' ({e})") from e
    from ..loading import load_model_and_tokenizer
    from ..progress import log_to_stderr
    from .deltas import check_adapter_name, load_deltas
    from .engine import Engine
    from .server import BASE_ALIAS, run_server

    base_name = args.served_base_name or _served_base_name(args.base)
    adapters: dict[str, str] = {}
    for name, source in args.adapter or []:
        check_adapter_name(name, adapters)
        if name in (base_name, BASE_ALIAS):
            raise ConfigError(f"adapter name {name!r} is taken by the base model; choose another")
        adapters[name] = source
    log_to_stderr()
    model, tokenizer = load_model_and_tokenizer(args.base, "base", args.dtype)
    if args.device:
        model.to(args.device)
    if adapters:
        kwargs = {} if args.strict else {"strict": False}
        model = load_deltas(model, adapters, **kwargs)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_model_len=args.max_model_len)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    print(
        f"deltacome serve: {base_name} + {len(adapters)} adapter(s) [{', '.join(adapters) or 'none'}] on "
        f"http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, "
        f"{'API key required' if api_key else 'no API key'})",
        file=sys.stderr,
    )
    run_server(
        engine,
        base_name=base_name,
        host=args.host,
        port=args.port,
        api_key=api_key,
        default_max_tokens=args.default_max_tokens,
        log_level=args.log_level,
        allow_adapter_updates=args.allow_adapter_updates,
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_lora

    if args.format != "lora":
        raise ConfigError(f"--format {args.format!r} is not supported (only lora)")
    report = export_lora(
        args.adapter,
        args.output,
        rank=args.rank,
        dtype=args.dtype,
        drop_extras=args.drop_extras,
        base=args.base,
        overwrite=args.overwrite,
    )
    print(report.format())
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from ..progress import log_to_stderr
    from .merge import merge_adapter

    log_to_stderr()  # streamed, or why the whole base is loaded
    out = merge_adapter(
        args.base,
        args.adapter,
        args.output,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        strict=None if args.strict else False,
        in_memory=args.in_memory,
        progress=True,
    )
    print(f"merged model written to {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``deltacome serve``, ``deltacome export`` and ``deltacome merge``."""
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible server for one base and many adapters (mixed batches)",
        description="Serve BASE and Delta-CoMe adapters over an OpenAI-compatible HTTP API; the request's `model` "
        "picks an adapter by name or the base (its name, or 'base'). Needs pip install 'hf-deltacome[serve]'.",
    )
    p.add_argument("--base", required=True, help="base model: local folder or Hub id")
    p.add_argument(
        "--adapter", action="append", type=_named_adapter, metavar="NAME=PATH", help="adapter to serve (repeatable)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens (default: the model's)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="completion tokens when a request sets none")
    p.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set ${API_KEY_ENV}, kept out of ps)"
    )
    p.add_argument("--served-base-name", default=None, help="the base's model name (default: folder name / Hub id)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: where the model loads)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-strict", dest="strict", action="store_false", help="base fingerprint mismatch: warn only")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--allow-adapter-updates", action="store_true",
                   help="POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter {lora_name} "
                   "add and remove adapters while serving (folders and Hub ids this machine can read: pair it with "
                   "--api-key)")  # fmt: skip
    p.set_defaults(func=_cmd_serve)

    p = subparsers.add_parser(
        "export",
        help="export an adapter as a plain PEFT LoRA (for vLLM, TGI, any PEFT)",
        description="Write ADAPTER as a LoRA that plain PEFT loads. It is exact up to --dtype unless --rank "
        "truncates it, and larger than the adapter (16-bit factors). vLLM accepts LoRA ranks up to 512 "
        "(--max-lora-rank, default 16) and no modules_to_save (see --drop-extras).",
    )
    p.add_argument("adapter", help="Delta-CoMe adapter: folder or Hub id")
    p.add_argument("output", help="folder to write the LoRA to")
    p.add_argument("--format", default="lora", choices=["lora"], help="output format (lora)")
    p.add_argument("--rank", type=int, default=None, help="cap every module's rank (truncated SVD; default: exact)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="factor dtype")
    p.add_argument(
        "--drop-extras",
        action="store_true",
        help="leave the dense extras (changed norms, ...) out of the LoRA: needed by vLLM, costs accuracy",
    )
    p.add_argument("--base", default=None, help="base model: also measure the LoRA's logits error against the adapter")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty OUTPUT")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser(
        "merge",
        help="merge an adapter into its base: a standalone model for plain transformers",
        description="Write BASE + ADAPTER as one model folder (sharded safetensors, config, tokenizer, model card). "
        "A local (or cached) safetensors base is streamed one tensor at a time; others are loaded whole (a note "
        "says why).",
    )
    p.add_argument("--base", required=True, help="base model: local folder or Hub id")
    p.add_argument("--adapter", required=True, help="Delta-CoMe adapter: folder or Hub id")
    p.add_argument("--output", required=True, help="folder to write (not inside the base or adapter folder)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: base's")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --output")
    p.add_argument("--no-strict", dest="strict", action="store_false", help="base fingerprint mismatch: warn only")
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole base in float32 and merge with PEFT instead of streaming it from its safetensors "
                   "one tensor at a time (the same tensors, in about 4 bytes per parameter of memory)")  # fmt: skip
    p.set_defaults(func=_cmd_merge)
