"""Fingerprint of the base model a delta was computed against, stored in the adapter and checked at load.

Version 2: what the base is (architecture, vocabulary, sizes), how it is built (a hash of every weight's canonical
name and logical shape) and what every weight holds. Each parameter (embeddings, norms, biases included) is viewed as
a matrix ``W`` (a vector as a column), rounded to bfloat16 and projected onto 8 seeded random directions, ``Y =
round(W) R`` (float64; ``R`` made once per width); rows are summed in buckets of 512 with seeded random signs, ``Z_g
= sum_i s_i Y_i``, stored as float32. A changed row ``i`` moves ``Z_g`` by ``dW_i R``, which no other row cancels.
The check reproduces the rounding rather than tolerating it (bf16(fp32(x)) = bf16(x); the float16 rounding is stored
too where it differs), so ``TOL`` covers only float64 round-off and float32 storage: a tolerance for rounding (up to
2**-8 of each weight) would hide a 1% edit of one row. Roundings that cannot be reproduced (fingerprinted in one
16-bit dtype, loaded in another) are compared to bfloat16's unit roundoff (``LOOSE``) and unreadable weights (meta,
packed) by shape only, each with a :class:`WeakBaseCheckWarning`. Version-1 fingerprints (16 values of at most 64
tensors) are still checked, with a one-time note. An integrity check, not a security boundary (the seeds are public).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import BaseModelMismatchError, ConfigError, WeakBaseCheckWarning

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
_V1 = {"rtol": 1.0 / 64, "mean": 1.0 / 128, "atol": 1e-3}  # version-1 value tolerances
_V1_NOTED: set[str] = set()
_KEYS = {"version", "name_or_path", "architecture", "model_type", "vocab_size", "hidden_size", "num_hidden_layers"}
_KEYS |= {"num_parameters", "num_tensors", "structure_hash", "sketch"}
_WRAPPER_SEGMENTS = ("base_layer", "original_module")
_LABELS = {"architecture": "architecture", "model_type": "model type", "vocab_size": "vocabulary size",
           "hidden_size": "hidden size", "num_hidden_layers": "number of layers"}  # fmt: skip


class BaseModelMismatchWarning(UserWarning):
    """Emitted instead of :class:`BaseModelMismatchError` when the base check is not strict."""


# --- strictness ----------------------------------------------------------------------------------------------------

_STRICT: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("deltacome_strict_base", default=None)


def default_strict() -> bool:
    """Whether a base mismatch is an error: :func:`base_check` if active, else ``DELTACOME_STRICT_BASE`` (default on)."""
    value = _STRICT.get()
    if value is not None:
        return value
    env = os.environ.get("DELTACOME_STRICT_BASE", "1").strip().lower()
    return env not in ("0", "false", "no", "off")


@contextlib.contextmanager
def base_check(strict: bool) -> Iterator[None]:
    """Within the block, loading a DELTACOME adapter onto a different base raises (``strict=True``) or warns.

    Useful with ``AutoPeftModelForCausalLM.from_pretrained``, which passes its keyword arguments to the base model.
    """
    token = _STRICT.set(bool(strict))
    try:
        yield
    finally:
        _STRICT.reset(token)


# --- walking the base model ----------------------------------------------------------------------------------------


@dataclass
class _Weight:
    name: str  # canonical
    shape: tuple[int, ...]  # logical shape (out, in) for linear-like modules, else the tensor's shape
    module: nn.Module
    attr: str
    tensor: torch.Tensor


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        with contextlib.suppress(Exception):
            return get_base()
    return model


def _skipped_prefixes(model: nn.Module) -> list[str]:
    """Sub-module paths that hold adapter state rather than base weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    skip = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for attr in tuple(module.adapter_layer_names) + tuple(module.other_param_names):
                skip.append(f"{name}.{attr}" if name else attr)
        if isinstance(module, AuxiliaryTrainingWrapper):
            for attr in ("modules_to_save", "token_adapter"):
                if hasattr(module, attr):
                    skip.append(f"{name}.{attr}" if name else attr)
    return skip


