#!/usr/bin/env python
"""What the PyTorch path keeps in memory once it has run N adapters: RSS over the base, and the decoded-form cache.

    python benchmarks/decoded_memory.py --source ADAPTER [--counts 1,4,8] [--cap-mb 256]

Loads SmolLM2-135M-Instruct (``examples/zoo``), then ADAPTER under N names with ``load_deltas`` / ``add_delta`` (each
its own packed tensors and its own decoded forms, as N fine-tunes of one layout), and runs one short forward pass per adapter on the
PyTorch path (one thread), the first N of them at each N. It prints the resident memory's growth over the base with
every adapter loaded and none run yet, and the bytes in ``hf_deltacome.backend.dequant_cache`` by kind: the bands' float factors, DARE
parts' CSR matrices, vector codes' decoded rows. ``DELTACOME_DEQUANT_CACHE_MB`` (``--cap-mb``) caps that cache; a
library where a kind lives outside it shows RSS growing past the cap. Run it with ``PYTHONPATH=<checkout>`` to
measure another revision's library with this script.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

MB = 2**20


def rss() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def check_args(args: argparse.Namespace) -> tuple[Path, list[int]]:
    """The adapter folder and the counts, or a SystemExit naming the bad flag (before any model loads)."""
    source = Path(args.source).resolve()
    if not (source / "adapter_model.safetensors").is_file() or not (source / "adapter_config.json").is_file():
        raise SystemExit(f"--source {args.source}: not a saved adapter folder (adapter_model.safetensors and "
                         "adapter_config.json)")  # fmt: skip
    try:
        counts = sorted({int(c) for c in args.counts.split(",")})
    except ValueError:
        raise SystemExit(f"--counts: comma-separated whole numbers such as 1,4,8, got {args.counts!r}") from None
    if counts[0] < 1:
        raise SystemExit(f"--counts must be >= 1, got {args.counts!r}")
    if not args.cap_mb >= 0:
        raise SystemExit(f"--cap-mb must be >= 0, got {args.cap_mb}")
    return source, counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="a saved adapter folder of SmolLM2-135M-Instruct")
    ap.add_argument("--counts", default="1,4,8")
    ap.add_argument("--cap-mb", type=float, default=256.0)
    args = ap.parse_args(argv)
    source, counts = check_args(args)
    os.environ["DELTACOME_DEQUANT_CACHE_MB"] = str(args.cap_mb)  # read when the library is imported
    os.environ["DELTACOME_BACKEND"] = "torch"
    import torch

    torch.set_num_threads(1)
    from zoo import load_smollm2

    import hf_deltacome
    from hf_deltacome.backend import dequant_cache
    from hf_deltacome.serving import add_delta, load_deltas

    model, tok = load_smollm2()
    ids = tok("Who plays the cello in Lisbon?", return_tensors="pt").input_ids
    print(f"library {Path(hf_deltacome.__file__).parent}; cap {dequant_cache.max_bytes / MB:.0f} MiB; adapter "
          f"{source.name}, {(source / 'adapter_model.safetensors').stat().st_size / MB:.1f} MiB on disk")  # fmt: skip
    for k in range(counts[-1]):
        if k == 0:
            model = load_deltas(model, {"a00": source})
        else:
            add_delta(model, f"a{k:02d}", source)
    before = rss()
    print("| N run | RSS − all loaded, none run | cache held | of it: factors / csr / vq |")
    print("|---:|---:|---:|---|")
    done = 0
    for n in counts:
        with torch.no_grad():
            for k in range(done, n):
                model.set_adapter(f"a{k:02d}")
                model(ids)
        done = n
        grown = rss() - before
        kinds: collections.Counter = collections.Counter()
        for key, entry in dequant_cache._entries.items():
            size = entry.size if hasattr(entry, "size") else sum(t.numel() * t.element_size() for t in entry[1:3])
            kinds[key[1] if isinstance(key[1], str) else "factors"] += size
        split = " / ".join(f"{kinds.get(k, 0) / MB:.1f}" for k in ("factors", "csr", "vq"))
        print(f"| {n} | {grown / MB:.1f} MiB | {dequant_cache.bytes / MB:.1f} MiB | {split} MiB |", flush=True)


if __name__ == "__main__":
    main()
