"""Reading Delta-CoMe adapter files: the one reader, with validation before anything reaches a model.

Only safetensors is ever read (never ``torch.load``/pickle), through ``safetensors.safe_open``; every failure (bad
header, truncated file, unsupported dtype) becomes an :class:`AdapterFileError` naming the file and, where it
applies, the tensor. :func:`validate_adapter_state_dict` checks the tensors against ``adapter_config.json``'s
``layout`` (names, shapes and dtypes from the format spec :func:`~hf_deltacome.format.storage.layout_tensors`,
NaN/Inf, zero points, packing padding). File names are PEFT's own (``adapter_config.json``,
``adapter_model.safetensors``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft.utils.constants import CONFIG_NAME as ADAPTER_CONFIG_NAME
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from peft.utils.constants import WEIGHTS_NAME as PICKLE_WEIGHTS_NAME

from ..config import DeltaCoMeConfig
from ..errors import AdapterFileError, ConfigError, DeltaCoMeError, user_stacklevel
from ..format.draws import entry_draws
from ..format.storage import PackedDelta, TensorSpec, layout_tensors, plane_bits, sparse_band_masks
from .atomic import PathLike, PinnedFiles, file_sha256, recover_folder, wait_for_swap

STATE_DICT_PREFIX = "base_model.model."
# dense extras (modules_to_save: norms, embeddings, lm_head) are floating weights
EXTRA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# every float in an adapter file (dense extras, singular values, quantization scales, bias deltas) stays below this:
# weights of released LLMs stay below ~1e3 and a fine-tune's delta is smaller than the weights; the cap catches
# corrupted exponents (1e30, 3e38) that would load and then overflow to inf in the forward pass
MAX_ABS = 1e6
DELTA_MARKER = ".deltacome_delta."
BLOB_SUFFIX = ".deltacome_delta.blob"  # format 2: one tensor per module
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def is_adapter_folder(path: PathLike) -> bool:
    """Whether ``path`` is a local PEFT adapter folder (``adapter_config.json``, no model ``config.json``)."""
    folder = Path(path)
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


# safetensors dtype names -> torch dtypes (sizes for byte counts come from the torch dtype)
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None), "U64": getattr(torch, "uint64", None),
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# safetensors
# ------------------------------------------------------------------------------------------------------------


def _open(path: str, source: Optional[str] = None) -> Any:
    """``safe_open`` of ``source`` (default ``path``) with its errors (truncated file, bad header, overlapping tensors)
    as `AdapterFileError` naming ``path``."""
    from safetensors import safe_open

    if not isinstance(path, str):
        raise AdapterFileError(f"{path!r}: not a file path")
    if path.endswith(PICKLE_SUFFIXES):
        raise AdapterFileError(
            f"{path}: refusing to read a pickle file; Delta-CoMe adapters are read only as safetensors"
        )
    if source is None and not os.path.isfile(path):
        raise AdapterFileError(f"{path}: adapter weights file not found")
    try:
        return safe_open(source or path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError (header, offsets, coverage, nesting) or OSError
        text = str(e)
        if "JSON" in text:
            why = "bad safetensors header: not valid JSON"
        elif "not fully covered" in text:
            why = "truncated or padded safetensors file (the tensors do not cover the data section)"
        else:
            why = "bad safetensors header (truncated, or not a safetensors file)"
        raise AdapterFileError(f"{path}: {why}: {text}") from e


def read_safetensors_header(path: PathLike) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """``({name: (dtype name, shape)}, metadata)`` of a safetensors file, checked, without reading any tensor."""
    path = os.fspath(path)
    with _open(path) as f:
        header = {}
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            sl = f.get_slice(name)
            header[name] = (sl.get_dtype(), list(sl.get_shape()))
        return header, dict(f.metadata() or {})


def tensor_nbytes(dtype_name: str, shape: list[int]) -> int:
    """Bytes a tensor of safetensors dtype ``dtype_name`` and ``shape`` takes in the file."""
    dtype = SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        raise AdapterFileError(f"unsupported safetensors dtype {dtype_name!r}")
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def read_safetensors(
    path: PathLike, device: Union[str, torch.device] = "cpu", *, source: Optional[str] = None
) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file (never pickle), raising :class:`AdapterFileError` naming the file.
    ``source`` reads another name of the same file (:func:`pinned`) while errors still name ``path``."""
    path = os.fspath(path)
    out: dict[str, torch.Tensor] = {}
    with _open(path, source) as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            try:
                out[name] = f.get_tensor(name)
            except Exception as e:  # e.g. a dtype torch cannot hold
                raise AdapterFileError(f"{path}: cannot read tensor {name!r}: {e}") from e
    if str(device) != "cpu":
        out = {k: v.to(device) for k, v in out.items()}
    return out