def _canonical(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def _weights(model: nn.Module) -> list[_Weight]:
    base = _unwrap(model)
    skip = _skipped_prefixes(base)
    out: dict[str, _Weight] = {}
    for mname, module in base.named_modules(remove_duplicate=False):
        if any(mname == s or mname.startswith(s + ".") for s in skip):
            continue
        dims = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        for pname, p in module.named_parameters(recurse=False):
            linear = pname == "weight" and all(isinstance(d, int) for d in dims)  # packed weights: logical shape
            name = _canonical(f"{mname}.{pname}" if mname else pname)
            out.setdefault(name, _Weight(name, dims if linear else tuple(p.shape), module, pname, p))
    return [out[k] for k in sorted(out)]


def _readable(w: _Weight) -> Optional[torch.Tensor]:
    """The weight's float values (``None``: not readable), from accelerate's offload map for meta weights."""
    t = w.tensor  # plain float tensors only: not packed, quantized (tensor subclasses), sharded (DTensor) or empty
    if type(t) not in (torch.Tensor, nn.Parameter) or not (t.is_floating_point() and t.element_size() >= 2):
        return None
    if tuple(t.shape) != w.shape or t.numel() == 0:
        return None
    if t.device.type != "meta":
        return t
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


def _describe_model(base: nn.Module, weights: list[_Weight]) -> dict[str, Any]:
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


def _sketcher(params: tuple[int, int, str]) -> Callable[[_Weight, torch.Tensor, torch.dtype], tuple]:
    """:func:`_sketch` once per parameter and rounding (tied weights are one parameter; the model keeps it alive,
    so its id is unique). Only the small results are kept: an offloaded weight is freed once sketched."""
    cache: dict[tuple, tuple] = {}

    def sketch(w: _Weight, t: torch.Tensor, dtype: torch.dtype, fast: bool = False) -> tuple:
        key = (id(w.tensor), dtype, fast and t.device.type == "cpu")
        if key not in cache:
            cache[key] = _sketch(t, dtype, params, key[2])
        return cache[key]

    return sketch


def _encode(arrays: list[np.ndarray]) -> str:
    data = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    return base64.b64encode(data.astype("<f4").tobytes()).decode("ascii")


def _decode(text: Any) -> np.ndarray:
    return np.frombuffer(base64.b64decode(str(text).encode("ascii"), validate=True), dtype="<f4")


def _sketch_model(weights: list[_Weight]) -> dict[str, Any]:
    params = (ROWS_PER_BUCKET, PROJECTIONS, SEED)
    sketch = _sketcher(params)
    codes, bf16, fp16 = [], [], []
    for w in weights:
        t = _readable(w)
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


def _compare(w: _Weight, z: torch.Tensor, scale: torch.Tensor, ref: np.ndarray, b: int) -> _Compared:
    z64, scale64, ref64 = z.numpy().astype(np.float64), scale.numpy(), ref.astype(np.float64).reshape(z.shape)
    diff, ref_norm = np.linalg.norm(z64 - ref64, axis=1), np.linalg.norm(ref64, axis=1)
    exact = bool(np.all(diff <= TOL * scale64 + STORE_RTOL * ref_norm))
    rel = diff / np.maximum(np.maximum(scale64, ref_norm), 1e-300)
    g = int(rel.argmax())
    overall = float(np.linalg.norm(diff) / max(np.linalg.norm(scale64), np.linalg.norm(ref_norm), 1e-300))
    rows = (g * b, min((g + 1) * b, w.shape[0] if w.shape else 1) - 1)
    return _Compared(w.name, exact, rows, float(rel[g]), overall)


def _sketch_differences(fp: Mapping[str, Any], weights: list[_Weight], where: str) -> dict[str, list]:
    """Compare each weight with its stored sketch: ``{"mismatched", "loose", "skipped"}`` plus ``compared`` count."""
    sk = fp["sketch"]
    params = (int(sk["rows_per_bucket"]), int(sk["projections"]), str(sk["seed"]))
    codes, bf16, fp16 = str(sk["dtypes"]), _decode(sk["bf16"]), _decode(sk["fp16"])
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
        t = _readable(w) if refs else None
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


# --- version 1: values sampled at fixed positions of at most 64 tensors (adapters made before the sketch) ----------


def _v1_sample(t: torch.Tensor, name: str, k: int) -> np.ndarray:
    idx = [int.from_bytes(hashlib.sha256(f"{name}#{j}".encode()).digest()[:8], "little") % t.numel() for j in range(k)]
    flat = t.detach().reshape(-1)
    return flat[torch.tensor(idx, device=flat.device)].to(torch.float32).cpu().double().numpy()


def _v1_differences(fp: Mapping[str, Any], weights: list[_Weight]) -> dict[str, list]:
    samples, by_name = fp["samples"], {w.name: w for w in weights}
    k = int(samples["per_tensor"])
    out: dict[str, list] = {"mismatched": [], "loose": [], "skipped": [], "compared": []}
    for want, name in zip(_decode(samples["values"]).astype(np.float64).reshape(-1, k), samples["tensors"]):
        t = _readable(by_name[name]) if name in by_name else None
        if t is None:
            out["skipped"].append(name)
            continue
        out["compared"].append(name)
        got = _v1_sample(t, name, k)
        atol, dev = _V1["atol"] * float(np.abs(want).max()) + 1e-12, np.abs(got - want)
        ok = np.all(dev <= atol + _V1["rtol"] * np.abs(want)) and np.mean(dev / (np.abs(want) + atol)) <= _V1["mean"]
        if not ok:
            out["mismatched"].append((name, want, got))
    return out


# --- public API ----------------------------------------------------------------------------------------------------


def compute_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Fingerprint of ``model`` (a transformers model, or a ``PeftModel`` whose base is fingerprinted).

    JSON-serialisable; store it in ``DeltaCoMeConfig.base_fingerprint``. Reads every weight once (on its device).
    """
    base = _unwrap(model)
    weights = _weights(base)
    return {"version": FINGERPRINT_VERSION, **_describe_model(base, weights), "sketch": _sketch_model(weights)}


def _validate(fp: dict) -> None:
    if not isinstance(fp.get("structure_hash"), str):
        raise ValueError("no structure_hash")
    if fp.get("version") == 1:
        samples = fp["samples"]
        k, names = samples["per_tensor"], list(samples["tensors"])
        if not isinstance(k, int) or k < 1 or not all(isinstance(n, str) for n in names):
            raise ValueError("bad sample list")
        if _decode(samples["values"]).size != k * len(names):
            raise ValueError(f"expected {k * len(names)} sampled values")
        return
    if set(fp) - _KEYS:
        raise ValueError(f"keys {sorted(set(fp) - _KEYS)} are not part of a version-2 fingerprint")
    sk = fp["sketch"]
    for key in ("rows_per_bucket", "projections"):
        if type(sk[key]) is not int or not 1 <= sk[key] <= 1 << 16:
            raise ValueError(f"sketch {key} must be a positive integer, got {sk[key]!r}")
    if not isinstance(sk["seed"], str) or not isinstance(sk["dtypes"], str) or set(sk["dtypes"]) - set("fbhdoFBHDO-"):
        raise ValueError("bad sketch seed or dtypes")
    if fp.get("num_tensors") is not None and fp["num_tensors"] != len(sk["dtypes"]):
        raise ValueError(f"{len(sk['dtypes'])} sketched tensors for {fp['num_tensors']!r} weights")
    _decode(sk["bf16"]), _decode(sk["fp16"])


def parse_fingerprint(value: Union[None, str, Mapping[str, Any]], *, adapter: Optional[str] = None) -> Optional[dict]:
    """A fingerprint from the config (a dict, or its JSON text); ``None`` if absent. Malformed: :class:`ConfigError`."""
    where = f"adapter {adapter!r}: " if adapter else ""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ConfigError(f"{where}base_fingerprint is not valid JSON: {e}") from e
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}base_fingerprint must be an object, got {type(value).__name__}")
    fp = dict(value)
    if fp.get("version") not in (1, FINGERPRINT_VERSION) or isinstance(fp.get("version"), bool):
        raise ConfigError(f"{where}base_fingerprint has unsupported version {fp.get('version')!r}")
    try:
        _validate(fp)
    except (TypeError, KeyError, ValueError, AttributeError, OverflowError) as e:
        raise ConfigError(f"{where}base_fingerprint (version {fp['version']}) is malformed: {e}") from e
    return fp


def describe_fingerprint(fp: Mapping[str, Any]) -> str:
    """``name (Architecture, vocab N, P parameters)`` for messages."""
    parts = [str(fp.get("architecture") or "unknown architecture")]
    parts += [f"vocab {fp['vocab_size']}"] if fp.get("vocab_size") is not None else []
    parts += [f"{fp['num_parameters']:,} parameters"] if fp.get("num_parameters") is not None else []
    return f"{fp.get('name_or_path') or '<unnamed base>'} ({', '.join(parts)})"


def _first(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items) - n} more)" if len(items) > n else "")


def fingerprint_differences(
    expected: Mapping[str, Any], model: nn.Module, *, adapter: Optional[str] = None
) -> tuple[list[str], dict[str, Any]]:
    """What differs between the (parsed) stored fingerprint and ``model``: ``(differences, found summary)``.

    The summary also lists the tensors ``compared``, ``skipped`` (unreadable: name and shape only) and checked
    ``loose`` (to the dtype's rounding only).
    """
    base = _unwrap(model)
    weights = _weights(base)
    found: dict[str, Any] = _describe_model(base, weights)
    diffs = [
        f"{label} {expected[key]!r} expected, {found[key]!r} found"
        for key, label in _LABELS.items()
        if expected.get(key) is not None and found.get(key) is not None and expected[key] != found[key]
    ]
    if expected["structure_hash"] != found["structure_hash"]:
        diffs.append("the weight names/shapes differ")
    if diffs:
        return diffs, found
    if expected["version"] == 1:
        res = _v1_differences(expected, weights)
        bad = [f"{n}: expected {np.array2string(a[:3], precision=4)}, found {np.array2string(b[:3], precision=4)}"
               for n, a, b in res["mismatched"]]  # fmt: skip
        scope = "sampled tensors"
    else:
        res = _sketch_differences(expected, weights, f"adapter {adapter!r}: " if adapter else "")
        bad = [f"{c.name} rows {c.rows[0]}-{c.rows[1]} (relative change {c.change:.1e})" for c in res["mismatched"]]
        scope = "tensors"
    found.update(compared_tensors=len(res["compared"]), skipped=res["skipped"], loose=res["loose"])
    if bad:
        diffs.append(f"the weights differ ({len(bad)} of {len(res['compared'])} {scope}: {_first(bad, 3)})")
    return diffs, found


def _notes(found: Mapping[str, Any]) -> list[str]:
    notes = []
    if found.get("skipped"):
        notes.append(
            f"{len(found['skipped'])} of {found['num_tensors']} weights could not be read (meta device without an "
            f"offload map, or packed/quantized) and were checked by name and shape only: {_first(found['skipped'])}"
        )
    if found.get("loose"):
        (_, was, now), names = found["loose"][0], [n for n, _, _ in found["loose"]]
        notes.append(
            f"{len(names)} weights were fingerprinted in {was} and are loaded in {now}, two roundings of an unknown "
            f"original, so they were checked only to bfloat16 precision (a change below {LOOSE:.1e} of a tensor "
            f"passes): {_first(names)}"
        )
    return notes


def check_fingerprint(
    expected: Union[None, str, Mapping[str, Any]],
    model: nn.Module,
    *,
    strict: bool = True,
    adapter: Optional[str] = None,
) -> list[str]:
    """Check that ``model`` is the base the adapter was compressed against.

    Raises :class:`BaseModelMismatchError` naming the expected and the found base and the first differing tensors
    (or warns with :class:`BaseModelMismatchWarning` when ``strict`` is false). Returns the list of differences
    (empty when the bases match). An adapter without a fingerprint cannot be checked: a warning says so. A check that
    passed but saw less than usual (see :class:`WeakBaseCheckWarning`) says so in a warning.
    """
    fp = parse_fingerprint(expected, adapter=adapter)
    who = f"adapter {adapter!r}" if adapter else "this adapter"
    if fp is None:
        note = f"{who} carries no base-model fingerprint; cannot check that it is loaded onto the right base"
        warnings.warn(note, BaseModelMismatchWarning, stacklevel=2)
        return []
    if fp["version"] == 1 and who not in _V1_NOTED:
        _V1_NOTED.add(who)
        note = f"{who} carries a version-1 base fingerprint (16 values of at most 64 weights): the base check is "
        note += "weaker (most weights unchecked); compress again with this version for a check of every weight"
        warnings.warn(note, WeakBaseCheckWarning, stacklevel=2)
    diffs, found = fingerprint_differences(fp, model, adapter=adapter)
    notes = _notes(found)
    if not diffs:
        if notes:
            warnings.warn(f"base check of {who}: {'; '.join(notes)}", WeakBaseCheckWarning, stacklevel=2)
        return []
    message = (
        f"{who} was compressed against base {describe_fingerprint(fp)} but is being loaded onto "
        f"{describe_fingerprint(found)}: {'; '.join(diffs)}. Load it onto the base it was made for"
        + (", or pass strict=False to load it anyway (its outputs will be wrong)." if strict else ".")
        + "".join(f" Note: {n}." for n in notes)
    )
    if strict:
        raise BaseModelMismatchError(message)
    warnings.warn(message, BaseModelMismatchWarning, stacklevel=2)
    return diffs


def fingerprint_json(model: nn.Module) -> str:
    """:func:`compute_fingerprint` as compact JSON text (for a ``str``-typed config field)."""
    return json.dumps(compute_fingerprint(model), separators=(",", ":"), sort_keys=True)


fingerprint_model = compute_fingerprint  # the older name, kept for callers
