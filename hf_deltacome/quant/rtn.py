"""Round-to-nearest quantization: the asymmetric grid of one group and data-free RTN of a whole matrix.

GPTQ (:mod:`.gptq`) uses the same grid (:func:`asymmetric_params`) with error feedback between columns.
"""

from __future__ import annotations

import torch

from ..format.packing import QuantizedMatrix

CLIP_GRID = tuple(1.0 - 0.04 * k for k in range(20))  # clip=True: shares of each group's range tried (1 .. 0.24)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, *, clip: bool = False) -> QuantizedMatrix:
    """Data-free asymmetric round-to-nearest quantization of ``w`` (rows x cols) in groups along ``cols``.

    ``clip``: each group's grid covers the share of its range in ``CLIP_GRID`` with the least squared error
    instead of the whole range (heavy-tailed values at 2-3 bits, e.g. DARE's rescaled ones: a min-max grid spends
    its few levels on the outliers). Same format: only the stored scale and zero differ."""
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
    maxq = (1 << bits) - 1
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    scales, zeros = asymmetric_params(lo, hi, bits)
    q = torch.clamp(torch.round(grouped / scales.unsqueeze(-1)) + zeros.unsqueeze(-1), 0, maxq)
    if clip:
        best = _group_error(grouped, q, scales, zeros)
        for share in CLIP_GRID[1:]:
            s, z = asymmetric_params(lo * share, hi * share, bits)
            qs = torch.clamp(torch.round(grouped / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, maxq)
            err = _group_error(grouped, qs, s, z)
            better = err < best
            best = torch.where(better, err, best)
            scales, zeros = torch.where(better, s, scales), torch.where(better, z, zeros)
            q = torch.where(better.unsqueeze(-1), qs, q)
    q = q.view(rows, g * group_size)[:, :cols].to(torch.int64)
    return QuantizedMatrix.from_int(q, scales, zeros, bits, group_size)


def unbiased(qm: QuantizedMatrix, w: torch.Tensor) -> QuantizedMatrix:
    """``qm``, the RTN of ``w``, with each group's scale stretched so that its values project onto ``w``'s at 1
    (``<Q(w), w> = ||w||²`` per group): the same codes, zeros and bytes. A least-squares grid (``clip=True``) pulls
    heavy tails in: 2-bit DARE's stores ~0.87 of its rescaled values, a shrunk delta plus noise, which the model
    feels more than the noise (benchmarks/RESULTS.md, reading at 14b298f). This keeps the noise, not the bias."""
    if qm.bits == 16:
        return qm
    rows, cols = w.shape
    pad = qm.n_groups(cols, qm.group_size) * qm.group_size - cols
    x = torch.nn.functional.pad(w.float(), (0, pad)).view(rows, -1, qm.group_size)
    dq = torch.nn.functional.pad(qm.dequantize(), (0, pad)).view(rows, -1, qm.group_size)
    dot = (x * dq).sum(-1)
    stretch = torch.where(dot > 0, x.square().sum(-1) / dot.clamp_min(1e-30), 1.0)
    stretch = stretch.clamp(0.25, 4.0)  # ~1.16 at 2 bits; a group rounded to almost nothing is not blown up
    return QuantizedMatrix.from_int(qm.int_codes(), qm.scales.float() * stretch, qm.zeros.float(), qm.bits,
                                    qm.group_size)  # fmt: skip


def _group_error(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Squared error of each group of ``x`` (rows x groups x size) quantized to ``q`` on the grid (scale, zero)."""
    return ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - x).square().sum(-1)


def asymmetric_params(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of an asymmetric ``bits``-bit grid covering ``[wmin, wmax]`` (and 0).

    ``bits`` may be a tensor broadcastable to ``wmin`` for per-row bit widths. The scale is rounded to float16
    first so that quantizing and dequantizing use exactly the stored value.
    """
    return grid_params(wmin, wmax, (2 ** torch.as_tensor(bits, device=wmin.device, dtype=torch.float32)) - 1)


def grid_params(wmin: torch.Tensor, wmax: torch.Tensor, maxq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`asymmetric_params` with the top code ``maxq = 2^bits − 1`` given (float32, broadcastable): GPTQ's
    column loop forms it once per call, not once per column."""
    wmin = torch.clamp(wmin, max=0.0)
    wmax = torch.clamp(wmax, min=0.0)
    span = wmax - wmin
    scale = torch.where(span > 0, span / maxq, 1.0)
    scale = scale.to(torch.float16).to(torch.float32)
    scale = torch.where(scale > 0, scale, 2.0**-24)  # float16 underflow guard
    zero = torch.minimum(torch.round(-wmin / scale).clamp_(min=0.0), maxq)
    return scale, zero
