"""AMLQ: adaptive mixed-precision quantization of the shared base model, with low-rank error reconstruction.

``quantize_model(model, bpw)`` quantizes a causal LM's decoder linears (per-unit GPTQ errors, each linear's measured
end-to-end KL curve, an allocation minimising the summed estimated KL within the true bits per weight, per-group
mixed precision and a per-linear low-rank correction), and ``save_quantized`` writes a checkpoint that
``AutoModelForCausalLM.from_pretrained`` loads after ``import hf_deltacome`` (``quant_method="amlq"``, registered by
:mod:`hf_deltacome.integration`). Delta-CoMe adapters compressed against such a base absorb its quantization error
(``hf_deltacome.compress(quantized_base, finetuned, ...)``). Names load on first use (no torch at import).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "AmlqConfig": "config",
    "AmlqHfQuantizer": "quantizer",
    "AmlqLinear": "linear",
    "set_dequant_cache": "linear",
    "quantize_model": "pipeline",
    "save_quantized": "pipeline",
    "measure_sensitivity": "sensitivity",
    "measure_end_to_end": "sensitivity",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
