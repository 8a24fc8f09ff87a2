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
packed without a dense view) by shape only, each with a :class:`WeakBaseCheckWarning`. A packed quantized linear
that exposes its dequantized weight (AMLQ) is sketched by that weight. A quantized base whose
``quantization_config.source_fingerprint`` matches the adapter's fingerprint is the quantization of the adapter's own
base: the adapter loads with a :class:`QuantizedBaseWarning` naming the expected loss instead of an error. Version-1
fingerprints (16 values of at most 64 tensors) are still checked, with a one-time note. An integrity check, not a
security boundary (the seeds are public).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from ..errors import (
    BaseModelMismatchError,
    BaseModelMismatchWarning,
    ConfigError,
    QuantizedBaseWarning,
    WeakBaseCheckWarning,
    user_stacklevel,
)
from .weight_sketch import (
    FINGERPRINT_VERSION,
    LOOSE,
    BaseWeight,
    _canonical,
    base_weights,
    decode_sketch,
    describe_model,
    readable,
    sketch_differences,
    sketch_model,
    unwrap,
)

_V1 = {"rtol": 1.0 / 64, "mean": 1.0 / 128, "atol": 1e-3}  # version-1 value tolerances
_V1_NOTED: set[str] = set()
_KEYS = {"version", "name_or_path", "architecture", "model_type", "vocab_size", "hidden_size", "num_hidden_layers"}
_KEYS |= {"num_parameters", "num_tensors", "structure_hash", "sketch"}
_LABELS = {"architecture": "architecture", "model_type": "model type", "vocab_size": "vocabulary size",
           "hidden_size": "hidden size", "num_hidden_layers": "number of layers"}  # fmt: skip

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

# --- version 1: values sampled at fixed positions of at most 64 tensors (adapters made before the sketch) ----------


def _v1_sample(t: torch.Tensor, name: str, k: int) -> np.ndarray:
    idx = [int.from_bytes(hashlib.sha256(f"{name}#{j}".encode()).digest()[:8], "little") % t.numel() for j in range(k)]
    flat = t.detach().reshape(-1)
    return flat[torch.tensor(idx, device=flat.device)].to(torch.float32).cpu().double().numpy()


def _v1_differences(
    fp: Mapping[str, Any], weights: list[BaseWeight], read: Optional[Callable] = None
) -> dict[str, list]:
    samples, by_name = fp["samples"], {w.name: w for w in weights}
    k = int(samples["per_tensor"])
    out: dict[str, list] = {"mismatched": [], "loose": [], "skipped": [], "compared": []}
    for want, name in zip(decode_sketch(samples["values"]).astype(np.float64).reshape(-1, k), samples["tensors"]):
        t = readable(by_name[name]) if name in by_name else None
        if t is None and read is not None and name in by_name and by_name[name].tensor.device.type == "meta":
            t = read(by_name[name])
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


def compute_fingerprint(model: nn.Module, read: Optional[Callable[[BaseWeight], Optional[torch.Tensor]]] = None) -> dict[str, Any]:
    """Fingerprint of ``model`` (a transformers model, or a ``PeftModel`` whose base is fingerprinted).

    JSON-serialisable; store it in ``DeltaCoMeConfig.base_fingerprint``. Reads every weight once (on its device);
    ``read(weight)`` supplies the values of meta weights (a model streamed from its checkpoint files).
    """
    base = unwrap(model)
    weights = base_weights(base)
    return {"version": FINGERPRINT_VERSION, **describe_model(base, weights), "sketch": sketch_model(weights, read)}