# ------------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------------


def read_adapter_config(path: PathLike, *, shown: Optional[str] = None) -> DeltaCoMeConfig:
    """Parse ``adapter_config.json`` (a file or the folder holding it) into a validated `DeltaCoMeConfig`.

    Any problem (unreadable, not JSON, not a DELTACOME config, invalid layout) is a :class:`ConfigError` naming the
    file (``shown``, when ``path`` is another name of it).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, ADAPTER_CONFIG_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{shown or path}: cannot read adapter config: {e.strerror}") from e
    path = shown or path
    data = parse_config_json(raw, path)
    if data.get("peft_type") != "DELTACOME":
        hint = " (PEFT reads it case-sensitively)" if str(data.get("peft_type")).upper() == "DELTACOME" else ""
        raise ConfigError(f"{path}: peft_type is {data.get('peft_type')!r}, not 'DELTACOME'{hint}")
    data.pop("runtime_config", None)
    known = {f.name for f in DeltaCoMeConfig.__dataclass_fields__.values()}
    unknown = sorted(set(data) - known - {"peft_type"})
    if unknown:  # written by a newer version: ignored, as PEFT does
        warnings.warn(f"{path}: ignoring unknown field(s) {unknown} of a DELTACOME adapter config", stacklevel=user_stacklevel())
        for key in unknown:
            del data[key]
    data.pop("peft_type", None)
    try:
        config = DeltaCoMeConfig(**data)
    except DeltaCoMeError as e:
        raise type(e)(f"{path}: {e}") from e
    except Exception as e:  # any failure to build the config from its fields means the file is invalid
        raise ConfigError(f"{path}: invalid adapter config: {e}") from e
    if not config.layout:
        raise ConfigError(f"{path}: its layout is empty: a saved adapter lists every module it changes")
    return config


def parse_config_json(raw: bytes, path: str) -> dict:
    """The JSON object of an adapter config file; bad UTF-8, bad or too deeply nested JSON are a `ConfigError`."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _specs(entry_json: str, group_size: int, parts: bool) -> tuple[tuple[str, TensorSpec], ...]:
    return tuple(layout_tensors(json.loads(entry_json), group_size, parts=parts).items())


def entry_tensors(entry: dict, group_size: int, *, parts: bool = False) -> dict[str, TensorSpec]:
    """:func:`~hf_deltacome.format.storage.layout_tensors`, remembered per distinct layout entry (a model's modules
    share a few entries, and adapters loaded onto one base share them all: loading many stays fast)."""
    try:
        text = json.dumps(entry, sort_keys=True)
    except TypeError:  # not plain JSON (an entry built in memory): not remembered
        return layout_tensors(entry, group_size, parts=parts)
    return dict(_specs(text, group_size, parts))


def expected_delta_tensors(config: DeltaCoMeConfig, prefix: str = STATE_DICT_PREFIX) -> dict[str, TensorSpec]:
    """Every packed tensor the layout requires, by PEFT's saved key (``<prefix><module>.deltacome_delta.<key>``)."""
    out: dict[str, TensorSpec] = {}
    for module, entry in config.layout.items():
        for key, spec in entry_tensors(entry, config.group_size).items():
            out[f"{prefix}{module}.deltacome_delta.{key}"] = spec
    return out


