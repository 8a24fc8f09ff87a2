"""Safe reading and atomic writing of Delta-CoMe adapter files.

Reading: only safetensors is ever read (never ``torch.load``/pickle); every low-level failure (bad header,
truncated file, unsupported dtype) becomes an :class:`AdapterFileError` naming the file and, where it applies, the
tensor. :func:`validate_adapter_state_dict` checks the tensors against ``adapter_config.json``'s ``layout`` (names,
shapes, dtypes, NaN/Inf, zero points, packing padding) before any of them reaches the model.

Writing: :func:`atomic_write` writes a temp file in the target folder and ``os.replace``-s it over the target, so
an interrupted save leaves the previous file intact. Inside :func:`atomic_transaction` the renames are deferred
until every file of the save has been written, so a kill at any point before the end leaves the previous
adapter (weights, config and card) untouched. :func:`install_atomic_save` routes PEFT's ``save_pretrained`` of
DELTACOME adapters through this; other PEFT methods keep PEFT's behaviour.

:func:`install_load_guard` makes ``PeftModel.from_pretrained`` / ``load_adapter`` of a DELTACOME adapter read
weights through :func:`load_adapter_weights` (safetensors only, validated) after checking the base fingerprint.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import math
import os
import re
import struct
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .config import DeltaCoMeConfig
from .errors import AdapterFileError, ConfigError, DeltaCoMeError
from .packing import expected_tensor_shapes

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAMES = ("adapter_model.bin",)
STATE_DICT_PREFIX = "base_model.model."
DELTA_MARKER = ".deltacome_delta."
TEMP_SUFFIX = ".deltacome-tmp"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

PathLike = Union[str, os.PathLike]

# ------------------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------------------

_TRANSACTION: contextvars.ContextVar[Optional[list[tuple[str, str]]]] = contextvars.ContextVar(
    "deltacome_atomic_transaction", default=None
)


def _temp_path(target: str) -> str:
    """A fresh, exclusively created temp file next to ``target`` (same folder, so ``os.replace`` is atomic)."""
    directory, name = os.path.split(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    while True:
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, like a plain open()
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. directories cannot be opened on Windows; best effort
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, writer: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``writer(tmp_path)`` fills a temp file in the same folder, which then replaces it.

    If ``writer`` raises (or the process dies) the previous ``path`` is untouched and the temp file is removed (or,
    after a kill, left as a hidden ``*.deltacome-tmp`` file that the next save of that folder removes). Inside
    :func:`atomic_transaction` the final rename is deferred to the end of the transaction.
    """
    target = os.fspath(path)
    tmp = _temp_path(target)
    try:
        writer(tmp)
        _fsync_path(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    staged = _TRANSACTION.get()
    if staged is not None:
        for i, (old_tmp, old_target) in enumerate(staged):
            if os.path.abspath(old_target) == os.path.abspath(target):  # written twice: the last write wins
                with contextlib.suppress(OSError):
                    os.remove(old_tmp)
                del staged[i]
                break
        staged.append((tmp, target))
        return
    os.replace(tmp, target)
    _fsync_path(os.path.dirname(os.path.abspath(target)), directory=True)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, _write)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_transaction() -> Iterator[None]:
    """Defer the renames of every :func:`atomic_write` in the block until it ends without error.

    On error (or a kill) no target has been replaced and the staged temp files are removed. Nested transactions
    join the outermost one.
    """
    if _TRANSACTION.get() is not None:
        yield
        return
    staged: list[tuple[str, str]] = []
    token = _TRANSACTION.set(staged)
    try:
        yield
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    finally:
        _TRANSACTION.reset(token)
    done = 0
    try:
        for tmp, target in staged:
            os.replace(tmp, target)
            done += 1
    finally:
        for tmp, _ in staged[done:]:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    for directory in {os.path.dirname(os.path.abspath(t)) for _, t in staged}:
        _fsync_path(directory, directory=True)


def remove_stale_temp_files(folder: PathLike) -> list[str]:
    """Remove ``*.deltacome-tmp`` files left in ``folder`` by saves whose process no longer runs."""
    removed = []
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        m = re.fullmatch(r"\..+\.(\d+)\.[0-9a-f]{12}" + re.escape(TEMP_SUFFIX), name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], filename: PathLike, metadata: Optional[dict[str, str]] = None
) -> None:
    """``safetensors.torch.save_file`` through a temp file + ``os.replace`` (same signature)."""
    import safetensors.torch

    atomic_write(filename, lambda tmp: safetensors.torch.save_file(dict(tensors), tmp, metadata=metadata))


