"""Streamed ``deltacome merge``: the base read one tensor at a time from its safetensors files, each merged tensor
written to its shard as soon as it is computed. Peak memory is one tensor of the base (with its float32 copy and
delta; for a mixture, one fused experts parameter: a layer's experts of one projection) plus the packed adapter,
whatever the size of the model.

It computes what the loaded path (:func:`.merge.load_merged`: whole base in float32, PEFT's ``merge_and_unload``,
``.to(dtype)``, ``save_pretrained``) computes, with the same code and in the same order, so the tensors are
bit-identical:

* a target linear: ``float32(base) + PackedDelta.delta_weight(float32)`` (the layer's merge; the packed delta read
  by the one adapter reader, :func:`~hf_deltacome.io.adapter_files.packed_delta`), a bias delta likewise;
* a dense extra (``modules_to_save``): the adapter's tensor (PEFT swaps in its copy: a tied ``lm_head`` carried
  dense becomes a tensor of its own, as in the loaded path);
* added tokens: the base's embeddings grown with zero rows (:func:`~hf_deltacome.model.prepare_vocab`, the same
  resize), the trainable tokens' rows copied in (PEFT's merge: ``index_copy``);
* a mixture's fused experts parameter (read through transformers' conversion, :mod:`~hf_deltacome.compression.
  stream_keys`): each expert's delta added to its slice, or its dense copy put there, as the per-expert linears of
  the loaded path merge; then the tensors ``save_pretrained`` writes made from it (transformers' conversion reverted:
  Mixtral's one tensor per expert and projection), kept until written;
* everything else: the base's tensor; then one rounding to the output dtype.

The shards are planned as ``save_pretrained`` plans them (same files, same index) and written by
:class:`~hf_deltacome.io.shards.ShardWriter` inside :func:`~hf_deltacome.io.atomic.write_folder`. The base check is
the loaded path's (:func:`~hf_deltacome.io.fingerprint.check_fingerprint`) with each weight read from disk in turn.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..compression.stream_keys import reverted, saved_origins
from ..compression.streaming import HUB_PATTERNS, Checkpoint, release_memory, skeleton, why_not_streamable
from ..errors import ConfigError
from ..io.adapter_files import STATE_DICT_PREFIX, TOKENS_SUFFIX, packed_delta, read_adapter
from ..io.adapter_source import check_extras
from ..io.atomic import write_folder
from ..io.fingerprint import check_fingerprint, default_strict
from ..io.shards import INDEX_NAME, ShardWriter, plan_shards, write_index
from ..linears import fuse_experts, in_weight_layout, is_fused_experts
from ..model import check_layout_fits, prepare_vocab, unfuse_adapter_experts
from ..progress import progress_bar

log = logging.getLogger("hf_deltacome")
PathLike = Union[str, os.PathLike]
ADAPTER_NAME = "default"  # what PeftModel.from_pretrained names it (messages of the shared checks)


def streamable_base(base: PathLike) -> tuple[Optional[Path], Optional[str]]:
    """``(folder, None)`` when ``base`` can be merged streamed: a local folder, or a Hub id whose safetensors
    snapshot is in the local cache, holding a text LM in safetensors; else ``(None, why not)``."""
    text = os.fspath(base)
    folder = Path(text).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(text, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except Exception:  # not a Hub id, or not cached: the loaded path downloads it (or says what is wrong)
            return None, f"--base {text!r} is not a local folder and not in the Hugging Face cache"
    why = why_not_streamable(folder)
    return (None, why) if why is not None else (folder, None)


def not_deltacome(adapter_folder: Path) -> Optional[str]:
    """Why the adapter is not merged streamed (another PEFT method: PEFT's own merge handles it), else ``None``."""
    import json

    try:
        peft_type = json.loads((adapter_folder / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None  # the reader reports it
    return None if peft_type == "DELTACOME" else f"the adapter is a {peft_type} adapter, not a Delta-CoMe one"


def _matches(name: str, targets: Any) -> bool:
    """PEFT's ``modules_to_save`` match (a module whose name ends with a target)."""
    return any(name.endswith(t) for t in targets or ())


class StreamedMerge:
    """One streamed merge: the base's skeleton (meta), the read adapter, the checks, then :meth:`write`.

    Construction raises `ConfigError` when the base cannot be streamed after all (its checkpoint keys are not its
    parameters' names, say): the caller falls back to the loaded path.
    """

    def __init__(self, folder: Path, name: str, adapter_folder: Path) -> None:
        self.ckpt = Checkpoint(folder, "base")
        self.model, self.keys = skeleton(self.ckpt)
        self.model.config._name_or_path = name  # as from_pretrained(name) records it (base check, messages)
        self.adapter_folder = adapter_folder
        self._packed: tuple[str, dict[str, Any]] = ("", {})  # the packed deltas of the tensor being merged
        self.experts = {n: m for n, m in self.model.named_modules() if is_fused_experts(m)}
        self._origins = saved_origins(self.model)
        self._pending: dict[str, torch.Tensor] = {}  # converted together with a tensor written before

    def check(self, adapter: str, strict: Optional[bool]) -> None:
        """Read the adapter and run the loaded path's checks on the skeleton: the base fingerprint (every weight read
        from disk in turn), the vocabulary grown for added tokens, the layout's modules, the dense extras."""
        self.config, self.state = read_adapter(self.adapter_folder)
        config, model = self.config, self.model
        strict = default_strict() if strict is None else bool(strict)

        def read(weight: Any) -> Optional[torch.Tensor]:
            key = self.keys.get(weight.name)
            return None if key is None else self.ckpt.read(key)

        try:
            check_fingerprint(config.base_fingerprint, model, strict=strict, adapter=adapter,
                              vocab_rows=config.base_vocab_size, read=read)  # fmt: skip
        finally:
            release_memory()
        prepare_vocab(model, config)
        unfuse_adapter_experts(model, config, meta=True)  # as a load would
        try:
            check_layout_fits(model, config, ADAPTER_NAME)
            for module, entry in config.layout.items():
                if entry.get("bias") and model.get_submodule(module).bias is None:
                    raise ConfigError(f"adapter {ADAPTER_NAME!r} carries a bias delta but the base linear has no bias")
            check_extras(model, self.state, self.adapter_folder / "adapter_model.safetensors", config.modules_to_save)
        finally:
            fuse_experts(model)
        self._untie_extras()

    def _untie_extras(self) -> None:
        """PEFT replaces a ``modules_to_save`` module by its own copy: its parameters are no longer shared with
        anything (a tied ``lm_head`` carried dense is saved as a tensor of its own, and PEFT's merge then sets
        ``tie_word_embeddings`` false). Do the same on the skeleton."""
        for name, module in list(self.model.named_modules(remove_duplicate=False)):
            if name and _matches(name, self.config.modules_to_save):
                for pname, p in list(module.named_parameters(remove_duplicate=False)):
                    owner_path, _, leaf = pname.rpartition(".")
                    owner = module.get_submodule(owner_path) if owner_path else module
                    owner._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        inp, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if getattr(self.model.config, "tie_word_embeddings", False) and inp is not None and out is not None:
            if getattr(inp, "weight", None) is not getattr(out, "weight", None):  # as PEFT's merge notes it
                self.model.config.tie_word_embeddings = False

    def plan(self, dtype: torch.dtype, max_shard_size: Union[int, str]) -> tuple[list, dict, Any]:
        """The output tensors as ``save_pretrained`` of the merged model would list them: ``(specs, files, index)``."""
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        model = self.model
        state = model.state_dict()
        for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
            state.pop(key, None)
        state = remove_tied_weights_from_state_dict(state, model)
        state = reverted(model, state)  # save_pretrained's names: e.g. fused experts as one tensor per expert
        specs = [(n, dtype if t.is_floating_point() else t.dtype, tuple(t.shape)) for n, t in state.items()]
        files, index = plan_shards(specs, max_shard_size, model.num_parameters())
        return specs, files, index

    def _aliases(self) -> dict[str, list[str]]:
        """Every name of each tensor (tied parameters share one), by name."""
        by_id: dict[int, list[str]] = {}
        for name, t in [*self.model.named_parameters(remove_duplicate=False), *self.model.named_buffers()]:
            by_id.setdefault(id(t), []).append(name)
        return {name: names for names in by_id.values() for name in names}

    def _saved(self, name: str, aliases: dict[str, list[str]]) -> torch.Tensor:
        """Tensor ``name`` of the saved checkpoint: a merged parameter, or its part where ``save_pretrained`` converts
        it (the others kept until they are written: they come next in the plan)."""
        if name in self._pending:
            return self._pending.pop(name)
        origin = self._origins.get(name, name)
        t = self.merged(origin, aliases.get(origin, [origin]))
        if origin == name:
            return t
        self._pending.update(reverted(self.model, {origin: t}))
        return self._pending.pop(name)

    def _delta(self, module: str, owner: str = "") -> Any:
        """``module``'s packed delta, kept while the tensors of ``owner`` (default: the module) are merged: a
        module's weight and bias come one after the other, and so do a fused experts parameter and its bias."""
        owner = owner or module
        if self._packed[0] != owner:
            self._packed = (owner, {})
        cached = self._packed[1]
        if module not in cached:
            cached[module] = packed_delta(self.config, self.state, module)
        return cached[module]

    @torch.no_grad()
    def merged(self, name: str, aliases: list[str]) -> torch.Tensor:
        """Tensor ``name`` of the merged model, in float32 (before the one rounding to the output dtype)."""
        config = self.config
        for alias in aliases:
            if _matches(alias.rpartition(".")[0], config.modules_to_save):
                return self.state[f"{STATE_DICT_PREFIX}{alias}"].to(torch.float32)
        want = self._tensors[name]
        key = next((self.keys[a] for a in aliases if a in self.keys), name if name in self.ckpt.specs else None)
        t = self.ckpt.read(key) if key is not None else want.detach().clone()
        t = t.to(torch.float32) if t.is_floating_point() else t
        if t.dim() and t.shape[0] < want.shape[0] and t.shape[1:] == want.shape[1:]:  # grown vocabulary (resize_vocab)
            t = torch.cat([t, t.new_zeros((want.shape[0] - t.shape[0], *t.shape[1:]))])
        for alias in aliases:
            module, _, leaf = alias.rpartition(".")
            if module in config.layout:
                packed = self._delta(module)
                if leaf == "weight":
                    t = t + in_weight_layout(self.model.get_submodule(module), packed.delta_weight(torch.float32))
                elif leaf == "bias" and packed.bias is not None:
                    t = t + packed.bias.to(t.device, t.dtype)
            if module in self.experts:
                t = self._merge_experts(t, module, leaf)
            rows = (config.trainable_token_indices or {}).get(module)
            if rows and leaf == "weight":
                values = self.state[f"{STATE_DICT_PREFIX}{module}{TOKENS_SUFFIX}"]
                t = t.index_copy(0, torch.tensor(rows, device=t.device), values.to(t))
        return t

    def _merge_experts(self, t: torch.Tensor, module: str, leaf: str) -> torch.Tensor:
        """A fused experts parameter (``gate_up_proj``, ``down_proj`` or a bias) with each expert's linear merged: its
        packed delta added, or its dense copy (``modules_to_save``) in place, as the stand-in's linears merge."""
        experts, config = self.experts[module], self.config
        proj, part = (leaf[: -len("_bias")], "bias") if leaf.endswith("_bias") else (leaf, "weight")
        transposed = bool(experts.is_transposed) and part == "weight"
        for e in range(experts.num_experts):
            linear = f"{module}.{e}.{proj}"
            if _matches(linear, config.modules_to_save):
                value = self.state[f"{STATE_DICT_PREFIX}{linear}.{part}"].to(torch.float32)
                t[e] = value.t() if transposed else value
            elif linear in config.layout:
                packed = self._delta(linear, owner=f"{module}.{proj}")
                if part == "weight":
                    delta = packed.delta_weight(torch.float32)
                    t[e] = t[e] + (delta.t() if transposed else delta)
                elif packed.bias is not None:
                    t[e] = t[e] + packed.bias.to(t.device, t.dtype)
        return t

    def write(self, output: Path, dtype: torch.dtype, *, tokenizer: Any, card: str,
              max_shard_size: Union[int, str], progress: bool = False) -> list[str]:  # fmt: skip
        """Every file of the merged model into ``output`` in one transaction, one tensor in memory at a time."""
        specs, files, index = self.plan(dtype, max_shard_size)
        model = self.model
        self._tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
        aliases = self._aliases()
        model.config.dtype = str(dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]

        def fill(tmp: Path) -> None:
            model.config.save_pretrained(tmp)
            if model.can_generate():
                self._generation_config().save_pretrained(tmp)
            bar = progress_bar(len(specs), progress, "Merging", unit="tensor")
            with ShardWriter(tmp, files, {"format": "pt"}) as writer:
                for name, out_dtype, _ in specs:
                    t = self._saved(name, aliases)
                    writer.write(name, t.to(out_dtype))
                    del t
                    bar.update(1)
            bar.close()
            self._packed = ("", {})
            release_memory()
            if index is not None:
                write_index(tmp, index)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(card)

        return write_folder(output, fill, stale=["*.safetensors", INDEX_NAME])

    def _generation_config(self) -> Any:
        """The base folder's generation config, as ``from_pretrained`` sets it (else one made from config.json)."""
        from transformers import GenerationConfig

        try:
            return GenerationConfig.from_pretrained(self.ckpt.folder)
        except OSError:
            return GenerationConfig.from_pretrained(self.ckpt.folder, config_file_name="config.json",
                                                    _from_model_config=True)  # fmt: skip
