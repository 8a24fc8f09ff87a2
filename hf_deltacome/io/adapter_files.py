"""Reading Delta-CoMe adapter files: the one reader, with validation before anything reaches a model.

Only safetensors is ever read (never ``torch.load``/pickle), through ``safetensors.safe_open``; every failure (bad
header, truncated file, unsupported dtype) becomes an :class:`AdapterFileError` naming the file and, where it
applies, the tensor. :func:`validate_adapter_state_dict` checks the tensors against ``adapter_config.json``'s
``layout`` (names, shapes and dtypes from the format spec :func:`~hf_deltacome.format.storage.layout_tensors`,
NaN/Inf, zero points, packing padding). File names are PEFT's own (``adapter_config.json``,
``adapter_model.safetensors``).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from peft.utils.constants import CONFIG_NAME as ADAPTER_CONFIG_NAME
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from peft.utils.constants import WEIGHTS_NAME as PICKLE_WEIGHTS_NAME

from ..config import DeltaCoMeConfig
from ..errors import AdapterFileError, ConfigError, DeltaCoMeError
from ..format.storage import TensorSpec, layout_tensors, plane_bits
from .atomic import PathLike

STATE_DICT_PREFIX = "base_model.model."
DELTA_MARKER = ".deltacome_delta."
BLOB_SUFFIX = ".deltacome_delta.blob"  # format 2: one tensor per module
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

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


def _open(path: str) -> Any:
    """``safe_open`` with its errors (truncated file, bad header, overlapping tensors) as `AdapterFileError`."""
    from safetensors import safe_open

    if path.endswith(PICKLE_SUFFIXES):
        raise AdapterFileError(
            f"{path}: refusing to read a pickle file; Delta-CoMe adapters are read only as safetensors"
        )
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: adapter weights file not found")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError (header, offsets, coverage) or OSError
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


def read_safetensors(path: PathLike, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file (never pickle), raising :class:`AdapterFileError` naming the file."""
    path = os.fspath(path)
    out: dict[str, torch.Tensor] = {}
    with _open(path) as f:
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