def packed_delta(config: DeltaCoMeConfig, state_dict: Mapping[str, torch.Tensor], module: str) -> PackedDelta:
    """The `PackedDelta` of ``module`` filled from a read adapter's tensors (what PEFT's load puts into the layer),
    for code that works on the file without a model: LoRA export, streamed merge."""
    packed = PackedDelta.from_layout(config.layout[module], config.group_size)
    prefix = f"{STATE_DICT_PREFIX}{module}{DELTA_MARKER}"
    packed.load_state_dict({k[len(prefix) :]: t for k, t in state_dict.items() if k.startswith(prefix)})
    return packed


def as_blobs(config: DeltaCoMeConfig, state_dict: dict[str, torch.Tensor], prefix: str = STATE_DICT_PREFIX) -> dict:
    """``state_dict`` (validated) with each format-1 module's parts gathered into its runtime ``blob`` key.

    At run time every module holds one blob (``format/blob.py``), whatever its file format; loaders that set tensors
    by attribute path (transformers' ``load_adapter``) need that one key, not a key per part of a format-1 file."""
    out = dict(state_dict)
    for module, entry in config.layout.items():
        if entry.get("format", 1) >= 2:
            continue
        head = f"{prefix}{module}.deltacome_delta."
        packed = PackedDelta.from_layout(entry, config.group_size)
        packed.load_state_dict({k[len(head) :]: out.pop(k) for k in list(out) if k.startswith(head)})
        out[head + "blob"] = packed.blob
    return out


TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"  # PEFT's trainable tokens: the rows of added tokens


def _is_extra_key(key: str, config: DeltaCoMeConfig, prefix: str) -> bool:
    name = key[len(prefix) :] if key.startswith(prefix) else key
    if name.endswith(TOKENS_SUFFIX):
        return name[: -len(TOKENS_SUFFIX)] in (getattr(config, "trainable_token_indices", None) or {})
    module = name.rsplit(".", 1)[0] if "." in name else ""
    dotted = f".{module}."
    # a parameter of the target itself or of any submodule of it (a whole vision-embeddings block, say)
    return any(f".{target}." in dotted for target in config.modules_to_save or [])


def _padding_ok(qweight: torch.Tensor, cols: int, bits: int) -> bool:
    """Whether the unused high bits of each row's last int32 word are zero (packing pads with zeros)."""
    per = 32 // bits
    used = cols % per
    if used == 0 or qweight.numel() == 0:
        return True
    last = qweight[:, -1].to(torch.int64) & 0xFFFFFFFF
    return bool(((last >> (used * bits)) == 0).all())