def _first_rows(base: nn.Module, weights: list[BaseWeight], rows: int) -> list[BaseWeight]:
    """The weights as the base held them before its vocabulary grew to ``rows``+ tokens for an adapter of a
    fine-tune that added tokens (:class:`~hf_deltacome.config.DeltaCoMeConfig` ``base_vocab_size``)."""
    vocab = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(base, get, lambda: None)()
        name = next((n for n, m in base.named_modules(remove_duplicate=False) if m is module), None)
        if module is not None and name is not None:
            vocab += [_canonical(f"{name}.{leaf}") for leaf in ("weight", "bias")]
    return [
        BaseWeight(w.name, (rows, *w.shape[1:]), w.module, w.attr, w.tensor[:rows])
        if w.name in vocab and w.shape and w.shape[0] > rows else w
        for w in weights
    ]


def _validate(fp: dict) -> None:
    if not isinstance(fp.get("structure_hash"), str):
        raise ValueError("no structure_hash")
    if fp.get("version") == 1:
        samples = fp["samples"]
        k, names = samples["per_tensor"], list(samples["tensors"])
        if not isinstance(k, int) or k < 1 or not all(isinstance(n, str) for n in names):
            raise ValueError("bad sample list")
        if decode_sketch(samples["values"]).size != k * len(names):
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
    decode_sketch(sk["bf16"]), decode_sketch(sk["fp16"])


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
    expected: Mapping[str, Any],
    model: nn.Module,
    *,
    adapter: Optional[str] = None,
    vocab_rows: Optional[int] = None,
    read: Optional[Callable[[BaseWeight], Optional[torch.Tensor]]] = None,
) -> tuple[list[str], dict[str, Any]]:
    """What differs between the (parsed) stored fingerprint and ``model``: ``(differences, found summary)``.

    The summary also lists the tensors ``compared``, ``skipped`` (unreadable: name and shape only) and checked
    ``loose`` (to the dtype's rounding only). ``vocab_rows``: only the first rows of the embeddings and ``lm_head``
    are the base's (an adapter of a fine-tune that added tokens grew them). ``read(weight)`` supplies the values of
    meta weights (a base streamed from its checkpoint files, version-2 fingerprints).
    """
    base = unwrap(model)
    weights = base_weights(base)
    if vocab_rows is not None:
        weights = _first_rows(base, weights, vocab_rows)
    found: dict[str, Any] = describe_model(base, weights)
    if vocab_rows is not None and found.get("vocab_size") is not None and found["vocab_size"] > vocab_rows:
        found["vocab_size"] = vocab_rows
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
        res = _v1_differences(expected, weights, read)
        bad = [f"{n}: expected {np.array2string(a[:3], precision=4)}, found {np.array2string(b[:3], precision=4)}"
               for n, a, b in res["mismatched"]]  # fmt: skip
        scope = "sampled tensors"
    else:
        res = sketch_differences(expected, weights, f"adapter {adapter!r}: " if adapter else "", read)
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
    vocab_rows: Optional[int] = None,
    read: Optional[Callable[[BaseWeight], Optional[torch.Tensor]]] = None,
) -> list[str]:
    """Check that ``model`` is the base the adapter was compressed against (``read``: see
    :func:`fingerprint_differences`).

    Raises :class:`BaseModelMismatchError` naming the expected and the found base and the first differing tensors
    (or warns with :class:`BaseModelMismatchWarning` when ``strict`` is false). Returns the list of differences
    (empty when the bases match). An adapter without a fingerprint cannot be checked: a warning says so. A check that
    passed but saw less than usual (see :class:`WeakBaseCheckWarning`) says so in a warning.
    """
    fp = parse_fingerprint(expected, adapter=adapter)
    who = f"adapter {adapter!r}" if adapter else "this adapter"
    if fp is None:
        note = f"{who} carries no base-model fingerprint; cannot check that it is loaded onto the right base"
        warnings.warn(note, BaseModelMismatchWarning, stacklevel=user_stacklevel())
        return []
    if fp["version"] == 1 and who not in _V1_NOTED:
        _V1_NOTED.add(who)
        note = f"{who} carries a version-1 base fingerprint (16 values of at most 64 weights): the base check is "
        note += "weaker (most weights unchecked); compress again with this version for a check of every weight"
        warnings.warn(note, WeakBaseCheckWarning, stacklevel=user_stacklevel())
    diffs, found = fingerprint_differences(fp, model, adapter=adapter, vocab_rows=vocab_rows, read=read)
    notes = _notes(found)
    if not diffs:
        if notes:
            warnings.warn(f"base check of {who}: {'; '.join(notes)}", WeakBaseCheckWarning, stacklevel=user_stacklevel())
        return []
    note = quantized_source_note(fp, model)  # the quantization of the adapter's own base: warn, do not refuse
    if note is not None:
        warnings.warn(f"{who} was {note}", QuantizedBaseWarning, stacklevel=user_stacklevel())
        return diffs
    message = (
        f"{who} was compressed against base {describe_fingerprint(fp)} but is being loaded onto "
        f"{describe_fingerprint(found)}: {'; '.join(diffs)}. Load it onto the base it was made for"
        + (", or pass strict=False to load it anyway (its outputs will be wrong)." if strict else ".")
        + "".join(f" Note: {n}." for n in notes)
    )
    if strict:
        raise BaseModelMismatchError(message)
    warnings.warn(message, BaseModelMismatchWarning, stacklevel=user_stacklevel())
    return diffs


