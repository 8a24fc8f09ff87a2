"""`PackedDelta`: the packed factors of one adapter on one target linear, held as buffers.

This module only stores and exposes the data; `backend.py` computes with it and `layer.py` plugs it into PEFT.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import AdapterFileError
from .packing import QuantizedMatrix, expected_tensor_shapes


class _FixedDtypeModule(nn.Module):
    """A module whose buffers keep their stored dtypes: ``.to(dtype)``, ``.half()`` etc. only move devices.

    Packed codes, float16 scales and float32 singular values are the file format; casting them to the model's
    dtype (as ``model.to(torch.bfloat16)`` or PEFT's device/dtype alignment would) loses precision for nothing.
    """

    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - torch API
        if recurse:
            for child in self.children():
                child._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self


class QuantizedFactor(_FixedDtypeModule):
    """Buffers of one `QuantizedMatrix` (``qweight``, ``qweight_hi``, ``scales``, ``zeros``)."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int) -> None:
        super().__init__()
        self.rows, self.cols, self.bits = rows, cols, bits
        self.group_size = group_size if bits != 16 else 0
        for name, (shape, dtype) in expected_tensor_shapes(rows, cols, bits, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))

    def set(self, q: QuantizedMatrix) -> None:
        """Copy a `QuantizedMatrix` into the buffers (shapes and bits must match)."""
        if tuple(q.shape) != (self.rows, self.cols) or q.bits != self.bits:
            raise AdapterFileError(
                f"factor of shape {tuple(q.shape)} at {q.bits} bits does not fit a buffer of shape "
                f"{(self.rows, self.cols)} at {self.bits} bits"
            )
        for name, t in q.tensors().items():
            getattr(self, name).copy_(t)

    def matrix(self) -> QuantizedMatrix:
        """A `QuantizedMatrix` view of the buffers (no copy)."""
        return QuantizedMatrix(
            qweight=self.qweight,
            scales=getattr(self, "scales", None),
            zeros=getattr(self, "zeros", None),
            bits=self.bits,
            group_size=self.group_size,
            shape=(self.rows, self.cols),
            qweight_hi=getattr(self, "qweight_hi", None),
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.matrix().dequantize(dtype)

    def extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, bits={self.bits}, group_size={self.group_size}"


class DeltaBand(_FixedDtypeModule):
    """One band: ``V_kᵀ`` (``rank x in``), ``U_k`` (``out x rank``) and ``S_k`` (``rank``, float32)."""

    def __init__(self, out_features: int, in_features: int, bits: int, rank: int, group_size: int) -> None:
        super().__init__()
        self.bits, self.rank = bits, rank
        self.v = QuantizedFactor(rank, in_features, bits, group_size)
        self.u = QuantizedFactor(out_features, rank, bits, group_size)
        self.register_buffer("s", torch.zeros(rank, dtype=torch.float32))

    def set(self, v: QuantizedMatrix, u: QuantizedMatrix, s: torch.Tensor) -> None:
        self.v.set(v)
        self.u.set(u)
        self.s.copy_(s.to(torch.float32))


class PackedDelta(_FixedDtypeModule):
    """All bands (and the optional dense bias delta) of one adapter on one ``out x in`` linear."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        bands: Sequence[Sequence[int]],
        group_size: int,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self.layout = [(int(b), int(r)) for b, r in bands]
        self.bands = nn.ModuleList(
            [DeltaBand(out_features, in_features, b, r, group_size) for b, r in self.layout if r > 0]
        )
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    @property
    def rank(self) -> int:
        return sum(r for _, r in self.layout)

    def set_band(self, k: int, v: QuantizedMatrix, u: QuantizedMatrix, s: torch.Tensor) -> None:
        """Fill band ``k`` (index among the non-empty bands)."""
        self.bands[k].set(v, u, s)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``out x in`` delta ``Σ_k U_k diag(S_k) V_kᵀ`` (for merging and export)."""
        w = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self._device())
        for band in self.bands:
            w += (band.u.dequantize() * band.s) @ band.v.dequantize()
        return w.to(dtype)

    def nbytes(self) -> int:
        """Exact bytes of every buffer (what the adapter file stores for this module)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _device(self) -> torch.device:
        for b in self.buffers():
            return b.device
        return torch.device("cpu")
