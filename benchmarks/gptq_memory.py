"""Peak memory of quantizing one 7B-shaped ``down_proj`` delta with GPTQ (the widest Hessian of a Llama-2-7B layer).

    python benchmarks/gptq_memory.py [--out 4096] [--in 11008] [--rank 256] [--tokens 2048] [--revision REV ...]

Each measurement is one child process (``compress_linear`` on a random low-rank-plus-tail delta and a Hessian from
random activations, in float32 like a streamed run) reporting its own peak RSS (``ru_maxrss``); the same child with
round-to-nearest (working tree only) gives the floor that is not GPTQ's (inputs, SVD). With ``--revision`` each given git revision is checked
out into a temporary worktree and measured the same way, side by side (e.g. before and after a change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, resource, sys, time, torch
torch.manual_seed(0)
from hf_deltacome.compression.svd import compress_linear
m, n, r, t, rtn = (int(a) for a in sys.argv[1:6])
x = torch.randn(t, n)
H = (x.t() @ x) * (2.0 / t)
del x
delta = torch.randn(m, r) @ torch.randn(r, n) * 0.01 + torch.randn(m, n) * 1e-4
floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.time()
compress_linear(delta, H, [(8, 2), (3, 32), (2, r)], 128, quantizer="rtn" if rtn else "gptq", name="down_proj")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"inputs_peak": floor, "peak": peak, "seconds": time.time() - t0}))
"""


def measure(pythonpath: str, args: argparse.Namespace, rtn: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable, "-c", CHILD, str(args.out), str(args.inp), str(args.rank), str(args.tokens), str(int(rtn))]
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # the child's own ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=4096)
    ap.add_argument("--in", dest="inp", type=int, default=11008)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--revision", nargs="*", default=[])
    args = ap.parse_args()
    trees: list[tuple[str, str]] = [("working tree", str(ROOT))]
    tmp = tempfile.TemporaryDirectory()
    for rev in args.revision:
        path = Path(tmp.name) / rev
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(path), rev], check=True)
        trees.append((rev, str(path)))
    hessian_gb = args.inp**2 * 8 / 2**30
    print(
        f"down_proj {args.out} x {args.inp}, rank {args.rank}, Hessian {args.inp} x {args.inp} "
        f"(float64 copy {hessian_gb:.2f} GiB), {args.tokens} tokens, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}\n"
    )
    print("| code | quantizer | peak RSS (GiB) | peak − RTN peak (GiB) | seconds |")
    print("|---|---|---:|---:|---:|")
    try:
        rtn = measure(str(ROOT), args, True)
        print(f"| {trees[0][0]} | rtn | {rtn['peak'] / 2**30:.2f} | 0 | {rtn['seconds']:.0f} |", flush=True)
        for label, path in trees:
            rec = measure(path, args, False)
            extra = (rec["peak"] - rtn["peak"]) / 2**30
            print(f"| {label} | gptq | {rec['peak'] / 2**30:.2f} | {extra:.2f} | {rec['seconds']:.0f} |", flush=True)
    finally:
        for rev in args.revision:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp.name) / rev)])
        tmp.cleanup()


if __name__ == "__main__":
    main()
