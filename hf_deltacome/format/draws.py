"""The seeded uniform draws behind a DARE part's mask: never stored, drawn again from the layout's seed when read.

Two kinds, named by a ``sparse`` layout entry's ``"draws"``:

* ``"generator"`` (formats 1-4: the key absent): torch's CPU generator (a Mersenne Twister) seeded with the seed,
  one float32 in [0, 1) per entry in row-major order. Only a CPU replays it, in order, so a GPU kernel has to be
  handed the mask (a bitmap: one bit a weight beside a file of ~2.5 bits a kept weight).
* ``"hash"`` (format 5): a counter-based hash of ``(seed, row, column)``, :data:`HASH_BITS` bits an entry. The same
  integers on any device, in any order, and inside a Triton kernel (`kernels/triton_sparse.py` replays it tile by
  tile: the GPU keeps nothing but each row's first value index). Entry ``(i, j)`` draws
  ``mix32(row_key(i) ^ col_key(j)) >> (32 - HASH_BITS)`` with ``row_key(i) = mix32(seed ^ mix32(2 i + 1))`` and
  ``col_key(j) = mix32(2 j + 2)``; :func:`mix32` is a 32-bit xorshift-multiply finaliser (two odd multipliers
  under 2^31, so its products fit int64 in torch, which has no wrapping uint32 multiply on every device).
"""

from __future__ import annotations

import math

import torch

DRAWS = ("generator", "hash")
HASH_BITS = 24  # bits of a hashed draw: its uniform value d / 2^24 is exact in float32
MIX_A, MIX_B = 0x21F0AAAD, 0x735A2D97  # the finaliser's multipliers (kernels/triton_sparse.py repeats them)
_M32 = 0xFFFFFFFF
_CHUNK = 1 << 22  # entries hashed at once: bounds the int64 temporaries (~100 MB) on a 7B-class matrix


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser on int64 tensors holding values in [0, 2^32): the same bits as uint32 arithmetic."""
    x = x ^ (x >> 16)
    x = (x * MIX_A) & _M32
    x = x ^ (x >> 15)
    x = (x * MIX_B) & _M32
    return x ^ (x >> 15)


def row_keys(rows: int, seed: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """The hash keys of rows ``start .. start + rows`` (int64) for ``seed`` (its low 32 bits)."""
    i = torch.arange(start, start + rows, dtype=torch.int64, device=device)
    return mix32((int(seed) & _M32) ^ mix32(2 * i + 1))


def col_keys(cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The hash keys of columns ``0 .. cols`` (int64), the same for every seed."""
    return mix32(2 * torch.arange(cols, dtype=torch.int64, device=device) + 2)


def _hashed_rows(m: int, n: int, seed: int, device: torch.device | str, fn) -> list[torch.Tensor]:
    """``fn`` of the integer draws of each chunk of whole rows, in order."""
    cols = col_keys(n, device)
    step = max(1, _CHUNK // max(n, 1))
    out = []
    for r0 in range(0, m, step):
        rk = row_keys(min(step, m - r0), seed, device, r0)
        out.append(fn(mix32(rk.view(-1, 1) ^ cols.view(1, -1)) >> (32 - HASH_BITS)))
    return out


def hash_uniform(m: int, n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The hashed draws of an ``m x n`` mask as float32 uniforms in [0, 1) (exact: ``d / 2^HASH_BITS``)."""
    scale = 1.0 / (1 << HASH_BITS)
    parts = _hashed_rows(m, n, seed, device, lambda d: d.to(torch.float32) * scale)
    return torch.cat(parts) if parts else torch.zeros(0, n, device=device)


def hash_cut(keep: float) -> int:
    """The integer draws a uniform mask at ``keep`` keeps: those under ``ceil(keep · 2^HASH_BITS)`` (the same
    entries as ``d / 2^HASH_BITS < keep``, decided in integers, as the kernel decides them)."""
    return min(1 << HASH_BITS, math.ceil(float(keep) * (1 << HASH_BITS)))


def hash_mask(m: int, n: int, keep: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The uniform hashed mask of an ``m x n`` DARE part at ``keep`` (bool, on ``device``)."""
    cut = hash_cut(keep)
    parts = _hashed_rows(m, n, seed, device, lambda d: d < cut)
    return torch.cat(parts) if parts else torch.zeros(0, n, dtype=torch.bool, device=device)


def generator_uniform(m: int, n: int, seed: int) -> torch.Tensor:
    """The CPU generator's draws of an ``m x n`` mask (formats 1-4; float32, CPU)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.rand(m, n, generator=g)
