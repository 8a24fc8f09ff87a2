"""PEFT tuner model for Delta-CoMe: injects `DeltaCoMeLinear` layers where the adapter's layout says."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from types import SimpleNamespace
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils import _get_submodules
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from .config import DeltaCoMeConfig
from .errors import AdapterFileError, ConfigError
from .layer import BASE_ADAPTER_NAME, DeltaCoMeLayer, DeltaCoMeLinear, MixedBatch
from .linears import ExpertsAsLinears, fuse_experts, is_linear, linear_shape, unfuse_experts


def _adapter_names_pre_hook(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs.setdefault("adapter_names", adapter_names)  # per-token names given by a fused experts stand-in win
    return args, kwargs


def _adapter_hosts(root: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``root`` except the insides of per-adapter containers (``deltacome_delta``, a wrapper's
    ``modules_to_save`` / ``token_adapter``).

    A mixed-batch forward needs only the Delta-CoMe layers and the wrappers themselves; ``root.modules()`` would also
    walk the thousands of sub-modules each loaded adapter adds (bands, factors, copies of norms), making every forward
    slower as adapters are added (0.39 s per forward with 16 SmolLM2 adapters loaded, 0.04 s with one).
    """
    stack, seen = [root], set()
    while stack:
        module = stack.pop()
        if id(module) in seen:  # a module reachable twice gets one hook, like nn.Module.modules()
            continue
        seen.add(id(module))
        yield module
        skip = {"deltacome_delta"} if isinstance(module, DeltaCoMeLayer) else set()
        if isinstance(module, AuxiliaryTrainingWrapper):
            skip |= {"modules_to_save", "token_adapter"}
        stack.extend(
            child for name, child in reversed(module._modules.items()) if child is not None and name not in skip
        )


