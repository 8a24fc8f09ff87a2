"""Bit packing of quantized factors and the `QuantizedMatrix` container.

Format (shared by the PyTorch path, the Triton kernels and the file format):

* A quantized matrix ``W`` of shape ``(rows, cols)`` is a *linear weight* (out x in); ``cols`` is the reduction
  dimension. Values are asymmetric integers ``q`` in ``[0, 2**bits - 1]`` with ``W ≈ (q - zero) * scale``; one
  ``scale`` (float16) and one ``zero`` (uint8) per row and group of ``group_size`` consecutive columns.
* 1-, 2-, 4- and 8-bit values are packed into int32 words along ``cols``, least significant bits first:
  value ``j`` of a row sits in word ``j // (32 // bits)`` at bit offset ``(j % (32 // bits)) * bits``.
  A row whose length is not a multiple of ``32 // bits`` is padded with zeros.
* 3-bit values are stored as a 2-bit plane (``qweight``, the low two bits) plus a 1-bit plane (``qweight_hi``).
* 16-bit "quantization" stores the float16 values as they are in ``qweight`` (no scales, no zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import AdapterFileError

SUPPORTED_BITS = (1, 2, 3, 4, 8, 16)
_PLAIN_BITS = (1, 2, 4, 8)
_MASK32 = 0xFFFFFFFF


def packed_words(cols: int, bits: int) -> int:
    """Number of int32 words one row of ``cols`` ``bits``-bit values (1, 2, 4 or 8 bits) occupies."""
    per = 32 // bits
    return (cols + per - 1) // per


_PACK_ELEMENTS = 1 << 22  # values packed at a time by pack_bits (32 MiB of int64 working copies)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values ``q`` (rows x cols, each in ``[0, 2**bits)``) into int32 words along the last dim."""
    if bits not in _PLAIN_BITS:
        raise ValueError(f"pack_bits supports {_PLAIN_BITS} bits, got {bits}")
    rows, cols = q.shape
    step = max(1, _PACK_ELEMENTS // max(cols, 1))
    if rows > step:  # a block of rows at a time: the int64 working copies stay small (a 7B U band is 11008 rows)
        return torch.cat([pack_bits(q[i : i + step], bits) for i in range(0, rows, step)])
    per = 32 // bits
    words = packed_words(cols, bits)
    padded = torch.zeros(rows, words * per, dtype=torch.int64, device=q.device)
    padded[:, :cols] = q.to(torch.int64) & ((1 << bits) - 1)
    shifts = torch.arange(per, device=q.device, dtype=torch.int64) * bits
    acc = (padded.view(rows, words, per) << shifts).sum(dim=-1)  # bits do not overlap, so sum == bitwise or
    acc = torch.where(acc >= 2**31, acc - 2**32, acc)  # reinterpret as signed int32
    return acc.to(torch.int32)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (0..15) two to a ``uint8``, low nibble first, an odd count padded with a zero code: DARE's rate
    codes and a vq part's vector codes."""
    c = codes.to(torch.uint8).flatten()
    c = torch.cat([c, c.new_zeros(c.numel() % 2)])
    return c[0::2] | (c[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` 4-bit codes of :func:`pack_nibbles`' bytes (int64)."""
    p = packed.to(torch.uint8)
    return torch.stack([p & 15, p >> 4], 1).flatten()[:count].to(torch.int64)


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words (rows x words) to int64 values (rows x cols)."""
    if bits not in _PLAIN_BITS:
        raise ValueError(f"unpack_bits supports {_PLAIN_BITS} bits, got {bits}")
    per = 32 // bits
    rows, words = packed.shape
    shifts = torch.arange(per, device=packed.device, dtype=torch.int64) * bits
    vals = ((packed.to(torch.int64) & _MASK32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(rows, words * per)[:, :cols]


@dataclass
class QuantizedMatrix:
    """A bit-packed, group-quantized matrix (see the module docstring for the format)."""

    qweight: torch.Tensor  # int32 (rows, words); float16 (rows, cols) when bits == 16
    scales: torch.Tensor | None  # float16 (rows, n_groups)
    zeros: torch.Tensor | None  # uint8 (rows, n_groups)
    bits: int
    group_size: int
    shape: tuple[int, int]
    qweight_hi: torch.Tensor | None = None  # int32 (rows, ceil(cols / 32)), 3-bit only

    @staticmethod
    def n_groups(cols: int, group_size: int) -> int:
        return math.ceil(cols / group_size)

    @classmethod
    def from_int(
        cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
    ) -> QuantizedMatrix:
        """Pack integer codes ``q`` with their per-group ``scales`` and integer ``zeros``."""
        if bits not in SUPPORTED_BITS or bits == 16:
            raise ValueError(f"cannot pack {bits}-bit integers; supported: 1, 2, 3, 4, 8")
        rows, cols = q.shape
        hi = None
        if bits == 3:
            packed = pack_bits(q & 3, 2)
            hi = pack_bits(q >> 2, 1)
        else:
            packed = pack_bits(q, bits)
        return cls(
            qweight=packed,
            scales=scales.to(torch.float16).contiguous(),
            zeros=zeros.round().clamp(0, 255).to(torch.uint8).contiguous(),
            bits=bits,
            group_size=group_size,
            shape=(rows, cols),
            qweight_hi=hi,
        )

    @classmethod
    def of(cls, holder: object) -> QuantizedMatrix:
        """The matrix over the tensors ``holder`` stores as attributes (``qweight``, ``scales``, ``zeros``, optional
        ``qweight_hi``; ``rows``, ``cols``, ``bits``, ``group_size``): a view, no copy (AMLQ's buffers, blob parts)."""
        return cls(
            qweight=holder.qweight,
            scales=holder.scales,
            zeros=holder.zeros,
            bits=holder.bits,
            group_size=holder.group_size,
            shape=(holder.rows, holder.cols),
            qweight_hi=getattr(holder, "qweight_hi", None),
        )

    @classmethod
    def from_float16(cls, w: torch.Tensor) -> QuantizedMatrix:
        """Store ``w`` unquantized in float16 (the "16-bit band" used by plain low-rank baselines)."""
        return cls(w.to(torch.float16).contiguous(), None, None, 16, 0, tuple(w.shape))

    def int_codes(self) -> torch.Tensor:
        """Unpacked integer codes (rows x cols, int64)."""
        rows, cols = self.shape
        if self.bits == 16:
            raise ValueError("a 16-bit matrix has no integer codes")
        if self.bits == 3:
            return unpack_bits(self.qweight, 2, cols) | (unpack_bits(self.qweight_hi, 1, cols) << 2)
        return unpack_bits(self.qweight, self.bits, cols)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``(q - zero) * scale`` as ``dtype``."""
        if self.bits == 16:
            return self.qweight.to(dtype)
        rows, cols = self.shape
        q = self.int_codes().to(torch.float32)
        scale = self.scales.to(torch.float32).repeat_interleave(self.group_size, dim=1)[:, :cols]
        zero = self.zeros.to(torch.float32).repeat_interleave(self.group_size, dim=1)[:, :cols]
        return ((q - zero) * scale).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (``qweight``, ``qweight_hi``, ``scales``, ``zeros``); absent ones omitted."""
        out = {"qweight": self.qweight}
        for name in ("qweight_hi", "scales", "zeros"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t
        return out

    def nbytes(self) -> int:
        """Exact bytes of every stored tensor."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def expected_tensor_shapes(
    rows: int, cols: int, bits: int, group_size: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the tensors a ``rows x cols`` matrix at ``bits`` bits is stored as.

    Used both to allocate buffers before loading weights and to validate files.
    """
    if bits not in SUPPORTED_BITS:
        raise AdapterFileError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
    if bits == 16:
        return {"qweight": ((rows, cols), torch.float16)}
    g = QuantizedMatrix.n_groups(cols, group_size)
    if bits == 3:
        out = {
            "qweight": ((rows, packed_words(cols, 2)), torch.int32),
            "qweight_hi": ((rows, packed_words(cols, 1)), torch.int32),
        }
    else:
        out = {"qweight": ((rows, packed_words(cols, bits)), torch.int32)}
    out["scales"] = ((rows, g), torch.float16)
    out["zeros"] = ((rows, g), torch.uint8)
    return out


def stored_nbytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Exact bytes a ``rows x cols`` matrix takes when stored at ``bits`` bits (packing padding, scales, zeros)."""
    if rows == 0 or cols == 0:
        return 0
    total = 0
    for shape, dtype in expected_tensor_shapes(rows, cols, bits, group_size).values():
        total += math.prod(shape) * dtype.itemsize
    return total
