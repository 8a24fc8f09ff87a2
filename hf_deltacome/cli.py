"""``deltacome`` command line: compress a fine-tune against its base, inspect and share adapters, evaluate them.

Building the parser imports nothing heavy (``deltacome --help`` is instant); each command imports what it needs.
Subcommands of other parts of the package register through small ``add_parser(subparsers)`` functions
(:mod:`hf_deltacome.evaluation.cli`, :mod:`hf_deltacome.serving.cli`, :mod:`hf_deltacome.amlq.cli`). Every error of
ours ends the command with one line and exit code 2; an interrupt with exit code 130; any other exception (a bug, ours
or a library's) with one line naming the command, a "this is a bug" hint and exit code 1, the traceback only with
``DELTACOME_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DeltaCoMeError
from .progress import log_to_stderr as _log_to_stderr

IN_MEMORY_SHARE = 0.25  # a pair whose checkpoints take at most this share of the available memory is loaded whole
CHECKPOINT_DIR = ".deltacome-checkpoint"  # per-layer checkpoints of a running `deltacome compress`
# == config.METHODS (tested)
METHODS = ("deltacome", "bitdelta", "lowrank", "svd-uniform", "dare", "impart", "deltacome-dare", "vq")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # == loading.DTYPES (tested)
# optional config fields the CLI passes on only when given (their defaults live in DeltaCoMeConfig)
METHOD_OPTIONS = ("search", "allocation", "uniform_bits", "bitdelta_scale", "distill_steps", "min_rank_share",
                  "sparse_tail", "band_share", "residual", "mask_draws", "dare_rates", "dare_fit",
                  "dare_modules", "full_rank", "distill_bands")


def _leaf_names(text: str) -> list[str] | str:
    """``--dare-modules``: ``auto``, ``mlp``, ``none`` (an empty list) or comma-separated names (leaves, suffixes)."""
    word = text.strip()
    if word in ("auto", "mlp"):
        return word
    return [] if word == "none" else [x.strip() for x in text.split(",") if x.strip()]


def _share(text: str) -> float | str:
    """``--min-rank-share``: ``auto`` or a number (DeltaCoMeConfig checks its range)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1], got {text!r}") from None


