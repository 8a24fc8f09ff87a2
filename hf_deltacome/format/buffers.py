"""Buffer modules the packed format is made of: `QuantizedFactor` (one packed matrix) and the base that keeps stored
dtypes. Shared by :mod:`.storage` (the bands, `PackedDelta`) and :mod:`.parts` (the optional parts)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterFileError
from .packing import QuantizedMatrix, expected_tensor_shapes


class FixedDtypeModule(nn.Module):
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


class QuantizedFactor(FixedDtypeModule):
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

