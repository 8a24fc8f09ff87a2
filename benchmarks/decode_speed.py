"""Decode-step cost of a Delta-CoMe adapter on the PyTorch path (CPU), as ratios to the base model, side by side.

SmolLM2-135M-Instruct (examples/zoo) with its `dates` fine-tune compressed at 1/16 (round-to-nearest: the published
8/3/2 split; the layout, not the rounding, sets the cost). One forward step with the KV cache after a 16-token prompt,
at batch 1 and 8, and a 128-token prefill, for: the base alone (adapter disabled); the adapter dequantizing every
band at every step (cache off, what the torch path did before); the adapter with the dequantized-factor cache
(`hf_deltacome.backend.dequant_cache`); and the adapter merged into the base weights (`model.merge_adapter()`, one
adapter only). Modes are interleaved round by round and the median step time is kept, so a busy machine slows all of
them alike; only the ratios mean anything.

    OMP_NUM_THREADS=1 python benchmarks/decode_speed.py [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo  # noqa: E402

from hf_deltacome import DeltaCoMeConfig, compress  # noqa: E402
from hf_deltacome.backend import dequant_cache  # noqa: E402

CACHE = zoo.cache_dir() / "bench-decode"


def adapter_model(base: torch.nn.Module) -> torch.nn.Module:
    """base + the dates adapter at 1/16 (compressed once, then loaded from the cache)."""
    from peft import PeftModel

    folder = CACHE / "dates-1_16-rtn"
    if not (folder / "adapter_config.json").is_file():
        ft = type(base).from_pretrained(zoo.finetune("dates")).eval()
        model = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio="1/16", quantizer="rtn"))
        model.save_pretrained(folder)
    return PeftModel.from_pretrained(base, folder).eval()


@torch.no_grad()
def step_time(model: torch.nn.Module, batch: int, prompt: int, decode: bool) -> float:
    """Seconds of one decode step (or of the prefill when ``decode`` is False)."""
    ids = torch.randint(10, 1000, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = time.perf_counter() - t0
    if not decode:
        return prefill
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per cell (median kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = zoo.load_smollm2()
    model = adapter_model(base)
    cells = [("decode, batch 1", 1, 16, True), ("decode, batch 8", 8, 16, True), ("prefill 128 tokens", 1, 128, False)]
    modes = ["base", "adapter, no cache", "adapter, cache", "adapter, merged"]
    times: dict[tuple[str, str], list[float]] = {(c[0], m): [] for c in cells for m in modes}
    saved_cap = dequant_cache.max_bytes
    for _ in range(args.rounds):
        for name, batch, prompt, decode in cells:
            for mode in modes:
                if mode == "base":
                    with model.disable_adapter():
                        t = step_time(model, batch, prompt, decode)
                elif mode == "adapter, merged":
                    model.merge_adapter()
                    t = step_time(model, batch, prompt, decode)
                    model.unmerge_adapter()
                else:
                    dequant_cache.configure(saved_cap if mode == "adapter, cache" else 0)
                    step_time(model, batch, prompt, decode)  # warm the cache (an entry per module)
                    t = step_time(model, batch, prompt, decode)
                    dequant_cache.configure(saved_cap)
                times[name, mode].append(t)
    print(f"SmolLM2-135M + dates adapter at 1/16, PyTorch path, {args.threads} thread(s), {args.rounds} rounds, "
          f"cache {dequant_cache.bytes / 2**20:.0f} MiB used (cap {saved_cap / 2**20:.0f} MiB); load "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"| cell | {' | '.join(modes)} |")
    print("|---|" + "---:|" * len(modes))
    for name, *_ in cells:
        med = {m: statistics.median(times[name, m]) for m in modes}
        row = " | ".join(f"{med[m] / med['base']:.2f}x" for m in modes)
        print(f"| {name} ({med['base'] * 1e3:.1f} ms base) | {row} |")


if __name__ == "__main__":
    main()
