"""The weights of a base model and their sketch (fingerprint version 2; see :mod:`.fingerprint` for the design).

:func:`base_weights` lists every parameter under its canonical name (PEFT wrappers stripped) with its logical shape;
:func:`sketch_model` computes the stored sketch, and :func:`sketch_differences` compares a model with a stored one.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..linears import Conv1DAsLinear, ExpertsAsLinears

FINGERPRINT_VERSION = 2
ROWS_PER_BUCKET = 512
PROJECTIONS = 8
SEED = "deltacome-fingerprint-2"
TOL = 2.0**-18  # per bucket, of ||Y_g||: float32 products err ~5e-7; a 1% change of a row in 512 moves it ~2e-4
STORE_RTOL = 2.0**-22  # plus the float32 rounding of the stored value (2**-24), with margin
LOOSE = 2.0**-8  # bfloat16 unit roundoff: the most one rounding moves a weight, relative to it
_CHUNK = {"cpu": 1 << 17}  # elements per matmul chunk (<= 1 MiB: stays in L2 on CPU); 1 << 24 elsewhere
_CODES = {torch.float32: "f", torch.bfloat16: "b", torch.float16: "h", torch.float64: "d"}  # other floats: "o"
_DTYPE_NAMES = {"f": "float32", "b": "bfloat16", "h": "float16", "d": "float64", "o": "another float type"}
_WRAPPER_SEGMENTS = ("base_layer", "original_module", "token_adapter")


# --- walking the base model ----------------------------------------------------------------------------------------


@dataclass
class BaseWeight:
    name: str  # canonical
    shape: tuple[int, ...]  # logical shape (out, in) for linear-like modules, else the tensor's shape
    module: nn.Module
    attr: str
    tensor: torch.Tensor


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        with contextlib.suppress(Exception):
            return get_base()
    return model


def _adapter_state(module: nn.Module) -> set[str]:
    """Names of ``module``'s children that hold adapter state rather than base weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    skip: set[str] = set()
    if isinstance(module, BaseTunerLayer):
        skip.update(module.adapter_layer_names, module.other_param_names)
    if isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "modules_to_save"):
        # (trainable tokens keep the base weight inside token_adapter, whose own parts are skipped above)
        skip.add("modules_to_save")
    return skip


