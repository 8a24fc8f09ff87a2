"""The hashed draws of DARE masks (format 5, `format/draws.py`): the documented formula, device- and chunk-free, and
statistically a fair coin per entry."""

from __future__ import annotations

import pytest
import torch

from hf_deltacome import AdapterFileError
from hf_deltacome.format import draws
from hf_deltacome.format.baseline_parts import SparsePart, sparse_mask
from hf_deltacome.format.draws import HASH_BITS, hash_cut, hash_mask, hash_uniform


def _mix32(x: int) -> int:
    """docs/FORMAT.md's finaliser in plain Python integers."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def _draw(seed: int, i: int, j: int) -> int:
    return _mix32(_mix32(seed ^ _mix32(2 * i + 1)) ^ _mix32(2 * j + 2)) >> (32 - HASH_BITS)


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 2**32 - 1])
def test_the_draws_are_the_documented_formula(seed):
    m, n = 5, 9
    want = torch.tensor([[_draw(seed, i, j) for j in range(n)] for i in range(m)], dtype=torch.float64)
    assert torch.equal(hash_uniform(m, n, seed).to(torch.float64) * 2**HASH_BITS, want)
    keep = 0.3
    assert torch.equal(hash_mask(m, n, keep, seed), want < keep * 2**HASH_BITS)


def test_chunks_and_threshold_edges_do_not_change_the_mask(monkeypatch):
    """Rows hashed a few at a time give the same draws; the integer cut keeps exactly the draws under ``keep``, and
    ``keep = 1`` keeps everything."""
    whole_u, whole_m = hash_uniform(37, 50, 11), hash_mask(37, 50, 0.2, 11)
    monkeypatch.setattr(draws, "_CHUNK", 120)  # two rows and a bit: chunks of two rows
    assert torch.equal(hash_uniform(37, 50, 11), whole_u) and torch.equal(hash_mask(37, 50, 0.2, 11), whole_m)
    assert torch.equal(whole_m, whole_u < 0.2)
    kth = float(whole_u.flatten().kthvalue(300).values)  # a keep that is itself a draw: that draw is not kept
    assert int(hash_mask(37, 50, kth, 11).sum()) == 299 and hash_cut(kth) == round(kth * 2**HASH_BITS)
    assert bool(hash_mask(37, 50, 1.0, 11).all()) and hash_cut(1.0) == 2**HASH_BITS


def test_the_draws_look_like_independent_fair_coins():
    """Keep-rate, no correlation along rows, columns or between seeds, and no parity structure between a 2x2 block's
    entries (``r_i ^ c_j`` is linear: the finaliser must break it)."""
    m, n, p = 512, 768, 0.2
    mask = hash_mask(m, n, p, 1234).to(torch.float64)
    sd = (p * (1 - p) / (m * n)) ** 0.5
    assert abs(mask.mean() - p) < 5 * sd
    u = hash_uniform(m, n, 1234).to(torch.float64) - 0.5
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1]), (u, hash_uniform(m, n, 1235).to(torch.float64) - 0.5)):
        assert abs(float((a * b).mean() / u.var())) < 5 / (m * n) ** 0.5
    odd = (mask[:-1, :-1] + mask[1:, :-1] + mask[:-1, 1:] + mask[1:, 1:]) % 2  # four fair coins: odd w.p. below
    want = (1 - (1 - 2 * p) ** 4) / 2
    assert abs(float(odd.mean()) - want) < 5 * (want * (1 - want) / odd.numel()) ** 0.5
    rows, cols = mask.mean(1), mask.mean(0)  # no row or column far from the rate
    assert float(rows.std()) < 1.3 * (p * (1 - p) / n) ** 0.5 and float(cols.std()) < 1.3 * (p * (1 - p) / m) ** 0.5


def test_a_hashed_part_checks_its_count_and_names_the_seed():
    m, n, keep, seed = 24, 40, 0.25, 99
    nnz = int(sparse_mask(m, n, keep, seed, draws="hash").sum())
    assert nnz != int(sparse_mask(m, n, keep, seed).sum())  # another mask than the CPU generator's
    part = SparsePart(m, n, nnz, keep, seed, 2, 16, draws="hash")
    assert torch.equal(part.mask(), hash_mask(m, n, keep, seed))
    with pytest.raises(AdapterFileError, match=rf"regenerated from seed {seed} keeps {nnz} entries but {nnz + 1}"):
        SparsePart(m, n, nnz + 1, keep, seed, 2, 16, draws="hash").mask()
