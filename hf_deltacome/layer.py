"""PEFT tuner layer: a linear with one or more packed Delta-CoMe deltas on top of its base weight."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .backend import add_delta_into, base_and_delta
from .errors import ConfigError
from .format.storage import PackedDelta
from .linears import add_delta_to_weight, is_linear, linear_shape

BASE_ADAPTER_NAME = "__base__"  # PEFT's name for "no adapter" in per-row `adapter_names`


class MixedBatch(list):
    """Per-row adapter names of one mixed-batch forward, shared by every layer of the model.

    The row -> adapter index tensor is built once per device and reused by all layers, instead of one host-to-device
    copy per layer per forward (which would also stall CUDA-graph capture).
    """

    def __init__(self, adapter_names: Sequence[str]) -> None:
        super().__init__(adapter_names)
        self.names = [n for n in dict.fromkeys(self) if n != BASE_ADAPTER_NAME]
        self._index: dict[torch.device, torch.Tensor] = {}

    def row_index(self, device: torch.device) -> torch.Tensor:
        """``index[i]`` = position of row ``i``'s adapter in :attr:`names`, ``-1`` for the base."""
        if device not in self._index:
            slot = {n: i for i, n in enumerate(self.names)}
            self._index[device] = torch.tensor([slot.get(n, -1) for n in self], dtype=torch.long, device=device)
        return self._index[device]


class DeltaCoMeLayer(BaseTunerLayer):
    """Mixin holding one `PackedDelta` per adapter in ``deltacome_delta`` (buffers only, nothing trainable)."""

    adapter_layer_names = ("deltacome_delta",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.deltacome_delta = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        if not is_linear(base):
            raise ConfigError(f"Delta-CoMe wraps nn.Linear (and GPT-2's Conv1D) layers only, got {type(base).__name__}")
        self.out_features, self.in_features = linear_shape(base)
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, layout: dict[str, Any], inference_mode: bool = False) -> None:
        """Allocate zeroed buffers for ``adapter_name`` from its layout entry (filled by loading or compression)."""
        m, n = layout["shape"]
        if (m, n) != (self.out_features, self.in_features):
            raise ConfigError(
                f"adapter {adapter_name!r} was built for a {m}x{n} linear, but the base layer is "
                f"{self.out_features}x{self.in_features}"
            )
        has_bias = bool(layout.get("bias", False))
        if has_bias and self.get_base_layer().bias is None:
            raise ConfigError(f"adapter {adapter_name!r} carries a bias delta but the base linear has no bias")
        self.deltacome_delta[adapter_name] = PackedDelta.from_layout(layout)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[Any, Any]:
        # a packed quantized base (AMLQ) answers without dequantizing its weight (PEFT reads ``.weight`` for this)
        if callable(getattr(base_layer, "device_and_dtype", None)):
            return base_layer.device_and_dtype()
        return super()._get_base_layer_device_and_dtype(base_layer)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # A base weight offloaded by accelerate sits on the meta device; the packed factors are small, keep them real.
        base_device, _ = self._get_base_layer_device_and_dtype(self.get_base_layer())
        if device is None and base_device is not None and base_device.type == "meta":
            device = torch.device("cpu")
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``out x in`` weight delta of ``adapter`` in the base weight's dtype (bias delta excluded; ``out x in``
        for a ``Conv1D`` base too, whose weight is ``in x out``)."""
        device, dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())
        return self.deltacome_delta[adapter].to(device).delta_weight(dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # The delta is exactly low rank; a bias delta is not representable in LoRA, so refuse then.
        # Sign bits / sparse values (bitdelta, dare baselines) are full rank: not a LoRA either (sparse bands are).
        delta = self.deltacome_delta[adapter_name]
        return delta.bias is None and not delta.full_rank


class DeltaCoMeLinear(nn.Module, DeltaCoMeLayer):
    """``y = base(x) + Σ_active_adapters delta(x)`` with the deltas kept bit-packed in memory."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, layout: dict[str, Any], **kwargs: Any) -> None:
        super().__init__()
        DeltaCoMeLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, layout, inference_mode=kwargs.get("inference_mode", False))

    # -- merging ---------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the deltas (and bias deltas) of the active (or given) adapters into the base weights."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        self.check_mergeable(adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.deltacome_delta:
                continue
            weight = add_delta_to_weight(base, self.get_delta_weight(name))
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {name!r} seems to be broken")
            base.weight.data = weight
            bias = self.deltacome_delta[name].bias
            if bias is not None:
                base.bias.data = base.bias.data + bias.to(base.bias.device, base.bias.dtype)
            self.merged_adapters.append(name)

    def check_mergeable(self, adapter_names: Sequence[str]) -> None:
        """Raise a `ConfigError` naming this layer when its base weight is packed or quantized (AMLQ, bitsandbytes):
        there is no dense weight to add a delta of ``adapter_names`` to."""
        names = [n for n in adapter_names if n in self.deltacome_delta and n not in self.merged_adapters]
        base = self.get_base_layer()
        amlq = getattr(base, "exposes_dense_weight", False)
        weight = None if amlq else getattr(base, "weight", None)
        if not names or (type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point()):
            return
        where = (f"cannot merge adapter(s) {names} into a {type(base).__name__} ({self.out_features}x"
                 f"{self.in_features}): the base weight is stored ")  # fmt: skip
        if amlq:  # its source fingerprint lets the adapter load onto model.dequantize()
            raise ConfigError(where + "bit-packed (a quantized base) and has no dense weight to add the delta to. Run "
                              "the adapter unmerged, or merge into a dense copy of the base (model.dequantize() on "
                              "the quantized model, then load the adapter onto it)")  # fmt: skip
        raise ConfigError(where + f"quantized ({type(weight).__name__}, {getattr(weight, 'dtype', None)}) and has no "
                          "dense weight to add the delta to. Run the adapter unmerged, or merge it into the "
                          "full-precision base (loaded without quantization_config; `deltacome merge` does that) and "
                          "quantize the merged model")  # fmt: skip

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.deltacome_delta:
                continue
            base.weight.data = add_delta_to_weight(base, -self.get_delta_weight(name))
            bias = self.deltacome_delta[name].bias
            if bias is not None:
                base.bias.data = base.bias.data - bias.to(base.bias.device, base.bias.dtype)

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if self.merged:
                raise ValueError("Cannot pass `adapter_names` while adapters are merged; unmerge them first")
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [self.deltacome_delta[n] for n in self.active_adapters if n in self.deltacome_delta]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        # the first delta beside the base layer (its shrink overlaps the base on CUDA), any others added after it
        result = base_and_delta(x, lambda: self.base_layer(x, *args, **kwargs), active[:1])
        for delta in active[1:]:
            result = add_delta_into(result, x, [delta])
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str], **kwargs: Any
    ) -> torch.Tensor:
        """Row ``i`` of the batch gets adapter ``adapter_names[i]`` (``"__base__"`` or unknown here: none)."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} rows")
        batch = adapter_names if isinstance(adapter_names, MixedBatch) else MixedBatch(adapter_names)
        deltas = [self.deltacome_delta[n] if n in self.deltacome_delta else None for n in batch.names]
        if all(d is None for d in deltas):
            return self.base_layer(x, *args, **kwargs)
        return base_and_delta(x, lambda: self.base_layer(x, *args, **kwargs), deltas, batch.row_index(x.device))

    def __repr__(self) -> str:
        return "deltacome." + super().__repr__()
