"""The upper Cholesky factor of a damped Hessian's inverse, the one factorization GPTQ's column loop needs.

Kept apart from the loop (:mod:`.gptq`) because its memory is the loop's largest: for a 7B down_proj one n x n copy
is 0.45 GiB in float32, and the straightforward sequence (factor, inverse, factor again, then a float32 copy) held
five of them.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict

import torch

from ..errors import user_stacklevel
from .spill import Hessian, copy_hessian

FLOAT64_MAX_BYTES = 512 << 20  # largest float64 working copy of a Hessian (n <= 8192); wider ones work in float32
MAX_DAMP_RETRIES = 6
REUSE_MAX_BYTES = 64 << 20  # factors kept for Hessians that are still alive (q/k/v and gate/up share theirs)

# id(H) -> (weak reference to H, H's version, damping asked for, factor, damping used): the factor of a Hessian that
# several linears share is computed once while that Hessian lives (an entry goes when its Hessian is freed)
_reused: OrderedDict[int, tuple[weakref.ref, int, float, torch.Tensor, float]] = OrderedDict()


def inverse_cholesky(H: Hessian, damp: float, name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of the damped ``H⁻¹`` (only its upper triangle is meaningful) and the damping used
    (``inf`` = fell back to the identity).

    One working copy in column-major order, which LAPACK factorizes, inverts and factorizes again *in place*
    (``out=`` the input; bit-identical to the out-of-place sequence): no other n x n matrix is made here. The copy
    is float64 up to :data:`FLOAT64_MAX_BYTES`, float32 (as the reference GPTQ computes) above: for a 7B down_proj
    (n = 11008) that is 0.45 instead of 0.90 GiB, and the factor, its inverse and the second factor as separate
    float64 tensors had made a streamed GPTQ run's peak several times the size of a 4-layer model on disk.
    A factorization that fails is retried with ten times the damping. ``H`` may be spilled to disk (:mod:`.spill`):
    then the working copy is the only n x n matrix in memory.

    The factor of an in-memory ``H`` is kept while ``H`` lives (up to :data:`REUSE_MAX_BYTES`), so linears that share
    one input Hessian (q/k/v, gate/up: :mod:`.hessian`) factor it once. Callers must not modify it.
    """
    if isinstance(H, torch.Tensor):
        entry = _reused.get(id(H))
        if entry is not None and entry[0]() is H and entry[1] == H._version and entry[2] == damp:
            return entry[3], entry[4]
    work, used = _factor(H, damp, name)
    if isinstance(H, torch.Tensor) and used != float("inf"):
        _keep(H, damp, work, used)
    return work, used


def _keep(H: torch.Tensor, damp: float, work: torch.Tensor, used: float) -> None:
    """Remember ``H``'s factor while ``H`` lives, within :data:`REUSE_MAX_BYTES` (oldest entries go first). The
    factor is only read by its callers (GPTQ's loop copies the blocks it needs)."""
    size = work.numel() * work.element_size()
    if size > REUSE_MAX_BYTES:
        return
    key = id(H)
    _reused.pop(key, None)
    while _reused and size + sum(e[3].numel() * e[3].element_size() for e in _reused.values()) > REUSE_MAX_BYTES:
        _reused.popitem(last=False)
    ref = weakref.ref(H, lambda _, key=key, forget=_forget: forget(key, ref))  # bound: also works at exit
    _reused[key] = (ref, H._version, damp, work, used)


def _forget(key: int, ref: weakref.ref, reused: OrderedDict = _reused) -> None:
    entry = reused.get(key)
    if entry is not None and entry[0] is ref:
        del reused[key]


def _factor(H: Hessian, damp: float, name: str) -> tuple[torch.Tensor, float]:
    where = f" of {name!r}" if name else ""
    n = H.shape[0]
    dtype = torch.float64 if n * n * 8 <= FLOAT64_MAX_BYTES else torch.float32
    work = torch.empty_strided((n, n), (1, n), dtype=dtype, device=H.device)  # column-major: LAPACK's own
    info = torch.empty((), dtype=torch.int32, device=H.device)

    def load() -> torch.Tensor:
        copy_hessian(work, H)  # H is symmetric, so the column-major copy holds the same matrix
        return torch.diagonal(work)

    diag = load()
    dead = diag <= 0
    if bool(dead.all()) or not _all_finite(work):
        warnings.warn(
            f"GPTQ{where}: Hessian is empty or not finite; falling back to round-to-nearest", stacklevel=user_stacklevel()
        )
        return torch.eye(n, dtype=dtype, device=H.device), float("inf")
    # inputs that were always zero carry no information: give them a neutral diagonal entry
    undamped = torch.where(dead, diag[~dead].mean(), diag)
    mean_diag = float(undamped.mean())
    d = max(float(damp), 1e-8)
    for attempt in range(MAX_DAMP_RETRIES):
        if attempt:  # the last try overwrote the working copy: start again from the Hessian
            load()
        torch.diagonal(work).copy_(undamped).add_(d * mean_diag)
        torch.linalg.cholesky_ex(work, out=(work, info))
        if int(info) == 0:
            torch.cholesky_inverse(work, out=work)
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
            if int(info) == 0 and _all_finite(work, upper=True):
                return work, d
        d *= 10.0
    warnings.warn(
        f"GPTQ{where}: Hessian is not positive definite even with damping {d / 10:g}; "
        "falling back to round-to-nearest",
        stacklevel=user_stacklevel(),
    )
    return torch.eye(n, dtype=dtype, device=H.device), float("inf")


def _all_finite(M: torch.Tensor, upper: bool = False, rows: int = 1024) -> bool:
    """Whether every entry of ``M`` (of its upper triangle with ``upper``) is finite, checked a block of rows at a
    time (a whole-matrix mask would be one more n x n tensor)."""
    for i in range(0, M.shape[0], rows):
        block = M[i : i + rows, i:] if upper else M[i : i + rows]
        if not bool(torch.isfinite(torch.triu(block) if upper else block).all()):
            return False
    return True