def _count(low: int) -> Any:
    """An argparse type: an integer >= ``low`` (``--num-samples 0`` is refused, naming the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def parse_bands(text: str) -> list[list]:
    """Parse ``"8:2,3:32,2:rest"`` into ``[[8, 2], [3, 32], [2, None]]`` (``0.25`` = a fraction of the budget)."""
    bands: list[list] = []
    for part in text.split(","):
        try:
            bits_s, size_s = part.strip().split(":")
            bits = int(bits_s)
            size: Any
            if size_s in ("rest", "*", ""):
                size = None
            elif "." in size_s:
                size = float(size_s)
            else:
                size = int(size_s)
        except ValueError as e:
            raise DeltaCoMeError(
                f"cannot parse band {part!r} in --bands {text!r}; use bits:rank, bits:fraction or bits:rest, "
                "e.g. 8:2,3:32,2:rest"
            ) from e
        bands.append([bits, size])
    return bands


def _cmd_compress(args: argparse.Namespace) -> int:
    from .backend import check_device
    from .compression.pipeline import compress
    from .config import DeltaCoMeConfig
    from .io.atomic import check_output_folder
    from .io.summary import summarize_adapter

    out = Path(args.output)
    checkpoint = out / CHECKPOINT_DIR
    check_output_folder(out, {"--base": args.base, "--finetuned": args.finetuned})  # whatever --overwrite says
    if args.device is not None:
        check_device(args.device, "--device")
    if out.exists() and not out.is_dir():
        raise DeltaCoMeError(f"--output {str(out)!r} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not args.overwrite and not args.resume:
        hint = "; pass --resume to continue the interrupted run" if checkpoint.exists() else ""
        raise DeltaCoMeError(f"--output {str(out)!r} exists and is not empty; pass --overwrite to replace it{hint}")
    if args.resume and not checkpoint.exists():
        print(f"deltacome compress: no checkpoint in {out}, starting from the first layer", file=sys.stderr)
    if args.overwrite and checkpoint.exists():
        shutil.rmtree(checkpoint)
    cfg_kwargs: dict[str, Any] = dict(
        ratio=args.ratio, method=args.method, group_size=args.group_size, quantizer=args.quantizer,
        act_order=args.act_order, damp=args.damp,
    )  # fmt: skip
    if args.bands:
        cfg_kwargs["bands"] = parse_bands(args.bands)
    for opt in METHOD_OPTIONS:
        if getattr(args, opt, None) is not None:
            cfg_kwargs[opt] = getattr(args, opt)
    if args.target_modules:
        cfg_kwargs["target_modules"] = args.target_modules
    config = DeltaCoMeConfig(**cfg_kwargs)
    _log_to_stderr()  # notes: streamed or loaded, calibration kind, fallbacks, dtype roundings
    extra: dict[str, Any] = {}
    if args.num_samples is not None:
        extra["num_samples"] = args.num_samples
    if args.seq_len is not None:
        extra["seq_len"] = args.seq_len
    why = _why_in_memory(args)
    if why is None:
        import torch

        base, finetuned, tokenizer, base_tokenizer = args.base, args.finetuned, *_tokenizers(args)
        extra["dtype"] = None if args.dtype == "auto" else getattr(torch, args.dtype)
    else:
        import logging

        logging.getLogger("hf_deltacome").info("loading both whole models: %s", why)
        base, finetuned, tokenizer, base_tokenizer = _load_pair(args)
    model = compress(base, finetuned, config, calibration=args.calibration, tokenizer=tokenizer, device=args.device,
                     checkpoint_dir=str(checkpoint), base_tokenizer=base_tokenizer, **extra)  # fmt: skip
    del finetuned
    model.save_pretrained(str(out))
    shutil.rmtree(checkpoint, ignore_errors=True)  # the adapter is saved: checkpoints are no longer needed
    if tokenizer is not None and args.save_tokenizer:
        tokenizer.save_pretrained(str(out))
    print(summarize_adapter(out).format())
    return 0


def _why_in_memory(args: argparse.Namespace) -> str | None:
    """Why this run loads both whole models instead of streaming them from their files (``None``: it streams).

    A pair whose checkpoints take at most ``IN_MEMORY_SHARE`` of the available memory is loaded whole unless
    ``--stream`` is given: the whole-model checks of the default (``min_rank_share`` and ``residual`` auto) and
    calibration text sampled from the fine-tune need both models; larger pairs stream one decoder layer at a time.
    """
    from .compression.streaming import available_memory, checkpoint_bytes, local_folder, why_not_streamable
    from .io.adapter_files import is_adapter_folder

    if args.in_memory and args.stream:
        raise DeltaCoMeError("--in-memory and --stream contradict each other; pass one")
    if args.in_memory:
        return "--in-memory"
    if is_adapter_folder(args.finetuned):
        if args.stream:
            raise DeltaCoMeError(f"--stream: --finetuned {args.finetuned!r} is a PEFT adapter, merged into a copy of "
                                 "the base in memory; drop --stream, or merge it and save the fine-tune first")  # fmt: skip
        return f"--finetuned {args.finetuned!r} is a PEFT adapter: merged into a copy of the base in memory"
    if args.search or args.allocation == "adaptive":
        if args.stream:
            raise DeltaCoMeError("--stream cannot be combined with --search or --allocation adaptive: they measure "
                                 "layouts on the whole model")  # fmt: skip
        return "--search / --allocation adaptive measure layouts on the whole model"
    if args.stream:
        for role in ("base", "finetuned"):
            why = why_not_streamable(getattr(args, role))  # a Hub id is judged once streaming has its snapshot
            if why is not None:
                raise DeltaCoMeError(f"--stream: --{role} cannot be streamed: {why}")
        return None
    folders = [local_folder(getattr(args, role), role) for role in ("base", "finetuned")]  # a Hub id: its snapshot
    for folder in folders:
        why = why_not_streamable(folder)
        if why is not None:
            return why
    size, free = sum(checkpoint_bytes(f) for f in folders), available_memory()
    if free is not None and size <= IN_MEMORY_SHARE * free:
        return (f"both checkpoints ({size / 2**30:.2f} GiB) fit in memory ({free / 2**30:.1f} GiB available), so the "
                "default's whole-model checks run (--stream streams them instead)")  # fmt: skip
    import logging

    logging.getLogger("hf_deltacome").info(
        "streaming one decoder layer at a time: both checkpoints (%.2f GiB) are more than %.0f%% of the available "
        "memory (%s); the whole-model checks (min_rank_share and residual auto) fall back to their defaults",
        size / 2**30, 100 * IN_MEMORY_SHARE, "unknown" if free is None else f"{free / 2**30:.1f} GiB",
    )  # fmt: skip
    return None


def _tokenizers(args: argparse.Namespace) -> tuple[Any, Any]:
    """The fine-tune's tokenizer (calibration, saved with the adapter; the base's when it has none) and the base's."""
    from .compression.inputs import load_tokenizer

    base_tok, ft_tok = load_tokenizer(args.base), load_tokenizer(args.finetuned)
    return ft_tok or base_tok, base_tok


