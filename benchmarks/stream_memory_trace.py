#!/usr/bin/env python
"""Where a streamed compression's memory goes: resident memory by phase, one line per phase as it ends.

    python benchmarks/stream_memory_trace.py [--pair DIR] [--quantizer gptq|rtn] [--layers N]

Runs ``deltacome compress`` in this process on a pair written by ``benchmarks/scale.py`` (default: the 2-layer
Llama-2-7B-shaped pair in ``~/.cache/hf_deltacome/scale``) with the library's phases wrapped: the comparison of the
two models, both fingerprints, each Hessian pass, and per linear the fill, SVD, inverse Cholesky, GPTQ loop and
least-squares refit of ``U``. Each line gives the resident set at the phase's start, its peak inside the phase (the
kernel's high-water mark, reset at every phase boundary through ``/proc/self/clear_refs``) and at its end, in GiB.
``--layers`` stops after that many decoder layers (the per-layer pattern repeats). Linux only.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def rss() -> tuple[float, float]:
    """(current, peak since the last reset) resident set of this process, GiB."""
    text = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", text).group(1)) / 1048576 for k in ("VmRSS", "VmHWM"))


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Tracer:
    """Wraps functions so that each call prints its phase's memory (nested phases indented)."""

    def __init__(self) -> None:
        self.depth = 0

    def wrap(self, owner: Any, attr: str, label: str, detail: Callable[..., str] = lambda *a: "") -> None:
        inner = getattr(owner, attr)

        @functools.wraps(inner)
        def traced(*args: Any, **kwargs: Any) -> Any:
            start, _ = rss()
            reset_peak()
            self.depth += 1
            try:
                return inner(*args, **kwargs)
            finally:
                self.depth -= 1
                end, peak = rss()
                print(f"{'  ' * self.depth}{label:17s} {detail(*args):34s} start {start:.2f}  peak {peak:.2f}  "
                      f"end {end:.2f} GiB", flush=True)  # fmt: skip
                reset_peak()

        setattr(owner, attr, traced)


class Enough(SystemExit):
    """Raised once ``--layers`` decoder layers are done (a ``SystemExit``, so the CLI lets it through)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default=str(Path.home() / ".cache" / "hf_deltacome" / "scale" / "llama2-7b-2L"))
    ap.add_argument("--quantizer", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--layers", type=int, default=1, help="stop after this many decoder layers (0: all)")
    ap.add_argument("--output", default="/tmp/stream-memory-trace")
    args = ap.parse_args()
    if not (Path(args.pair) / "base").is_dir():
        sys.exit(f"{args.pair}: no base/ folder (write the pairs first: python benchmarks/scale.py --build-only)")

    import hf_deltacome.compression.layerwalk as layerwalk
    import hf_deltacome.compression.pipeline as pipeline
    import hf_deltacome.compression.streaming as streaming
    import hf_deltacome.compression.svd as svd
    import hf_deltacome.quant.gptq as gptq
    from hf_deltacome.cli import main as cli

    t = Tracer()
    t.wrap(streaming.StreamedPair, "fingerprint", "fingerprint")
    t.wrap(streaming.StreamedPair, "finetuned_fingerprint", "ft fingerprint")
    t.wrap(pipeline._Filler, "_hessians", "Hessian pass", lambda _self, _layer, inputs, *a: f"{len(inputs)} linears")
    t.wrap(pipeline._Filler, "fill", "fill", lambda _self, name, *a: name)
    t.wrap(svd, "svd", "svd")
    t.wrap(gptq, "inverse_cholesky", "inverse Cholesky")
    t.wrap(gptq.GPTQ, "_run", "GPTQ loop")
    t.wrap(svd, "_least_squares_u", "refit U")
    verdicts = streaming.StreamedPair.verdicts

    def all_verdicts(self: Any, *a: Any, **k: Any) -> Any:  # a generator: traced over its whole run
        reset_peak()
        out = list(verdicts(self, *a, **k))
        print(f"{'comparison':17s} {'':34s} peak {rss()[1]:.2f} GiB", flush=True)
        return iter(out)

    streaming.StreamedPair.verdicts = all_verdicts
    walk, done = layerwalk.walk_layers, [0]

    def visit_counting(*a: Any, **k: Any) -> Any:
        visit = a[3]

        def counted(i: int, *va: Any) -> None:
            if args.layers and done[0] >= args.layers:
                raise Enough
            visit(i, *va)
            done[0] += 1

        return walk(*a[:3], counted, *a[4:], **k)

    pipeline.walk_layers = visit_counting
    print(f"start: {rss()[0]:.2f} GiB resident (torch, transformers, PEFT imported)", flush=True)
    sys.argv = ["deltacome", "compress", "--base", f"{args.pair}/base", "--finetuned", f"{args.pair}/finetuned",
                "--output", args.output, "--overwrite", "--quantizer", args.quantizer, "--device", "cpu",
                "--num-samples", "16", "--seq-len", "128", "--stream"]  # fmt: skip
    try:
        cli()
    except Enough:
        print(f"stopped after {done[0]} layer(s)")


if __name__ == "__main__":
    main()
