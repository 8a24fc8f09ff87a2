"""Scale: compress 7B-shaped pairs streamed from disk, peak memory against the pair's size, time per layer.

    python benchmarks/scale.py                       # the budgeted runs of benchmarks/RESULTS.md ("Scale")
    python benchmarks/scale.py --runs llama2-7b:2:rtn llama2-7b:2:gptq mini:8:rtn:loaded
    python benchmarks/scale.py --build-only          # just write (or check) the cached pairs

A run is ``shape:layers:quantizer[:mode]``, mode ``streamed`` (default) or ``loaded`` (``--in-memory``: both whole
models loaded first, the behaviour before streaming). The default runs compress a small Llama-shaped pair ("mini":
hidden 1024, intermediate 2816, vocabulary 8000) at 2, 4, 8 and 16 layers both ways, so that peak memory against
the number of layers can be compared side by side, the same for a Mixtral-style mixture ("moe-mini": its experts
read one at a time when streamed), then 7B-shaped pairs streamed.

Each pair is written once under ``~/.cache/hf_deltacome/scale`` (``$HF_DELTACOME_CACHE``): a random bfloat16 base
of Llama-2-7B or Llama-3-8B shapes (hidden 4096, intermediate 11008 / 14336, 32 heads, 32 / 8 KV heads, vocabulary
32000 / 128256) with 2, 4 or 8 decoder layers, and a fine-tune = base + a structured delta on every decoder linear
(a rank-16 part with decaying singular values, 5% of the weight's norm, plus a full-rank tail of 1%; the norms move
by 1%; the "moe-mini" mixture's router and every expert's three linears too), sharded one decoder layer per file
with ``model.safetensors.index.json``. Pairs with fewer layers link the
shards of the 8-layer one. A character-level tokenizer is saved with them (GPTQ calibrates on the built-in text).

Each run is ``python -m hf_deltacome.cli compress --base B --finetuned F`` in a child process (streamed, the
checkpoints' own dtype); its peak RSS comes from ``os.wait4`` (the child's own ``ru_maxrss``), its per-layer times
from ``compression_info["layer_seconds"]``. The table gives wall time per layer, peak RSS against the size of one
model on disk, and an extrapolation to 32 layers (fixed part + 32 x the mean layer time; the adapter's buffers are
the part of the memory that grows with the layers: ~1/16 of a layer's fp16 size each at ratio 1/16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256),
    "mini": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
                 vocab_size=8000),
    # a Mixtral-style mixture (16 experts of 1408, top 2) stored as Mixtral checkpoints store it: one tensor per
    # expert and projection (w1/w3/w2), which transformers fuses when loading
    "moe-mini": dict(hidden_size=1024, intermediate_size=1408, num_attention_heads=16, num_key_value_heads=4,
                     vocab_size=8000, num_local_experts=16, num_experts_per_tok=2),
}  # fmt: skip
FULL_LAYERS = {"llama2-7b": 8, "llama3-8b": 2, "mini": 16, "moe-mini": 8}  # the pair written whole; smaller ones link its shards
# (shape, layers, quantizer[, mode]): the mini pair streamed and loaded at 2..16 layers (memory against depth, side by
# side); 7B-shaped pairs streamed with RTN (memory against one model on disk, time per layer)
MINI_RUNS = tuple(f"mini:{n}:rtn:{mode}" for n in (2, 4, 8, 16) for mode in ("streamed", "loaded"))
MOE_RUNS = (*(f"moe-mini:{n}:rtn:{mode}" for n in (2, 4, 8) for mode in ("streamed", "loaded")), "moe-mini:2:gptq")
DEFAULT_RUNS = (*MINI_RUNS, *MOE_RUNS, "llama2-7b:2:rtn", "llama2-7b:4:rtn")
MODES = ("streamed", "loaded")
GPTQ_CALIBRATION = ("--num-samples", "16", "--seq-len", "128")


def cache_root() -> Path:
    env = os.environ.get("HF_DELTACOME_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "hf_deltacome") / "scale"


def _tokenizer():
    """A character-level tokenizer (ids < 100): real text for GPTQ calibration, whatever the vocabulary size."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip


def _linears(shape: dict) -> dict[str, tuple[int, int]]:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    attention = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, h)}  # fmt: skip
    experts = shape.get("num_local_experts")
    if experts is None:
        return {**attention, "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    moe = {f"block_sparse_moe.experts.{e}.{w}": (h, i) if w == "w2" else (i, h) for e in range(experts)
           for w in ("w1", "w2", "w3")}  # fmt: skip
    return {**attention, "block_sparse_moe.gate": (experts, h), **moe}


