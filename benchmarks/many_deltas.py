#!/usr/bin/env python
"""Many fine-tunes on one base: memory, load time and mixed-batch generation speed against N adapters.

    python benchmarks/many_deltas.py [--work DIR] [--counts 1,2,4,8,16,32,64] [--tokens 16] [--plot PNG]

Base: SmolLM2-135M-Instruct (``examples/zoo``, float32 on CPU). Adapters: the ``dates`` fine-tune of
``zoo.finetune`` compressed **once** at 1/16 (``deltacome compress --quantizer rtn``: the layout, not the rounding,
sets the bytes and the cost; ``--source`` reuses any saved adapter), then ``max(counts) - 1`` distinct copies: each
copy multiplies every singular value ``S_k`` of every band by ``1 + 0.05·ε`` (ε ~ N(0, 1), seed = its index; in
format 2 the ``S_k`` are views into each module's blob) and is saved as its own adapter folder (same layout and byte
size, a different delta). Compressing 64 real
fine-tunes would take hours on this CPU; what is measured here (bytes held, load path, batch composition) does not
depend on how the deltas were obtained.

One process loads the adapters one at a time (``load_deltas`` then ``add_delta``, as a server adding adapters
would). At each N of ``--counts`` it records the process RSS (psutil, after ``gc.collect()``), the bytes held for
the adapters (``adapter_nbytes``) with the torch path's dequantized-factor cache emptied first (its size after the
speed test is its own column: it is capped by ``DELTACOME_DEQUANT_CACHE_MB``), the mean load time of the adapters loaded since the previous N, and the
generation speed of 8 left-padded chat prompts of the task, each row on adapter ``i mod N``, greedy, ``--tokens``
new tokens each (``model.generate(..., adapter_names=[...])``), next to the base alone (all rows ``"__base__"``) and
one adapter on every row, each the best of two runs. Torch uses one thread (the machine is shared); compare the
ratios measured side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from zoo import finetune, get_task, load_smollm2, smollm2_path  # noqa: E402

import hf_deltacome  # noqa: E402,F401
from hf_deltacome.backend import dequant_cache  # noqa: E402
from hf_deltacome.serving import adapter_nbytes, add_delta, load_deltas  # noqa: E402

MB = 1e6
ROWS = 8


def rss() -> int:
    """Resident bytes after a garbage collection and ``malloc_trim`` (freed heap handed back to the OS)."""
    import ctypes

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss


def compute_path() -> str:
    """Which path computed the deltas: the Triton interpreter on CPU would distort every speed column."""
    from hf_deltacome.backend import backend_name

    return (f"DELTACOME_BACKEND={backend_name()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}, "
            f"triton imported: {'triton' in sys.modules}, hf_deltacome.kernels imported: "
            f"{'hf_deltacome.kernels' in sys.modules}")  # fmt: skip


def source_adapter(work: Path, finetuned: Path) -> Path:
    """The real adapter: the dates fine-tune compressed once at 1/16 (cached in ``work``)."""
    out = work / "source-1of16-rtn"
    if (out / "adapter_model.safetensors").is_file():
        return out
    from hf_deltacome.cli import main

    code = main(["compress", "--base", str(smollm2_path()), "--finetuned", str(finetuned), "--output", str(out),
                 "--ratio", "1/16", "--quantizer", "rtn"])  # fmt: skip
    if code:
        raise SystemExit(f"compression failed ({code})")
    return out


def perturbed(state: dict, layout: dict, seed: int) -> dict:
    """``state`` with every singular value of every band times ``1 + 0.05·ε`` (format 1: the ``.s`` tensors; format 2:
    the ``S_k`` views inside each module's blob, found through ``PackedDelta``)."""
    from hf_deltacome.format.storage import PackedDelta
    from hf_deltacome.io.adapter_files import DELTA_MARKER, STATE_DICT_PREFIX

    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name, entry in sorted(layout.items()):
        prefix = f"{STATE_DICT_PREFIX}{name}{DELTA_MARKER}"
        delta = PackedDelta.from_layout(entry)
        delta.load_state_dict({k[len(prefix) :]: t for k, t in state.items() if k.startswith(prefix)})
        for band in delta.bands:
            band.s.mul_(1 + 0.05 * torch.randn(band.s.shape, generator=g))
        out.update({prefix + k: t.clone().contiguous() for k, t in delta.state_dict().items()})
    return out


def make_copies(source: Path, work: Path, count: int) -> list[Path]:
    """``count`` adapter folders: the source, then copies with every singular value perturbed by 5% (seeded)."""
    from safetensors.torch import load_file, save_file

    from hf_deltacome.io.atomic import atomic_dir

    folders = [source]
    state = layout = None
    for k in range(1, count):
        out = work / f"copy-{k:02d}"
        if not (out / "adapter_model.safetensors").is_file():
            if state is None:
                state = load_file(str(source / "adapter_model.safetensors"))
                layout = json.loads((source / "adapter_config.json").read_text())["layout"]
            shutil.rmtree(out, ignore_errors=True)
            with atomic_dir(out) as tmp:
                shutil.copy(source / "adapter_config.json", tmp / "adapter_config.json")
                save_file(
                    perturbed(state, layout, k), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"}
                )
        folders.append(out)
    return folders


def prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    task = get_task("dates")
    texts = [task.render(tokenizer, ex) for ex in task.split("eval")[:ROWS]]
    encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = max(map(len, encoded))
    ids = torch.full((ROWS, width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :], mask[i, width - len(e) :] = torch.tensor(e), 1
    return ids, mask


@torch.no_grad()
def tokens_per_s(model, ids, mask, names: list[str], tokens: int) -> float:
    kwargs = dict(attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    model.generate(
        input_ids=ids[:, -8:],
        attention_mask=mask[:, -8:],
        max_new_tokens=2,
        do_sample=False,
        pad_token_id=0,
        adapter_names=names,
    )  # fmt: skip  (warm-up)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    seconds = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == tokens
    return ROWS * tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "hf_deltacome" / "bench-many-deltas-v2"))
    ap.add_argument("--source", default=None, help="adapter folder to copy (default: compress the dates fine-tune)")
    ap.add_argument("--counts", default="1,2,4,8,16,32,64")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per row in the speed test")
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "many_deltas.png"))
    ap.add_argument("--json", default=None, help="also write the measurements here")
    ap.add_argument("--replot", default=None, help="only redraw the plot from a --json file")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["rows"], saved["base_rss_mb"], args.plot)
        return
    torch.set_num_threads(1)
    counts = sorted(int(c) for c in args.counts.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    finetuned = finetune("dates", progress=False)
    source = Path(args.source) if args.source else source_adapter(work, finetuned)
    folders = make_copies(source, work, counts[-1])
    file_bytes = (folders[0] / "adapter_model.safetensors").stat().st_size
    ft_fp32 = sum(p.stat().st_size for p in finetuned.glob("*.safetensors"))
    rss_start = rss()
    model, tokenizer = load_smollm2()
    ft_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # make every weight resident (safetensors are memory-mapped until touched)
        sum(float(p.sum()) for p in model.parameters())
    rss_base = rss()
    ids, mask = prompts(tokenizer)
    print(f"compute path: {compute_path()}")
    print(f"base loaded: RSS {rss_base / MB:.0f} MB ({(rss_base - rss_start) / MB:.0f} MB for the weights)")

    rows, loaded = [], 0
    for n in counts:
        t0 = time.perf_counter()
        for k in range(loaded, n):
            name = f"a{k:02d}"
            if k == 0:
                model = load_deltas(model, {name: folders[0]})
            else:
                add_delta(model, name, folders[k])
        load_s = (time.perf_counter() - t0) / max(n - loaded, 1)
        loaded = n
        dequant_cache.clear()  # the packed adapters alone; the cache is reported after the speed test
        now = rss()
        held = sum(adapter_nbytes(model, f"a{k:02d}") for k in range(n))
        # side by side at every N, best of two each: the machine is shared, so only ratios taken together mean much
        names = [f"a{i % n:02d}" for i in range(ROWS)]
        base_speed, one_speed, speed = (
            max(tokens_per_s(model, ids, mask, rows_names, args.tokens) for _ in range(2))
            for rows_names in (["__base__"] * ROWS, ["a00"] * ROWS, names)
        )
        row = {
            "n": n,
            "rss_mb": now / MB,
            "rss_over_base_mb": (now - rss_base) / MB,
            "held_mb": held / MB,
            "files_mb": n * file_bytes / MB,
            "finetunes_fp32_mb": n * ft_fp32 / MB,
            "finetunes_bf16_mb": n * ft_params * 2 / MB,
            "load_s_per_adapter": load_s,
            "distinct_in_batch": len(set(names)),
            "tok_s": speed,
            "dequant_cache_mb": dequant_cache.bytes / MB,
            "base_tok_s": base_speed,
            "one_tok_s": one_speed,
        }
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    header = (
        "| N | adapter files | RSS | RSS − base (÷ files) | held for adapters | N fine-tunes fp32 / bf16 | load s/adapter "
        f"| tok/s, {ROWS} rows: base / 1 adapter / over min(N,8) adapters | mixed vs base | mixed vs 1 adapter "
        "| dequant cache after |"
    )
    lines = [f"compute path: {compute_path()}", "", header, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['files_mb']:,.0f} MB | {r['rss_mb']:,.0f} MB | {r['rss_over_base_mb']:,.0f} MB "
            f"({r['rss_over_base_mb'] / r['files_mb']:.2f}x) "
            f"| {r['held_mb']:,.0f} MB | {r['finetunes_fp32_mb']:,.0f} / {r['finetunes_bf16_mb']:,.0f} MB "
            f"| {r['load_s_per_adapter']:.1f} | {r['base_tok_s']:.1f} / {r['one_tok_s']:.1f} / {r['tok_s']:.1f} "
            f"({r['distinct_in_batch']}) | {r['tok_s'] / r['base_tok_s']:.2f} | {r['tok_s'] / r['one_tok_s']:.2f} "
            f"| {r['dequant_cache_mb']:,.0f} MB |"
        )
    lines.append(
        f"\nbase RSS {rss_base / MB:.0f} MB; one adapter file {file_bytes / MB:.2f} MB; one fine-tune checkpoint "
        f"{ft_fp32 / MB:.0f} MB (fp32 safetensors)"
    )
    table = "\n".join(lines)
    print("\n" + table)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 1, "
          f"torch {torch.__version__}; the machine was shared with other jobs; {compute_path()}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "base_rss_mb": rss_base / MB, "table": table}, indent=2))
    plot(rows, rss_base / MB, args.plot)


def plot(rows: list[dict], base_mb: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ft_mb = rows[0]["finetunes_fp32_mb"] / rows[0]["n"]
    ax.plot(n, [r["rss_mb"] for r in rows], "o-", label="base + N Delta-CoMe adapters, one process (measured RSS)")
    ax.plot(n, [base_mb + (r["n"] - 1) * ft_mb for r in rows], "s--",
            label="N fine-tunes, one process, fp32 (base RSS + (N-1) x checkpoint)")  # fmt: skip
    ax.plot(n, [r["finetunes_bf16_mb"] for r in rows], "^:", label="N fine-tunes, bf16 weights alone")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(n, [str(x) for x in n])
    ax.set_xlabel("fine-tunes served (N)")
    ax.set_ylabel("memory (MB)")
    ax.set_title("SmolLM2-135M: one base + N adapters at 1/16 vs N fine-tunes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
