"""Loading VLM adapters: :class:`AutoDeltaCoMeModelForImageTextToText`, the base's processor, VLM checkpoints.

The adapter of a VLM has ``task_type=None``, so PEFT records the model class (``auto_mapping``) and
``PeftModel.from_pretrained(vlm_base, adapter)`` and ``peft.AutoPeftModel.from_pretrained(adapter)`` both work. PEFT
has no ``AutoPeftModelForImageTextToText``; :class:`AutoDeltaCoMeModelForImageTextToText` fills that gap (loads the
base with ``AutoModelForImageTextToText``). The processor and chat template come from the base (:func:`load_processor`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from .parts import is_vlm


def _adapter_config(adapter: str | os.PathLike) -> dict:
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{os.fspath(adapter)!r} is not an adapter folder (no adapter_config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {str(path)!r}: {e}") from e


def _base_path(adapter: str | os.PathLike) -> str:
    if not (Path(adapter) / "adapter_config.json").is_file():
        return os.fspath(adapter)  # a base model folder or Hub id itself
    base = _adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise ConfigError(
            f"{os.fspath(adapter)}/adapter_config.json has no base_model_name_or_path; pass the base model explicitly"
        )
    return base


def _check_local(name_or_path: str, what: str) -> None:
    """A path that looks local must be an existing folder (else transformers reports a confusing Hub-id error)."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.path.exists(name_or_path)
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise ConfigError(f"{what} {name_or_path!r}: no such folder")


def load_processor(adapter_or_base: str | os.PathLike, **kwargs: Any) -> Any:
    """The processor (image processor, tokenizer, chat template) of the adapter's base model.

    ``adapter_or_base`` is an adapter folder (its ``base_model_name_or_path`` is used) or a base model folder / id.
    """
    from transformers import AutoProcessor

    base = _base_path(adapter_or_base)
    _check_local(base, "base model")
    try:
        return AutoProcessor.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the processor of base model {base!r}: {e}") from e


class AutoDeltaCoMeModelForImageTextToText:
    """``AutoPeftModel``-style loader for Delta-CoMe adapters of image-text-to-text models.

    PEFT 0.21 has no ``AutoPeftModelForImageTextToText``. ``peft.AutoPeftModel.from_pretrained(adapter)`` also works
    for our VLM adapters (they record the model class); this class loads the base with transformers'
    ``AutoModelForImageTextToText`` instead and accepts a base model (instance or path) to use in place of the one
    recorded in ``adapter_config.json``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is used through its from_pretrained() class method")

    @classmethod
    def from_pretrained(
        cls,
        adapter: str | os.PathLike,
        base_model: nn.Module | str | os.PathLike | None = None,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """Load the base VLM (``base_model`` or the adapter's recorded base) and apply the adapter on top.

        ``model_kwargs`` (``dtype``, ``device_map``, ...) go to ``AutoModelForImageTextToText.from_pretrained``.
        """
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText

        if base_model is None or isinstance(base_model, (str, os.PathLike)):
            path = os.fspath(base_model) if base_model is not None else _base_path(adapter)
            _check_local(path, "base model")
            try:
                base_model = AutoModelForImageTextToText.from_pretrained(path, **model_kwargs)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot load base model {path!r} as an image-text-to-text model: {e}") from e
        if not is_vlm(base_model):
            raise ConfigError(f"{type(base_model).__name__} is not a vision-language model")
        return PeftModel.from_pretrained(base_model, adapter, adapter_name=adapter_name, is_trainable=is_trainable)


def is_vlm_checkpoint(name_or_path: str) -> bool:
    """True when the model at ``name_or_path`` is a VLM that ``AutoModelForImageTextToText`` loads."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return False
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and is_vlm(config)


def load_vlm_and_processor(name_or_path: str, dtype: Any = "auto", device_map: str | None = None) -> tuple[Any, Any]:
    """Load a VLM with ``AutoModelForImageTextToText`` and its processor (None when it has none), eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, device_map=device_map)
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        processor = None
    return model.eval(), processor