def _load_pair(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    from .io.adapter_files import is_adapter_folder
    from .loading import load_merged_adapter, load_model_and_tokenizer
    from .multimodal import is_vlm

    base, base_tok = load_model_and_tokenizer(args.base, "base", args.dtype)
    if is_adapter_folder(args.finetuned):  # a LoRA (or any PEFT adapter): merged into its own copy of the base
        finetuned, ft_tokenizer = load_merged_adapter(base, args.base, args.finetuned)
    else:
        finetuned, ft_tokenizer = load_model_and_tokenizer(args.finetuned, "finetuned", args.dtype)
    # a VLM's processor and chat template come from the base; a text model's tokenizer from the fine-tune
    tokenizer = (base_tok or ft_tokenizer) if is_vlm(base) else (ft_tokenizer or base_tok)
    return base, finetuned, tokenizer, base_tok


def _cmd_info(args: argparse.Namespace) -> int:
    from .io.summary import quantized_base_summary, summarize_adapter

    quantized = quantized_base_summary(args.adapter, as_json=args.json)  # a folder written by `deltacome quantize`
    if quantized is not None:
        print(quantized)
        return 0
    summary = summarize_adapter(args.adapter)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format(per_module=args.modules))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_adapter

    info = push_adapter(args.adapter, args.repo_id, private=args.private, revision=args.revision, token=args.token,
                        commit_message=args.message)  # fmt: skip
    print(info.commit_url)
    return 0


