"""Computing the delta product ``Σ_k U_k (S_k ⊙ (V_kᵀ x))``: PyTorch reference path and the Triton seam.

``DELTACOME_BACKEND`` selects the path: ``torch`` (reference, any device), ``triton`` (CUDA kernels from
``hf_deltacome.kernels``; an error if unavailable) or ``auto`` (default: Triton on CUDA when importable, else torch).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch

from .errors import ConfigError
from .format.baseline_parts import SparsePart
from .format.blob import PINNED_FACTORS
from .format.decoded import DequantCache, dequant_cache  # noqa: F401 (public here: hf_deltacome.backend.dequant_cache)
from .format.sparse_bands import SparseBand
from .format.storage import PackedDelta
from .format.vq_part import VectorPart

BACKENDS = ("auto", "torch", "triton")


def backend_name() -> str:
    """The value of ``DELTACOME_BACKEND`` (validated), ``auto`` by default."""
    name = os.environ.get("DELTACOME_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ConfigError(f"DELTACOME_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def check_device(device: torch.device | str, what: str = "device") -> torch.device:
    """``torch.device(device)`` if this machine has it; else a `ConfigError` naming ``what`` (an option, say)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{what} {str(device)!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} {str(device)!r}: no CUDA GPU is available here (use cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"{what} {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{what} {str(device)!r}: MPS is not available here (use cpu)")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"{what} {str(device)!r}: not a device to compute on; use cpu, cuda, cuda:N or mps")
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(f"{what} {str(device)!r}: no XPU is available here (use cpu)")
    return dev


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from . import kernels  # noqa: F401
    except Exception:
        return False
    return hasattr(kernels, "delta_forward")


def _use_triton(x: torch.Tensor) -> bool:
    name = backend_name()
    if name == "torch":
        return False
    if name == "triton":
        if not triton_available():
            raise ConfigError("DELTACOME_BACKEND=triton but Triton or hf_deltacome.kernels is not importable")
        from . import kernels

        # on CPU the kernels only run interpreted, which Triton fixes when they are defined (the first import)
        if x.is_cuda or kernels.INTERPRET:
            return True
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise ConfigError(
                "DELTACOME_BACKEND=triton on CPU: TRITON_INTERPRET=1 was set after hf_deltacome.kernels was imported, "
                "and Triton reads it when the kernels are defined; set it before the first import (in the environment)"
            )
        return False
    return x.is_cuda and triton_available()


def torch_delta_forward(x: torch.Tensor, delta: PackedDelta) -> torch.Tensor:
    """Reference path: the bands' factors (dequantized, or from :data:`dequant_cache`) as two skinny matmuls."""
    out_dtype = x.dtype
    compute = torch.float32 if x.device.type == "cpu" else x.dtype
    xc = x.to(compute)
    y = None
    pinned = delta.part(PINNED_FACTORS) if delta.overridden else None
    if pinned is not None:  # factors being distilled (compression/distill.py): differentiable, never cached
        y = (xc @ pinned[0].to(compute)) @ pinned[1].to(compute)
    elif dequant_cache.max_bytes > 0 and delta.rank > 0:
        a, b = dequant_cache.factors(delta, compute, xc.device)
        y = (xc @ a) @ b
    else:
        for band in delta.low_rank_bands:
            t = (xc @ band.vt_dense(compute).t().to(xc.device)) * band.s.to(compute)
            part = t @ band.ut_dense(compute)
            y = part if y is None else y + part
    if y is None:
        y = xc.new_zeros(*x.shape[:-1], delta.out_features)
    for part in delta.extra_parts:  # BitDelta sign bits, DARE sparse values, vector codes
        y = y + part.forward_delta(xc)
    if delta.bias is not None:
        y = y + delta.bias.to(compute)
    return y.to(out_dtype)


def _kernel_ready(delta: PackedDelta | None) -> bool:
    """Can the kernels serve this delta: they read format-2 dense bands (and the bias); a delta's DARE values (the
    default's MLP), vector codes, sign bits (BitDelta) and sparse bands (impart, the sparse tail: seeded masks inside
    the singular vectors) are added beside them by `_add_parts`. Format-1 files and parts overridden for computing
    (scale distillation) take the PyTorch path whole."""
    return delta is None or (delta.format >= 2 and not delta.overridden)


def _parts(delta: PackedDelta | None) -> list:
    """The parts beside the dense bands, added after the band kernels (`_add_parts`): sign bits, DARE values, vector
    codes, sparse bands."""
    if delta is None or not delta.has_extra_parts:
        return []
    return [*delta.extra_parts, *delta.sparse_bands]


