"""hf-deltacome: Delta-CoMe compression of fine-tuned LLM deltas as PEFT adapters.

``import hf_deltacome`` is instant: the public names below load on first use, and the PEFT integration (the
``DELTACOME`` method, validated safetensors-only loading with the base-model check, atomic saves, our model card,
``pipeline("image-text-to-text")`` support; see :mod:`hf_deltacome.integration`) is installed as soon as PEFT is
imported (:mod:`hf_deltacome.bootstrap`). So ``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` load our
adapters like any other once this package has been imported.

Layout (data flows top to bottom): ``cli`` → ``compression`` (the pipeline) → ``quant`` / ``format`` / ``io``;
``config``, ``layer``, ``model``, ``backend`` are the PEFT tuner; ``multimodal`` and ``evaluation`` build on them.
"""

from __future__ import annotations

from . import bootstrap
from .lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access, PEP 562)
_EXPORTS = {
    "AdapterFileError": "errors",
    "BaseModelMismatchError": "errors",
    "BaseModelMismatchWarning": "errors",
    "CalibrationError": "errors",
    "ConfigError": "errors",
    "DeltaCoMeError": "errors",
    "DegenerateAdapterWarning": "errors",
    "DecodeCacheFullWarning": "errors",
    "EmptyDeltaError": "errors",
    "IncompatibleModelsError": "errors",
    "DeltaCoMeConfig": "config",
    "parse_ratio": "config",
    "DeltaCoMeLayer": "layer",
    "DeltaCoMeLinear": "layer",
    "DeltaCoMeModel": "model",
    "compress": "compression.pipeline",
    "AutoDeltaCoMeModelForImageTextToText": "multimodal",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


bootstrap.watch()