def _add_compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="compress FINETUNED - BASE into a Delta-CoMe adapter folder")
    p.add_argument("--base", required=True, help="base model: local folder or Hub id")
    p.add_argument("--finetuned", required=True,
                   help="fine-tuned model: local folder or Hub id; or a local PEFT adapter folder (a LoRA, ...) "
                        "of --base, merged into a copy of it in memory")  # fmt: skip
    p.add_argument("--output", required=True, help="adapter folder to write")
    p.add_argument("--ratio", default="1/16",
                   help="bytes of the whole adapter file (packed factors, dense extras, header) / fp16 delta of the "
                        "target linears (default: %(default)s)")  # fmt: skip
    p.add_argument("--method", default="deltacome", choices=METHODS,
                   help="compression method; the others are baselines at the same byte budget (default: %(default)s)")  # fmt: skip
    p.add_argument("--search", choices=["greedy", "genetic"], default=None,
                   help="search the band split per module type (default: the configured split)")  # fmt: skip
    p.add_argument("--allocation", choices=["uniform", "adaptive"], default=None,
                   help="adaptive: move budget between modules by sensitivity (default: uniform)")  # fmt: skip
    p.add_argument("--uniform-bits", type=int, default=None, help="bits of svd-uniform / dare / deltacome-dare's DARE values: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--bitdelta-scale", choices=["matrix", "row"], default=None,
                   help="BitDelta scale granularity (default: matrix)")  # fmt: skip
    p.add_argument("--sparse-tail", type=float, default=None,
                   help="keep-rate in (0, 1): the last 2-bit band keeps this random share of each singular vector "
                        "(mask from a seed) and buys more rank; with --method impart, its lowest keep-rate "
                        "(default 0.5)")  # fmt: skip
    p.add_argument("--band-share", type=_share, default=None,
                   help="--method deltacome-dare: share 0..1 of each module's budget its bands (--bands) take, the "
                        "rest stores DARE of their residual; auto: per module by the delta's spectrum (default 0.25)")  # fmt: skip
    p.add_argument("--residual", choices=["auto", "none"], default=None,
                   help="auto (default; needs the whole model, see --in-memory): the whole-model check also weighs "
                        "3-bit bands + a 2-bit DARE of their residual and keeps it where it brings the model closer "
                        "to the fine-tune; none: the bands alone")  # fmt: skip
    p.add_argument("--mask-draws", type=_count(1), default=None,
                   help="--residual auto: when it keeps a DARE part, the whole-model check weighs this many draws "
                        "of its seeded masks and keeps the closest to the fine-tune (default 1: the seeds from the "
                        "module names alone; more draws kept no more held-out facts in benchmarks/RESULTS.md)")  # fmt: skip
    p.add_argument("--dare-rates", choices=["uniform", "importance"], default=None,
                   help="keep-rates of a DARE part: uniform (published DARE; the default of --method dare) or "
                        "importance (a rate per row and column from the output energy; the default's residual)")  # fmt: skip
    p.add_argument("--dare-fit", choices=["rescale", "gptq", "unbiased"], default=None,
                   help="kept values of a DARE part: rescale (default; published DARE), unbiased (the same codes, "
                        "each group's scale stretched so the values are not shrunk: closer to the fine-tune, fewer "
                        "answers beyond it) or gptq (rounding compensated by GPTQ on calibration data); the mask "
                        "and bytes the same (benchmarks/RESULTS.md)")  # fmt: skip
    p.add_argument("--dare-modules", type=_leaf_names, default=None,
                   help="targets stored whole (--full-rank: vector codes or 2-bit DARE), the rest the method's "
                        "layout: auto (default: mlp for deltacome with gptq, and o_proj from ratio 1/64 down; else none), mlp (every "
                        "feed-forward target), none (the published Delta-CoMe layout; the closer to the fine-tune at 1/8-1/32) or "
                        "comma-separated leaf names or dotted suffixes (e.g. gate_proj,up_proj,down_proj or mlp.c_proj); "
                        "benchmarks/RESULTS.md")  # fmt: skip
    p.add_argument("--full-rank", choices=["dare", "vq"], default=None,
                   help="how --dare-modules store their delta: dare (default: 2-bit DARE) or vq (4-bit codes of "
                        "short vectors of the randomly rotated delta: closer to the fine-tune at 1/8-1/64, fewer "
                        "held-out answers on one knowledge delta); benchmarks/RESULTS.md")  # fmt: skip
    p.add_argument("--distill-steps", type=_count(0), default=None,
                   help="scale distillation steps (BitDelta's sign scales, the bands' scales), 0 = off (default 50)")
    p.add_argument("--distill-bands", action=argparse.BooleanOptionalAction, default=None,
                   help="distil the bands' singular values and group scales against the fine-tune (default: on for "
                        "deltacome with calibration data, off for the baselines)")
    p.add_argument("--calibration", default=None,
                   help="calibration text: .txt (one per line) or .jsonl; for a vision-language model, a .jsonl of "
                        '{"image": "file.png", "text": ...} records gives image + text calibration '
                        "(default: text sampled from the fine-tune; streamed, the built-in generic text). The "
                        "fine-tune's own training prompts and answers ({\"prompt\": ..., \"completion\": ...} "
                        "lines) keep more of a delta that carries knowledge")  # fmt: skip
    p.add_argument("--num-samples", type=_count(1), default=None, help="calibration sequences (default 32)")
    p.add_argument("--seq-len", type=_count(2), default=None, help="tokens per calibration sequence (default 256)")
    p.add_argument("--group-size", type=_count(1), default=128, help="quantization group size (default: %(default)s)")
    p.add_argument("--bands", default=None, help="bits:rank list (default 8:2,3:32,2:rest, the published split)")
    p.add_argument("--min-rank-share", type=_share, default=None,
                   help="auto (default: chosen on the calibration data) or 0..1: the fixed-rank bands shrink until "
                        "the split keeps this share of the ranks its last band alone buys (0 = the published bands)")  # fmt: skip
    p.add_argument("--quantizer", default="gptq", choices=["gptq", "rtn"], help="rtn = data-free round-to-nearest (default: %(default)s)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, a share of the mean Hessian diagonal (default: %(default)s)")
    p.add_argument("--act-order", action="store_true", help="GPTQ act-order on V (static groups)")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="module names or a regex (default: every linear of the decoder layers)")  # fmt: skip
    p.add_argument("--device", default=None,
                   help="where to run the per-layer work: cpu or cuda (default: cuda if available)")  # fmt: skip
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype the weights are held in (default: auto, what the checkpoints hold; the work on each layer "
                        "is done in float32 whatever it is)")  # fmt: skip
    p.add_argument("--in-memory", action="store_true",
                   help="load both whole models (the default when both checkpoints take at most a quarter of the "
                        "available memory; needed for calibration sampled from the fine-tune and the whole-model "
                        "checks of min_rank_share and residual auto; implied by --search, --allocation adaptive, "
                        "vision-language models and non-safetensors checkpoints)")  # fmt: skip
    p.add_argument("--stream", action="store_true",
                   help="stream both models one decoder layer at a time whatever their size (the default for pairs "
                        "larger than a quarter of the available memory; the whole-model checks fall back)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from the layers checkpointed in --output")
    p.add_argument("--no-save-tokenizer", dest="save_tokenizer", action="store_false",
                   help="do not save the tokenizer next to the adapter")  # fmt: skip
    p.set_defaults(func=_cmd_compress)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="per-module ranks and bits, exact bytes and effective ratio of an adapter "
                                    "(or, for an AMLQ-quantized base, per-linear precisions and true bpw)")  # fmt: skip
    p.add_argument("adapter", help="adapter folder, or a model folder written by `deltacome quantize`")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--modules", action="store_true", help="list every module")
    p.set_defaults(func=_cmd_info)


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload an adapter folder (with its model card) to the Hugging Face Hub")
    p.add_argument("adapter", help="adapter folder written by `deltacome compress`")
    p.add_argument("repo_id", help="user/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to push to, created from main if missing (default: main)")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")
    p.add_argument("--message", default="Upload Delta-CoMe adapter", help="commit message (default: %(default)r)")
    p.set_defaults(func=_cmd_push)


def build_parser() -> argparse.ArgumentParser:
    """The ``deltacome`` parser with every subcommand (imports nothing heavy)."""
    from .amlq import cli as amlq_cli
    from .evaluation import cli as evaluation_cli
    from .serving import cli as serving_cli

    parser = argparse.ArgumentParser(prog="deltacome", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    _add_info(sub)
    _add_push(sub)
    evaluation_cli.add_parser(sub)
    serving_cli.add_parser(sub)
    amlq_cli.add_parser(sub)
    return parser


DEBUG_ENV = "DELTACOME_DEBUG"  # set to 1 for the traceback of an unexpected error


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deltacome`` script; returns the exit code (2 for our errors, 130 when interrupted, 1 for
    anything unexpected)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DeltaCoMeError as e:
        print(f"deltacome {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deltacome {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # not ours: a bug here or in a library; one line unless asked for the traceback
        debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        if debug:
            import traceback

            traceback.print_exc(file=sys.stderr)
        where = "" if debug else f"; run again with {DEBUG_ENV}=1 for the traceback"
        print(
            f"deltacome {args.command}: unexpected {type(e).__name__}: {_one_line(str(e))} (this is a bug; please "
            f"report it{where})",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
