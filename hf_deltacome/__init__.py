"""hf-deltacome: Delta-CoMe compression of fine-tuned LLM deltas as PEFT adapters.

Importing the package registers the ``DELTACOME`` method with PEFT, so ``PeftModel.from_pretrained`` and
``AutoPeftModelForCausalLM`` load our adapters like any other.
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
from .layer import DeltaCoMeLayer, DeltaCoMeLinear
from .model import DeltaCoMeModel


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if "DELTACOME" not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(
            name="deltacome", config_cls=DeltaCoMeConfig, model_cls=DeltaCoMeModel, prefix="deltacome_"
        )


_register()

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
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
