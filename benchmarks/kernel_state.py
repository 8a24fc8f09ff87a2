#!/usr/bin/env python
"""What the Triton path holds beside an adapter's packed bytes on the GPU, against the file. No GPU needed.

    python benchmarks/kernel_state.py ADAPTER [ADAPTER ...] [--markdown FILE]

The kernels read the bands' codes, the DARE values and the vector codes in place. A DARE part's kernel keeps the
index of each row's first kept value (int32 a row), and where it cannot replay the mask itself (an older file's CPU
generator draws, or importance rates) the mask as a bitmap too, one bit a weight (`kernels/triton_sparse.py`;
format 5 hashes the draws so that the kernel replays them: `format/draws.py`); a vector-code part keeps its two
rotations' float32 factors; a sparse band (impart, the sparse tail) of format 6 keeps its masks' row and tile starts
(int32), one of an older file (the generator's draws) its decoded factors (``in x rank`` and ``rank x out``) in the
activations' dtype (counted in float16), added beside the kernels in PyTorch. This reads each adapter
folder without a model (`hf_deltacome.io.adapter_files.read_adapter`), builds exactly those tensors for every part
with the kernels' own builders (on the CPU: the same shapes and dtypes as on the GPU) and sums their bytes: a served
adapter takes its file's bytes plus these on the device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

MB = 1e6


def held_bytes(folder: Path) -> dict:
    """The adapter's file bytes and what the kernel path builds beside them, by kind."""
    from hf_deltacome.kernels.triton_sparse import build_band_mask_state, build_mask_state, sparse_band_ready

    from hf_deltacome.format.baseline_parts import SparsePart
    from hf_deltacome.format.vq_part import VectorPart
    from hf_deltacome.io.adapter_files import packed_delta, read_adapter

    config, state = read_adapter(folder)
    cpu = torch.device("cpu")
    out = {"file": (folder / "adapter_model.safetensors").stat().st_size, "bitmap": 0, "starts": 0, "vq_rot": 0,
           "sparse_bands": 0, "dare_parts": 0, "dare_weights": 0, "weights": 0, "ratio": config.ratio}  # fmt: skip
    for module in config.layout:
        delta = packed_delta(config, state, module)
        out["weights"] += delta.out_features * delta.in_features
        for part in delta.extra_parts:
            if isinstance(part, SparsePart):
                words, starts = build_mask_state(part, cpu)
                out["bitmap"] += 0 if words is None else words.numel() * words.element_size()
                out["starts"] += starts.numel() * starts.element_size()
                out["dare_parts"] += 1
                out["dare_weights"] += part.out_features * part.in_features
            elif isinstance(part, VectorPart):
                out["vq_rot"] += sum(f.numel() * f.element_size() for side in part.rotations(cpu) for f in side)
        for band in delta.sparse_bands:  # the kernels' mask state, or what SparseBand.forward_delta decodes
            held = build_band_mask_state(band, cpu) if sparse_band_ready(band) else band.decoded_factors(torch.float16)
            out["sparse_bands"] += sum(f.numel() * f.element_size() for f in held)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", nargs="+", help="saved adapter folders")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    folders = [Path(a).resolve() for a in args.adapters]
    for f in folders:
        if not (f / "adapter_model.safetensors").is_file() or not (f / "adapter_config.json").is_file():
            raise SystemExit(f"{f}: not a saved adapter folder (adapter_model.safetensors and adapter_config.json)")
    sys.path.insert(0, str(ROOT))
    rows = ["| adapter | ratio | DARE parts (share of weights) | file | bitmaps | row start indices | vq rotations "
            "| sparse bands (mask starts, or decoded factors) | held beside the file | (file + held) / file |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for f in folders:
        r = held_bytes(f)
        held = r["bitmap"] + r["starts"] + r["vq_rot"] + r["sparse_bands"]
        ratio = f"1/{round(1 / r['ratio'])}" if r["ratio"] < 1 else str(r["ratio"])
        rows.append(f"| {f.name} | {ratio} | {r['dare_parts']} ({r['dare_weights'] / r['weights']:.0%}) "
                    f"| {r['file'] / MB:,.2f} MB | {r['bitmap'] / MB:,.2f} MB | {r['starts'] / MB:,.3f} MB "
                    f"| {r['vq_rot'] / MB:,.3f} MB | {r['sparse_bands'] / MB:,.3f} MB | {held / MB:,.2f} MB "
                    f"| {(r['file'] + held) / r['file']:.2f}x |")
        print(json.dumps({"adapter": f.name, **r}), file=sys.stderr)
    table = "\n".join(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
