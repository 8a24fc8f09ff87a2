"""Round-to-nearest quantization: the asymmetric grid of one group and data-free RTN of a whole matrix.

GPTQ (:mod:`.gptq`) uses the same grid (:func:`asymmetric_params`) with error feedback between columns.
"""

from __future__ import annotations

import torch

from ..format.packing import QuantizedMatrix


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int) -> QuantizedMatrix:
    """Data-free asymmetric round-to-nearest quantization of ``w`` (rows x cols) in groups along ``cols``."""
    if bits == 16:
        return QuantizedMatrix.from_float16(w)
    rows, cols = w.shape
    g = QuantizedMatrix.n_groups(cols, group_size)
    w = w.to(torch.float32)
    padded = torch.zeros(rows, g * group_size, dtype=torch.float32, device=w.device)
    padded[:, :cols] = w
    # padding must not widen the range: fill it with a value from the group itself
    if g * group_size > cols:
        padded[:, cols:] = w[:, -1:].expand(rows, g * group_size - cols)
    grouped = padded.view(rows, g, group_size)
    scales, zeros = asymmetric_params(grouped.amin(-1), grouped.amax(-1), bits)
    maxq = (1 << bits) - 1
    q = torch.clamp(torch.round(grouped / scales.unsqueeze(-1)) + zeros.unsqueeze(-1), 0, maxq)
    q = q.view(rows, g * group_size)[:, :cols].to(torch.int64)
    return QuantizedMatrix.from_int(q, scales, zeros, bits, group_size)


def asymmetric_params(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of an asymmetric ``bits``-bit grid covering ``[wmin, wmax]`` (and 0).

    ``bits`` may be a tensor broadcastable to ``wmin`` for per-row bit widths. The scale is rounded to float16
    first so that quantizing and dequantizing use exactly the stored value.
    """
    maxq = (2 ** torch.as_tensor(bits, device=wmin.device, dtype=torch.float32)) - 1
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    span = wmax - wmin
    scale = torch.where(span > 0, span / maxq, torch.ones_like(span))
    scale = scale.to(torch.float16).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # float16 underflow guard
    zero = torch.clamp(torch.round(-wmin / scale), torch.zeros_like(maxq), maxq)
    return scale, zero