@contextlib.contextmanager
def only_adapter(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """Hide every other loaded adapter's packed deltas and dense-extra copies while ``adapter_name`` is loaded.

    PEFT's injection and state-dict loading walk every module of the model (about 20 full walks per load, plus the
    state dicts): with every loaded adapter in view, the 64th SmolLM2 adapter took 10x as long as the first (issue
    16). Hidden, a load visits the base, the layers and its own adapter only, so its time does not grow with the
    number loaded, and only its keys are loaded and checked. The active adapters stay in view (PEFT moves their
    trainability around); everything is put back in its order afterwards, also on failure. Not for use while
    another thread runs the model (the engine loads adapters between steps).
    """
    keep = {adapter_name, *getattr(model, "active_adapters", ())}
    hidden: list[tuple[nn.ModuleDict, list[str], dict[str, nn.Module]]] = []
    for module in _adapter_hosts(model):
        if isinstance(module, DeltaCoMeLayer):
            holder = module.deltacome_delta
        elif isinstance(module, ModulesToSaveWrapper):
            holder = module.modules_to_save
        else:
            continue
        away = {k: m for k, m in holder._modules.items() if k not in keep}
        if away:
            hidden.append((holder, list(holder._modules), away))
            for k in away:
                del holder._modules[k]
    try:
        yield
    finally:
        for holder, order, away in hidden:
            now = dict(holder._modules)
            holder._modules.clear()
            for k in order:
                if k in away or k in now:
                    holder._modules[k] = away[k] if k in away else now[k]
            for k, m in now.items():  # added by this load
                if k not in holder._modules:
                    holder._modules[k] = m


def _rowwise_extras_forward(
    wrapper: ModulesToSaveWrapper, batch: MixedBatch, x: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    """Mixed-batch forward of a dense extra (``modules_to_save``): each adapter's copy runs on its own rows (per-token
    names given by a fused experts stand-in, ``adapter_names=``, replace the batch's).

    PEFT's wrapper allows only Linear/Embedding/Conv here, but fine-tunes change norms too; any module that maps
    batch row ``i`` to output row ``i`` (norms, linears, embeddings) is exact when split by rows. Rows whose adapter
    did not change this module (or ``"__base__"``) use the base module.
    """
    adapter_names = kwargs.pop("adapter_names", None) or batch
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != len(adapter_names):
        rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else "no"
        raise ValueError(
            f"adapter_names has {len(adapter_names)} entries but {wrapper.original_module.__class__.__name__} "
            f"received an input with {rows} batch rows; a mixed batch needs one adapter name per row"
        )
    if wrapper.disable_adapters:
        return wrapper.original_module(x, *args, **kwargs)
    out = None
    for name in dict.fromkeys(adapter_names):
        rows = [i for i, n in enumerate(adapter_names) if n == name]
        module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
        y = module(x[rows], *args, **kwargs)
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out[rows] = y
    return out


@torch.no_grad()
def resize_vocab(model: nn.Module, rows: int) -> None:
    """Grow the input and output embeddings of ``model`` to ``rows`` tokens (and ``config.vocab_size`` with them).

    For adapters of fine-tunes that added tokens: the new rows are zero (the adapter carries their values), a tied
    ``lm_head`` stays tied, no random number is drawn, and meta (not yet loaded) weights work too.
    """
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    grow = rows - inp.weight.shape[0]
    if grow <= 0:
        return
    if not isinstance(inp, nn.Embedding) or (out is not None and not isinstance(out, nn.Linear)):
        raise ConfigError(
            f"this adapter's fine-tune added {grow} token(s), but the base's embeddings ({type(inp).__name__}, "
            f"{type(out).__name__}) cannot be resized here (already wrapped by another adapter?)"
        )

    def grown(p: nn.Parameter) -> nn.Parameter:
        extra = torch.zeros((grow, *p.shape[1:]), dtype=p.dtype, device=p.device)
        return nn.Parameter(torch.cat([p.detach(), extra]), requires_grad=p.requires_grad)

    tied = out is not None and out.weight is inp.weight
    inp.weight = grown(inp.weight)
    inp.num_embeddings = rows
    if out is not None:
        out.weight = inp.weight if tied else grown(out.weight)
        if out.bias is not None:
            out.bias = grown(out.bias)
        out.out_features = rows
    config = getattr(model, "config", None)
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c is not None}.values():
        if getattr(cfg, "vocab_size", None) is not None:
            cfg.vocab_size = rows


def prepare_vocab(model: nn.Module, config: DeltaCoMeConfig) -> None:
    """A fine-tune that added tokens: the base's embeddings grow to its vocabulary before PEFT injects (the dense
    copies and trainable tokens are built on the grown modules); the base check reads the first rows."""
    rows = config.vocab_size
    if rows is not None and config.base_vocab_size is not None:
        current = model.get_input_embeddings().weight.shape[0]
        if current == config.base_vocab_size:
            resize_vocab(model, rows)


def unfuse_adapter_experts(model: nn.Module, config: DeltaCoMeConfig, meta: bool = False) -> int:
    """Swap in the per-expert stand-ins of the fused experts whose linears the adapter names, compressed (``layout``)
    or carried dense (``modules_to_save``): what loading it does, and what checking it against a base needs."""
    return unfuse_experts(model, [*config.layout, *(config.modules_to_save or [])], meta=meta)


def check_layout_fits(model: nn.Module, config: DeltaCoMeConfig, adapter_name: str) -> None:
    """Every module of the adapter's layout is a linear of the base with the layout's shape (else `ConfigError`)."""
    modules = dict(model.named_modules())
    missing = [name for name in config.layout if name not in modules]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(
            f"adapter {adapter_name!r} targets modules that the base model "
            f"({type(model).__name__}) does not have: {shown}; was it made for another base model?"
        )
    for name, entry in config.layout.items():
        module = modules[name]
        base = module.get_base_layer() if isinstance(module, DeltaCoMeLayer) else module
        if not is_linear(base):
            raise ConfigError(f"adapter {adapter_name!r} targets {name!r}, which is a {type(base).__name__}")
        shape = list(linear_shape(base))
        if list(entry["shape"]) != shape:
            raise ConfigError(
                f"adapter {adapter_name!r} expects module {name!r} of shape {list(entry['shape'])} "
                f"but the base model has {shape}"
            )


class DeltaCoMeModel(BaseTuner):
    """Wraps a base model so that each linear listed in the adapter's ``layout`` adds its packed delta.

    Created by PEFT (``get_peft_model``, ``PeftModel.from_pretrained``); users normally build adapters with
    :func:`hf_deltacome.compress`.
    """

    prefix: str = "deltacome_"
    tuner_layer_cls = DeltaCoMeLayer
    target_module_mapping: dict = {}

    # -- injection -------------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: DeltaCoMeConfig, model_config: dict) -> DeltaCoMeConfig:
        if not peft_config.layout:
            raise ConfigError(
                "this DeltaCoMeConfig has an empty layout: a Delta-CoMe adapter is created by "
                "hf_deltacome.compress(base, finetuned, config) or loaded with PeftModel.from_pretrained"
            )
        peft_config.target_modules = set(peft_config.layout)
        return peft_config

    def _prepare_model(self, peft_config: DeltaCoMeConfig, model: nn.Module) -> None:
        prepare_vocab(model, peft_config)

    def _pre_injection_hook(self, model: nn.Module, config: DeltaCoMeConfig, adapter_name: str) -> None:
        unfuse_adapter_experts(model, config)  # those fused experts run as per-expert linears
        check_layout_fits(model, config, adapter_name)

    @staticmethod
    def _check_target_module_exists(peft_config: DeltaCoMeConfig, key: str) -> Any:
        if key in peft_config.layout:
            return True
        if not peft_config.exclude_modules:
            return False
        # what compression left out by exclude_modules is PEFT's excluded marker (else PEFT warns that it excluded
        # nothing, at every compress and load); PEFT's own matching, with no targets and nothing to save
        probe = SimpleNamespace(exclude_modules=peft_config.exclude_modules, modules_to_save=None, target_modules=set(),
                                target_parameters=None)  # fmt: skip
        return check_target_module_exists(probe, key)

    def _create_and_replace(
        self,
        peft_config: DeltaCoMeConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        layout = {"group_size": peft_config.group_size, **peft_config.layout[current_key]}  # the entry may omit it
        if isinstance(target, DeltaCoMeLinear):
            target.update_layer(adapter_name, layout, inference_mode=peft_config.inference_mode)
            return
        new_module = DeltaCoMeLinear(target, adapter_name, layout, inference_mode=peft_config.inference_mode)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
        # PEFT moves the new adapter to the base weight's device, "meta" when accelerate offloaded the base (to disk
        # or CPU): the packed factors are small and are not in the offload map, so keep them real (zeroed until the
        # adapter's weights are loaded), as DeltaCoMeLayer does for adapters added later
        packed = new_module.deltacome_delta
        if any(b.device.type == "meta" for b in packed.buffers()):
            packed.to_empty(device="cpu")
            for buf in packed.buffers():
                buf.zero_()

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(child, AuxiliaryTrainingWrapper):
            # unloading a dense copy or trainable tokens (merge_and_unload): ``new_module`` is the merged module
            # itself. PEFT's version would assign the wrapper's ``weight`` to it, a plain tensor for trainable tokens
            # on a linear (lm_head of a fine-tune that added tokens), and fail; LoRA's own override skips it too
            setattr(parent, child_name, new_module)
            return None
        base = getattr(child, "base_layer", child)
        if not callable(getattr(base, "device_and_dtype", None)):
            return super()._replace_module(parent, child_name, new_module, child)
        # a packed quantized base (AMLQ): PEFT's version reads its ``weight`` (a full dequantization) once per
        # adapter submodule only to learn its device; the packed module tells it directly
        setattr(parent, child_name, new_module)
        device, _ = base.device_and_dtype()
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(device)
        return None

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        # The packed factors are integer buffers: nothing of ours trains. Freeze the base.
        for name, param in model.named_parameters():
            if self.prefix not in name:
                param.requires_grad = False

    # -- merging: every layer is checked before any merges, so a quantized base layer cannot stop a merge halfway ----
    def _check_mergeable(self, adapter_names: Optional[list[str]]) -> None:
        for module in self.model.modules():
            if isinstance(module, DeltaCoMeLinear):
                module.check_mergeable(module.active_adapters if adapter_names is None else adapter_names)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> Any:  # fmt: skip
        if merge:
            self._check_mergeable(adapter_names)
        else:  # unload(): the base as it was. PEFT would keep the adapter's copies of modules_to_save (its changed
            for name, module in list(self.model.named_modules()):  # norms, embeddings), half of the fine-tune
                if isinstance(module, ModulesToSaveWrapper):
                    parent, _, leaf = _get_submodules(self.model, name)
                    setattr(parent, leaf, module.original_module)
        model = super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                     adapter_names=adapter_names)  # fmt: skip
        fuse_experts(model)  # fused experts again, holding the merged values
        return model

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **_: Any) -> None:
        """Not offered (LoRA's combination of factors): a Delta-CoMe adapter is a quantized delta, and a weighted sum
        of several is a new delta to compress, not a re-weighting of stored codes."""
        raise NotImplementedError(
            f"add_weighted_adapter({adapters!r} -> {adapter_name!r}) combines LoRA factors; Delta-CoMe adapters store "
            "quantized deltas that cannot be re-weighted in place. Serve them side by side with adapter_names= (one "
            "adapter per row of a batch), or merge one into the base (merge_and_unload(), `deltacome merge`) and "
            "compress the combined fine-tune against the base."
        )

    # -- saving and loading ----------------------------------------------------------------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Our adapter entries are nested modules (``deltacome_delta.<adapter>.bands.0.v.qweight``), so the adapter
        # name is not PEFT's usual second-to-last component.
        marker = f".deltacome_delta.{adapter_name}."
        if marker in key:
            return key.replace(marker, ".deltacome_delta.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: DeltaCoMeConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # PEFT loads non-strictly; an adapter missing any packed tensor must not load silently as a zero delta.
        expected = {k for k in model.state_dict() if f".deltacome_delta.{adapter_name}." in k}
        missing = sorted(k for k in expected if k not in remapped)
        if missing:
            raise AdapterFileError(
                f"adapter {adapter_name!r}: the weights file lacks {len(missing)} tensor(s) that its "
                f"adapter_config.json layout requires, e.g. {missing[0]!r}"
            )
        return remapped

    # -- mixed batches ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Route per-row ``adapter_names`` to every Delta-CoMe layer and dense-extras wrapper."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        hosts = list(_adapter_hosts(self))
        known = set()
        for module in hosts:
            if isinstance(module, DeltaCoMeLayer):
                known |= set(module.deltacome_delta.keys())
        unknown = {n for n in adapter_names if n != BASE_ADAPTER_NAME} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [n for n in adapter_names for _ in range(num_beams)]
        # one row index for all layers; a caller's own MixedBatch is kept, so that its index, built on the first
        # forward, is reused by later ones (no host-to-device copy: a decode step can be captured in a CUDA graph)
        batch = adapter_names if isinstance(adapter_names, MixedBatch) else MixedBatch(adapter_names)
        handles, swapped = [], []
        for module in hosts:
            if isinstance(module, (DeltaCoMeLayer, ExpertsAsLinears)) or (
                isinstance(module, AuxiliaryTrainingWrapper) and not isinstance(module, ModulesToSaveWrapper)
            ):
                hook = partial(_adapter_names_pre_hook, adapter_names=batch)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            elif isinstance(module, ModulesToSaveWrapper):
                # an instance-level forward (an accelerate hook, say) is put back afterwards
                swapped.append((module, module.__dict__.get("forward")))
                module.forward = partial(_rowwise_extras_forward, module, batch)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, previous in swapped:
                if previous is None:
                    del module.forward  # back to the class's forward
                else:
                    module.forward = previous
