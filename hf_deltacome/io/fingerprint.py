"""Fingerprint of the base model a delta was computed against, stored in the adapter and checked at load.

A fingerprint says *what* the base is (architecture, model type, vocabulary, hidden size, depth, parameter count),
*how it is built* (a hash of every weight's canonical name and logical shape) and *which weights it has* (a few
values sampled at fixed pseudo-random positions of up to 64 weight tensors). Values are compared with a relative
tolerance, so the same base loaded in float32, bfloat16 or float16 matches while another checkpoint of the same
architecture does not. It is cheap (a few hundred scalar reads) and works on bases spread with ``device_map`` or
offloaded by accelerate (offloaded weights are read from the offload map; weights that cannot be read, e.g.
packed quantized ones, are compared by shape only).

Names are canonicalised so the fingerprint of a base is the same before and after PEFT wrapped it
(``.base_layer``, ``ModulesToSaveWrapper.original_module`` and adapter sub-modules are folded away).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from ..errors import BaseModelMismatchError, BaseModelMismatchWarning, ConfigError

FINGERPRINT_VERSION = 1
SAMPLES_PER_TENSOR = 16
MAX_SAMPLED_TENSORS = 64
RTOL = 1.0 / 64  # no single value may move more than this (bfloat16 rounding moves it at most 2**-9)
MEAN_RTOL = 1.0 / 128  # nor the mean relative deviation of a tensor's samples (bf16 rounding: about 2**-10)
ATOL_FRACTION = 1e-3  # absolute slack relative to the tensor's largest sampled magnitude (float16 underflow)

_WRAPPER_SEGMENTS = ("base_layer", "original_module")


# ------------------------------------------------------------------------------------------------------------
# strictness
# ------------------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------------------
# walking the base model
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _Weight:
    name: str  # canonical
    shape: tuple[int, ...]  # logical shape (out, in) for linear-like modules, else the tensor's shape
    module: nn.Module
    attr: str
    tensor: torch.Tensor

    @property
    def sampleable(self) -> bool:
        t = self.tensor
        return (
            t.is_floating_point()
            and t.element_size() >= 2
            and tuple(t.shape) == self.shape
            and math.prod(self.shape) > 0
        )


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
        linear_like = isinstance(getattr(module, "in_features", None), int) and isinstance(
            getattr(module, "out_features", None), int
        )
        for pname, p in module.named_parameters(recurse=False):
            name = _canonical(f"{mname}.{pname}" if mname else pname)
            if linear_like and pname == "weight":
                shape: tuple[int, ...] = (module.out_features, module.in_features)
            else:
                shape = tuple(p.shape)
            out.setdefault(name, _Weight(name, shape, module, pname, p))
    return [out[k] for k in sorted(out)]


def _readable(w: _Weight) -> Optional[torch.Tensor]:
    """The tensor's values, reading accelerate's offload map for weights left on the meta device."""
    t = w.tensor
    if t.device.type != "meta":
        return t
    hook = getattr(w.module, "_hf_hook", None)
    hooks = list(getattr(hook, "hooks", [])) or ([hook] if hook is not None else [])
    for h in hooks:
        weights_map = getattr(h, "weights_map", None)
        if weights_map is None:
            continue
        with contextlib.suppress(Exception):
            value = weights_map[w.attr]
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                return value
    return None


def _sample_indices(name: str, numel: int, k: int) -> list[int]:
    """``k`` fixed pseudo-random flat positions of a tensor, from its name (same everywhere, forever)."""
    return [int.from_bytes(hashlib.sha256(f"{name}#{j}".encode()).digest()[:8], "little") % numel for j in range(k)]


def _sample(w: _Weight, k: int) -> Optional[list[float]]:
    t = _readable(w)
    if t is None:
        return None
    idx = _sample_indices(w.name, t.numel(), k)
    flat = t.detach().reshape(-1)
    with torch.no_grad():
        values = flat[torch.tensor(idx, device=flat.device)].to(torch.float32).cpu()
    return values.tolist()


def _choose(names: list[str], limit: int) -> list[str]:
    if len(names) <= limit:
        return names
    step = (len(names) - 1) / (limit - 1)
    return [names[round(i * step)] for i in range(limit)]


def _config_value(config: Any, *keys: str) -> Any:
    for key in keys:
        value = getattr(config, key, None)
        if value is None and hasattr(config, "get_text_config"):
            with contextlib.suppress(Exception):
                value = getattr(config.get_text_config(), key, None)
        if value is not None:
            return value
    return None


def _describe_model(base: nn.Module) -> dict[str, Any]:
    config = getattr(base, "config", None)
    archs = _config_value(config, "architectures") if config is not None else None
    return {
        "name_or_path": (getattr(config, "_name_or_path", None) or getattr(base, "name_or_path", None) or None),
        "architecture": (archs[0] if archs else type(base).__name__),
        "model_type": getattr(config, "model_type", None),
        "vocab_size": _config_value(config, "vocab_size"),
        "hidden_size": _config_value(config, "hidden_size", "d_model", "n_embd"),
        "num_hidden_layers": _config_value(config, "num_hidden_layers", "n_layer", "num_layers"),
    }


def _structure_hash(weights: list[_Weight]) -> str:
    text = "\n".join(f"{w.name}:{'x'.join(map(str, w.shape))}" for w in weights)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _encode(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def _decode(text: str, count: int) -> np.ndarray:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    arr = np.frombuffer(raw, dtype="<f4")
    if arr.size != count:
        raise ValueError(f"expected {count} sampled values, found {arr.size}")
    return arr


# ------------------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------------------


def compute_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Fingerprint of ``model`` (a transformers model, or a ``PeftModel`` whose base is fingerprinted).

    JSON-serialisable; store it in ``DeltaCoMeConfig.base_fingerprint``.
    """
    base = _unwrap(model)
    weights = _weights(base)
    info = _describe_model(base)
    sampleable = [w for w in weights if w.sampleable]
    chosen = set(_choose([w.name for w in sampleable], MAX_SAMPLED_TENSORS))
    names, values = [], []
    for w in sampleable:
        if w.name not in chosen:
            continue
        v = _sample(w, SAMPLES_PER_TENSOR)
        if v is not None:
            names.append(w.name)
            values.extend(v)
    return {
        "version": FINGERPRINT_VERSION,
        **info,
        "num_parameters": sum(math.prod(w.shape) for w in weights),
        "num_tensors": len(weights),
        "structure_hash": _structure_hash(weights),
        "samples": {"per_tensor": SAMPLES_PER_TENSOR, "tensors": names, "values": _encode(values)},
    }


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
    if fp.get("version") != FINGERPRINT_VERSION:
        raise ConfigError(f"{where}base_fingerprint has unsupported version {fp.get('version')!r}")
    samples = fp.get("samples")
    try:
        k = int(samples["per_tensor"])
        names = list(samples["tensors"])
        if k < 1 or not all(isinstance(n, str) for n in names):
            raise ValueError("bad sample list")
        _decode(samples["values"], k * len(names))
    except (TypeError, KeyError, ValueError) as e:
        raise ConfigError(f"{where}base_fingerprint samples are malformed: {e}") from e
    if not isinstance(fp.get("structure_hash"), str):
        raise ConfigError(f"{where}base_fingerprint has no structure_hash")
    return fp


