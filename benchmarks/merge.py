"""``deltacome merge`` streamed against loaded (``--in-memory``): peak RSS of the child process, wall time, and
whether the two merged models hold the same tensors.

The base is SmolLM2-135M-Instruct from the zoo's cache (float32, 538 MB) and the adapter the dates fine-tune at
1/16 that ``benchmarks/decode_speed.py`` compresses once (``--base`` / ``--adapter`` name others). Each merge runs in
its own child (``python -m hf_deltacome.cli merge``, one thread, ``nice``); its peak RSS is the child's own
``ru_maxrss`` from ``os.wait4``. Run: ``python benchmarks/merge.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def merge(base: Path, adapter: Path, out: Path, mode: str) -> dict:
    """One merge in a child process: wall time and peak RSS."""
    cmd = ["nice", "-n", "10", sys.executable, "-m", "hf_deltacome.cli", "merge", "--base", str(base),
           "--adapter", str(adapter), "--output", str(out)] + (["--in-memory"] if mode == "loaded" else [])  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"mode": mode, "wall_s": time.time() - t0, "peak_rss": usage.ru_maxrss * 1024}


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two model folders hold the same tensor names with bit-identical values (read one at a time)."""
    import torch
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        out = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                out.update(dict.fromkeys(f.keys(), file))
        return out

    wa, wb = where(a), where(b)
    if set(wa) != set(wb):
        return False
    for key in wa:
        with safe_open(str(wa[key]), "pt") as fa, safe_open(str(wb[key]), "pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    import zoo

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=None, help="base model folder (default: the zoo's SmolLM2)")
    p.add_argument("--adapter", type=Path, default=zoo.cache_dir() / "bench-decode" / "dates-1_16-rtn")
    args = p.parse_args(argv)
    base = args.base or zoo.cache_dir() / "smollm2-135m-instruct"
    if not (args.adapter / "adapter_model.safetensors").is_file():
        raise SystemExit(f"{args.adapter}: no adapter; run benchmarks/decode_speed.py once to compress it")
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="deltacome-merge-bench-") as tmp:
        for mode in ("streamed", "loaded"):
            rows.append(merge(base, args.adapter, Path(tmp) / mode, mode))
        identical = same_tensors(Path(tmp) / "streamed", Path(tmp) / "loaded")
    mib = 1 << 20
    print(f"base {base.name}: {base_bytes / mib:,.0f} MiB of safetensors; adapter {args.adapter.name}")
    print("| mode | wall (s) | peak RSS (MiB) | peak RSS / base on disk |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['wall_s']:.1f} | {r['peak_rss'] / mib:,.0f} | {r['peak_rss'] / base_bytes:.2f} |")
    print(f"streamed / loaded peak RSS: {rows[0]['peak_rss'] / rows[1]['peak_rss']:.2f}; "
          f"tensors bit-identical: {identical}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