def _base_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules(remove_duplicate=False)`` without descending into adapter state: a model carrying many
    adapters is walked as fast as one carrying none."""
    if isinstance(module, ExpertsAsLinears):  # per-expert linears: the fused weights, with their current values
        module = module.fused()
    yield prefix, module.conv1d if isinstance(module, Conv1DAsLinear) else module  # as the base holds it
    skip = _adapter_state(module)
    for name, child in module._modules.items():
        if child is not None and name not in skip:
            yield from _base_modules(child, f"{prefix}.{name}" if prefix else name)


def _canonical(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def base_weights(model: nn.Module) -> list[BaseWeight]:
    out: dict[str, BaseWeight] = {}
    for mname, module in _base_modules(unwrap(model)):
        dims = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        for pname, p in module.named_parameters(recurse=False):
            linear = pname == "weight" and all(isinstance(d, int) for d in dims)  # packed weights: logical shape
            name = _canonical(f"{mname}.{pname}" if mname else pname)
            out.setdefault(name, BaseWeight(name, dims if linear else tuple(p.shape), module, pname, p))
        if getattr(module, "exposes_dense_weight", False) and all(isinstance(d, int) for d in dims):
            # a packed quantized linear (AMLQ) has no weight parameter: its dequantized weight stands for it, read
            # only when sketched (see readable); a meta placeholder here keeps listing the weights cheap
            name = _canonical(f"{mname}.weight" if mname else "weight")
            placeholder = torch.empty(dims, dtype=module.compute_dtype, device="meta")
            out.setdefault(name, BaseWeight(name, dims, module, "weight", placeholder))
    return [out[k] for k in sorted(out)]


def readable(w: BaseWeight) -> Optional[torch.Tensor]:
    """The weight's float values (``None``: not readable), from accelerate's offload map for meta weights."""
    t = w.tensor  # plain float tensors only: not packed, quantized (tensor subclasses), sharded (DTensor) or empty
    if type(t) not in (torch.Tensor, nn.Parameter) or not (t.is_floating_point() and t.element_size() >= 2):
        return None
    if tuple(t.shape) != w.shape or t.numel() == 0:
        return None
    if t.device.type != "meta":
        return t
    if getattr(w.module, "exposes_dense_weight", False):
        return w.module.weight  # packed linear: its effective (dequantized) weight
    hook = getattr(w.module, "_hf_hook", None)
    for h in list(getattr(hook, "hooks", [])) or ([hook] if hook is not None else []):
        with contextlib.suppress(Exception):
            value = h.weights_map[w.attr]
            if isinstance(value, torch.Tensor) and value.device.type != "meta" and value.shape == t.shape:
                return value
    return None


def _config_value(config: Any, *keys: str) -> Any:
    for key in keys:
        value = getattr(config, key, None)
        if value is None and hasattr(config, "get_text_config"):
            with contextlib.suppress(Exception):
                value = getattr(config.get_text_config(), key, None)
        if value is not None:
            return value
    return None


def describe_model(base: nn.Module, weights: list[BaseWeight]) -> dict[str, Any]:
    config = getattr(base, "config", None)
    archs = _config_value(config, "architectures") if config is not None else None
    text = "\n".join(f"{w.name}:{'x'.join(map(str, w.shape))}" for w in weights)
    return {
        "name_or_path": (getattr(config, "_name_or_path", None) or getattr(base, "name_or_path", None) or None),
        "architecture": (archs[0] if archs else type(base).__name__),
        "model_type": getattr(config, "model_type", None),
        "vocab_size": _config_value(config, "vocab_size"),
        "hidden_size": _config_value(config, "hidden_size", "d_model", "n_embd"),
        "num_hidden_layers": _config_value(config, "num_hidden_layers", "n_layer", "num_layers"),
        "num_parameters": sum(math.prod(w.shape) for w in weights),
        "num_tensors": len(weights),
        "structure_hash": hashlib.sha256(text.encode()).hexdigest()[:32],
    }


# --- the sketch (version 2) ----------------------------------------------------------------------------------------


def _random_words(tag: str, count: int) -> np.ndarray:
    """``count`` pseudo-random 64-bit words from ``tag`` (splitmix64: the same on every platform and version)."""
    z = np.uint64(int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "little"))
    with np.errstate(over="ignore"):
        z = z + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=64)
def _projection(n: int, k: int, seed: str, device: torch.device) -> torch.Tensor:
    """The ``n x k`` random matrix of width ``n`` (uniform in (-1, 1), float64), made once per shape and device."""
    u = (_random_words(f"{seed}/R/{n}x{k}", n * k) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return torch.from_numpy(2.0 * u - 1.0).view(n, k).to(device)


@functools.lru_cache(maxsize=64)
def _signs(rows: int, seed: str, device: torch.device) -> torch.Tensor:
    bits = (_random_words(f"{seed}/signs", rows) & np.uint64(1)).astype(np.float64)
    return torch.from_numpy(1.0 - 2.0 * bits).to(device)


def _dims(shape: tuple[int, ...], params: tuple[int, int, str]) -> tuple[int, int, int, int]:
    """``(rows, width, buckets, projections)`` of a tensor of logical ``shape`` viewed as a matrix."""
    rows = shape[0] if shape else 1
    width = math.prod(shape[1:]) if len(shape) > 1 else 1
    return rows, width, -(-rows // params[0]), min(params[1], width)


def _sketch(
    t: torch.Tensor, dtype: torch.dtype, params: tuple, fast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Z, scale)`` of ``t`` rounded to ``dtype``, computed on ``t``'s device: ``Z`` (buckets x k, float32 as
    stored) and each bucket's ``||Y_g||`` (float64). ``fast``: float32 products on CPU (2x faster; within ~1e-6
    of float64, inside ``TOL``); a mismatch is recomputed in float64, so a CPU that rounds float32 matmuls lower
    (oneDNN bf16 modes) costs time, never a false refusal."""
    b, _, seed = params
    m, n, g, k = _dims(tuple(t.shape), params)
    x = t.detach().reshape(m, n)
    x = x.cpu() if x.device.type == "mps" else x  # no float64 there
    acc = torch.float32 if fast and x.device.type == "cpu" else torch.float64
    r = _projection(n, k, seed, x.device).to(acc)
    step = max(1, _CHUNK.get(x.device.type, 1 << 24) // n)
    with torch.no_grad():
        y = torch.cat([(c if c.dtype == dtype else c.to(dtype)).to(acc) @ r for c in x.split(step)]).double()
        y = F.pad(y, (0, 0, 0, g * b - m)).view(g, b, k)
        z = (y * _signs(g * b, seed, x.device).view(g, b, 1)).sum(1)
        scale = y.square().sum((1, 2)).sqrt()
    return torch.nan_to_num(z.float(), nan=0.0).cpu(), scale.cpu()


def _sketcher(params: tuple[int, int, str]) -> Callable[[BaseWeight, torch.Tensor, torch.dtype], tuple]:
    """:func:`_sketch` once per parameter and rounding (tied weights are one parameter; the model keeps it alive,
    so its id is unique). Only the small results are kept: an offloaded weight is freed once sketched."""
    cache: dict[tuple, tuple] = {}

    def sketch(w: BaseWeight, t: torch.Tensor, dtype: torch.dtype, fast: bool = False) -> tuple:
        key = (id(w.tensor), dtype, fast and t.device.type == "cpu")
        if key not in cache:
            cache[key] = _sketch(t, dtype, params, key[2])
        return cache[key]

    return sketch


def _encode(arrays: list[np.ndarray]) -> str:
    data = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    return base64.b64encode(data.astype("<f4").tobytes()).decode("ascii")


def decode_sketch(text: Any) -> np.ndarray:
    return np.frombuffer(base64.b64decode(str(text).encode("ascii"), validate=True), dtype="<f4")


def sketch_model(
    weights: list[BaseWeight], read: Optional[Callable[[BaseWeight], Optional[torch.Tensor]]] = None
) -> dict[str, Any]:
    """The stored sketch of ``weights``; ``read(weight)`` supplies meta weights (a model streamed from its files)."""
    params = (ROWS_PER_BUCKET, PROJECTIONS, SEED)
    sketch = _sketcher(params)
    codes, bf16, fp16 = [], [], []
    for w in weights:
        t = readable(w)
        if t is None and read is not None and w.tensor.device.type == "meta":
            t = read(w)
        if t is None:
            codes.append("-")
            continue
        zb, zh = sketch(w, t, torch.bfloat16)[0].numpy(), sketch(w, t, torch.float16)[0].numpy()
        code = _CODES.get(t.dtype, "o")
        bf16.append(zb)
        if not np.array_equal(zb, zh) and np.abs(zh).max() < np.finfo(np.float32).max:  # fp16 rounds otherwise
            code = code.upper()
            fp16.append(zh)
        codes.append(code)
    return {"rows_per_bucket": params[0], "projections": params[1], "seed": params[2], "dtypes": "".join(codes),
            "bf16": _encode(bf16), "fp16": _encode(fp16)}  # fmt: skip


@dataclass
class _Compared:
    name: str
    exact: bool
    rows: tuple[int, int]  # worst bucket
    change: float  # relative change of the worst bucket
    overall: float  # relative change of the whole tensor


def _compare(w: BaseWeight, z: torch.Tensor, scale: torch.Tensor, ref: np.ndarray, b: int) -> _Compared:
    z64, scale64, ref64 = z.numpy().astype(np.float64), scale.numpy(), ref.astype(np.float64).reshape(z.shape)
    diff, ref_norm = np.linalg.norm(z64 - ref64, axis=1), np.linalg.norm(ref64, axis=1)
    exact = bool(np.all(diff <= TOL * scale64 + STORE_RTOL * ref_norm))
    rel = diff / np.maximum(np.maximum(scale64, ref_norm), 1e-300)
    g = int(rel.argmax())
    overall = float(np.linalg.norm(diff) / max(np.linalg.norm(scale64), np.linalg.norm(ref_norm), 1e-300))
    rows = (g * b, min((g + 1) * b, w.shape[0] if w.shape else 1) - 1)
    return _Compared(w.name, exact, rows, float(rel[g]), overall)


def sketch_differences(
    fp: Mapping[str, Any],
    weights: list[BaseWeight],
    where: str,
    read: Optional[Callable[[BaseWeight], Optional[torch.Tensor]]] = None,
) -> dict[str, list]:
    """Compare each weight with its stored sketch: ``{"mismatched", "loose", "skipped"}`` plus ``compared`` count;
    ``read(weight)`` supplies meta weights (a model streamed from its checkpoint files), as in :func:`sketch_model`."""
    sk = fp["sketch"]
    params = (int(sk["rows_per_bucket"]), int(sk["projections"]), str(sk["seed"]))
    codes, bf16, fp16 = str(sk["dtypes"]), decode_sketch(sk["bf16"]), decode_sketch(sk["fp16"])
    sizes = [math.prod(_dims(w.shape, params)[2:]) for w in weights]
    fits = len(codes) == len(weights) and sum(s for s, c in zip(sizes, codes) if c != "-") == bf16.size
    if not fits or sum(s for s, c in zip(sizes, codes) if c.isupper()) != fp16.size:
        raise ConfigError(f"{where}base_fingerprint sketch does not fit the model's {len(weights)} weights")
    sketch = _sketcher(params)
    out: dict[str, list] = {"mismatched": [], "loose": [], "skipped": [], "compared": []}
    ob = oh = 0
    for w, code, size in zip(weights, codes, sizes):
        refs = {}
        if code != "-":
            refs[torch.bfloat16], ob = bf16[ob : ob + size], ob + size
        if code.isupper():
            refs[torch.float16], oh = fp16[oh : oh + size], oh + size
        t = readable(w) if refs else None
        if t is None and refs and read is not None and w.tensor.device.type == "meta":
            t = read(w)
        if t is None:
            out["skipped"].append(w.name)
            continue
        out["compared"].append(w.name)
        results = []
        for dtype in sorted(refs, key=lambda d: d != t.dtype):  # the loaded dtype's own rounding first
            results.append(_compare(w, *sketch(w, t, dtype, fast=True), refs[dtype], params[0]))
            if not results[-1].exact:  # float64 before a verdict (a no-op where the fast path is float64)
                results[-1] = _compare(w, *sketch(w, t, dtype), refs[dtype], params[0])
            if results[-1].exact:
                break
        else:
            best = min(results, key=lambda r: r.overall)
            fingerprinted, loaded = code.lower(), _CODES.get(t.dtype, "o")
            if fingerprinted not in ("f", loaded) and best.overall <= LOOSE:  # another rounding of an unknown original
                out["loose"].append((w.name, _DTYPE_NAMES[fingerprinted], _DTYPE_NAMES[loaded]))
            else:
                out["mismatched"].append(best)
    return out
