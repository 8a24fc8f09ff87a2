"""Every patch hf-deltacome applies to PEFT and transformers, in one list, each with its reason.

:func:`install` applies them all, once (idempotent). It runs as soon as PEFT is imported in a process that imported
``hf_deltacome`` (see :mod:`hf_deltacome.bootstrap`), so ``PeftModel.from_pretrained``, ``AutoPeftModel*`` and
``save_pretrained`` / ``push_to_hub`` handle our adapters like any other. Every patch leaves other PEFT methods
exactly as PEFT has them.

The patches in :data:`EARLY` need transformers only (``quant_method="amlq"`` in its quantizer registry, so
``AutoModelForCausalLM.from_pretrained`` loads an AMLQ base without PEFT ever being imported): :func:`install_early`
applies them as soon as transformers' quantizer registry has loaded, before PEFT is. So this module imports nothing
heavy at its top.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from .errors import DeltaCoMeError
from .io.saving import is_deltacome


@dataclass
class _LoadContext:
    model: Any
    adapter_name: str
    strict: Optional[bool]


_LOAD: contextvars.ContextVar[Optional[_LoadContext]] = contextvars.ContextVar("deltacome_load", default=None)
# our errors raised while pipeline() loads a model (it would fold them into one ValueError per model class it tried)
_PIPELINE_ERRORS: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("deltacome_pipeline", default=None)


# ------------------------------------------------------------------------------------------------------------
# the patches
# ------------------------------------------------------------------------------------------------------------


def _add_peft_type() -> None:
    from peft.utils import PeftType

    if "DELTACOME" in PeftType.__members__:
        return
    member = str.__new__(PeftType, "DELTACOME")
    member._name_ = "DELTACOME"
    member._value_ = "DELTACOME"
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType.__members__)
    PeftType._member_map_["DELTACOME"] = member
    PeftType._value2member_map_["DELTACOME"] = member
    PeftType._member_names_.append("DELTACOME")
    type.__setattr__(PeftType, "DELTACOME", member)


def _register_method() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .config import DeltaCoMeConfig
    from .model import DeltaCoMeModel

    if "DELTACOME" not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name="deltacome", config_cls=DeltaCoMeConfig, model_cls=DeltaCoMeModel, prefix="deltacome_")


def _config_errors() -> None:
    from .io.adapter_source import patch_peft_config_reading

    patch_peft_config_reading()


def _saving(name: str) -> Callable[[], None]:
    def apply() -> None:
        from .io import saving

        getattr(saving, name)()

    return apply


def _load_guard() -> None:
    import peft.peft_model as pm

    from .io.adapter_source import apply_key_mapping, load_checked_weights
    from .io.atomic import take_pin
    from .io.fingerprint import check_fingerprint, default_strict
    from .model import DeltaCoMeModel, only_adapter

    original_load_weights = pm.load_peft_weights
    original_load_adapter = pm.PeftModel.load_adapter

    @functools.wraps(original_load_adapter)
    def load_adapter(self: Any, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        strict = kwargs.pop("strict", None)
        token = _LOAD.set(_LoadContext(self, adapter_name, strict))
        # many adapters: PEFT's walks see only this one (its load time does not grow with the number loaded)
        hide = only_adapter(self, adapter_name) if isinstance(self.base_model, DeltaCoMeModel) else contextlib.nullcontext()
        try:
            with hide:
                return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        finally:
            _LOAD.reset(token)

    def load_peft_weights(
        model_id: str, device: Optional[str] = None, key_mapping: Optional[dict] = None, **hub_kwargs: Any
    ) -> dict:
        ctx = _LOAD.get()
        config = ctx.model.peft_config.get(ctx.adapter_name) if ctx is not None else None
        if config is None or not is_deltacome(config):
            return original_load_weights(model_id, device=device, key_mapping=key_mapping, **hub_kwargs)
        strict = default_strict() if ctx.strict is None else bool(ctx.strict)
        check_fingerprint(config.base_fingerprint, ctx.model, strict=strict, adapter=str(model_id),
                          vocab_rows=getattr(config, "base_vocab_size", None))  # fmt: skip
        subfolder = hub_kwargs.pop("subfolder", None)
        with take_pin(config) or contextlib.nullcontext() as pin:  # the weights opened with the config, if so
            source = pin.path("adapter_model.safetensors") if pin is not None else None
            state_dict = load_checked_weights(
                config, ctx.model, model_id, subfolder=subfolder, source=source, **hub_kwargs
            )
        if device is not None and str(device) != "cpu":
            state_dict = {k: v.to(device) for k, v in state_dict.items()}
        return apply_key_mapping(state_dict, key_mapping)

    pm.PeftModel.load_adapter = load_adapter
    pm.load_peft_weights = load_peft_weights


def _transformers_load_guard() -> None:
    from transformers.integrations import peft as hf_peft

    from .format.storage import blob_state_dicts
    from .io.adapter_files import as_blobs, read_adapter, validate_adapter_state_dict
    from .io.adapter_source import check_extras, load_checked_weights, transformers_adapter_config
    from .io.fingerprint import check_fingerprint, default_strict

    original = hf_peft.PeftAdapterMixin.load_adapter
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return _load_adapter(self, *args, **kwargs)
        except DeltaCoMeError as e:
            seen = _PIPELINE_ERRORS.get()
            if seen is not None:
                seen.append(e)
            raise

    def _load_adapter(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        arg = bound.arguments
        load_config = arg.get("load_config")
        model_id = arg.get("peft_model_id") or getattr(load_config, "pretrained_model_name_or_path", None)
        hub_kwargs = {**(getattr(load_config, "download_kwargs", None) or {}), **(arg.get("adapter_kwargs") or {})}
        if arg.get("local_files_only"):
            hub_kwargs["local_files_only"] = True
        config = given = arg.get("peft_config")
        if config is None and arg.get("adapter_state_dict") is None and model_id is not None:
            config = transformers_adapter_config(model_id, hub_kwargs)  # None unless a DELTACOME adapter
        elif isinstance(config, dict) and is_deltacome(config):
            from .config import DeltaCoMeConfig

            config = DeltaCoMeConfig(**{k: v for k, v in config.items() if k != "peft_type"})
        if config is None or not is_deltacome(config):
            return original(self, *args, **kwargs)
        state_dict = arg.get("adapter_state_dict")
        subfolder = hub_kwargs.pop("subfolder", None)
        where = "adapter_state_dict"
        if state_dict is None and given is None and subfolder is None and os.path.isdir(os.fspath(model_id)):
            config, state_dict = read_adapter(model_id)  # config and weights of one save
            where = os.path.join(os.fspath(model_id), "adapter_model.safetensors")
        check_fingerprint(config.base_fingerprint, self, strict=default_strict(), adapter=str(model_id),
                          vocab_rows=getattr(config, "base_vocab_size", None))  # fmt: skip
        if state_dict is None:
            state_dict = load_checked_weights(config, self, model_id, subfolder=subfolder, **hub_kwargs)
        else:
            validate_adapter_state_dict(config, state_dict, where)
            check_extras(self, state_dict, where, config.modules_to_save)
        arg["peft_config"], arg["adapter_state_dict"] = config, as_blobs(config, state_dict)
        with blob_state_dicts():  # it sets tensors by attribute path: one blob per module, format 1 too
            return original(*bound.args, **bound.kwargs)

    hf_peft.PeftAdapterMixin.load_adapter = load_adapter


def _transformers_enable_adapters() -> None:
    from peft.utils import ModulesToSaveWrapper
    from transformers.integrations import peft as hf_peft

    original = hf_peft.PeftAdapterMixin.enable_adapters

    @functools.wraps(original)
    def enable_adapters(self: Any) -> None:
        original(self)
        ours = {name for name, config in (getattr(self, "peft_config", None) or {}).items() if is_deltacome(config)}
        for module in self.modules():  # disable_adapters() turned these off too; enable_adapters() leaves them off
            if isinstance(module, ModulesToSaveWrapper) and ours & set(module.modules_to_save):
                module.enable_adapters(enabled=True)

    hf_peft.PeftAdapterMixin.enable_adapters = enable_adapters


def _pipeline_errors() -> None:
    import transformers.pipelines as pipelines
    from transformers.pipelines import base

    original = base.load_model

    @functools.wraps(original)
    def load_model(*args: Any, **kwargs: Any) -> Any:
        token = _PIPELINE_ERRORS.set([])
        try:
            return original(*args, **kwargs)
        except ValueError:
            ours = _PIPELINE_ERRORS.get()
            if ours:
                raise ours[0] from None
            raise
        finally:
            _PIPELINE_ERRORS.reset(token)

    base.load_model = pipelines.load_model = load_model


def _model_card() -> None:
    from peft import PeftModel

    from .hub import write_peft_model_card

    original_card = PeftModel.create_or_update_model_card

    @functools.wraps(original_card)
    def create_or_update_model_card(self: Any, output_dir: str) -> None:
        if not is_deltacome(self.active_peft_config):
            return original_card(self, output_dir)
        write_peft_model_card(self, output_dir)
        return None

    PeftModel.create_or_update_model_card = create_or_update_model_card


def _push_to_hub() -> None:
    from peft import PeftModel

    from .hub import push_peft_model

    original_push = PeftModel.push_to_hub

    @functools.wraps(original_push)
    def push_to_hub(self: Any, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if args or not any(is_deltacome(c) for c in self.peft_config.values()):
            return original_push(self, repo_id, *args, **kwargs)
        return push_peft_model(self, repo_id, **kwargs)

    PeftModel.push_to_hub = push_to_hub


def _vlm_pipeline() -> None:
    try:
        from transformers.pipelines import base as pipeline_base
    except ImportError:  # pragma: no cover
        return
    supported = getattr(pipeline_base, "SUPPORTED_PEFT_TASKS", None)
    if isinstance(supported, dict):
        names = supported.setdefault("image-text-to-text", [])
        if "PeftModel" not in names:
            names.append("PeftModel")


def _amlq_quantizer() -> None:
    from .amlq.quantizer import register_with_transformers

    register_with_transformers()


def _amlq_compress() -> None:
    from .amlq.compat import dense_linears
    from .compression.pipeline import QUANTIZED_BASE_VIEWS

    if dense_linears not in QUANTIZED_BASE_VIEWS:
        QUANTIZED_BASE_VIEWS.append(dense_linears)


# (what is patched, why, how) — applied in this order by install()
PATCHES: tuple[tuple[str, str, Callable[[], None]], ...] = (
    ("transformers.quantizers.auto: quant_method 'amlq'",
     "from_pretrained loads AMLQ-quantized bases (hf_deltacome.amlq) through AmlqHfQuantizer, packed in memory",
     _amlq_quantizer),
    ("peft.utils.PeftType.DELTACOME",
     "PEFT reads peft_type from adapter_config.json through this enum; registration needs the member", _add_peft_type),
    ("peft.utils.register_peft_method('deltacome')",
     "PeftModel.from_pretrained / get_peft_model find our config and tuner classes", _register_method),
    ("peft.config.PeftConfigMixin.from_json_file, ._get_peft_type, .from_pretrained",
     "a broken adapter_config.json (bad or deeply nested JSON, missing or unknown peft_type) is a ConfigError naming "
     "the file, not a KeyError/RecursionError from before our type is known", _config_errors),
    ("peft.PeftModel.save_pretrained, peft.peft_model.safe_save_file",
     "a DELTACOME save (weights, config, card) replaces the folder as one unit, never a pickle, never into a "
     "model's folder, extras in a dtype the reader accepts, no Hub lookup of the base", _saving("patch_peft_save")),
    ("peft.PeftModel.load_adapter, peft.peft_model.load_peft_weights",
     "a DELTACOME adapter is read only as validated safetensors, after the base-model check", _load_guard),
    ("transformers.integrations.peft.PeftAdapterMixin.load_adapter",
     "transformers reads adapter weights itself (model.load_adapter, from_pretrained(adapter_dir), "
     "pipeline(model=adapter_dir)): the same base check and validation run first, then it gets the checked tensors",
     _transformers_load_guard),
    ("transformers.integrations.peft.PeftAdapterMixin.enable_adapters",
     "model.disable_adapters() turns off the changed norms (PEFT's ModulesToSaveWrapper) as well as the deltas, "
     "enable_adapters() turns on the deltas only: without this the model would run the deltas on the base's norms",
     _transformers_enable_adapters),
    ("transformers.integrations.peft.PeftAdapterMixin.get_adapter_state_dict",
     "a transformers model's state dict of our adapter is PeftModel's: no Hub lookup of the base "
     "(save_embedding_layers='auto'), float64 extras as float32", _saving("patch_transformers_adapter_state")),
    ("transformers.PreTrainedModel.save_pretrained",
     "a transformers model holding one of our adapters (model.load_adapter) saves it as PeftModel does: the folder "
     "replaced as one unit, never into the base model's folder, our card; push_to_hub=True pushes through "
     "hub.push_adapter", _saving("patch_transformers_save")),
    ("transformers.PreTrainedModel.push_to_hub",
     "such a model pushes as a PeftModel does (hub.push_peft_model: validated, our card)",
     _saving("patch_transformers_push")),
    ("peft.PeftModel.create_or_update_model_card",
     "save_pretrained writes our model card (method, sizes, loading) instead of PEFT's template", _model_card),
    ("peft.PeftModel.push_to_hub",
     "pushes go through hub.push_adapter (validation, our card; transformers' push would overwrite it)",
     _push_to_hub),
    ("transformers.pipelines.load_model",
     "pipeline(model=adapter_dir) raises our error itself, not a ValueError listing every model class it tried",
     _pipeline_errors),
    ("transformers.pipelines.base.SUPPORTED_PEFT_TASKS['image-text-to-text']",
     "pipeline('image-text-to-text', model=peft_model) accepts our VLM adapters without an error log", _vlm_pipeline),
    ("hf_deltacome.compression.pipeline.QUANTIZED_BASE_VIEWS += amlq.compat.dense_linears",
     "compress() against an AMLQ base sees its dequantized weights, so the adapter absorbs the quantization error",
     _amlq_compress),
)  # fmt: skip
EARLY = ("transformers.quantizers.auto: quant_method 'amlq'",)  # need transformers only (install_early)

_installed: list[str] = []


def install_early() -> list[str]:
    """Apply the patches of :data:`EARLY` (transformers only) that are not applied yet; returns the names applied."""
    for name, _why, apply in PATCHES:
        if name in EARLY and name not in _installed:
            apply()
            _installed.append(name)
    return list(_installed)


def install() -> list[str]:
    """Apply every patch in :data:`PATCHES` that is not applied yet; returns the names applied so far."""
    for name, _why, apply in PATCHES:
        if name not in _installed:
            apply()
            _installed.append(name)
    from . import multimodal  # noqa: F401 - registers the vision-language model kind with the compression pipeline

    return list(_installed)
