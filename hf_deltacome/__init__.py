"""hf-deltacome: Delta-CoMe compression of fine-tuned LLM deltas as PEFT adapters.

Importing the package registers the ``DELTACOME`` method with PEFT, so ``PeftModel.from_pretrained`` and
``AutoPeftModelForCausalLM`` load our adapters like any other, and installs (idempotently) what makes those paths
safe for our adapters: validated safetensors-only loading with the base-model check, atomic saves, our model card
on ``save_pretrained``/``push_to_hub``, and ``pipeline("image-text-to-text")`` support for VLM adapters.
"""

from peft.utils import register_peft_method

from .compress import compress
from .config import DeltaCoMeConfig, parse_ratio
from .errors import (
    AdapterFileError,
    BaseModelMismatchError,
    CalibrationError,
    ConfigError,
    DeltaCoMeError,
    IncompatibleModelsError,
)
from .hub import install_hub_integration
from .layer import DeltaCoMeLayer, DeltaCoMeLinear
from .model import DeltaCoMeModel
from .multimodal import AutoDeltaCoMeModelForImageTextToText
from .safe_io import install_atomic_save, install_load_guard


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if "DELTACOME" not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(
            name="deltacome", config_cls=DeltaCoMeConfig, model_cls=DeltaCoMeModel, prefix="deltacome_"
        )


_register()
install_atomic_save()
install_load_guard()
install_hub_integration()

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "AutoDeltaCoMeModelForImageTextToText",
    "BaseModelMismatchError",
    "CalibrationError",
    "ConfigError",
    "DeltaCoMeConfig",
    "DeltaCoMeError",
    "DeltaCoMeLayer",
    "DeltaCoMeLinear",
    "DeltaCoMeModel",
    "IncompatibleModelsError",
    "compress",
    "parse_ratio",
]
