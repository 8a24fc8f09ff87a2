"""Triton kernels for the Delta-CoMe delta product, reading the packed format in place.

``delta_forward(x, delta)`` serves one adapter, ``delta_forward_mixed(x, deltas, row_index)`` a batch whose rows
use different adapters (``-1`` = none), ``sparse_add_into(y, x, part)`` adds a DARE part (its values packed, its
mask hashed in the kernel, or read as a bitmap for an older file), ``sparse_band_add_into(y, x, band)`` a sparse
band of singular vectors (impart, the sparse tail: values packed, masks hashed, format 6), ``vq_add_into(y, x,
part)`` a vector-quantized part (its codes read in place).
``hf_deltacome.backend`` dispatches here on CUDA (or on CPU under
``TRITON_INTERPRET=1``); importing this package needs Triton.
"""

# This folder is installed as ``hf_deltacome.kernels``. With the repository root on ``sys.path`` it is also visible
# as a top-level ``kernels``, which transformers probes for (the Hub ``kernels`` package) in the middle of its own
# import: under that name, import nothing, so the probe finds no version and moves on without a circular import.
if __name__ == "hf_deltacome.kernels":
    from .plan import KERNEL_BITS, KernelPlan, mixed_plan_for, plan_for
    from .triton_delta import INTERPRET, base_plus_delta, can_add_into, delta_forward, delta_forward_mixed
    from .triton_sparse import sparse_add_into, sparse_band_add_into, sparse_band_ready, sparse_ready
    from .triton_vq import vq_add_into, vq_ready

    __all__ = [
        "INTERPRET",
        "KERNEL_BITS",
        "KernelPlan",
        "base_plus_delta",
        "can_add_into",
        "delta_forward",
        "delta_forward_mixed",
        "mixed_plan_for",
        "plan_for",
        "sparse_add_into",
        "sparse_band_add_into",
        "sparse_band_ready",
        "sparse_ready",
        "vq_add_into",
        "vq_ready",
    ]