def _config_class(shape: dict) -> type:
    from transformers import LlamaConfig, MixtralConfig

    return MixtralConfig if "num_local_experts" in shape else LlamaConfig


def _delta(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A fine-tune-like delta: rank 16 with decaying singular values (5% of ||W||) plus a full-rank tail (1%)."""
    m, n = w.shape
    sigma = (torch.arange(16, dtype=torch.float32) + 1.0) ** -0.8
    low = (torch.randn(m, 16, generator=g) * sigma) @ torch.randn(16, n, generator=g)
    low *= 0.05 * w.norm() / low.norm()
    return low.add_(torch.randn(m, n, generator=g), alpha=float(0.01 * w.norm() / (m * n) ** 0.5))


def _write_pair(name: str, layers: int, folder: Path) -> None:
    from safetensors.torch import save_file

    shape = SHAPES[name]
    config = _config_class(shape)(**shape, num_hidden_layers=layers, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    config.dtype = torch.bfloat16
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    dirs = {role: tmp / role for role in ("base", "finetuned")}
    maps: dict[str, dict[str, str]] = {role: {} for role in dirs}
    for d in dirs.values():
        d.mkdir()
        config.save_pretrained(d)
        _tokenizer().save_pretrained(d)

    def save(role: str, file: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(dirs[role] / file), metadata={"format": "pt"})
        maps[role].update({k: file for k in tensors})

    g = torch.Generator().manual_seed(0)
    h, v = shape["hidden_size"], shape["vocab_size"]
    outer = {"model.embed_tokens.weight": (torch.randn(v, h, generator=g) * 0.02).bfloat16(),
             "lm_head.weight": (torch.randn(v, h, generator=g) * 0.02).bfloat16(),
             "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}  # fmt: skip
    save("base", "model-outer.safetensors", outer)
    outer["model.norm.weight"] = (1 + 0.01 * torch.randn(h, generator=g)).bfloat16()
    save("finetuned", "model-outer.safetensors", outer)
    del outer
    for i in range(layers):
        base, ft = {}, {}
        for lin, (m, n) in _linears(shape).items():
            key = f"model.layers.{i}.{lin}.weight"
            w = torch.randn(m, n, generator=g) * 0.02
            base[key] = w.bfloat16()
            ft[key] = w.add_(_delta(w, g)).bfloat16()
            del w
        for norm in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.{i}.{norm}.weight"
            base[key] = torch.ones(h, dtype=torch.bfloat16)
            ft[key] = (1 + 0.01 * torch.randn(h, generator=g)).bfloat16()
        save("base", f"model-layer-{i:05d}.safetensors", base)
        save("finetuned", f"model-layer-{i:05d}.safetensors", ft)
        print(f"  wrote layer {i + 1}/{layers} of {name}", file=sys.stderr)
    for role, d in dirs.items():
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": maps[role]}))
    tmp.rename(folder)


def _link_pair(name: str, layers: int, full: Path, folder: Path) -> None:
    """A pair with the first ``layers`` decoder layers of the full one (its shards linked, not copied)."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    for role in ("base", "finetuned"):
        src, dst = full / role, tmp / role
        dst.mkdir()
        config = _config_class(SHAPES[name]).from_pretrained(src)
        config.num_hidden_layers = layers
        config.save_pretrained(dst)
        for f in src.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                (dst / f.name).write_bytes(f.read_bytes())
        weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        keep = {k: v for k, v in weight_map.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
        for file in set(keep.values()):
            os.symlink(src / file, dst / file)
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    tmp.rename(folder)


def pair(name: str, layers: int) -> Path:
    """The cached pair folder (``base/``, ``finetuned/``), written on first use."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    full_layers = FULL_LAYERS[name]
    full = root / f"{name}-{full_layers}L"
    if not full.exists():
        _write_pair(name, full_layers, full)
    if layers == full_layers:
        return full
    if layers > full_layers:
        raise SystemExit(f"{name} pairs have at most {full_layers} layers here")
    folder = root / f"{name}-{layers}L"
    if not folder.exists():
        _link_pair(name, layers, full, folder)
    return folder


def model_bytes(folder: Path) -> int:
    """Bytes on disk of the safetensors files a model's index names (links followed)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sum(os.path.getsize(folder / f) for f in set(index["weight_map"].values()))


def run(name: str, layers: int, quantizer: str, mode: str = "streamed") -> dict:
    """Compress one pair in a child process: wall time, peak RSS, per-layer times."""
    folder = pair(name, layers)
    with tempfile.TemporaryDirectory(prefix="deltacome-scale-") as out:
        cmd = [sys.executable, "-m", "hf_deltacome.cli", "compress", "--base", str(folder / "base"),
               "--finetuned", str(folder / "finetuned"), "--output", out, "--overwrite", "--quantizer", quantizer,
               "--device", "cpu"]  # fmt: skip
        if quantizer == "gptq":
            cmd += list(GPTQ_CALIBRATION)
        cmd.append("--in-memory" if mode == "loaded" else "--stream")  # whatever the pair's size
        env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err_lines = []
        for line in proc.stderr:  # drained as it comes (the progress bars), kept for the error case
            err_lines.append(line)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(err_lines[-20:])}")
        cfg = json.loads((Path(out) / "adapter_config.json").read_text())
        adapter = os.path.getsize(Path(out) / "adapter_model.safetensors")
    info = cfg["compression_info"]
    return {"pair": name, "layers": layers, "quantizer": quantizer, "mode": mode, "wall_s": wall, "peak_rss": usage.ru_maxrss * 1024,
            "model_bytes": model_bytes(folder / "base"), "layer_seconds": info.get("layer_seconds", []),
            "adapter_bytes": adapter, "calibration": info.get("calibration")}  # fmt: skip


def table(results: list[dict]) -> str:
    gib = 1 << 30
    rows = ["| pair | layers | quantizer | mode | wall (s) | per layer (s) | peak RSS (GiB) | one model on disk (GiB) | "
            "peak / model | adapter (MB) | 32 layers, extrapolated |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        per = sum(r["layer_seconds"]) / max(len(r["layer_seconds"]), 1)
        fixed = r["wall_s"] - sum(r["layer_seconds"])
        est = fixed + 32 * per
        rows.append(
            f"| {r['pair']} | {r['layers']} | {r['quantizer']} | {r.get('mode', 'streamed')} | {r['wall_s']:.0f} | {per:.1f} | "
            f"{r['peak_rss'] / gib:.2f} | {r['model_bytes'] / gib:.2f} | {r['peak_rss'] / r['model_bytes']:.2f} | "
            f"{r['adapter_bytes'] / 1e6:.0f} | {est / 3600:.2f} h |"
        )
    return "\n".join(rows)


def depth_table(results: list[dict]) -> str:
    """Peak RSS against the number of layers, streamed beside loaded, as ratios (same pair shape and quantizer)."""
    by = {(r["pair"], r["quantizer"], r["layers"], r.get("mode", "streamed")): r["peak_rss"] for r in results}
    groups = sorted({(p, q) for p, q, _, _ in by})
    rows = ["| pair | quantizer | layers | streamed peak (GiB) | loaded peak (GiB) | streamed / loaded | "
            "streamed / streamed at fewest layers | loaded / loaded at fewest layers |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for pair_name, quantizer in groups:
        layers = sorted({n for p, q, n, _ in by if (p, q) == (pair_name, quantizer)})
        first = {m: by.get((pair_name, quantizer, layers[0], m)) for m in MODES}
        for n in layers:
            s, ld = by.get((pair_name, quantizer, n, "streamed")), by.get((pair_name, quantizer, n, "loaded"))

            def cell(value, fmt):
                return "–" if value is None else fmt(value)

            rows.append(
                f"| {pair_name} | {quantizer} | {n} | {cell(s, lambda v: f'{v / (1 << 30):.2f}')} | "
                f"{cell(ld, lambda v: f'{v / (1 << 30):.2f}')} | {cell(s and ld and s / ld, lambda v: f'{v:.2f}')} | "
                f"{cell(s and first['streamed'] and s / first['streamed'], lambda v: f'{v:.2f}')} | "
                f"{cell(ld and first['loaded'] and ld / first['loaded'], lambda v: f'{v:.2f}')} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="shape:layers:quantizer items")
    parser.add_argument("--build-only", action="store_true", help="write the pairs and stop")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    specs = []
    for item in args.runs:
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[0] not in SHAPES or not parts[1].isdigit() or parts[2] not in ("rtn", "gptq") \
                or (len(parts) == 4 and parts[3] not in MODES):
            parser.error(f"--runs {item!r}: expected shape:layers:quantizer[:mode], shape in {sorted(SHAPES)}, "
                         f"quantizer rtn or gptq, mode in {MODES}")  # fmt: skip
        specs.append((parts[0], int(parts[1]), parts[2], parts[3] if len(parts) == 4 else "streamed"))
    if args.build_only:
        for name, layers, _, _ in specs:
            print(pair(name, layers))
        return 0
    results = []
    for name, layers, quantizer, mode in specs:
        print(f"compressing {name} x {layers} layers ({quantizer}, {mode}) ...", file=sys.stderr, flush=True)
        results.append(run(name, layers, quantizer, mode))
        print(table(results[-1:]), file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))
    print()
    print(depth_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
