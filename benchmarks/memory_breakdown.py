#!/usr/bin/env python
"""What the resident memory of many loaded adapters is made of (issue 16): RSS growth broken down per adapter.

    python benchmarks/memory_breakdown.py [--counts 1,4,16] [--source DIR] [--work DIR] [--tracemalloc]

Loads SmolLM2-135M-Instruct (``examples/zoo``) and then the adapters one at a time with ``load_deltas`` /
``add_delta`` (the copies of ``benchmarks/many_deltas.py``: same layout and bytes, perturbed singular values). At
each N it prints the growth over the base of: RSS (after ``gc.collect`` and ``malloc_trim``), anonymous and
file-backed resident pages (``/proc/self/smaps_rollup``; file pages still mapped from an adapter file would count
here), tensor bytes held for the adapters (``adapter_nbytes``), the ``nn.Module`` and tensor objects alive, the
Python heap (``tracemalloc``, with ``--tracemalloc``: it slows loading) and the load time per adapter, with the
number of modules PEFT walks (``nn.Module.named_modules`` calls' yields) per load. One torch thread.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from many_deltas import make_copies, rss  # noqa: E402
from zoo import load_smollm2  # noqa: E402

import hf_deltacome  # noqa: E402,F401
from hf_deltacome.backend import dequant_cache  # noqa: E402
from hf_deltacome.serving import adapter_nbytes, add_delta, load_deltas  # noqa: E402

MB = 1e6


def smaps() -> dict[str, int]:
    """``Anonymous`` and file-backed (``Rss`` − ``Anonymous``) resident bytes of this process."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].rstrip(":") in ("Rss", "Anonymous"):
            out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return {"anon": out["Anonymous"], "file": out["Rss"] - out["Anonymous"]}


def adapter_file_maps() -> int:
    """Resident bytes still mapped from ``adapter_model.safetensors`` files."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = line.rstrip().endswith("adapter_model.safetensors")
        elif inside and head and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def objects() -> dict[str, int]:
    gc.collect()
    mods = tens = 0
    for o in gc.get_objects():
        if isinstance(o, torch.nn.Module):
            mods += 1
        elif isinstance(o, torch.Tensor):
            tens += 1
    return {"modules": mods, "tensors": tens}


class WalkCounter:
    """Counts the modules yielded by outermost ``nn.Module.named_modules`` calls (``modules()`` too): what PEFT's
    and torch's walks visit (the recursion inside one walk is not counted again)."""

    def __init__(self) -> None:
        self.count = 0
        plain = torch.nn.Module.named_modules
        counter = self

        def named_modules(module, memo=None, prefix="", remove_duplicate=True):
            outer = memo is None and not prefix
            for item in plain(module, memo, prefix, remove_duplicate):
                counter.count += outer
                yield item

        torch.nn.Module.named_modules = named_modules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "hf_deltacome" / "bench-many-deltas-v2"))
    ap.add_argument("--source", default=str(Path.home() / ".cache" / "hf_deltacome" / "bench-decode" / "dates-1_16-rtn"))
    ap.add_argument("--counts", default="1,4,16")
    ap.add_argument("--tracemalloc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    counts = sorted(int(c) for c in args.counts.split(","))
    folders = make_copies(Path(args.source), Path(args.work), counts[-1])
    file_bytes = (folders[0] / "adapter_model.safetensors").stat().st_size
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} DELTACOME_BACKEND="
          f"{os.environ.get('DELTACOME_BACKEND')!r} MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX')!r}")  # fmt: skip
    model, _ = load_smollm2()
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())
    walks = WalkCounter()
    base_rss, base_maps, base_obj = rss(), smaps(), objects()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start()
    base_py = tracemalloc.get_traced_memory()[0] if args.tracemalloc else 0
    print(f"base: RSS {base_rss / MB:.0f} MB, {base_obj['modules']} modules, {base_obj['tensors']} tensors; "
          f"one adapter file {file_bytes / MB:.2f} MB")  # fmt: skip
    print("| N | RSS − base (÷ files) | anon − base | file-backed − base | adapter-file pages mapped | held tensors "
          "(÷ files) | modules / adapter | tensors / adapter | Python heap / adapter | load s / adapter "
          "| modules walked per load |")  # fmt: skip
    print("|" + "---|" * 11)
    loaded = 0
    for n in counts:
        walks.count = 0
        t0 = time.perf_counter()
        for k in range(loaded, n):
            if k == 0:
                model = load_deltas(model, {"a00": folders[0]})
            else:
                add_delta(model, f"a{k:02d}", folders[k])
        load_s = (time.perf_counter() - t0) / (n - loaded)
        walked = walks.count / (n - loaded)
        loaded = n
        dequant_cache.clear()
        now, maps, obj = rss(), smaps(), objects()
        py = tracemalloc.get_traced_memory()[0] - base_py if args.tracemalloc else float("nan")
        held = sum(adapter_nbytes(model, f"a{k:02d}") for k in range(n))
        files = n * file_bytes
        print(
            f"| {n} | {(now - base_rss) / MB:.1f} MB ({(now - base_rss) / files:.2f}x) "
            f"| {(maps['anon'] - base_maps['anon']) / MB:.1f} MB | {(maps['file'] - base_maps['file']) / MB:.1f} MB "
            f"| {adapter_file_maps() / MB:.1f} MB | {held / MB:.1f} MB ({held / files:.3f}x) "
            f"| {(obj['modules'] - base_obj['modules']) / n:.0f} | {(obj['tensors'] - base_obj['tensors']) / n:.0f} "
            f"| {py / n / MB:.2f} MB | {load_s:.2f} | {walked:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