def config_to_json(config: DeltaCoMeConfig, auto_mapping_dict: Optional[dict] = None) -> str:
    """The ``adapter_config.json`` text PEFT would write for ``config`` (sets as lists, sorted keys)."""
    out = config.to_dict()
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = sorted(value)
    if auto_mapping_dict is not None:
        out["auto_mapping"] = auto_mapping_dict
    return json.dumps(out, indent=2, sort_keys=True)


def save_config_atomic(
    config: DeltaCoMeConfig, save_directory: PathLike, auto_mapping_dict: Optional[dict] = None
) -> None:
    """Write ``adapter_config.json`` into ``save_directory`` atomically."""
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ConfigError(f"{save_directory} should be a directory, not a file")
    os.makedirs(save_directory, exist_ok=True)
    atomic_write_text(os.path.join(save_directory, ADAPTER_CONFIG_NAME), config_to_json(config, auto_mapping_dict))


# ------------------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": getattr(torch, "uint16", None),
    "I32": torch.int32,
    "U32": getattr(torch, "uint32", None),
    "I64": torch.int64,
    "U64": getattr(torch, "uint64", None),
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


def read_safetensors_header(path: PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and check a safetensors header: ``({name: {dtype, shape, data_offsets}}, metadata)``.

    Checks that the header is valid JSON, that every entry has a known dtype, a shape and offsets that match
    ``prod(shape) * itemsize``, and that the data section covers the file exactly (a truncated file fails here).
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AdapterFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise AdapterFileError(
                    f"{path}: bad safetensors header: it declares {n} header bytes but the file has {size} bytes "
                    "(truncated or not a safetensors file)"
                )
            raw = f.read(n)
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot read adapter weights: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AdapterFileError(f"{path}: bad safetensors header: not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: bad safetensors header: expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path}: bad safetensors header: __metadata__ must map strings to strings")
    spans = []
    data_size = size - 8 - n
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise AdapterFileError(f"{where}: bad header entry {info!r}")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise AdapterFileError(f"{where}: unsupported dtype {dtype_name!r}")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise AdapterFileError(f"{where}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise AdapterFileError(f"{where}: data offsets {offsets!r} outside the {data_size}-byte data section")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise AdapterFileError(
                f"{where}: shape {shape} of {dtype_name} needs {nbytes} bytes but the file stores "
                f"{offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    end = 0
    for start, stop, name in spans:
        if start != end:
            raise AdapterFileError(f"{path}: tensor {name!r} overlaps another tensor or leaves a gap in the data")
        end = stop
    if end != data_size:
        raise AdapterFileError(
            f"{path}: the data section has {data_size} bytes but the tensors cover {end} (truncated or padded file)"
        )
    return header, metadata


def read_safetensors(path: PathLike, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file (never pickle), raising :class:`AdapterFileError` naming the file.

    Refuses ``.bin``/``.pt``/``.pth`` files outright: those are pickles and are never loaded.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if path.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")):
        raise AdapterFileError(
            f"{path}: refusing to read a pickle file; Delta-CoMe adapters are read only as safetensors"
        )
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: adapter weights file not found")
    read_safetensors_header(path)
    out: dict[str, torch.Tensor] = {}
    try:
        f = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) here
        raise AdapterFileError(f"{path}: not a valid safetensors file: {e}") from e
    with f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            try:
                out[name] = f.get_tensor(name)
            except Exception as e:
                raise AdapterFileError(f"{path}: cannot read tensor {name!r}: {e}") from e
    if str(device) != "cpu":
        out = {k: v.to(device) for k, v in out.items()}
    return out


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


def expected_delta_tensors(
    config: DeltaCoMeConfig, prefix: str = STATE_DICT_PREFIX
) -> dict[str, tuple[tuple, torch.dtype, int]]:
    """Every packed tensor the layout requires: ``{file key: (shape, dtype, bits)}`` (PEFT's saved key names)."""
    out: dict[str, tuple[tuple, torch.dtype, int]] = {}
    for module, entry in config.layout.items():
        m, n = entry["shape"]
        g = entry.get("group_size", config.group_size)
        base = f"{prefix}{module}.deltacome_delta"
        k = 0
        for bits, rank in entry["bands"]:
            if rank <= 0:
                continue
            band = f"{base}.bands.{k}"
            for factor, (rows, cols) in (("v", (rank, n)), ("u", (m, rank))):
                for name, (shape, dtype) in expected_tensor_shapes(rows, cols, bits, g).items():
                    out[f"{band}.{factor}.{name}"] = (tuple(shape), dtype, bits)
            out[f"{band}.s"] = ((rank,), torch.float32, 0)
            k += 1
        if entry.get("bias"):
            out[f"{base}.bias"] = ((m,), torch.float32, 0)
        if entry.get("sign") is not None or entry.get("sparse") is not None:
            out.update(_baseline_part_tensors(entry, g, base))
    return out


def _baseline_part_tensors(entry: dict, group_size: int, base: str) -> dict[str, tuple[tuple, torch.dtype, int]]:
    """Tensors of the optional baseline parts (BitDelta ``sign``, DARE ``sparse``), taken from the runtime module
    itself (built on the meta device, so nothing is allocated) so that loader and validator cannot disagree."""
    from .factors import PackedDelta, QuantizedFactor

    m, n = entry["shape"]
    with torch.device("meta"):
        packed = PackedDelta(m, n, [], group_size, sign=entry.get("sign"), sparse=entry.get("sparse"))
    bits_of = {name: mod.bits for name, mod in packed.named_modules() if isinstance(mod, QuantizedFactor)}
    out = {}
    for key, t in packed.state_dict().items():
        if key.startswith(("sign.", "sparse.")):
            owner = key.rsplit(".", 1)[0]
            out[f"{base}.{key}"] = (tuple(t.shape), t.dtype, bits_of.get(owner, 0))
    return out


def _is_extra_key(key: str, modules_to_save: Optional[list[str]], prefix: str) -> bool:
    name = key[len(prefix) :] if key.startswith(prefix) else key
    module = name.rsplit(".", 1)[0] if "." in name else ""
    dotted = f".{module}."
    # a parameter of the target itself or of any submodule of it (a whole vision-embeddings block, say)
    return any(f".{target}." in dotted for target in modules_to_save or [])


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
        if not _is_extra_key(key, config.modules_to_save, prefix):
            raise AdapterFileError(
                f"{filename}: unexpected tensor {key!r}: it is neither a packed delta of the layout nor part of "
                f"modules_to_save {sorted(config.modules_to_save or [])}"
            )
    for key in sorted(present):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise AdapterFileError(f"{filename}: entry {key!r} is a {type(t).__name__}, not a tensor")
        if key in expected:
            shape, dtype, bits = expected[key]
            if t.dtype != dtype:
                raise AdapterFileError(
                    f"{filename}: tensor {key!r} has dtype {t.dtype}, adapter_config.json's layout needs {dtype}"
                )
            if tuple(t.shape) != shape:
                raise AdapterFileError(
                    f"{filename}: tensor {key!r} has shape {list(t.shape)}, adapter_config.json's layout needs "
                    f"{list(shape)} (config and weights disagree)"
                )
            if key.endswith(".zeros") and t.numel() and int(t.max()) > (1 << bits) - 1:
                raise AdapterFileError(
                    f"{filename}: tensor {key!r} has zero point {int(t.max())}, out of range for {bits}-bit codes"
                )
            if key.endswith((".qweight", ".qweight_hi")) and t.dtype == torch.int32:
                plane_bits = 1 if key.endswith("_hi") else (2 if bits == 3 else bits)
                cols = _factor_cols(config, key, prefix)
                if cols is not None and not _padding_ok(t, cols, plane_bits):
                    raise AdapterFileError(
                        f"{filename}: tensor {key!r} has non-zero padding bits: the packed codes are corrupted"
                    )
        if t.is_floating_point() and t.numel():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise AdapterFileError(f"{filename}: tensor {key!r} contains {kind} values")


def _factor_cols(config: DeltaCoMeConfig, key: str, prefix: str) -> Optional[int]:
    m = re.fullmatch(re.escape(prefix) + r"(.+)\.deltacome_delta\.bands\.(\d+)\.([uv])\.qweight(_hi)?", key)
    if not m:
        return None
    entry = config.layout.get(m.group(1))
    if entry is None:
        return None
    ranks = [r for _, r in entry["bands"] if r > 0]
    k = int(m.group(2))
    if k >= len(ranks):
        return None
    return entry["shape"][1] if m.group(3) == "v" else ranks[k]


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
    for name in PICKLE_WEIGHTS_NAMES:
        if os.path.isfile(os.path.join(where, name)):
            raise AdapterFileError(
                f"{where}: only {name} (a pickle) is present; Delta-CoMe adapters are read only from "
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


def load_adapter_weights(
    model_id: PathLike,
    config: DeltaCoMeConfig,
    *,
    device: Union[str, torch.device, None] = None,
    subfolder: Optional[str] = None,
    **hub_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Resolve, read (safetensors only) and validate the weights of a DELTACOME adapter; keys as PEFT saved them."""
    path = resolve_adapter_weights(model_id, subfolder=subfolder, **hub_kwargs)
    state_dict = read_safetensors(path)
    validate_adapter_state_dict(config, state_dict, path)
    if device is not None and str(device) != "cpu":
        state_dict = {k: v.to(device) for k, v in state_dict.items()}
    return state_dict


def check_extra_shapes(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], filename: PathLike) -> None:
    """Check ``modules_to_save`` tensors against the base model's own shapes (an error names the tensor)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for key, t in state_dict.items():
        if DELTA_MARKER in key:
            continue
        name = key[len(STATE_DICT_PREFIX) :] if key.startswith(STATE_DICT_PREFIX) else key
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


def _apply_key_mapping(state_dict: dict[str, torch.Tensor], key_mapping: Optional[dict[str, str]]) -> dict:
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


# ------------------------------------------------------------------------------------------------------------
# PEFT integration
# ------------------------------------------------------------------------------------------------------------


def _is_deltacome(config: Any) -> bool:
    peft_type = getattr(config, "peft_type", None)
    return str(getattr(peft_type, "value", peft_type)).upper() == "DELTACOME"


_DELTACOME_SAVE: contextvars.ContextVar[bool] = contextvars.ContextVar("deltacome_save", default=False)


@dataclass
class _LoadContext:
    model: Any
    adapter_name: str
    strict: Optional[bool]


_LOAD: contextvars.ContextVar[Optional[_LoadContext]] = contextvars.ContextVar("deltacome_load", default=None)


def install_atomic_save() -> None:
    """Route ``PeftModel.save_pretrained`` of DELTACOME adapters through atomic writes (idempotent).

    * ``PeftModel.save_pretrained``: when any saved adapter is DELTACOME, the whole save (model card, weights,
      ``adapter_config.json``) runs in one :func:`atomic_transaction`, stale temp files of killed saves are removed
      first, and ``safe_serialization=False`` (pickle) is refused.
    * ``peft.peft_model.safe_save_file``: atomic inside such a save, PEFT's original otherwise.
    * ``DeltaCoMeConfig.save_pretrained``: always atomic.
    """
    import peft.peft_model as pm

    if getattr(pm.PeftModel.save_pretrained, "_deltacome_atomic", False):
        return
    original_save_file = pm.safe_save_file
    original_save = pm.PeftModel.save_pretrained
    signature = inspect.signature(original_save)

    def safe_save_file(tensors: dict, filename: str, metadata: Optional[dict] = None) -> None:
        if _DELTACOME_SAVE.get():
            save_safetensors_atomic(tensors, filename, metadata=metadata)
        else:
            original_save_file(tensors, filename, metadata=metadata)

    @functools.wraps(original_save)
    def save_pretrained(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        selected = bound.arguments.get("selected_adapters") or list(self.peft_config)
        if not any(_is_deltacome(self.peft_config.get(name)) for name in selected):
            return original_save(self, *args, **kwargs)
        if not bound.arguments.get("safe_serialization", True):
            raise ConfigError(
                "DELTACOME adapters are saved only as safetensors; safe_serialization=False (pickle) is not supported"
            )
        directory = os.fspath(bound.arguments["save_directory"])
        if bound.arguments.get("is_main_process", True):
            remove_stale_temp_files(directory)
            for name in selected:
                if name != "default":
                    remove_stale_temp_files(os.path.join(directory, name))
        token = _DELTACOME_SAVE.set(True)
        try:
            with atomic_transaction():
                return original_save(self, *args, **kwargs)
        finally:
            _DELTACOME_SAVE.reset(token)

    def config_save_pretrained(self: DeltaCoMeConfig, save_directory: str, **kwargs: Any) -> None:
        save_config_atomic(self, save_directory, kwargs.pop("auto_mapping_dict", None))

    save_pretrained._deltacome_atomic = True  # type: ignore[attr-defined]
    pm.safe_save_file = safe_save_file
    pm.PeftModel.save_pretrained = save_pretrained
    DeltaCoMeConfig.save_pretrained = config_save_pretrained  # type: ignore[method-assign]


def install_load_guard() -> None:
    """Make PEFT load DELTACOME adapter weights only through :func:`load_adapter_weights` (idempotent).

    * ``PeftModel.load_adapter`` (used by ``PeftModel.from_pretrained`` and ``AutoPeftModel*``) accepts
      ``strict=`` (default: :func:`hf_deltacome.fingerprint.default_strict`) and records what it is loading.
    * ``peft.peft_model.load_peft_weights``: for a DELTACOME adapter, checks the base fingerprint
      (:func:`hf_deltacome.fingerprint.check_fingerprint`), then reads ``adapter_model.safetensors`` only (a repo
      with only ``adapter_model.bin`` is refused, nothing is unpickled), validates every tensor against the
      config and the base model; PEFT's original loader for every other method.
    """
    import peft.peft_model as pm

    if getattr(pm.PeftModel.load_adapter, "_deltacome_guard", False):
        return
    original_load_weights = pm.load_peft_weights
    original_load_adapter = pm.PeftModel.load_adapter

    @functools.wraps(original_load_adapter)
    def load_adapter(self: Any, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        strict = kwargs.pop("strict", None)
        token = _LOAD.set(_LoadContext(self, adapter_name, strict))
        try:
            return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        finally:
            _LOAD.reset(token)

    def load_peft_weights(
        model_id: str, device: Optional[str] = None, key_mapping: Optional[dict] = None, **hub_kwargs: Any
    ) -> dict:
        ctx = _LOAD.get()
        config = ctx.model.peft_config.get(ctx.adapter_name) if ctx is not None else None
        if config is None or not _is_deltacome(config):
            return original_load_weights(model_id, device=device, key_mapping=key_mapping, **hub_kwargs)
        from .fingerprint import check_fingerprint, default_strict

        strict = default_strict() if ctx.strict is None else bool(ctx.strict)
        check_fingerprint(config.base_fingerprint, ctx.model, strict=strict, adapter=str(model_id))
        subfolder = hub_kwargs.pop("subfolder", None)
        path = resolve_adapter_weights(model_id, subfolder=subfolder, **hub_kwargs)
        state_dict = read_safetensors(path)
        validate_adapter_state_dict(config, state_dict, path)
        check_extra_shapes(ctx.model, state_dict, path)
        if device is not None and str(device) != "cpu":
            state_dict = {k: v.to(device) for k, v in state_dict.items()}
        return _apply_key_mapping(state_dict, key_mapping)

    original_config_from_pretrained = DeltaCoMeConfig.from_pretrained.__func__  # type: ignore[attr-defined]

    def config_from_pretrained(cls: type, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        where = os.fspath(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            where = f"{where}/{kwargs['subfolder']}"
        try:
            return original_config_from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs)
        except DeltaCoMeError as e:
            raise type(e)(f"{where}/{ADAPTER_CONFIG_NAME}: {e}") from e
        except (TypeError, AttributeError) as e:  # a field of the wrong type in a hand-edited file
            raise ConfigError(f"{where}/{ADAPTER_CONFIG_NAME}: invalid adapter config: {e}") from e

    load_adapter._deltacome_guard = True  # type: ignore[attr-defined]
    pm.PeftModel.load_adapter = load_adapter
    pm.load_peft_weights = load_peft_weights
    DeltaCoMeConfig.from_pretrained = classmethod(config_from_pretrained)  # type: ignore[method-assign]