def validate_adapter_state_dict(
    config: DeltaCoMeConfig,
    state_dict: Mapping[str, torch.Tensor],
    filename: PathLike,
    *,
    prefix: str = STATE_DICT_PREFIX,
) -> None:
    """Check a loaded adapter state dict against its config before it touches the model.

    Checks, each failure an :class:`AdapterFileError` naming ``filename`` and the tensor: every tensor the
    ``layout`` requires is present with the exact shape and dtype (config/tensor disagreement), no unknown
    ``deltacome_delta`` tensor and no tensor outside the layout and ``modules_to_save``, dense extras in float16,
    bfloat16 or float32, no NaN/Inf and no ``|x| > MAX_ABS`` in float tensors, zero points within
    ``[0, 2**bits - 1]`` and zero packing padding in the last word of each row.
    """
    filename = os.fspath(filename)
    _check_masks(config, filename)
    expected = expected_delta_tensors(config, prefix)
    present = set(state_dict)
    missing = sorted(set(expected) - present)
    if missing:
        raise AdapterFileError(
            f"{filename}: the weights file lacks {len(missing)} tensor(s) that adapter_config.json's layout "
            f"requires, e.g. {missing[0]!r}"
        )
    for key in sorted(present - set(expected)):
        if DELTA_MARKER in key or key.endswith(".deltacome_delta"):
            raise AdapterFileError(
                f"{filename}: unknown tensor {key!r}: adapter_config.json's layout has no such band/module "
                "(config and weights disagree)"
            )
        if not _is_extra_key(key, config, prefix):
            raise AdapterFileError(
                f"{filename}: unexpected tensor {key!r}: it is neither a packed delta of the layout nor part of "
                f"modules_to_save {sorted(config.modules_to_save or [])} or of the added tokens' rows"
            )
    for key in sorted(present):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise AdapterFileError(f"{filename}: entry {key!r} is a {type(t).__name__}, not a tensor")
        if key not in expected:
            _check_extra(t, key, filename)
            continue
        shape, dtype, bits, cols, _ = expected[key]
        if t.dtype != dtype:
            raise AdapterFileError(
                f"{filename}: tensor {key!r} has dtype {t.dtype}, adapter_config.json's layout needs {dtype}"
            )
        if tuple(t.shape) != shape:
            raise AdapterFileError(
                f"{filename}: tensor {key!r} has shape {list(t.shape)}, adapter_config.json's layout needs "
                f"{list(shape)} (config and weights disagree)"
            )
        if key.endswith(BLOB_SUFFIX):  # format 2: check every part inside the module's blob
            entry = config.layout[key[len(prefix) : -len(BLOB_SUFFIX)]]
            for part, spec in entry_tensors(entry, config.group_size, parts=True).items():
                nbytes = math.prod(spec.shape) * spec.dtype.itemsize
                view = t[spec.offset : spec.offset + nbytes].view(spec.dtype).view(spec.shape)
                _check_codes(filename, f"{key}[{part}]", view, spec.bits, spec.cols)
            continue
        _check_codes(filename, key, t, bits, cols)


def _check_masks(config: DeltaCoMeConfig, filename: str) -> None:
    """The seeded masks of every sparse band (impart, the sparse tail), regenerated: their counts must be the
    layout's ``nnz`` (another seed or keep-rate would scatter the stored values to the wrong entries)."""
    for name, entry in config.layout.items():
        m, n = entry["shape"]
        for k, band in enumerate(entry.get("sparse_bands", [])):
            if band["rank"] > 0:
                mv, mu = sparse_band_masks(m, n, band["rank"], band["keep"], band["seed"], entry_draws(band))
                if [int(mv.sum()), int(mu.sum())] != list(band["nnz"]):
                    raise AdapterFileError(
                        f"{filename}: module {name!r}, sparse band {k}: the masks regenerated from seed {band['seed']} "
                        f"and keep {band['keep']} keep {[int(mv.sum()), int(mu.sum())]} entries, the layout's nnz says "
                        f"{band['nnz']} (config and weights disagree)"
                    )


def _check_codes(filename: str, key: str, t: torch.Tensor, bits: int, cols: Optional[int]) -> None:
    """Zero points in range for ``bits``-bit codes, zero packing padding, finite and sane floats."""
    leaf = key.rstrip("]")
    if leaf.endswith("zeros") and t.numel() and int(t.max()) > (1 << bits) - 1:
        raise AdapterFileError(
            f"{filename}: tensor {key!r} has zero point {int(t.max())}, out of range for {bits}-bit codes"
        )
    if cols is not None and not _padding_ok(t, cols, plane_bits(leaf, bits)):
        raise AdapterFileError(f"{filename}: tensor {key!r} has non-zero padding bits: the packed codes are corrupted")
    _check_finite(t, key, filename)


def _check_finite(t: torch.Tensor, key: str, filename: str) -> None:
    """Float tensors: no NaN/Inf, ``|x| <= MAX_ABS``."""
    if not t.is_floating_point() or not t.numel():
        return
    if not bool(torch.isfinite(t).all()):
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise AdapterFileError(f"{filename}: tensor {key!r} contains {kind} values")
    peak = float(t.abs().max())
    if peak > MAX_ABS:
        raise AdapterFileError(
            f"{filename}: tensor {key!r} holds |x| = {peak:.3g}, above {MAX_ABS:.0e}: not a weight or delta "
            "(corrupted file?)"
        )


