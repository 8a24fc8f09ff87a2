"""``AmlqHfQuantizer``: lets ``AutoModelForCausalLM.from_pretrained(DIR)`` load an AMLQ model (after
``import hf_deltacome``: the registration is one of :data:`hf_deltacome.integration.PATCHES`), the way transformers loads any pre-quantized method (compare its AQLM/SpQR quantizers).

Before the weights are read, every linear named in ``config.quantization_config.layout`` is swapped (on the meta
device) for an empty `AmlqLinear` whose buffers have the exact shapes of the stored planes; transformers then
loads the packed tensors into them like any buffer, and places them with ``device_map`` as usual. Quantizing on
load (``pre_quantized=False``) is not supported: use :func:`hf_deltacome.amlq.quantize_model` or
``deltacome quantize``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer

from ..errors import ConfigError
from ..linears import ExpertsAsLinears, conv1d_holding, fuse_experts, unfuse_experts
from .config import QUANT_METHOD, AmlqConfig
from .linear import replace_with_amlq_linear, set_dequant_cache


class AmlqHfQuantizer(HfQuantizer):
    """Loads pre-quantized AMLQ checkpoints; see the module docstring."""

    requires_calibration = True  # the allocation needs calibration data: only pre-quantized loading
    quantization_config: AmlqConfig

    def __init__(self, quantization_config: AmlqConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._dtype: torch.dtype | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.quantization_config.layout:
            raise ConfigError("the AMLQ quantization_config in config.json has an empty layout: nothing to load")

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype | None:
        self._dtype = dtype if isinstance(dtype, torch.dtype) else None
        return dtype

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        dtype = kwargs.get("dtype")
        unfuse_experts(model, self.quantization_config.layout, meta=True, keep=True)  # experts stored per expert
        replace_with_amlq_linear(
            model, self.quantization_config.layout, dtype=dtype if isinstance(dtype, torch.dtype) else self._dtype
        )

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if self.quantization_config.cache_dequantized:
            set_dequant_cache(model, True)
        return model

    def _dequantize(self, model: Any, dtype: torch.dtype | None = None) -> Any:
        """``model.dequantize()``: every `AmlqLinear` becomes a dense ``nn.Linear`` of its effective weight (a
        ``Conv1D`` where it stands for one)."""
        from torch import nn

        from .linear import AmlqLinear

        for name, module in list(model.named_modules()):
            if isinstance(module, AmlqLinear):
                weight = module.weight.to(dtype or module.compute_dtype)
                if module.from_conv1d:  # GPT-2: the Conv1D it stands for, its weight in x out as the model saves it
                    model.set_submodule(name, conv1d_holding(weight.t().contiguous().t(), module.bias))
                    continue
                dense = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
                dense.weight = nn.Parameter(weight, requires_grad=False)
                dense.bias = module.bias
                model.set_submodule(name, dense)
        for stand_in in model.modules():  # per-expert linears dense again: the fused experts module comes back
            if isinstance(stand_in, ExpertsAsLinears):
                stand_in.keep = False
        fuse_experts(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register_with_transformers() -> None:
    """Register ``quant_method="amlq"`` with transformers (idempotent; run by :mod:`hf_deltacome.integration`)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(AmlqConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(AmlqHfQuantizer)
