"""``AmlqLinear``: a linear layer whose weight stays bit-packed in memory, with per-group mixed precision.

Storage layout (one module, all tensors are persistent buffers, so they are in the state dict and the safetensors
file as they are in memory):

* The input columns are cut into *units* of ``unit`` columns (the largest allowed group size; the last unit may be
  shorter). Each unit takes one precision ``(bits, group_size)`` from the layer's list of ``planes``.
* **Planes.** All units of one precision are concatenated, in column order, into one `QuantizedMatrix`-style plane
  ``planes.<k>`` (``qweight`` int32 words packed along the columns, ``qweight_hi`` for 3 bits, ``scales`` float16 and
  ``zeros`` uint8 per row and group; exactly :mod:`hf_deltacome.format.packing`'s format). Because a full unit is a multiple
  of every group size and only the very last unit can be short, groups never straddle two units.
* **Group permutation.** Which unit sits in which plane is the layout entry's ``units`` list (in ``config.json``);
  the column permutation is rebuilt from it at construction (a plain attribute, not a buffer), so nothing about the
  permutation is stored twice.
* **Low-rank correction.** With ``rank > 0`` the quantization error is corrected by ``L R`` (``L``: out x rank,
  ``R``: rank x in), stored at ``rank_bits`` (8 or 4) as ``lowrank_l`` / ``lowrank_r`` planes.

The effective weight is ``W = scatter_columns(dequant(planes)) + L R``; :attr:`AmlqLinear.weight` returns it
(a fresh tensor: reading it costs a dequantization, and writing into it changes nothing, so merging an adapter
into this layer is refused by the Delta-CoMe layer). PEFT asks a base layer for its device and dtype through its
``weight``; :meth:`AmlqLinear.device_and_dtype` answers without dequantizing. The forward pass of the
torch path computes ``x Wqᵀ + (x Rᵀ) Lᵀ``, dequantizing the planes on the fly (or once, with
``cache_dequantized``). ``BACKENDS`` is the seam for a fused kernel (e.g. Triton on CUDA): a backend is a
function ``(module, x) -> y`` chosen by ``AmlqLinear.backend``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..format.amlq_layout import LOWRANK_GROUP, check_entry, plane_columns
from ..format.packing import QuantizedMatrix, expected_tensor_shapes
from ..linears import is_conv1d, is_linear, linear_shape


class PackedMatrix(nn.Module):
    """Buffers of one bit-packed, group-quantized matrix (:mod:`hf_deltacome.format.packing` format)."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int, device: Any = None) -> None:
        super().__init__()
        self.rows, self.cols, self.bits, self.group_size = rows, cols, bits, group_size
        for name, (shape, dtype) in expected_tensor_shapes(rows, cols, bits, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))

    def matrix(self) -> QuantizedMatrix:
        return QuantizedMatrix.of(self)

    @torch.no_grad()
    def fill(self, q: QuantizedMatrix) -> None:
        """Copy a `QuantizedMatrix` of the same layout into the buffers."""
        if tuple(q.shape) != (self.rows, self.cols) or q.bits != self.bits or q.group_size != self.group_size:
            raise ConfigError(
                f"packed matrix {q.shape}@{q.bits}b/g{q.group_size} does not fit buffers "
                f"{(self.rows, self.cols)}@{self.bits}b/g{self.group_size}"
            )
        for name, t in q.tensors().items():
            getattr(self, name).copy_(t)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.matrix().dequantize(dtype)

    def extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, {self.bits} bits, group {self.group_size}"


def _torch_forward(module: AmlqLinear, x: torch.Tensor) -> torch.Tensor:
    """Reference path: dequantize (or reuse the cached weight) and multiply; the low-rank part as two thin matmuls."""
    w = module.dequantized_planes(x.dtype)
    y = F.linear(x, w, module.bias.to(x.dtype) if module.bias is not None else None)
    if module.rank:
        r = module.lowrank_r.dequantize(x.dtype)
        l_ = module.lowrank_l.dequantize(x.dtype)
        y = y + F.linear(F.linear(x, r), l_)
    return y


BACKENDS: dict[str, Callable[[AmlqLinear, torch.Tensor], torch.Tensor]] = {"torch": _torch_forward}