def _check_extra(t: torch.Tensor, key: str, filename: str) -> None:
    """A dense extra (``modules_to_save``) is a float16/bfloat16/float32 weight, finite, ``|x| <= MAX_ABS``."""
    if t.dtype not in EXTRA_DTYPES:
        raise AdapterFileError(
            f"{filename}: dense extra {key!r} has dtype {t.dtype}; only float16, bfloat16 and float32 are accepted"
        )
    _check_finite(t, key, filename)


def _file_state(path: str) -> Optional[tuple[int, int, int, int]]:
    """What identifies the file at ``path`` now (a save puts new files there), ``None`` if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_adapter_weights(
    config: DeltaCoMeConfig, path: PathLike, *, source: Optional[str] = None
) -> dict[str, torch.Tensor]:
    """Read and validate ``adapter_model.safetensors`` for ``config``; when the config records ``weights_sha256``
    the file must be the very one saved with it (weights and config of two different saves are refused). The file
    is read and hashed through one open handle (``source``, else pinned here: `PinnedFiles`), so a save replacing
    the folder meanwhile cannot mix two files."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    if source is None and not os.path.exists(path):  # set aside for an instant by a save's two-rename swap
        wait_for_swap(folder)
    with PinnedFiles(folder, [name]) as pin:
        source = source or pin.path(name)
        state_dict = read_safetensors(path, source=source)
        validate_adapter_state_dict(config, state_dict, path)
        if config.weights_sha256 is not None and file_sha256(source) != config.weights_sha256:
            raise AdapterFileError(
                f"{path}: its sha256 is not adapter_config.json's weights_sha256: weights and config come from "
                "different saves (or the folder was replaced between reading the two: load again)"
            )
    return state_dict


_READ_ATTEMPTS = 5


def read_adapter(folder: PathLike) -> tuple[DeltaCoMeConfig, dict[str, torch.Tensor]]:
    """Read and validate a saved adapter folder: ``(config, state_dict)``; every failure is a `DeltaCoMeError`.

    Config and weights always come from one save: both files are opened back to back and read through those
    handles; if a concurrent save swapped the folder between the two opens (the weights' sha256 then differs from
    the config's ``weights_sha256``), the folder is read again.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        recover_folder(folder)  # a save killed between the two renames of the fallback swap
    config_path, weights = os.path.join(folder, ADAPTER_CONFIG_NAME), os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    for attempt in range(_READ_ATTEMPTS):
        wait_for_swap(folder)  # a concurrent save between the two renames of the fallback swap
        seen = (_file_state(config_path), _file_state(weights))
        try:
            with PinnedFiles(folder, (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)) as pin:  # opened back to back
                config = read_adapter_config(pin.path(ADAPTER_CONFIG_NAME), shown=config_path)
                if not os.path.isfile(pin.path(ADAPTER_WEIGHTS_NAME)):
                    _raise_missing_weights(folder)
                return config, read_adapter_weights(config, weights, source=pin.path(ADAPTER_WEIGHTS_NAME))
        except DeltaCoMeError:
            if attempt + 1 == _READ_ATTEMPTS or (_file_state(config_path), _file_state(weights)) == seen:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _raise_missing_weights(where: str) -> None:
    if os.path.isfile(os.path.join(where, PICKLE_WEIGHTS_NAME)):
        raise AdapterFileError(
            f"{where}: only {PICKLE_WEIGHTS_NAME} (a pickle) is present; Delta-CoMe adapters are read only from "
            f"{ADAPTER_WEIGHTS_NAME} and pickles are never loaded"
        )
    raise AdapterFileError(f"{where}: {ADAPTER_WEIGHTS_NAME} not found")
