"""Where adapter weights come from and how they meet the model: a folder or a Hub repo (through the HF cache),
the checks of the dense extras against the base model's own tensors, PEFT's ``key_mapping``.

:func:`load_checked_weights` is what every loading path of :mod:`hf_deltacome.integration` calls after the base
check: PEFT's ``load_peft_weights`` and transformers' ``load_adapter``; :func:`patch_peft_config_reading` is that
list's patch of how PEFT reads an ``adapter_config.json``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Optional, TypeVar

import torch

from ..config import DeltaCoMeConfig
from ..errors import AdapterFileError, ConfigError, DeltaCoMeError
from .adapter_files import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    DELTA_MARKER,
    STATE_DICT_PREFIX,
    TOKENS_SUFFIX,
    _raise_missing_weights,
    read_adapter_config,
    read_adapter_weights,
)
from .atomic import PathLike, read_through_swap, recover_folder, wait_for_swap

_T = TypeVar("_T")

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
    if not os.path.isdir(local):  # a folder set aside for an instant by a save's two-rename swap is no Hub id
        wait_for_swap(model_id)
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


def transformers_adapter_config(model_id: PathLike, hub_kwargs: Mapping[str, Any]) -> Optional[DeltaCoMeConfig]:
    """The validated config of ``model_id`` (folder or Hub repo) if it holds a DELTACOME adapter, else ``None``
    (another PEFT method, no adapter, or a file transformers' own loading will report)."""
    import inspect

    from transformers.utils import find_adapter_config_file

    subfolder = hub_kwargs.get("subfolder") or ""
    local = os.path.join(os.fspath(model_id), subfolder)
    path: Optional[str] = os.path.join(local, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        if os.path.isdir(local):
            return None
        wanted = inspect.signature(find_adapter_config_file).parameters
        try:
            path = find_adapter_config_file(os.fspath(model_id), **{k: v for k, v in hub_kwargs.items() if k in wanted})
        except Exception:  # offline, gated, missing: transformers' own loading reports it
            return None
    try:
        with open(path, "rb") as f:  # type: ignore[arg-type]
            data = json.loads(f.read())
    except (TypeError, OSError, ValueError, RecursionError):
        return None  # PeftConfig.from_json_file (patched) reports a broken file
    if not isinstance(data, dict):
        return None
    ours = data.get("peft_type") == "DELTACOME" or {"layout", "base_fingerprint"} <= set(data)
    return read_adapter_config(path) if ours else None  # type: ignore[arg-type] - ours: its peft_type is checked


def _read_local_config(model_id: Any, subfolder: Optional[str], read: Callable[[], _T]) -> _T:
    """``read()`` (PEFT reading an adapter's config) of a local adapter folder, waiting out a concurrent save's swap
    (PEFT checks that the config exists, then opens it: the folder may be swapped in between); a Hub id is read as
    PEFT does."""
    if not isinstance(model_id, (str, os.PathLike)):
        return read()
    if not os.path.exists(model_id):
        recover_folder(model_id)  # an adapter folder set aside by a save killed mid-swap comes back
    folder = os.path.join(os.fspath(model_id), subfolder or "")
    where = os.path.join(folder, ADAPTER_CONFIG_NAME)
    try:  # PEFT's "Can't find 'adapter_config.json'" (a ValueError) too: the folder was absent for an instant
        return read_through_swap(folder, read, probe=where, missing=(ValueError,))
    except FileNotFoundError as e:
        raise ConfigError(f"{where}: cannot read adapter config: {e.strerror}") from e


def check_extras(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    filename: PathLike,
    modules_to_save: Optional[Any] = None,
) -> None:
    """Check the dense extras (``modules_to_save``) against the base model: every tensor of each such module is
    there (PEFT would fail on a missing one, transformers would initialise it anew), each replaces a floating
    parameter or buffer of the same shape, and every value fits that tensor's dtype (a float32 1e5 would be
    ``inf`` in float16). Errors name the tensor."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    filename = os.fspath(filename)
    for name, module in base.named_modules():
        wrapped = ".original_module" in f".{name}." or ".modules_to_save." in f".{name}."
        if wrapped or not any(name.endswith(target) for target in modules_to_save or ()):  # PEFT's own match
            continue
        module = getattr(module, "original_module", module)
        missing = sorted(
            f"{STATE_DICT_PREFIX}{name}.{k}"
            for k in module.state_dict()
            if f"{STATE_DICT_PREFIX}{name}.{k}" not in state_dict
        )
        if missing:
            raise AdapterFileError(
                f"{filename}: lacks {missing[0]!r}: adapter_config.json's modules_to_save includes {name!r}, whose "
                "every tensor the file must hold"
            )
    for key, t in state_dict.items():
        if DELTA_MARKER in key:
            continue
        name = key[len(STATE_DICT_PREFIX) :] if key.startswith(STATE_DICT_PREFIX) else key
        if name.endswith(TOKENS_SUFFIX):  # rows of added tokens: as wide as the embedding they go into
            module = _resolve_module(base, name[: -len(TOKENS_SUFFIX)])
            width = getattr(getattr(module, "weight", None), "shape", (0, 0))[1:]
            if module is None or t.dim() != 2 or tuple(t.shape[1:]) != tuple(width):
                raise AdapterFileError(
                    f"{filename}: tensor {key!r} of shape {list(t.shape)} does not fit the base model's "
                    f"{name[: -len(TOKENS_SUFFIX)]} (rows of width {list(width)} expected)"
                )
            continue
        module_name, _, param = name.rpartition(".")
        module = _resolve_module(base, module_name)
        if module is None:
            raise AdapterFileError(f"{filename}: tensor {key!r} belongs to no module of the base model")
        ref = getattr(module, param, None)
        if not isinstance(ref, torch.Tensor):
            raise AdapterFileError(
                f"{filename}: tensor {key!r}: the base model's {module_name} has no tensor {param!r}"
            )
        if tuple(ref.shape) != tuple(t.shape):
            raise AdapterFileError(
                f"{filename}: tensor {key!r} has shape {list(t.shape)} but the base model's "
                f"{module_name}.{param} is {list(ref.shape)}"
            )
        if not ref.is_floating_point():
            raise AdapterFileError(
                f"{filename}: tensor {key!r} replaces the base model's {module_name}.{param}, which is {ref.dtype}; "
                "only floating weights are carried as dense extras"
            )
        if t.numel() and float(t.abs().max()) > torch.finfo(ref.dtype).max:
            raise AdapterFileError(
                f"{filename}: tensor {key!r} holds values beyond the range of the base model's {ref.dtype} "
                f"{module_name}.{param} (they would load as inf)"
            )


def load_checked_weights(
    config: DeltaCoMeConfig,
    model: torch.nn.Module,
    model_id: PathLike,
    *,
    subfolder: Optional[str] = None,
    source: Optional[str] = None,
    **hub_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The adapter weights of ``model_id`` (folder or Hub repo) for ``config``, read (through ``source``, a pinned
    name of the file, if given), validated against the config (:func:`read_adapter_weights`) and against
    ``model``'s own tensors (:func:`check_extras`)."""
    path = os.path.join(os.fspath(model_id), subfolder or "", ADAPTER_WEIGHTS_NAME)
    if source is None or os.path.abspath(source) == os.path.abspath(path):  # not opened with the config: find it
        path = resolve_adapter_weights(model_id, subfolder=subfolder, **hub_kwargs)
    # else the file opened with the config (a pinned handle): the path only names it, even while a save's swap
    # has the folder set aside
    state_dict = read_adapter_weights(config, path, source=source)
    check_extras(model, state_dict, path, config.modules_to_save)
    return state_dict


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


def patch_peft_config_reading() -> None:
    """PEFT's adapter-config reading (``from_json_file``, ``_get_peft_type``, ``from_pretrained``) with errors that name
    the file: bad JSON, deep nesting, a missing or unknown ``peft_type`` are a ConfigError, not a KeyError or
    RecursionError from before our type is known; a local folder is read through a concurrent save's swap. Applied
    by :mod:`hf_deltacome.integration` (its list of patches)."""
    from peft.config import PeftConfig, PeftConfigMixin
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    original_from_json = PeftConfigMixin.from_json_file.__func__
    original_get_type = PeftConfigMixin._get_peft_type.__func__

    def from_json_file(cls: type, path_json_file: str, **kwargs: Any) -> Any:
        try:
            data = original_from_json(cls, path_json_file, **kwargs)
        except (ValueError, RecursionError, TypeError) as e:  # bad UTF-8 / JSON, nesting, not an object
            raise ConfigError(f"{path_json_file}: not a valid adapter config: {type(e).__name__}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path_json_file}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type")
        if "peft_type" not in data and cls in (PeftConfig, PeftConfigMixin):  # only a method's own class may
            raise ConfigError(f"{path_json_file}: no peft_type: not a PEFT adapter config")  # do without it
        if "peft_type" in data and (not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING):
            upper = str(peft_type).upper()
            hint = f" (PEFT reads it case-sensitively: {upper!r})" if upper in PEFT_TYPE_TO_CONFIG_MAPPING else ""
            raise ConfigError(f"{path_json_file}: peft_type {peft_type!r} is not a PEFT method known here{hint}")
        return data

    def _get_peft_type(cls: type, model_id: str, **hf_hub_download_kwargs: Any) -> Any:
        subfolder = hf_hub_download_kwargs.get("subfolder")
        try:
            read = lambda: original_get_type(cls, model_id, **hf_hub_download_kwargs)  # noqa: E731
            return _read_local_config(model_id, subfolder, read)
        except KeyError as e:  # from_json_file (above) refuses every present but unknown peft_type
            where = os.path.join(model_id, subfolder or "", ADAPTER_CONFIG_NAME)
            raise ConfigError(f"{where}: no peft_type: not a PEFT adapter config") from e

    original_from_pretrained = PeftConfigMixin.from_pretrained.__func__

    def from_pretrained(cls: type, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kw: Any):
        try:  # PeftConfig.from_pretrained (AutoPeftModel*, transformers) building one of ours: name the file
            read = lambda: original_from_pretrained(cls, pretrained_model_name_or_path, subfolder=subfolder, **kw)  # noqa: E731
            return _read_local_config(pretrained_model_name_or_path, subfolder, read)
        except DeltaCoMeError as e:
            where = os.path.join(os.fspath(pretrained_model_name_or_path), subfolder or "", ADAPTER_CONFIG_NAME)
            if where in str(e):
                raise
            raise type(e)(f"{where}: {e}") from e

    PeftConfigMixin.from_json_file = classmethod(from_json_file)
    PeftConfigMixin._get_peft_type = classmethod(_get_peft_type)
    PeftConfigMixin.from_pretrained = classmethod(from_pretrained)