def describe_fingerprint(fp: Mapping[str, Any]) -> str:
    """``name (Architecture, vocab N, P parameters)`` for messages."""
    name = fp.get("name_or_path") or "<unnamed base>"
    parts = [str(fp.get("architecture") or "unknown architecture")]
    if fp.get("vocab_size") is not None:
        parts.append(f"vocab {fp['vocab_size']}")
    if fp.get("num_parameters") is not None:
        parts.append(f"{fp['num_parameters']:,} parameters")
    return f"{name} ({', '.join(parts)})"


def fingerprint_differences(expected: Mapping[str, Any], model: nn.Module) -> tuple[list[str], dict[str, Any]]:
    """What differs between the stored fingerprint and ``model``: ``(differences, found summary)``."""
    base = _unwrap(model)
    weights = _weights(base)
    found: dict[str, Any] = {
        **_describe_model(base),
        "num_parameters": sum(math.prod(w.shape) for w in weights),
        "structure_hash": _structure_hash(weights),
    }
    diffs = []
    for key, label in (
        ("architecture", "architecture"),
        ("model_type", "model type"),
        ("vocab_size", "vocabulary size"),
        ("hidden_size", "hidden size"),
        ("num_hidden_layers", "number of layers"),
    ):
        if expected.get(key) is not None and found.get(key) is not None and expected[key] != found[key]:
            diffs.append(f"{label} {expected[key]!r} expected, {found[key]!r} found")
    if expected["structure_hash"] != found["structure_hash"]:
        diffs.append("the weight names/shapes differ")
    if diffs:
        return diffs, found
    samples = expected["samples"]
    k = int(samples["per_tensor"])
    ref = _decode(samples["values"], k * len(samples["tensors"])).reshape(-1, k)
    by_name = {w.name: w for w in weights}
    mismatched, compared = [], 0
    for row, name in zip(ref, samples["tensors"]):
        w = by_name.get(name)
        if w is None or not w.sampleable:
            continue
        got = _sample(w, k)
        if got is None:
            continue
        compared += 1
        got_arr = np.asarray(got, dtype=np.float64)
        want = row.astype(np.float64)
        atol = ATOL_FRACTION * float(np.abs(want).max()) + 1e-12
        dev = np.abs(got_arr - want)
        if not np.all(dev <= atol + RTOL * np.abs(want)) or float(np.mean(dev / (np.abs(want) + atol))) > MEAN_RTOL:
            mismatched.append((name, want, got_arr))
    if mismatched:
        name, want, got_arr = mismatched[0]
        diffs.append(
            f"the weights differ ({len(mismatched)} of {compared} sampled tensors; e.g. {name}: expected "
            f"{np.array2string(want[:3], precision=4)}, found {np.array2string(got_arr[:3], precision=4)})"
        )
    found["compared_tensors"] = compared
    return diffs, found


