"""A large Hessian parked on disk while GPTQ works on its one in-memory copy.

Quantizing ``Vᵀ`` of a delta needs the input Hessian ``H`` twice: GPTQ turns a working copy of it into the factor
of ``H⁻¹`` (:mod:`.cholesky`), and afterwards the refit of ``U`` needs ``H`` itself (``A H`` with the quantized
``Vᵀ``). For a 7B down_proj each is 0.45 GiB in float32, and holding both at once was the peak of a streamed
compression (above the size of a 4-layer model on disk). :class:`SpilledHessian` writes ``H`` to an anonymous
temporary file (deleted when closed, or by the OS if the process dies) and hands it back a block of columns at a
time, so only the working copy is resident. The file holds ``H`` column by column, so a block read back is exactly
``H[:, j:k]`` (no symmetry is assumed: the bytes of the adapter do not depend on whether ``H`` was spilled).
"""

from __future__ import annotations

import tempfile
import warnings
from typing import Union

import torch

from ..errors import user_stacklevel

SPILL_MIN_BYTES = 256 << 20  # Hessians at least this large are spilled (in a 7B layer only down_proj's, n = 11008)
_BLOCK = 512  # columns read or written at a time (22 MB for n = 11008 in float32)


class SpilledHessian:
    """An ``n x n`` Hessian kept in a temporary file (column-major), read back a block of columns at a time.

    Stands in for the tensor where GPTQ and the refit of ``U`` read it (:func:`column_block`,
    :func:`copy_hessian`); :meth:`load` materializes it for the rarer paths that need the whole matrix.
    """

    def __init__(self, H: torch.Tensor, directory: str | None = None) -> None:
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"a Hessian must be square, got shape {tuple(H.shape)}")
        self.shape = tuple(H.shape)
        self.dtype, self.device = H.dtype, H.device
        self._file = tempfile.TemporaryFile(prefix="deltacome-hessian-", dir=directory)  # noqa: SIM115 (owned)
        n = self.shape[0]
        for j in range(0, n, _BLOCK):
            self._file.write(memoryview(H[:, j : j + _BLOCK].t().contiguous().cpu().numpy()).cast("B"))
        self._file.flush()

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def columns(self, j: int, k: int) -> torch.Tensor:
        """``H[:, j:k]`` read from the file (on the Hessian's device)."""
        n = self.shape[0]
        k = min(k, n)
        block = torch.empty(k - j, n, dtype=self.dtype)
        self._file.seek(j * n * self.dtype.itemsize)
        view = memoryview(block.numpy()).cast("B")
        if self._file.readinto(view) != len(view):
            raise OSError(f"spilled Hessian file ended early at column {j} of {n}")
        return block.t().to(self.device)

    def load(self) -> torch.Tensor:
        """The whole matrix in memory again."""
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        copy_hessian(out, self)
        return out

    def close(self) -> None:
        self._file.close()

    def __del__(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass


Hessian = Union[torch.Tensor, SpilledHessian]  # noqa: UP007 (a runtime alias)


def column_block(H: Hessian, j: int, k: int) -> torch.Tensor:
    """``H[:, j:k]`` of an in-memory or spilled Hessian."""
    return H.columns(j, k) if isinstance(H, SpilledHessian) else H[:, j:k]


def copy_hessian(out: torch.Tensor, H: Hessian) -> None:
    """``out.copy_(H)`` a block of columns at a time (no second n x n matrix when ``H`` is spilled)."""
    if not isinstance(H, SpilledHessian):
        out.copy_(H)
        return
    for j in range(0, H.shape[0], _BLOCK):
        out[:, j : j + _BLOCK].copy_(H.columns(j, j + _BLOCK))


def maybe_spill(H: torch.Tensor | None, min_bytes: int | None = None) -> Hessian | None:
    """``H`` itself, or a :class:`SpilledHessian` of it when it is a CPU matrix of at least ``min_bytes``
    (default :data:`SPILL_MIN_BYTES`). The caller must drop its own reference for the memory to be freed."""
    limit = SPILL_MIN_BYTES if min_bytes is None else min_bytes
    if H is None or H.device.type != "cpu" or H.numel() * H.element_size() < limit:
        return H
    try:
        return SpilledHessian(H)
    except OSError as e:  # a full or read-only temporary folder costs memory, not the run
        warnings.warn(
            f"could not park a {tuple(H.shape)} Hessian in {tempfile.gettempdir()} ({e}); keeping it in memory "
            "(set TMPDIR to a folder with room to lower the peak)",
            stacklevel=user_stacklevel(),
        )
        return H