def _same_source(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two version-2 fingerprints describe the same weights (same structure, sketches equal to float32)."""
    if a.get("version") != FINGERPRINT_VERSION or b.get("version") != FINGERPRINT_VERSION:
        return False
    if a["structure_hash"] != b["structure_hash"] or a["sketch"]["dtypes"].lower() != b["sketch"]["dtypes"].lower():
        return False
    za, zb = decode_sketch(a["sketch"]["bf16"]), decode_sketch(b["sketch"]["bf16"])
    scale = float(np.abs(za).max()) if za.size else 0.0
    return za.shape == zb.shape and bool(np.allclose(za, zb, rtol=1e-5, atol=1e-6 * scale))


def quantized_source_note(expected: Mapping[str, Any], model: nn.Module) -> Optional[str]:
    """If ``model`` is a quantization (``quantization_config.source_fingerprint``) of the base ``expected``
    fingerprints, the warning to give when an adapter made against that base is loaded onto it; else ``None``."""
    cfg = getattr(getattr(unwrap(model), "config", None), "quantization_config", None)
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    if cfg is None or not get("source_fingerprint"):
        return None
    try:
        source = parse_fingerprint(get("source_fingerprint"))
    except ConfigError:
        return None
    if source is None or not _same_source(source, expected):
        return None
    info = get("info") or {}
    ppl = info.get("calibration_perplexity") or {}
    loss = ""
    if ppl.get("full_precision") and ppl.get("quantized"):
        fp, q = float(ppl["full_precision"]), float(ppl["quantized"])
        loss = (f"; expected loss: the base's own quantization error, calibration perplexity {fp:.3f} -> {q:.3f} "
                f"({100 * (q / fp - 1):+.1f}%) measured when it was quantized")  # fmt: skip
    bpw = float(info.get("true_bpw", get("bpw") or 0.0))
    return (f"compressed against the full-precision base, loaded onto its {get('quant_method')} quantization at "
            f"{bpw:.3f} bits per weight: the adapter does not correct the base's quantization error{loss}. Compress "
            "the fine-tune against the quantized base (hf_deltacome.compress(quantized_base, finetuned, ...)) to "
            "absorb it")  # fmt: skip


def fingerprint_json(model: nn.Module, read: Optional[Callable[[BaseWeight], Optional[torch.Tensor]]] = None) -> str:
    """:func:`compute_fingerprint` as compact JSON text (for a ``str``-typed config field)."""
    return json.dumps(compute_fingerprint(model, read), separators=(",", ":"), sort_keys=True)


fingerprint_model = compute_fingerprint  # the older name, kept for callers
