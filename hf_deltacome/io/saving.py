"""How PEFT's and transformers' own save and push paths write our adapters.

A DELTACOME adapter saved through ``PeftModel.save_pretrained``, or through a transformers model that holds it
(``model.load_adapter`` then ``model.save_pretrained``: a Trainer's checkpoint, for one) comes out the same: the
folder replaced as one unit (:func:`~hf_deltacome.io.atomic.atomic_folder`), never into the base's or the fine-tune's
folder, only safetensors, dense extras in a dtype the reader accepts (float64 becomes float32), our model card, and no
Hub lookup of the base to guess whether the vocabulary was resized (our adapters carry changed embeddings as dense
extras). A push from either (``push_to_hub=True``, ``model.push_to_hub``) goes through :func:`hf_deltacome.hub.push_adapter`.

The functions here are the bodies of :mod:`hf_deltacome.integration`'s patches (its list says what each patches and
why); every one leaves other PEFT methods as PEFT and transformers have them. Nothing heavy is imported at the top:
:mod:`hf_deltacome.integration` imports :func:`is_deltacome` from here before torch is needed.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
from typing import Any, Optional

from ..errors import ConfigError

_SAVING: contextvars.ContextVar[bool] = contextvars.ContextVar("deltacome_save", default=False)
# transformers' save_pretrained(push_to_hub=True, **kwargs): the keywords a push takes there
_TRANSFORMERS_PUSH_KWARGS = {"repo_id", "commit_message", "commit_description", "create_pr", "private", "revision",
                             "tags"}  # fmt: skip


def is_deltacome(config: Any) -> bool:
    """Whether a PEFT config (object or dict) is one of ours."""
    peft_type = config.get("peft_type") if isinstance(config, dict) else getattr(config, "peft_type", None)
    return str(getattr(peft_type, "value", peft_type)).upper() == "DELTACOME"


def holds_deltacome(model: Any) -> bool:
    """Whether a transformers model holds one of our adapters (loaded with ``model.load_adapter``)."""
    configs = getattr(model, "peft_config", None) or {}
    return bool(getattr(model, "_hf_peft_config_loaded", False)) and any(is_deltacome(c) for c in configs.values())


def input_folders(model: Any) -> dict[str, Optional[str]]:
    """The local folders a model holding our adapter was made from (``compress`` records the fine-tune's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"base": getattr(base, "name_or_path", None), "fine-tuned": getattr(model, "deltacome_finetuned", None)}


def storable(state: dict) -> dict:
    """``state`` with float64 tensors (a model loaded in float64) as float32, the widest dtype the reader accepts."""
    import torch

    return {k: v.float() if v.dtype == torch.float64 else v for k, v in state.items()}


def patch_peft_save() -> None:
    """``PeftModel.save_pretrained`` and the ``safe_save_file`` it writes with, for DELTACOME adapters."""
    import peft.peft_model as pm

    from .atomic import atomic_folder, check_output_folder, save_safetensors_atomic

    original_save_file = pm.safe_save_file
    original_save = pm.PeftModel.save_pretrained
    signature = inspect.signature(original_save)

    def safe_save_file(tensors: dict, filename: str, metadata: Optional[dict] = None) -> None:
        if _SAVING.get():
            save_safetensors_atomic(storable(tensors), filename, metadata=metadata)
        else:
            original_save_file(tensors, filename, metadata=metadata)

    @functools.wraps(original_save)
    def save_pretrained(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        selected = bound.arguments.get("selected_adapters") or list(self.peft_config)
        if not any(is_deltacome(self.peft_config.get(name)) for name in selected):
            return original_save(self, *args, **kwargs)
        if not bound.arguments.get("safe_serialization", True):
            raise ConfigError(
                "DELTACOME adapters are saved only as safetensors; safe_serialization=False (pickle) is not supported"
            )
        directory = os.fspath(bound.arguments["save_directory"])
        check_output_folder(directory, input_folders(self))
        if not bound.arguments.get("is_main_process", True):  # PEFT writes nothing then
            return original_save(self, *args, **kwargs)
        if bound.arguments.get("save_embedding_layers") == "auto":
            # "auto" would only look the base up on the Hub (a network call, a warning offline) to guess whether
            # the vocabulary was resized; our adapters carry changed embeddings in modules_to_save
            bound.arguments["save_embedding_layers"] = False
        token = _SAVING.set(True)
        try:
            with atomic_folder(directory) as next_version:  # weights, config, card: replaced as one unit
                bound.arguments["save_directory"] = next_version
                return original_save(*bound.args, **bound.kwargs)
        finally:
            _SAVING.reset(token)

    pm.safe_save_file = safe_save_file
    pm.PeftModel.save_pretrained = save_pretrained


def patch_transformers_adapter_state() -> None:
    """``model.get_adapter_state_dict()`` of a transformers model, for our adapters: PEFT's state dict without the
    Hub lookup of ``save_embedding_layers="auto"``, float64 extras as float32 (what transformers' save writes)."""
    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftAdapterMixin.get_adapter_state_dict

    @functools.wraps(original)
    def get_adapter_state_dict(self: Any, adapter_name: Optional[str] = None, state_dict: Optional[dict] = None) -> dict:
        name = adapter_name
        if name is None and getattr(self, "_hf_peft_config_loaded", False):
            name = self.active_adapters()[0]
        config = (getattr(self, "peft_config", None) or {}).get(name)
        if config is None or not is_deltacome(config):
            return original(self, adapter_name=adapter_name, state_dict=state_dict)
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=name, save_embedding_layers=False)
        return storable(state)

    PeftAdapterMixin.get_adapter_state_dict = get_adapter_state_dict


def _transformers_push_kwargs(directory: str, kwargs: dict) -> dict:
    """``push_adapter``'s keywords for ``save_pretrained(directory, push_to_hub=True, **kwargs)``."""
    unknown = set(kwargs) - _TRANSFORMERS_PUSH_KWARGS
    if unknown:
        raise TypeError(f"save_pretrained(push_to_hub=True) got unexpected keyword argument(s) {sorted(unknown)}")
    return {**kwargs, "repo_id": kwargs.get("repo_id") or os.path.basename(os.path.normpath(directory)),
            "private": bool(kwargs.get("private")), "create_pr": bool(kwargs.get("create_pr")),
            "commit_message": kwargs.get("commit_message") or "Upload Delta-CoMe adapter"}  # fmt: skip


def patch_transformers_save() -> None:
    """``PreTrainedModel.save_pretrained`` of a model holding our adapter: as ``PeftModel.save_pretrained`` saves it
    (one-unit swap, output-folder check, our card); with ``push_to_hub=True`` the saved folder is pushed by
    :func:`hf_deltacome.hub.push_adapter` (validated, our card), to ``repo_id`` or the folder's name as transformers
    would."""
    from transformers import PreTrainedModel

    from ..hub import push_adapter, write_peft_model_card
    from .atomic import atomic_folder, check_output_folder

    original = PreTrainedModel.save_pretrained
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        if not holds_deltacome(self) or not bound.arguments.get("is_main_process", True):  # other ranks write nothing
            return original(self, *args, **kwargs)
        directory = os.fspath(bound.arguments["save_directory"])
        check_output_folder(directory, input_folders(self))
        push = None
        if bound.arguments.get("push_to_hub"):
            push = _transformers_push_kwargs(directory, bound.arguments.pop("kwargs", {}))
            bound.arguments["push_to_hub"] = False
        with atomic_folder(directory) as next_version:  # the adapter's files replace the folder as one unit
            bound.arguments["save_directory"] = next_version
            result = original(*bound.args, **bound.kwargs)
            write_peft_model_card(self, next_version)
        if push is not None:
            push_adapter(directory, push.pop("repo_id"), token=bound.arguments.get("token"), **push)
        return result

    PreTrainedModel.save_pretrained = save_pretrained


def patch_transformers_push() -> None:
    """``PreTrainedModel.push_to_hub`` of a model holding our adapter: :func:`hf_deltacome.hub.push_peft_model`, as
    for a PeftModel (transformers' own push would upload the folder unvalidated, with its own card)."""
    from transformers import PreTrainedModel

    from ..hub import push_peft_model

    original = PreTrainedModel.push_to_hub

    @functools.wraps(original)
    def push_to_hub(self: Any, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if args or not holds_deltacome(self):
            return original(self, repo_id, *args, **kwargs)
        return push_peft_model(self, repo_id, **kwargs)

    PreTrainedModel.push_to_hub = push_to_hub
