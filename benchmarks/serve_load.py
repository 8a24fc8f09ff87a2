#!/usr/bin/env python
"""Load test of ``deltacome serve`` with the official ``openai`` client: 8 adapters, concurrent requests.

    python benchmarks/serve_load.py [--work DIR] [--adapters 8] [--concurrency 1,8,16] [--max-tokens 16]

Starts ``deltacome serve`` in a subprocess (SmolLM2-135M-Instruct base, float32, CPU, one torch thread,
``--max-batch 8``) with the adapters of ``benchmarks/many_deltas.py`` (the dates fine-tune at 1/16 and perturbed
copies, made there if missing). At each concurrency level ``c`` it sends ``max(8, 2c)`` chat requests from ``c``
client threads: request ``i`` goes to adapter ``i mod 8``, streams when ``i`` is even (usage via
``stream_options``), asks the task's ``i``-th held-out date question, greedy, ``--max-tokens`` tokens. Reports
throughput (requests/s, completion tokens/s), latency p50/p99 (whole request; first token for streams), errors, and
whether every answer is identical across concurrency levels (greedy: batching must not change results).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from many_deltas import make_copies, source_adapter  # noqa: E402
from zoo import finetune, get_task, smollm2_path  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folders: list[Path], port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "hf_deltacome.cli", "serve", "--base", str(smollm2_path()), "--port", str(port),
           "--max-batch", "8", "--log-level", "warning"]  # fmt: skip
    for i, folder in enumerate(folders):
        cmd += ["--adapter", f"a{i:02d}={folder}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 900
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server did not start; see {log}") from None
            time.sleep(1)


def one_request(client, i: int, question: str, adapters: int, max_tokens: int) -> dict:
    model = f"a{i % adapters:02d}"
    messages = [{"role": "user", "content": question}]
    t0 = time.perf_counter()
    try:
        if i % 2 == 0:
            first, parts, usage = None, [], None
            stream = client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    parts.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            text = "".join(parts)
        else:
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
            first, text, usage = None, r.choices[0].message.content, r.usage
        end = time.perf_counter()
        return {"i": i, "ok": True, "latency": end - t0, "ttft": (first - t0) if first else None,
                "tokens": usage.completion_tokens if usage else 0, "text": text}  # fmt: skip
    except Exception as e:  # counted, not raised: the load test reports errors
        return {"i": i, "ok": False, "latency": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "hf_deltacome" / "bench-many-deltas-v2"))
    ap.add_argument("--source", default=None, help="adapter folder to copy (default: as benchmarks/many_deltas.py)")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--concurrency", default="1,8,16")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    import openai

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = Path(args.source) if args.source else source_adapter(work, finetune("dates", progress=False))
    folders = make_copies(source, work, args.adapters)
    questions = [ex.prompt for ex in get_task("dates").split("eval")]
    port = free_port()
    log = work / "serve_load.server.log"
    t_start = time.perf_counter()
    server = start_server(folders, port, log)
    print(f"server up in {time.perf_counter() - t_start:.0f} s (base + {args.adapters} adapters); log {log}")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    rows, answers = [], {}
    try:
        for c in (int(x) for x in args.concurrency.split(",")):
            n = max(8, 2 * c)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                results = list(pool.map(lambda i: one_request(client, i, questions[i], args.adapters,
                                                               args.max_tokens), range(n)))  # fmt: skip
            wall = time.perf_counter() - t0
            ok = [r for r in results if r["ok"]]
            for r in ok:
                answers.setdefault(r["i"], set()).add(r["text"])
            lat = [r["latency"] for r in ok]
            ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
            row = {
                "c": c, "n": n, "errors": n - len(ok), "wall": wall, "rps": len(ok) / wall,
                "tps": sum(r["tokens"] for r in ok) / wall, "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99),
                "ttft50": percentile(ttft, 0.5) if ttft else float("nan"),
            }  # fmt: skip
            rows.append(row)
            print(row, flush=True)
            for r in results:
                if not r["ok"]:
                    print("  error:", r["error"])
    finally:
        server.terminate()
        server.wait(60)
    same = all(len(v) == 1 for v in answers.values())
    lines = [
        "| concurrency | requests (½ streamed) | errors | wall | requests/s | completion tok/s | latency p50 "
        "| latency p99 | first token p50 (streams) |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        lines.append(
            f"| {r['c']} | {r['n']} | {r['errors']} | {r['wall']:.0f} s | {r['rps']:.3f} | {r['tps']:.2f} "
            f"| {r['p50']:.1f} s | {r['p99']:.1f} s | {r['ttft50']:.1f} s |"
        )
    print("\n" + "\n".join(lines))
    print(f"\nanswers identical across concurrency levels: {'yes' if same else 'NO'} ({len(answers)} prompts)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, server torch threads 1; shared with other jobs")


if __name__ == "__main__":
    main()
