"""Many fine-tunes on one base: every Delta-CoMe adapter in one ``PeftModel``, each kept bit-packed.

A thin layer over ``PeftModel.from_pretrained`` / ``load_adapter`` / ``delete_adapter`` that checks names and paths
up front (errors name the adapter and the path), cleans up after a load that fails half-way (so a server that adds an
adapter while serving is never left with a half-injected one), and reports what each adapter costs in memory.

Mixed batches need nothing more: ``model(input_ids, adapter_names=[...])`` and ``model.generate(...,
adapter_names=[...])`` give row ``i`` adapter ``adapter_names[i]`` (``"__base__"``: no adapter).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from torch import nn

from ..backend import dequant_cache
from ..errors import ConfigError
from ..layer import BASE_ADAPTER_NAME, DeltaCoMeLayer

PathLike = Union[str, os.PathLike]

__all__ = ["BASE_ADAPTER_NAME", "adapter_nbytes", "add_delta", "check_adapter_name", "drop_delta", "load_deltas"]


def check_adapter_name(name: Any, existing: Any = ()) -> str:
    """``name`` if it can name an adapter (a non-empty string without ``.``, not ``"__base__"``, not taken)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"adapter name {name!r} must be a non-empty string")
    if name != name.strip() or "." in name or "/" in name:
        # PEFT keys each adapter's buffers by name inside module dicts, which refuse '.'; '/' would be read as a path
        raise ConfigError(f"adapter name {name!r} may not contain '.', '/' or surrounding spaces")
    if name == BASE_ADAPTER_NAME:
        raise ConfigError(f"adapter name {name!r} is reserved: it means 'no adapter' in adapter_names")
    if name in existing:
        raise ConfigError(f"an adapter named {name!r} is already loaded")
    return name


def _check_source(name: str, source: Any) -> str:
    """A local adapter folder (must hold adapter_config.json) or a Hub id, as a string."""
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"adapter {name!r}: expected a folder or Hub id, got {type(source).__name__}")
    text = os.fspath(source)
    path = Path(text).expanduser()
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise ConfigError(f"adapter {name!r}: {text!r} is not an adapter folder")
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"adapter {name!r}: {text!r} has no adapter_config.json")
        return str(path)
    return text


def _check_deltacome(name: str, source: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse a non-Delta-CoMe adapter before PEFT injects anything (one PeftModel holds one PEFT method)."""
    from peft import PeftConfig

    hub = {k: kwargs[k] for k in ("revision", "subfolder", "token", "cache_dir") if k in kwargs}
    try:
        config = PeftConfig.from_pretrained(source, **hub)
    except ConfigError:
        raise
    except Exception as e:  # unreadable or missing config, offline Hub: the message names the source
        raise ConfigError(f"adapter {name!r}: cannot read the adapter config of {source!r}: {e}") from e
    peft_type = str(getattr(config.peft_type, "value", config.peft_type)).upper()
    if peft_type != "DELTACOME":
        raise ConfigError(
            f"adapter {name!r}: {source!r} is a {peft_type} adapter, not a Delta-CoMe one; "
            "one PeftModel serves adapters of a single PEFT method"
        )


def load_deltas(base: nn.Module, adapters: Mapping[str, PathLike], **kwargs: Any) -> Any:
    """Load every adapter of ``adapters`` (``{name: folder or Hub id}``) onto ``base``; returns one ``PeftModel``.

    The first adapter goes through ``PeftModel.from_pretrained``, the others through ``load_adapter`` (so ``base``
    is wrapped in place, like ``get_peft_model``). Passing a ``PeftModel`` adds the adapters to it. ``kwargs`` go
    to every load (``strict=False`` turns a base-fingerprint mismatch into a warning; ``revision``, ``token``,
    ``subfolder``, ``torch_device`` ...). The factors stay packed: memory grows by about each adapter file's size
    (see :func:`adapter_nbytes`). Use ``adapter_names=[...]`` in ``forward``/``generate`` for mixed batches.
    """
    from peft import PeftModel

    if not isinstance(adapters, Mapping) or not adapters:
        raise ConfigError("load_deltas needs a non-empty mapping {adapter name: folder or Hub id}")
    if "adapter_name" in kwargs:
        raise ConfigError("load_deltas takes adapter names from the mapping's keys, not adapter_name=")
    existing = set(getattr(base, "peft_config", {}) or {}) if isinstance(base, PeftModel) else set()
    checked: dict[str, str] = {}
    for name, source in adapters.items():
        checked[check_adapter_name(name, existing)] = _check_source(name, source)
        existing.add(name)
    model = base
    for name, source in checked.items():
        if isinstance(model, PeftModel):
            add_delta(model, name, source, _checked=True, **kwargs)
            continue
        _check_deltacome(name, source, kwargs)
        model = PeftModel.from_pretrained(model, source, adapter_name=name, **kwargs)
    return model.eval()


def add_delta(model: Any, name: str, source: PathLike, *, _checked: bool = False, **kwargs: Any) -> None:
    """Load one more adapter into ``model`` (a ``PeftModel``) under ``name``; a failed load leaves no trace.

    Not thread-safe against a running forward: a server calls it between steps (see ``serving.engine.Engine``).
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ConfigError(f"add_delta needs a PeftModel (from load_deltas), got {type(model).__name__}")
    if not _checked:
        check_adapter_name(name, model.peft_config)
        source = _check_source(name, source)
    source = os.fspath(source)
    _check_deltacome(name, source, kwargs)
    try:
        model.load_adapter(source, adapter_name=name, **kwargs)
    except BaseException:
        if name in model.peft_config:  # injected, then refused (e.g. a file that fails validation): remove it
            drop_delta(model, name)
        raise
    model.eval()


def drop_delta(model: Any, name: str) -> None:
    """Remove adapter ``name`` (its packed factors and dense extras) from ``model``; the others are untouched."""
    import warnings

    if name not in getattr(model, "peft_config", {}):
        known = ", ".join(sorted(getattr(model, "peft_config", {}))) or "none"
        raise ConfigError(f"no adapter named {name!r} is loaded (loaded: {known})")
    with warnings.catch_warnings():  # "adapter was active, setting active adapter to ...": expected here
        warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
        model.delete_adapter(name)
    dequant_cache.prune()  # what the torch path decoded from it goes with it


def adapter_nbytes(model: nn.Module, name: str) -> int:
    """Bytes held in memory for adapter ``name``: its packed factors plus its copies of the dense extras.

    Compare with the size of its ``adapter_model.safetensors``: the two agree up to the file's header, since the
    factors stay packed (what the torch path decodes from them, the bands' float factors, DARE parts' CSR matrices
    and vector codes' rows, is counted separately: ``backend.dequant_cache.bytes``, capped by
    ``DELTACOME_DEQUANT_CACHE_MB`` for every adapter together).
    """
    from peft.utils.other import ModulesToSaveWrapper

    total = 0
    for module in model.modules():
        if isinstance(module, DeltaCoMeLayer) and name in module.deltacome_delta:
            total += module.deltacome_delta[name].nbytes()
        elif isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
            copy = module.modules_to_save[name]
            total += sum(t.numel() * t.element_size() for t in [*copy.parameters(), *copy.buffers()])
    return total