def read_adapter_config(path: PathLike) -> DeltaCoMeConfig:
    """Parse ``adapter_config.json`` (a file or the folder holding it) into a validated `DeltaCoMeConfig`.

    Any problem (unreadable, not JSON, not a DELTACOME config, invalid layout) is a :class:`ConfigError` naming the
    file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, ADAPTER_CONFIG_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read adapter config: {e}") from e
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if str(data.get("peft_type", "")).upper() != "DELTACOME":
        raise ConfigError(f"{path}: peft_type is {data.get('peft_type')!r}, not 'DELTACOME'")
    data.pop("runtime_config", None)
    known = {f.name for f in DeltaCoMeConfig.__dataclass_fields__.values()}
    unknown = sorted(set(data) - known - {"peft_type"})
    if unknown:  # written by a newer version: ignored, as PEFT does
        warnings.warn(f"{path}: ignoring unknown field(s) {unknown} of a DELTACOME adapter config", stacklevel=2)
        for key in unknown:
            del data[key]
    data.pop("peft_type", None)
    try:
        return DeltaCoMeConfig(**data)
    except DeltaCoMeError as e:
        raise type(e)(f"{path}: {e}") from e
    except Exception as e:  # any failure to build the config from its fields means the file is invalid
        raise ConfigError(f"{path}: invalid adapter config: {e}") from e


# ------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------


def expected_delta_tensors(config: DeltaCoMeConfig, prefix: str = STATE_DICT_PREFIX) -> dict[str, TensorSpec]:
    """Every packed tensor the layout requires, by PEFT's saved key (``<prefix><module>.deltacome_delta.<key>``)."""
    out: dict[str, TensorSpec] = {}
    for module, entry in config.layout.items():
        for key, spec in layout_tensors(entry, config.group_size).items():
            out[f"{prefix}{module}.deltacome_delta.{key}"] = spec
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
    ``deltacome_delta`` tensor and no tensor outside the layout and ``modules_to_save``, no NaN/Inf in float tensors,
    zero points within ``[0, 2**bits - 1]`` and zero packing padding in the last word of each row.
    """
    filename = os.fspath(filename)
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
        if key in expected:
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
                module = key[len(prefix) : -len(BLOB_SUFFIX)]
                entry = config.layout[module]
                for part, spec in layout_tensors(entry, config.group_size, parts=True).items():
                    nbytes = math.prod(spec.shape) * spec.dtype.itemsize
                    view = t[spec.offset : spec.offset + nbytes].view(spec.dtype).view(spec.shape)
                    _check_values(filename, f"{key}[{part}]", view, spec.bits, spec.cols)
                continue
            _check_values(filename, key, t, bits, cols)
        elif t.is_floating_point():
            _check_values(filename, key, t, 0, None)


def _check_values(filename: str, key: str, t: torch.Tensor, bits: int, cols: Optional[int]) -> None:
    """Zero points in range for ``bits``-bit codes, zero packing padding, finite floats."""
    if key.rstrip("]").endswith("zeros") and t.numel() and int(t.max()) > (1 << bits) - 1:
        raise AdapterFileError(
            f"{filename}: tensor {key!r} has zero point {int(t.max())}, out of range for {bits}-bit codes"
        )
    if cols is not None and not _padding_ok(t, cols, plane_bits(key.rstrip("]"), bits)):
        raise AdapterFileError(f"{filename}: tensor {key!r} has non-zero padding bits: the packed codes are corrupted")
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise AdapterFileError(f"{filename}: tensor {key!r} contains {kind} values")


def read_adapter(folder: PathLike) -> tuple[DeltaCoMeConfig, dict[str, torch.Tensor]]:
    """Read and validate a saved adapter folder: ``(config, state_dict)``; every failure is a `DeltaCoMeError`."""
    folder = os.fspath(folder)
    config = read_adapter_config(folder)
    weights = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        _raise_missing_weights(folder)
    state_dict = read_safetensors(weights)
    validate_adapter_state_dict(config, state_dict, weights)
    return config, state_dict


def _raise_missing_weights(where: str) -> None:
    if os.path.isfile(os.path.join(where, PICKLE_WEIGHTS_NAME)):
        raise AdapterFileError(
            f"{where}: only {PICKLE_WEIGHTS_NAME} (a pickle) is present; Delta-CoMe adapters are read only from "
            f"{ADAPTER_WEIGHTS_NAME} and pickles are never loaded"
        )
    raise AdapterFileError(f"{where}: {ADAPTER_WEIGHTS_NAME} not found")


# ------------------------------------------------------------------------------------------------------------
# loading from a folder or the Hub
# ------------------------------------------------------------------------------------------------------------

_HUB_KWARGS = (
    "revision",
    "token",
    "cache_dir",
    "local_files_only",
    "force_download",
    "proxies",
    "repo_type",
    "endpoint",
)


def resolve_adapter_weights(model_id: PathLike, *, subfolder: Optional[str] = None, **hub_kwargs: Any) -> str:
    """Local path of ``adapter_model.safetensors`` for a folder or a Hub repo id (through the HF cache).

    Honours ``revision``, ``token``, ``cache_dir`` and ``HF_HUB_OFFLINE`` (cached files only). A repo that only has
    ``adapter_model.bin`` is refused without downloading it.
    """
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    model_id = os.fspath(model_id)
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        path = os.path.join(local, ADAPTER_WEIGHTS_NAME)
        if not os.path.isfile(path):
            _raise_missing_weights(local)
        return path
    kwargs = {k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS and v is not None}
    if kwargs.get("token") is None and hub_kwargs.get("use_auth_token") is not None:
        kwargs["token"] = hub_kwargs["use_auth_token"]
    if hf_constants.HF_HUB_OFFLINE:
        kwargs["local_files_only"] = True
    where = f"{model_id}" + (f" (subfolder {subfolder})" if subfolder else "")
    if kwargs.get("revision"):
        where += f" at revision {kwargs['revision']}"
    try:
        return hf_hub_download(model_id, ADAPTER_WEIGHTS_NAME, subfolder=subfolder, **kwargs)
    except EntryNotFoundError as e:
        raise AdapterFileError(
            f"{where}: the repo has no {ADAPTER_WEIGHTS_NAME}; Delta-CoMe adapters are read only as safetensors "
            "(adapter_model.bin pickles are never loaded)"
        ) from e
    except LocalEntryNotFoundError as e:
        raise AdapterFileError(f"{where}: {ADAPTER_WEIGHTS_NAME} is not in the local cache and offline: {e}") from e


def check_extra_shapes(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], filename: PathLike) -> None:
    """Check ``modules_to_save`` tensors against the base model's own shapes (an error names the tensor)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for key, t in state_dict.items():
        if DELTA_MARKER in key:
            continue
        name = key[len(STATE_DICT_PREFIX) :] if key.startswith(STATE_DICT_PREFIX) else key
        if name.endswith(TOKENS_SUFFIX):  # rows of added tokens: as wide as the embedding they go into
            module = _resolve_module(base, name[: -len(TOKENS_SUFFIX)])
            width = getattr(getattr(module, "weight", None), "shape", (0, 0))[1:]
            if module is None or t.dim() != 2 or tuple(t.shape[1:]) != tuple(width):
                raise AdapterFileError(
                    f"{os.fspath(filename)}: tensor {key!r} of shape {list(t.shape)} does not fit the base model's "
                    f"{name[: -len(TOKENS_SUFFIX)]} (rows of width {list(width)} expected)"
                )
            continue
        module_name, _, param = name.rpartition(".")
        module = _resolve_module(base, module_name)
        if module is None:
            raise AdapterFileError(f"{os.fspath(filename)}: tensor {key!r} belongs to no module of the base model")
        ref = getattr(module, param, None)
        if isinstance(ref, torch.Tensor) and tuple(ref.shape) != tuple(t.shape):
            raise AdapterFileError(
                f"{os.fspath(filename)}: tensor {key!r} has shape {list(t.shape)} but the base model's "
                f"{module_name}.{param} is {list(ref.shape)}"
            )


def _resolve_module(root: torch.nn.Module, name: str) -> Optional[torch.nn.Module]:
    """The module at dotted ``name``, looking through PEFT's ``modules_to_save`` wrappers (``original_module``)."""
    module = root
    for part in name.split(".") if name else []:
        module = getattr(module, "original_module", module)
        child = module._modules.get(part) if isinstance(module, torch.nn.Module) else None
        if child is None:
            return None
        module = child
    return getattr(module, "original_module", module)


def apply_key_mapping(state_dict: dict[str, torch.Tensor], key_mapping: Optional[dict[str, str]]) -> dict:
    """PEFT's ``key_mapping`` remap (regex on the key without the ``base_model.model.`` prefix)."""
    if not key_mapping:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        prefix = STATE_DICT_PREFIX if key.startswith(STATE_DICT_PREFIX) else ""
        rest = key[len(prefix) :]
        for pattern, replacement in key_mapping.items():
            rest, n = re.subn(pattern, replacement, rest)
            if n:
                break
        out[prefix + rest] = value
    return out
