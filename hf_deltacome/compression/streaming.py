"""Streamed models: a model's safetensors files read one tensor, or one decoder layer, at a time.

``compress(base_path, finetuned_path)`` never loads either model whole. :class:`Checkpoint` knows which file holds
each tensor (``model.safetensors``, or the shards of ``model.safetensors.index.json``; a Hub id is downloaded first,
safetensors only); :func:`skeleton` builds the model on the meta device (accelerate's ``init_empty_weights``) with
every parameter in its checkpoint's dtype; :class:`StreamedPair` puts real tensors into the skeletons only while
they are worked on (:meth:`StreamedPair.hold`, ``safe_open`` reads) and puts the meta ones back afterwards. So peak
memory is about one decoder layer of each model, the calibration activations and the SVD workspace (plus the adapter
being built), whatever the number of layers. A checkpoint whose keys transformers converts when loading (renamed
legacy names; a mixture's experts, stored one tensor per expert and fused on load) is read through that conversion,
and a mixture's experts one expert's linear at a time (:mod:`.stream_keys`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DeltaCoMeError
from ..io.adapter_files import SAFETENSORS_DTYPES, is_adapter_folder
from ..io.fingerprint import fingerprint_json
from ..linears import is_conv1d, unfuse_experts
from ..progress import progress_bar
from .changes import judge, loaded_verdicts
from .stream_keys import Converted, Source, converted_spec, expert_sources, read_source, resolve_sources

log = logging.getLogger("hf_deltacome")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # no pickles, no GGUF
WRAPPER_SEGMENTS = ("base_layer", "original_module", "token_adapter")  # PEFT's wrappers around a base module


def canonical(name: str) -> str:
    """A parameter's name in the unwrapped model (PEFT's wrapper segments removed)."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_SEGMENTS)


