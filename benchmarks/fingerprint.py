#!/usr/bin/env python
"""Cost of the base-model fingerprint next to loading the model, and its size in ``adapter_config.json``.

    python benchmarks/fingerprint.py [--threads 1] [--device cpu] [--repeats 5] [--skip-smollm2]

Models:

* SmolLM2-135M-Instruct (a copy of the zoo's cached float32 safetensors), loaded in float32 and in bfloat16 with
  ``AutoModelForCausalLM.from_pretrained`` (``load_smollm2``'s call, without the tokenizer);
* one 7B-shaped Llama decoder layer (hidden 4096, intermediate 11008, 32 heads, random bfloat16 weights, 202M
  parameters), built without initialisation and filled from a safetensors file (``load_state_dict(assign=True)``).

Columns (medians; the measurements of one repeat run back to back, repeats interleaved): ``load`` = the loader alone
(safetensors are memory-mapped, so on CPU this reads almost nothing yet); ``load+read warm`` = load, then read every
weight once (the least a first forward pass costs), file in the page cache; ``load+read cold`` = the same after
evicting the file from the page cache (``posix_fadvise(DONTNEED)`` on our own copy): a load from disk. ``compute`` =
``compute_fingerprint`` (at compression: every weight, both roundings); ``check`` = ``check_fingerprint`` (at load).

Sizes: bytes of ``base_fingerprint`` in ``adapter_config.json`` for SmolLM2 (measured) and for 32-layer 7B/8B shapes
(Llama-2-7B, Llama-3-8B: untied heads), from the shapes with the module's own bucket arithmetic: with one stored
rounding (a bf16 checkpoint) and with two (a float32 checkpoint whose float16 rounding differs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))  # the demo zoo

from hf_deltacome.io import fingerprint as fpmod  # noqa: E402
from hf_deltacome.io import weight_sketch as sketch  # noqa: E402


def evict(path: str) -> None:
    """Drop ``path`` (a file we own) from the page cache, so the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def measure(load: Callable[[], torch.nn.Module], file: str, repeats: int, sync: Callable[[], None]) -> list[float]:
    """Median seconds of [load, load+read warm, load+read cold, compute, check], repeats interleaved."""

    def clock(fn: Callable[[], Any]) -> tuple[float, Any]:
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    model = load()
    read_all(model)
    fp = fpmod.compute_fingerprint(model)  # warm-up (projection matrices are made once per shape)
    assert fpmod.check_fingerprint(fp, model) == []
    times: list[list[float]] = [[] for _ in range(5)]
    for _ in range(repeats):
        times[0].append(clock(load)[0])
        times[1].append(clock(lambda: read_all(load()))[0])
        evict(file)
        times[2].append(clock(lambda: read_all(load()))[0])
        times[3].append(clock(lambda: fpmod.compute_fingerprint(model))[0])
        times[4].append(clock(lambda: fpmod.check_fingerprint(fp, model))[0])
    return [statistics.median(t) for t in times]


def smollm2_rows(tmp: str, device: str, repeats: int, sync: Callable[[], None]) -> tuple[list[tuple], list[str]]:
    from transformers import AutoModelForCausalLM
    from zoo import smollm2_path

    folder = os.path.join(tmp, "smollm2")
    shutil.copytree(smollm2_path(), folder)
    rows, sizes = [], []
    for dtype in (torch.float32, torch.bfloat16):

        def load(dtype: torch.dtype = dtype) -> Any:
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device).eval()

        name = f"SmolLM2-135M {str(dtype)[6:]}"
        rows.append((name, *measure(load, os.path.join(folder, "model.safetensors"), repeats, sync)))
        fp = fpmod.compute_fingerprint(load())
        both = sum(c.isupper() for c in fp["sketch"]["dtypes"])
        size = len(json.dumps(json.dumps(fp, separators=(",", ":"), sort_keys=True)))  # a JSON string in the file
        sizes.append(f"{name}: {size:,} bytes ({both} of {fp['num_tensors']} weights with both roundings stored)")
    return rows, sizes


def layer_7b_row(tmp: str, device: str, repeats: int, sync: Callable[[], None]) -> tuple:
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        shape_layer = LlamaDecoderLayer(config, layer_idx=0)
    g = torch.Generator().manual_seed(0)
    state = {
        k: (torch.randn(v.shape, generator=g) * (0.02 if v.dim() > 1 else 1.0)).to(torch.bfloat16)
        for k, v in shape_layer.state_dict().items()
    }
    file = os.path.join(tmp, "layer.safetensors")
    save_file(state, file)
    del state

    def load() -> torch.nn.Module:
        with torch.device("meta"):
            layer = LlamaDecoderLayer(config, layer_idx=0)
        layer.load_state_dict(load_file(file, device=device), assign=True)
        return layer.eval()

    return ("7B-shaped layer bf16", *measure(load, file, repeats, sync))


SHAPES = {  # 32-layer shapes, untied head
    "Llama-2-7B": dict(vocab_size=32000, intermediate_size=11008, num_key_value_heads=32),
    "Llama-3-8B": dict(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8),
}


def size_of_shape(name: str) -> tuple[int, int, int]:
    """(weights, JSON bytes with one rounding, with two) of base_fingerprint for one of ``SHAPES``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, tie_word_embeddings=False)
    for key, value in SHAPES[name].items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    weights = sketch.base_weights(model)
    params = (sketch.ROWS_PER_BUCKET, sketch.PROJECTIONS, sketch.SEED)
    floats = sum(sketch._dims(w.shape, params)[2] * sketch._dims(w.shape, params)[3] for w in weights)
    fp = {"version": 2, **sketch.describe_model(model, weights)}
    out = []
    for roundings in (1, 2):
        blob = sketch._encode([torch.zeros(floats).numpy()])
        fp["sketch"] = {"rows_per_bucket": params[0], "projections": params[1], "seed": params[2],
                        "dtypes": "f" * len(weights), "bf16": blob, "fp16": blob if roundings == 2 else ""}  # fmt: skip
        out.append(len(json.dumps(json.dumps(fp, separators=(",", ":"), sort_keys=True))))
    return len(weights), out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the house rule on shared machines)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    before = os.getloadavg()[0]
    print(
        f"device {args.device}, torch threads {args.threads}, {os.cpu_count()} CPUs, load average before {before:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows, smol_sizes = ([], []) if args.skip_smollm2 else smollm2_rows(tmp, args.device, args.repeats, sync)
        rows.append(layer_7b_row(tmp, args.device, args.repeats, sync))
    head = ("model", "load", "load+read warm", "load+read cold", "compute", "check", "check/warm", "check/cold")
    print("\n| " + " | ".join(head) + " |\n|" + "|".join("-" * (len(h) + 2) for h in head) + "|")
    for name, t_load, warm, cold, t_fp, t_check in rows:
        cells = [f"{t:.3f} s" for t in (t_load, warm, cold, t_fp, t_check)] + [
            f"{t_check / warm:.2f}",
            f"{t_check / cold:.2f}",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for line in smol_sizes:
        print(f"base_fingerprint in adapter_config.json, {line}")
    for shape in SHAPES:
        n, one, two = size_of_shape(shape)
        print(f"base_fingerprint for the {shape} shape ({n} weights): {one:,} bytes (bf16 checkpoint), "
              f"{two:,} bytes (fp32 checkpoint, both roundings stored)")  # fmt: skip
    print(f"load average after {os.getloadavg()[0]:.2f} (> 1 per core: other jobs shared the machine)")


if __name__ == "__main__":
    main()
