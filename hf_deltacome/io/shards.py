"""Writing a model's safetensors shards while its tensors are still being computed (a streamed ``deltacome merge``).

``save_pretrained`` needs every tensor of a shard in memory before it writes the shard (2 GB by default). Here the
shards are planned from meta tensors first (:func:`plan_shards`: huggingface_hub's ``split_torch_state_dict_into_shards``,
the very split ``save_pretrained`` makes, so the index names the same files), each file's safetensors header is
written as soon as its first tensor arrives (every shape and dtype is known from the plan), and every tensor's bytes
are appended as it arrives: :class:`ShardWriter` holds no tensor. The files are plain safetensors (8-byte header
length, JSON header padded with spaces to 8 bytes, data in header order); the caller writes them into the temporary
folder of :func:`hf_deltacome.io.atomic.write_folder`, so the output appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Union

import torch

from ..errors import DeltaCoMeError
from .adapter_files import SAFETENSORS_DTYPES

SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items() if dtype is not None}
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
Spec = tuple[str, torch.dtype, tuple[int, ...]]  # (tensor name, dtype, shape)


def plan_shards(specs: Sequence[Spec], max_shard_size: Union[int, str], total_parameters: int) -> tuple[dict, Any]:
    """``({file name: [spec, ...] in write order}, index or None)`` of a model whose tensors are ``specs`` (in
    state-dict order), split as ``save_pretrained(max_shard_size=...)`` splits them; the index is the JSON object of
    ``model.safetensors.index.json`` (``None``: one unsharded file)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    metas = {name: torch.empty(shape, dtype=dtype, device="meta") for name, dtype, shape in specs}
    split = split_torch_state_dict_into_shards(
        metas, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    by_name = {spec[0]: spec for spec in specs}
    order = {name: i for i, name in enumerate(by_name)}
    files = {f: [by_name[n] for n in sorted(names, key=order.__getitem__)] for f, names in split.filename_to_tensors.items()}
    if not split.is_sharded:
        return files, None
    meta = {"total_parameters": total_parameters, **split.metadata}
    return files, {"metadata": meta, "weight_map": dict(split.tensor_to_filename)}


def write_index(folder: Path, index: Mapping[str, Any]) -> None:
    """``model.safetensors.index.json`` as ``save_pretrained`` writes it."""
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _header(specs: Sequence[Spec], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in SAFETENSORS_NAMES:
            raise DeltaCoMeError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        size = dtype.itemsize
        for s in shape:
            size *= s
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


class ShardWriter:
    """Streams the tensors of planned shards (:func:`plan_shards`) into ``folder``, one :meth:`write` at a time.

    Tensors must arrive in each file's planned order (state-dict order does that), each with its planned dtype and
    shape; :meth:`close` checks that every planned tensor was written. Use as a context manager: files are closed
    (and fsynced) as they complete, and on an error the open ones are closed and left for the caller's temporary
    folder to be removed with."""

    def __init__(self, folder: Path, files: Mapping[str, Sequence[Spec]], metadata: Mapping[str, str]) -> None:
        self.folder, self.files, self.metadata = Path(folder), files, metadata
        self._where = {spec[0]: (file, i) for file, specs in files.items() for i, spec in enumerate(specs)}
        self._next = dict.fromkeys(files, 0)
        self._open: dict[str, BinaryIO] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (the planned tensor ``name``) to its shard."""
        if name not in self._where:
            raise DeltaCoMeError(f"tensor {name!r} is not part of the planned shards")
        file, i = self._where[name]
        _, dtype, shape = self.files[file][i]
        if i != self._next[file]:
            want = self.files[file][self._next[file]][0] if self._next[file] < len(self.files[file]) else None
            raise DeltaCoMeError(f"{file}: tensor {name!r} arrived out of order (expected {want!r})")
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise DeltaCoMeError(
                f"{file}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(shape)}"
            )
        handle = self._open.get(file)
        if handle is None:
            handle = self._open[file] = open(self.folder / file, "wb")  # noqa: SIM115 - closed when complete
            handle.write(_header(self.files[file], self.metadata))
        if tensor.numel():
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next[file] = i + 1
        if i + 1 == len(self.files[file]):
            self._finish(file)

    def _finish(self, file: str) -> None:
        handle = self._open.pop(file)
        try:
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            handle.close()

    def close(self) -> None:
        """Every planned tensor must have been written."""
        for file, specs in self.files.items():
            if self._next[file] < len(specs):
                raise DeltaCoMeError(f"{file}: tensor {specs[self._next[file]][0]!r} was never written")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()
        if exc[0] is None:
            self.close()
