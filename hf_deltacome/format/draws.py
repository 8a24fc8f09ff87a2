"""The seeded uniform draws behind a DARE part's mask and a sparse band's: never stored, drawn again from the layout's
seed when read.

Two kinds, named by a ``sparse`` (or ``sparse_bands``) layout entry's ``"draws"`` (:func:`entry_draws`):

* ``"generator"`` (formats 1-4, sparse bands to format 5: the key absent): torch's CPU generator (a Mersenne
  Twister) seeded with the seed, one float32 in [0, 1) per entry in row-major order. Only a CPU replays it, in
  order, so a GPU kernel has to be handed the mask (a bitmap: one bit a weight, more than a 1/16 file's whole
  budget).
* ``"hash"`` (format 5; sparse bands' from format 6): a counter-based hash of ``(seed, row, column)``,
  :data:`HASH_BITS` bits an entry. The same integers on any device, in any order, and inside a Triton kernel
  (`kernels/triton_sparse.py` replays it tile by tile: the GPU keeps nothing but each row's first value index).
  Entry ``(i, j)`` draws ``mix32(row_key(i) ^ col_key(j)) >> (32 - HASH_BITS)`` with ``row_key(i) = mix32(seed ^
  mix32(2 i + 1))`` and ``col_key(j) = mix32(2 j + 2)``; :func:`mix32` is a 32-bit xorshift-multiply finaliser (two
  odd multipliers under 2^31, so its products fit int64 in torch, which has no wrapping uint32 multiply on every
  device).
"""

from __future__ import annotations

import math

import torch

DRAWS = ("generator", "hash")
HASH_BITS = 24  # bits of a hashed draw: its uniform value d / 2^24 is exact in float32
MIX_A, MIX_B = 0x21F0AAAD, 0x735A2D97  # the finaliser's multipliers (kernels/triton_sparse.py repeats them)
_M32 = 0xFFFFFFFF
_CHUNK = 1 << 22  # entries hashed at once: bounds the int64 temporaries (~100 MB) on a 7B-class matrix


def entry_draws(entry: dict) -> str:
    """How a ``sparse`` or ``sparse_bands`` layout entry's masks are drawn: its ``"draws"``, else ``"generator"``
    (files written before the hash)."""
    return str(entry.get("draws", "generator"))


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser on int64 tensors holding values in [0, 2^32): the same bits as uint32 arithmetic."""
    return _mix32_(x.clone())


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """`mix32` in place (a third fewer allocations: the hot loop of drawing a mask on the CPU)."""
    x ^= x >> 16
    x.mul_(MIX_A).bitwise_and_(_M32)
    x ^= x >> 15
    x.mul_(MIX_B).bitwise_and_(_M32)
    x ^= x >> 15
    return x


def row_keys(rows: int, seed: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """The hash keys of rows ``start .. start + rows`` (int64) for ``seed`` (its low 32 bits)."""
    i = torch.arange(start, start + rows, dtype=torch.int64, device=device)
    return mix32((int(seed) & _M32) ^ mix32(2 * i + 1))


def col_keys(cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The hash keys of columns ``0 .. cols`` (int64), the same for every seed."""
    return mix32(2 * torch.arange(cols, dtype=torch.int64, device=device) + 2)


def _hashed_rows(m: int, n: int, seed: int, device: torch.device | str, fn) -> list[torch.Tensor]:
    """``fn`` of the 32-bit hashes of each chunk of whole rows, in order (a draw is a hash's top HASH_BITS)."""
    cols = col_keys(n, device)
    step = max(1, _CHUNK // max(n, 1))
    out = []
    for r0 in range(0, m, step):
        rk = row_keys(min(step, m - r0), seed, device, r0)
        out.append(fn(_mix32_(rk.view(-1, 1) ^ cols.view(1, -1))))
    return out


def hash_uniform(m: int, n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The hashed draws of an ``m x n`` mask as float32 uniforms in [0, 1) (exact: ``d / 2^HASH_BITS``)."""
    shift, scale = 32 - HASH_BITS, 1.0 / (1 << HASH_BITS)
    parts = _hashed_rows(m, n, seed, device, lambda h: (h >> shift).to(torch.float32) * scale)
    return torch.cat(parts) if parts else torch.zeros(0, n, device=device)


def hash_cut(keep: float) -> int:
    """The integer draws a uniform mask at ``keep`` keeps: those under ``ceil(keep · 2^HASH_BITS)`` (the same
    entries as ``d / 2^HASH_BITS < keep``, decided in integers, as the kernel decides them)."""
    return min(1 << HASH_BITS, math.ceil(float(keep) * (1 << HASH_BITS)))


def hash_mask(m: int, n: int, keep: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The uniform hashed mask of an ``m x n`` DARE part at ``keep`` (bool, on ``device``). On one CPU core a
    576x1536 mask takes ~8 ms, ~3x the CPU generator's draws; it is drawn once per part and device."""
    below = hash_cut(keep) << (32 - HASH_BITS)  # d < cut exactly when the hash is under cut · 2^(32 - HASH_BITS)
    parts = _hashed_rows(m, n, seed, device, lambda h: h < below)
    return torch.cat(parts) if parts else torch.zeros(0, n, dtype=torch.bool, device=device)


def generator_uniform(m: int, n: int, seed: int) -> torch.Tensor:
    """The CPU generator's draws of an ``m x n`` mask (formats 1-4; float32, CPU)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.rand(m, n, generator=g)
