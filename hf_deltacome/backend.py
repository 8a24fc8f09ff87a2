"""Computing the delta product ``Σ_k U_k (S_k ⊙ (V_kᵀ x))``: PyTorch reference path and the Triton seam.

``DELTACOME_BACKEND`` selects the path: ``torch`` (reference, any device), ``triton`` (CUDA kernels from
``hf_deltacome.kernels``; an error if unavailable) or ``auto`` (default: Triton on CUDA when importable, else torch).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from .errors import ConfigError
from .format.storage import PackedDelta

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
        # on CPU the kernels only run under TRITON_INTERPRET=1
        return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return x.is_cuda and triton_available()


def torch_delta_forward(x: torch.Tensor, delta: PackedDelta) -> torch.Tensor:
    """Reference path: dequantize each band's factors and apply them as two skinny matmuls."""
    out_dtype = x.dtype
    compute = torch.float32 if x.device.type == "cpu" else x.dtype
    xc = x.to(compute)
    y = None
    for band in delta.bands:
        t = (xc @ band.v.dequantize(compute).t()) * band.s.to(compute)
        part = t @ band.u.dequantize(compute).t()
        y = part if y is None else y + part
    if y is None:
        y = xc.new_zeros(*x.shape[:-1], delta.out_features)
    for part in (getattr(delta, "sign", None), getattr(delta, "sparse", None)):
        if part is not None:  # baseline parts (BitDelta sign bits, DARE sparse values)
            y = y + part.forward_delta(xc)
    if delta.bias is not None:
        y = y + delta.bias.to(compute)
    return y.to(out_dtype)


def delta_forward(x: torch.Tensor, delta: PackedDelta) -> torch.Tensor:
    """``delta(x)`` for one adapter, shape ``(..., out_features)``, in ``x``'s dtype."""
    if not getattr(delta, "has_extra_parts", False) and _use_triton(x):  # kernels read bands only
        from . import kernels

        return kernels.delta_forward(x, delta)
    return torch_delta_forward(x, delta)


def delta_forward_mixed(x: torch.Tensor, deltas: Sequence[PackedDelta | None], row_index: torch.Tensor) -> torch.Tensor:
    """Mixed batch: row ``i`` of ``x`` (``batch x ... x in``) gets ``deltas[row_index[i]]``; -1 means no delta."""
    extra = any(getattr(d, "has_extra_parts", False) for d in deltas if d is not None)
    if not extra and _use_triton(x):
        from . import kernels

        return kernels.delta_forward_mixed(x, deltas, row_index)
    present = [d for d in deltas if d is not None]
    out = x.new_zeros(*x.shape[:-1], present[0].out_features if present else 0)
    for i, delta in enumerate(deltas):
        rows = (row_index == i).nonzero(as_tuple=True)[0]
        if delta is None or rows.numel() == 0:
            continue
        out[rows] = torch_delta_forward(x[rows], delta)
    return out