def _add_parts(
    y: torch.Tensor, x: torch.Tensor, deltas: Sequence[PackedDelta | None], row_index: torch.Tensor | None
) -> torch.Tensor:
    """``y`` plus each delta's sign / DARE / vector-code parts and sparse bands (`_parts`), after the kernels wrote
    its dense bands: in place unless ``y`` needs its gradient. A DARE part goes through
    `hf_deltacome.kernels.sparse_add_into` (its values read packed, its mask hashed in the kernel, format 5, or kept
    as a bitmap, 1/16 of the fp16 delta, for an older file, where the PyTorch path's CSR copy takes ~0.9x at 1/16),
    vector codes through `hf_deltacome.kernels.vq_add_into` (read in place, where the PyTorch path decodes them to
    float32, 2x the fp16 delta), a sparse band of format 6 through `hf_deltacome.kernels.sparse_band_add_into`
    (values packed, masks hashed in the kernels); sign bits, an older file's sparse bands (two matmuls by their
    decoded factors, `SparseBand.forward_delta`), and a part whose output needs a gradient, through PyTorch: in a
    mixed batch computed on every row and kept on the delta's rows by a mask (no host synchronisation: a decode step
    can still be captured)."""
    from . import kernels

    for i, delta in enumerate(deltas):
        for part in _parts(delta):
            if kernels.can_add_into(y, x, y.shape[-1]):
                if isinstance(part, SparsePart) and kernels.sparse_ready(part):
                    kernels.sparse_add_into(y, x, part, row_index, i)
                    continue
                if isinstance(part, VectorPart) and kernels.vq_ready(part):
                    kernels.vq_add_into(y, x, part, row_index, i)
                    continue
                if isinstance(part, SparseBand) and kernels.sparse_band_ready(part):
                    kernels.sparse_band_add_into(y, x, part, row_index, i)
                    continue
            extra = part.forward_delta(x).to(y.dtype)
            if row_index is not None:
                keep = (row_index.to(y.device) == i).to(y.dtype)
                extra = extra * keep.view(-1, *([1] * (y.dim() - 1)))
            y = y + extra if y.requires_grad else y.add_(extra)
    return y


def delta_forward(x: torch.Tensor, delta: PackedDelta) -> torch.Tensor:
    """``delta(x)`` for one adapter, shape ``(..., out_features)``, in ``x``'s dtype."""
    if _kernel_ready(delta) and _use_triton(x):
        from . import kernels

        return _add_parts(kernels.delta_forward(x, delta), x, [delta], None)
    return torch_delta_forward(x, delta)


def delta_forward_mixed(x: torch.Tensor, deltas: Sequence[PackedDelta | None], row_index: torch.Tensor) -> torch.Tensor:
    """Mixed batch: row ``i`` of ``x`` (``batch x ... x in``) gets ``deltas[row_index[i]]``; -1 means no delta."""
    if all(_kernel_ready(d) for d in deltas) and _use_triton(x):
        from . import kernels

        return _add_parts(kernels.delta_forward_mixed(x, deltas, row_index), x, deltas, row_index)
    present = [d for d in deltas if d is not None]
    out = x.new_zeros(*x.shape[:-1], present[0].out_features if present else 0)
    for i, delta in enumerate(deltas):
        rows = (row_index == i).nonzero(as_tuple=True)[0]
        if delta is None or rows.numel() == 0:
            continue
        out[rows] = torch_delta_forward(x[rows], delta)
    return out


def add_delta_into(
    result: torch.Tensor,
    x: torch.Tensor,
    deltas: Sequence[PackedDelta | None],
    row_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``result +`` the delta of ``x``: one delta (``row_index`` None) or a mixed batch as in `delta_forward_mixed`.
    On the kernels it is added into ``result`` in place (one launch and one output-sized buffer fewer than a
    separate add) when nothing needs ``result``'s gradient."""
    present = [d for d in deltas if d is not None]
    if present and all(_kernel_ready(d) for d in deltas) and _use_triton(x):
        from . import kernels

        if kernels.can_add_into(result, x, present[0].out_features):
            if row_index is None:
                return _add_parts(kernels.delta_forward(x, present[0], out=result), x, deltas, None)
            return _add_parts(kernels.delta_forward_mixed(x, list(deltas), row_index, out=result), x, deltas, row_index)
    extra = delta_forward(x, deltas[0]) if row_index is None else delta_forward_mixed(x, deltas, row_index)
    return result + extra.to(result.dtype)


def overlap_enabled() -> bool:
    """``DELTACOME_OVERLAP`` (``1`` by default, ``0`` off): run the kernels' shrink beside the base layer on CUDA."""
    value = os.environ.get("DELTACOME_OVERLAP", "1").strip()
    if value not in ("0", "1"):
        raise ConfigError(f"DELTACOME_OVERLAP={value!r} must be 0 or 1")
    return value == "1"


def base_and_delta(
    x: torch.Tensor,
    base: Callable[[], torch.Tensor],
    deltas: Sequence[PackedDelta | None],
    row_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base() + delta(x)`` for one delta (``row_index`` None) or a mixed batch; on CUDA with the kernels the
    shrink runs beside ``base()`` (`hf_deltacome.kernels.base_plus_delta`), elsewhere it is `add_delta_into`."""
    if x.is_cuda and all(_kernel_ready(d) for d in deltas) and _use_triton(x) and overlap_enabled():
        from . import kernels

        return _add_parts(kernels.base_plus_delta(x, base, list(deltas), row_index), x, deltas, row_index)
    return add_delta_into(base(), x, deltas, row_index)
