"""A Hessian spilled to disk gives back exactly its entries, and compressing against it gives the same bytes."""

from __future__ import annotations

import math

import pytest
import torch

import hf_deltacome.quant.spill as spill
from hf_deltacome.compression.svd import compress_linear
from hf_deltacome.errors import DeltaCoMeError
from hf_deltacome.quant.cholesky import inverse_cholesky
from hf_deltacome.quant.gptq import GPTQ

pytestmark = pytest.mark.usefixtures("one_thread")


def hessian(n: int, seed: int = 0) -> torch.Tensor:
    """A Hessian accumulated as in a real pass (not exactly symmetric bit for bit: blocks of x xᵀ)."""
    g = GPTQ(n)
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen) / math.sqrt(n)
    for _ in range(3):
        g.add_batch(torch.randn(200, n, generator=gen) @ mix)
    return g.H


def test_blocks_and_load_are_exact(monkeypatch):
    monkeypatch.setattr(spill, "_BLOCK", 48)  # several blocks, the last one partial
    H = hessian(130)
    s = spill.SpilledHessian(H)
    assert s.shape == (130, 130) and s.nbytes == H.numel() * 4
    assert torch.equal(s.columns(0, 48), H[:, :48])
    assert torch.equal(s.columns(96, 200), H[:, 96:])  # past the end: up to the last column
    assert torch.equal(s.load(), H)
    s.close()


def test_inverse_factor_is_the_same_from_disk():
    H = hessian(96)
    U, d = inverse_cholesky(H, 0.01, "down_proj")
    S, ds = inverse_cholesky(spill.SpilledHessian(H), 0.01, "down_proj")
    assert d == ds and torch.equal(torch.triu(U), torch.triu(S))


@pytest.mark.parametrize("act_order", [False, True])
def test_compressed_bands_are_the_same_bytes(act_order):
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(64, 96, generator=gen) @ torch.diag(torch.logspace(0, -2, 96)) / 10
    H = hessian(96, seed=2)
    bands = [(8, 2), (3, 6), (2, 16)]
    ref = compress_linear(delta, H, bands, 32, act_order=act_order, name="mlp.down_proj")
    got = compress_linear(delta, spill.SpilledHessian(H), bands, 32, act_order=act_order, name="mlp.down_proj")
    assert len(ref) == len(got) == 3
    for (rv, ru, rs), (gv, gu, gs) in zip(ref, got, strict=True):
        for a, b in ((rv, gv), (ru, gu)):
            for field in ("qweight", "scales", "zeros", "qweight_hi"):
                x, y = getattr(a, field), getattr(b, field)
                assert (x is None and y is None) or torch.equal(x, y), field
        assert torch.equal(rs, gs)


def test_only_large_cpu_hessians_are_spilled():
    H = hessian(32)
    assert spill.maybe_spill(H) is H  # far below SPILL_MIN_BYTES
    assert spill.maybe_spill(None) is None
    spilled = spill.maybe_spill(H, min_bytes=1)
    assert isinstance(spilled, spill.SpilledHessian) and torch.equal(spilled.load(), H)


def test_a_spilled_hessian_takes_no_more_inputs():
    g = GPTQ.from_hessian(spill.SpilledHessian(hessian(16)), name="layers.0.mlp.down_proj")
    with pytest.raises(DeltaCoMeError, match="down_proj.*spilled"):
        g.add_batch(torch.randn(4, 16))


def test_a_temporary_folder_without_room_keeps_the_hessian_in_memory(monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spill.tempfile, "TemporaryFile", full)
    H = hessian(16)
    with pytest.warns(UserWarning, match=r"\(16, 16\) Hessian.*No space left.*TMPDIR"):
        assert spill.maybe_spill(H, min_bytes=1) is H
