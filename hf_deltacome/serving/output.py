"""Where export and merge read from and write to: the output folder checked against the inputs before any work,
and an adapter given as a folder or Hub id as a local folder. The writing itself is :func:`hf_deltacome.io.atomic.write_folder`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Union

from ..errors import ConfigError

PathLike = Union[str, os.PathLike]


def check_new_output(
    output: PathLike, inputs: Iterable[tuple[str, Optional[PathLike]]], *, overwrite: bool, flag: str = "--output"
) -> Path:
    """``output`` as a path, refused when it is (or lies inside) one of the ``(role, folder)`` inputs, or when it
    exists and is not empty without ``overwrite``. (A LoRA export also passes the adapter guard,
    :func:`hf_deltacome.io.atomic.check_output_folder`; a merged model is a model folder, which that guard refuses.)"""
    out = Path(output).expanduser().resolve()
    for role, folder in inputs:
        if folder is None or not Path(folder).expanduser().is_dir():
            continue  # a Hub id: its files live in the huggingface_hub cache, never where we write
        source = Path(folder).expanduser().resolve()
        if out == source or source in out.parents:
            raise ConfigError(
                f"{flag} {str(output)!r} is {'the' if out == source else 'inside the'} {role} folder {str(source)!r}; "
                "choose a folder outside it"
            )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {str(output)!r} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{flag} {str(output)!r} exists and is not empty; pass --overwrite to replace its files")
    return out


def local_adapter_folder(adapter: PathLike) -> Path:
    """The local folder of an adapter given as a folder or a Hub id (its config and safetensors weights fetched
    through the huggingface_hub cache; never a pickle)."""
    from ..io.adapter_files import ADAPTER_CONFIG_NAME
    from ..io.adapter_source import resolve_adapter_weights

    text = os.fspath(adapter)
    if not Path(text).expanduser().is_dir():
        from huggingface_hub import hf_hub_download

        try:
            hf_hub_download(text, ADAPTER_CONFIG_NAME)
        except Exception as e:  # not found, offline, bad id: the message names the adapter
            raise ConfigError(
                f"adapter {text!r}: not a folder, and its {ADAPTER_CONFIG_NAME} cannot be fetched: {e}"
            ) from e
    local = Path(text).expanduser()
    return Path(resolve_adapter_weights(local if local.is_dir() else text)).parent
