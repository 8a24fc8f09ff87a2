"""Delta-CoMe adapters on an AMLQ base: compressing against it.

:func:`dense_linears` is the view ``compress`` runs under when its base holds `AmlqLinear` modules (registered with
:func:`hf_deltacome.compression.pipeline.on_quantized_base` by :mod:`hf_deltacome.integration`): each is swapped for
a plain ``nn.Linear`` carrying its dequantized effective weight for the duration of the call, so every step of
``compress`` (pair check, changed-module scan, planning, deltas, fingerprint) sees the weights the user will actually
run, and the adapter absorbs the base's quantization error. Afterwards (also on failure) the `AmlqLinear` modules are
put back where the dense stand-ins are, under the PEFT wrappers too, so the returned model runs the packed base.
Peak memory is that of compressing against a dense base.

Loading an adapter made against the full-precision source onto its AMLQ quantization is recognised by the base
check itself (:mod:`hf_deltacome.io.fingerprint`, from ``quantization_config.source_fingerprint``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .linear import AmlqLinear


def has_amlq_linears(model: nn.Module) -> bool:
    return any(isinstance(m, AmlqLinear) for m in model.modules())


@contextlib.contextmanager
def dense_linears(model: nn.Module) -> Iterator[dict[int, AmlqLinear]]:
    """Within the block every `AmlqLinear` of ``model`` is a dense ``nn.Linear`` of its effective weight."""
    originals: dict[int, AmlqLinear] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, AmlqLinear):
            with torch.no_grad():
                dense = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
                dense.weight = nn.Parameter(module.weight, requires_grad=False)
                dense.bias = module.bias
            originals[id(dense)] = module
            model.set_submodule(name, dense)
    try:
        yield originals
    finally:
        if originals:
            for parent in model.modules():
                for child_name, child in list(parent._modules.items()):
                    if child is not None and id(child) in originals:
                        parent._modules[child_name] = originals[id(child)]