def check_fingerprint(
    expected: Union[None, str, Mapping[str, Any]],
    model: nn.Module,
    *,
    strict: bool = True,
    adapter: Optional[str] = None,
) -> list[str]:
    """Check that ``model`` is the base the adapter was compressed against.

    Raises :class:`BaseModelMismatchError` naming the expected and the found base (or warns with
    :class:`BaseModelMismatchWarning` when ``strict`` is false). Returns the list of differences (empty when the
    bases match). An adapter without a fingerprint cannot be checked: a warning says so.
    """
    fp = parse_fingerprint(expected, adapter=adapter)
    who = f"adapter {adapter!r}" if adapter else "this adapter"
    if fp is None:
        warnings.warn(
            f"{who} carries no base-model fingerprint; cannot check that it is loaded onto the right base",
            BaseModelMismatchWarning,
            stacklevel=2,
        )
        return []
    diffs, found = fingerprint_differences(fp, model)
    if not diffs:
        return []
    message = (
        f"{who} was compressed against base {describe_fingerprint(fp)} but is being loaded onto "
        f"{describe_fingerprint(found)}: {'; '.join(diffs)}. Load it onto the base it was made for"
        + (", or pass strict=False to load it anyway (its outputs will be wrong)." if strict else ".")
    )
    if strict:
        raise BaseModelMismatchError(message)
    warnings.warn(message, BaseModelMismatchWarning, stacklevel=2)
    return diffs


def fingerprint_json(model: nn.Module) -> str:
    """:func:`compute_fingerprint` as compact JSON text (for a ``str``-typed config field)."""
    return json.dumps(compute_fingerprint(model), separators=(",", ":"), sort_keys=True)


fingerprint_model = compute_fingerprint  # name used by compress.py