class AmlqLinear(nn.Linear):
    """A linear layer stored as AMLQ planes (+ optional low-rank correction); see the module docstring.

    It is an ``nn.Linear`` (so PEFT tuners, Delta-CoMe included, wrap it like any linear) without a ``weight``
    parameter: :attr:`weight` is the dequantized effective weight, computed on demand.
    """

    backend: str = "torch"
    exposes_dense_weight = True  # fingerprinting reads :attr:`weight` (dequantized) in place of a weight parameter

    def __init__(
        self,
        in_features: int,
        out_features: int,
        entry: dict[str, Any],
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: Any = None,
        name: str = "",
        from_conv1d: bool = False,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no dense weight parameter
        self.from_conv1d = from_conv1d  # stands for GPT-2's Conv1D: dequantize() gives a Conv1D back
        check_entry(name or "AmlqLinear", entry)
        if [int(v) for v in entry["shape"]] != [out_features, in_features]:
            raise ConfigError(
                f"AMLQ layout of {name or 'module'!r} is for shape {entry['shape']}, the linear is "
                f"{out_features}x{in_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.entry = {k: entry[k] for k in ("shape", "unit", "planes", "units")} | {"rank": int(entry.get("rank", 0))}
        self.rank = self.entry["rank"]
        self.rank_bits = int(entry.get("rank_bits", 8))
        if self.rank and self.rank_bits != 8:
            self.entry["rank_bits"] = self.rank_bits
        self.compute_dtype = dtype or torch.float32
        self.cache_dequantized = False
        self._cache: torch.Tensor | None = None
        columns = plane_columns(self.entry)
        self.planes = nn.ModuleList(
            PackedMatrix(out_features, len(cols), int(b), int(g), device=device)
            for (b, g), cols in zip(self.entry["planes"], columns, strict=True)
        )
        self._col_index: torch.Tensor | None = None  # storage column -> original column (built on first use)
        self._col_index_on: dict[torch.device, torch.Tensor] = {}
        if self.rank:
            self.lowrank_l = PackedMatrix(out_features, self.rank, self.rank_bits, LOWRANK_GROUP, device=device)
            self.lowrank_r = PackedMatrix(self.rank, in_features, self.rank_bits, LOWRANK_GROUP, device=device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.compute_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._is_hf_initialized = True  # transformers must not "initialize" (i.e. dequantize) it when loading

    # -- weights ---------------------------------------------------------------------------------------------
    def dequantized_planes(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The quantized weight without the low-rank part (cached when ``cache_dequantized`` is on)."""
        dtype = dtype or self.compute_dtype
        if self._cache is not None and self._cache.dtype == dtype:
            return self._cache
        parts = [p.dequantize(dtype) for p in self.planes]
        w = torch.empty(self.out_features, self.in_features, dtype=dtype, device=parts[0].device)
        index = self._col_index_on.get(w.device)
        if index is None:
            if self._col_index is None:  # not at construction: that may run under a meta-device context
                self._col_index = torch.cat(plane_columns(self.entry)).cpu()
            index = self._col_index_on[w.device] = self._col_index.to(w.device)
        w[:, index] = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self.cache_dequantized:
            self._cache = w
        return w

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The effective dense weight (planes + low-rank correction) as ``compute_dtype``; a fresh tensor."""
        w = self.dequantized_planes(torch.float32).clone()
        if self.rank:
            w += self.lowrank_l.dequantize() @ self.lowrank_r.dequantize()
        return w.to(self.compute_dtype)

    def device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where the packed buffers live and the dtype :attr:`weight` has, without dequantizing anything."""
        return self.planes[0].qweight.device, self.compute_dtype

    def set_cache(self, enabled: bool) -> None:
        """Keep (or drop) the dequantized weight between forward passes."""
        self.cache_dequantized = bool(enabled)
        self._cache = None

    def stored_nbytes(self) -> int:
        """Bytes of every packed tensor (planes and low-rank factors; the bias is not counted)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def fill(
        self, planes: list[QuantizedMatrix], lowrank: tuple[QuantizedMatrix, QuantizedMatrix] | None = None
    ) -> None:
        """Copy packed planes (storage order) and the low-rank factors ``(L, R)`` into the buffers."""
        if len(planes) != len(self.planes):
            raise ConfigError(f"AmlqLinear expects {len(self.planes)} planes, got {len(planes)}")
        for buf, q in zip(self.planes, planes, strict=True):
            buf.fill(q)
        if self.rank:
            if lowrank is None:
                raise ConfigError(f"AmlqLinear of rank {self.rank} needs its low-rank factors")
            self.lowrank_l.fill(lowrank[0])
            self.lowrank_r.fill(lowrank[1])
        self._cache = None

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            backend = BACKENDS[self.backend]
        except KeyError:
            raise ConfigError(f"unknown AMLQ backend {self.backend!r}; available: {sorted(BACKENDS)}") from None
        return backend(self, x)

    def _apply(self, fn: Any, recurse: bool = True) -> AmlqLinear:
        self._cache = None  # a moved or cast module recomputes its cached weight
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        planes = ", ".join(f"{b}b/g{g}" for b, g in self.entry["planes"])
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"planes=[{planes}], rank={self.rank}"
        )


def replace_with_amlq_linear(
    model: nn.Module, layout: dict[str, dict[str, Any]], dtype: torch.dtype | None = None, device: Any = None
) -> list[str]:
    """Swap every ``nn.Linear`` (or GPT-2 ``Conv1D``) named in ``layout`` for an empty `AmlqLinear` (buffers zeroed,
    on ``device``)."""
    replaced = []
    for name, entry in layout.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(
                f"AMLQ layout names module {name!r}, which {type(model).__name__} does not have"
            ) from None
        if not is_linear(old):
            raise ConfigError(f"AMLQ layout names {name!r}, which is a {type(old).__name__}, not a linear layer")
        out_features, in_features = linear_shape(old)
        new = AmlqLinear(in_features, out_features, entry, bias=old.bias is not None, dtype=dtype or old.weight.dtype,
                         device=device, name=name, from_conv1d=is_conv1d(old))  # fmt: skip
        new.requires_grad_(False)
        model.set_submodule(name, new)
        replaced.append(name)
    return replaced


def set_dequant_cache(model: nn.Module, enabled: bool = True) -> int:
    """Turn the dequantized-weight cache of every `AmlqLinear` of ``model`` on or off; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, AmlqLinear):
            module.set_cache(enabled)
            count += 1
    return count