def local_folder(name_or_path: str | os.PathLike, role: str) -> Path:
    """The folder of a local model, or of a Hub model's safetensors snapshot (downloaded when not cached)."""
    path = Path(name_or_path).expanduser()
    text = os.fspath(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise DeltaCoMeError(f"--{role} {text!r}: no such model directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, unknown repo: one line naming the input
        raise DeltaCoMeError(f"--{role} {text!r}: cannot fetch the model from the Hub: {e}") from e


def why_not_streamable(name_or_path: str | os.PathLike) -> str | None:
    """Why a local model folder cannot be streamed (``None``: it can): no safetensors, or not a text causal LM."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return None  # a Hub id: decided once its snapshot is there
    if not (folder / WEIGHTS_NAME).is_file() and not (folder / INDEX_NAME).is_file():
        if is_adapter_folder(folder):
            return (f"{folder} is a PEFT adapter, not a model (pass the fine-tune it makes: "
                    "PeftModel.from_pretrained(base, folder).merge_and_unload(), on its own copy of the base, with "
                    "the base loaded too; `deltacome compress` merges an adapter folder itself)")  # fmt: skip
        return f"{folder} has no {WEIGHTS_NAME} or {INDEX_NAME} (streaming reads safetensors only)"
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return f"{folder} has no readable config.json"
    if "vision_config" in cfg:
        return f"{folder} is a vision-language model (streaming compresses text causal LMs)"
    if isinstance(cfg, dict) and cfg.get("quantization_config"):
        method = (cfg["quantization_config"] or {}).get("quant_method", "?")
        return f"{folder} is a quantized model ({method}): its linears are read through its quantizer"
    return None


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of a model folder's safetensors files (the shards its index names, else ``model.safetensors``)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise DeltaCoMeError(f"{index}: not a readable safetensors index ({e})") from None
    else:
        names = {WEIGHTS_NAME}
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable`` of ``/proc/meminfo``; ``None``: unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class Checkpoint:
    """The safetensors files of one model: which file holds each tensor, its dtype and shape; reads any tensor alone.

    Reads open their file for the duration of a :meth:`session` only (a mapped file's touched pages count towards
    the process's resident memory while it stays open).
    """

    def __init__(self, name_or_path: str | os.PathLike, role: str, dtype: torch.dtype | None = None) -> None:
        from safetensors import safe_open

        self.name, self.role, self.dtype = os.fspath(name_or_path), role, dtype
        self.folder = local_folder(name_or_path, role)
        why = why_not_streamable(self.folder)
        if why is not None:
            raise ConfigError(f"--{role} {self.name!r}: cannot be streamed: {why}; load the models instead")
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"--{role} {self.name!r}: {INDEX_NAME} is not a valid shard index: {e}") from e
            self.files = {k: self.folder / v for k, v in weight_map.items()}
        else:
            self.files = {}
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for file in sorted(set(self.files.values())) or [self.folder / WEIGHTS_NAME]:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        sl = handle.get_slice(key)
                        self.specs[key] = (SAFETENSORS_DTYPES.get(sl.get_dtype()), tuple(sl.get_shape()))
                        self.files.setdefault(key, file)
            except Exception as e:  # missing shard, bad header
                raise ConfigError(f"--{role} {self.name!r}: cannot read {file.name}: {e}") from e
        self._handles: dict[Path, Any] | None = None

    def nbytes(self) -> int:
        """Bytes of the safetensors files on disk."""
        return sum(os.path.getsize(f) for f in set(self.files.values()))

    def main_dtype(self) -> torch.dtype:
        """The dtype most of the weights are stored in (or the requested one)."""
        if self.dtype is not None:
            return self.dtype
        counts = Counter({d: 0 for d, _ in self.specs.values()})
        for d, shape in self.specs.values():
            counts[d] += int(torch.Size(shape).numel())
        return counts.most_common(1)[0][0] if counts else torch.float32

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Keep the files read inside this block open (closed, and their mapped pages released, at the end)."""
        if self._handles is not None:  # nested: the outer session owns the handles
            yield
            return
        self._handles = {}
        try:
            yield
        finally:
            handles, self._handles = self._handles, None
            for h in handles.values():
                h.__exit__(None, None, None)

    def _handle(self, key: str) -> Any:
        from safetensors import safe_open

        file = self.files.get(key)
        if file is None:
            raise ConfigError(f"--{self.role} {self.name!r}: the checkpoint has no tensor {key!r}")
        handle = self._handles.get(file)
        if handle is None:
            handle = safe_open(str(file), framework="pt", device="cpu").__enter__()
            self._handles[file] = handle
        return handle

    def spec(self, source: Source) -> tuple[torch.dtype, tuple[int, ...]]:
        """``(dtype, shape)`` of a source as stored (a converted parameter's as transformers builds it)."""
        if isinstance(source, Converted):
            return converted_spec(source, self.specs)
        return self.specs[source]

    def read(self, key: Source, device: torch.device | str = "cpu") -> torch.Tensor:
        """Tensor ``key`` (a checkpoint key, or a parameter transformers converts, or one expert's slice of it) in
        its stored dtype (or the requested one), on ``device``."""
        with self.session():
            t = read_source(key, lambda k: self._handle(k).get_tensor(k),
                            lambda k, i: self._handle(k).get_slice(k)[i])  # fmt: skip
        t = t.to(device)
        return t if self.dtype is None or not t.is_floating_point() else t.to(self.dtype)


def skeleton(ckpt: Checkpoint) -> tuple[nn.Module, dict[str, Source]]:
    """The model on the meta device, each parameter in its checkpoint's dtype, and the source of every parameter
    name: its checkpoint key, or the tensors transformers converts into it (:mod:`.stream_keys`; tied parameters,
    such as a tied ``lm_head``, map to the tensor the checkpoint holds)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(ckpt.folder)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=ckpt.main_dtype())
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--{ckpt.role} {ckpt.name!r}: cannot build the model from its config.json: {e}") from e
    model.config._name_or_path = ckpt.name  # as from_pretrained(name) records it (fingerprint, model card)
    model.tie_weights()  # from_config leaves a tied lm_head untied, and its checkpoint holds no tensor of its own
    model.eval().requires_grad_(False)
    params = list(model.named_parameters(remove_duplicate=False))
    names_of: dict[int, list[str]] = {}
    for name, p in params:
        names_of.setdefault(id(p), []).append(name)
    sources, refused = resolve_sources(model, list(ckpt.specs))
    keys: dict[str, Source] = {}
    for name, p in params:
        key = sources.get(name) or next((sources[n] for n in names_of[id(p)] if n in sources), None)
        if key is None:
            why = refused.get(name, "streaming needs checkpoint keys named like the model's parameters, or converted "
                                    "by transformers' conversion mapping")  # fmt: skip
            raise ConfigError(f"--{ckpt.role} {ckpt.name!r}: the checkpoint has no tensor for parameter {name!r} "
                              f"({why}); load the models instead")  # fmt: skip
        keys[name] = key
    replaced: dict[int, nn.Parameter] = {}
    for name, p in params:
        dtype, shape = ckpt.spec(keys[name])
        if tuple(p.shape) != shape:
            what = keys[name] if isinstance(keys[name], str) else f"{name} (converted from its checkpoint tensors)"
            raise ConfigError(
                f"--{ckpt.role} {ckpt.name!r}: tensor {what!r} has shape {list(shape)}, the model built from "
                f"config.json expects {list(p.shape)}"
            )
        if id(p) not in replaced:
            want = ckpt.dtype if ckpt.dtype is not None and dtype.is_floating_point else dtype
            replaced[id(p)] = nn.Parameter(torch.empty(shape, dtype=want, device="meta"), requires_grad=False)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = replaced[id(p)]
    return model, keys


def unfused_skeleton(model: nn.Module, keys: dict[str, Source]) -> None:
    """Each fused experts module of a skeleton as an `ExpertsAsLinears` of meta views, and the source of each
    per-expert linear's weight added to ``keys`` (read one expert at a time; the fused names stay for fingerprints)."""
    if unfuse_experts(model, meta=True):
        keys.update(expert_sources(model, keys))


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise, and the RSS grows with the layers)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            _libc().malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_THRESHOLD = 128 << 10  # glibc's own starting mmap threshold, kept fixed: larger blocks are mapped on their own


def bounded_heap() -> None:
    """Keep glibc's mmap threshold at its starting 128 KiB (process-wide, set once per streamed run): every larger
    block is mapped on its own and given back to the system when freed.

    By default glibc raises the threshold to the size of each large block freed (up to 32 MiB), so the layer-sized
    tensors of a streamed run (a 7B layer's weights, deltas, factors and GPTQ workspaces, 4-180 MB) come to be
    carved from the heap, whose freed pieces stay resident. Traced on a 7B layer: fingerprinting peaked at 1.74 GiB
    instead of 0.76, compressing one attention projection at 1.39 instead of 1.22. The cost is a page fault per
    fresh page of a large tensor, nothing against an SVD.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = _libc()
            libc.mallopt(_M_MMAP_THRESHOLD, HEAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, HEAP_THRESHOLD)


class LoadedPair:
    """Two loaded models (``compress(base_model, finetuned_model)``): every weight is in memory already."""

    streamed = False

    def __init__(self, base: nn.Module, finetuned: nn.Module) -> None:
        self.base, self.finetuned = base, finetuned

    def verdicts(self, base_vocab: int | None, vocab_params: Sequence[str], progress: bool) -> Iterator[tuple]:
        return loaded_verdicts(self.base, self.finetuned, base_vocab, vocab_params)

    def fingerprint(self, progress: bool) -> str:
        return fingerprint_json(self.base)

    def finetuned_fingerprint(self, progress: bool) -> str:
        return fingerprint_json(self.finetuned)

    def read_finetuned(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.finetuned.get_parameter(canonical(name)).detach()

    def hold(self, names: Sequence[str], *, base: nn.Module | None, finetuned: nn.Module | None) -> Any:
        return contextlib.nullcontext()


class StreamedPair:
    """A base and its fine-tune read from their checkpoints: comparisons, fingerprint reads and held modules."""

    streamed = True

    def __init__(self, base: str | os.PathLike, finetuned: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:  # fmt: skip
        bounded_heap()
        self.base_ckpt = Checkpoint(base, "base", dtype)
        self.ft_ckpt = Checkpoint(finetuned, "finetuned", dtype)
        self.base, self.base_keys = skeleton(self.base_ckpt)
        convs = [n for n, m in self.base.named_modules() if is_conv1d(m)]
        if convs:  # read in place of nn.Linear weights, their in x out tensors would be taken as out x in
            raise ConfigError(
                f"--base {self.base_ckpt.name!r}: {type(self.base).__name__} computes with transformers' Conv1D "
                f"({convs[0]}, ...), which streamed compression does not read; load both models and pass them "
                "(deltacome compress --in-memory)"
            )
        self.finetuned, self.ft_keys = skeleton(self.ft_ckpt)
        unfused_skeleton(self.base, self.base_keys)  # fused experts: one linear per expert, read one at a time
        unfused_skeleton(self.finetuned, self.ft_keys)
        self.device = device or torch.device("cpu")

    def read_base(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The base's tensor of (canonical) parameter ``name``."""
        return self.base_ckpt.read(self.base_keys[canonical(name)], device)

    def read_finetuned(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The fine-tune's tensor of (canonical) parameter ``name``."""
        return self.ft_ckpt.read(self.ft_keys[canonical(name)], device)

    def read_delta(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Target linear ``name``'s delta (float32, ``out x in``) and fine-tuned weight, read from the checkpoints."""
        weight = self.read_finetuned(f"{name}.weight")
        return weight.float() - self.read_base(f"{name}.weight").float(), weight

    def verdicts(self, base_vocab: int | None, vocab_params: Sequence[str], progress: bool) -> Iterator[tuple]:
        """The :func:`~.changes.judge` verdict of every parameter, reading one pair of tensors at a time."""
        names = [n for n, _ in self.finetuned.named_parameters(remove_duplicate=False)]
        seen: dict[tuple[str, str], tuple[str, bool]] = {}
        bar = progress_bar(len(names), progress, "Comparing base and fine-tune", unit="tensor")
        for name in names:
            key = (self.base_keys[name], self.ft_keys[name])
            if key not in seen:  # tied parameters are read once
                pb, pf = self.base_ckpt.read(key[0]), self.ft_ckpt.read(key[1])
                seen[key] = judge(name, pb, pf, base_vocab, vocab_params)
                del pb, pf
            bar.update(1)
            yield name, *seen[key]
        bar.close()
        release_memory()

    def fingerprint(self, progress: bool) -> str:
        """The base's fingerprint (:mod:`hf_deltacome.io.fingerprint`), every weight read from disk in turn."""
        return self._fingerprint(self.base, self.base_ckpt, self.base_keys, "the base", progress)

    def finetuned_fingerprint(self, progress: bool) -> str:
        """The fine-tune's fingerprint (what a resumed run checks it continues with), read from disk the same way."""
        return self._fingerprint(self.finetuned, self.ft_ckpt, self.ft_keys, "the fine-tune", progress)

    @staticmethod
    def _fingerprint(model: nn.Module, ckpt: Checkpoint, keys: dict[str, str], who: str, progress: bool) -> str:
        bar = progress_bar(len(keys), progress, f"Fingerprinting {who}", unit="tensor")

        def read(weight: Any) -> torch.Tensor | None:
            bar.update(1)
            key = keys.get(weight.name)
            return None if key is None else ckpt.read(key)

        try:
            return fingerprint_json(model, read)
        finally:
            bar.close()
            release_memory()

    @contextlib.contextmanager
    def hold(self, names: Sequence[str], *, base: nn.Module | None, finetuned: nn.Module | None) -> Iterator[None]:
        """Real weights in modules ``names`` of ``base`` (the skeleton, or the PEFT model around it) and of
        ``finetuned`` while inside, on this pair's device; back to meta afterwards, and the memory released.

        Parameters that are already real (dense copies, packed buffers, an outer hold) are left alone; a vocabulary
        weight grown for added tokens gets zero rows past the base's (the adapter carries them)."""
        restore: list[tuple[nn.Module, str, nn.Parameter]] = []
        try:
            for root, ckpt, keys in ((base, self.base_ckpt, self.base_keys), (finetuned, self.ft_ckpt, self.ft_keys)):
                if root is None:
                    continue
                with ckpt.session():
                    for name in names:
                        self._materialize(root, name, ckpt, keys, restore)
            yield
        finally:
            for owner, leaf, p in reversed(restore):
                owner._parameters[leaf] = p
            restore.clear()
            release_memory()

    def _materialize(self, root: nn.Module, name: str, ckpt: Checkpoint, keys: dict[str, str], restore: list) -> None:
        module = root.get_submodule(name)
        done: dict[int, nn.Parameter] = {}
        for pname, p in list(module.named_parameters(remove_duplicate=False)):
            if p.device.type != "meta":
                continue
            owner_path, _, leaf = pname.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            if id(p) not in done:
                t = ckpt.read(keys[canonical(f"{name}.{pname}" if name else pname)], self.device).to(p.dtype)
                if t.shape[0] < p.shape[0] and t.shape[1:] == p.shape[1:]:  # grown vocabulary: zero rows
                    t = torch.cat([t, t.new_zeros((p.shape[0] - t.shape[0], *t.shape[1:]))])
                done[id(p)] = nn.Parameter(t, requires_grad=False)
            owner._parameters[leaf] = done[id(p)]
            restore.append((owner, leaf, p))
