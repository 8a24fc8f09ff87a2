"""``deltacome-dare``: Delta-CoMe bands for the top singular directions, DARE for the residual they leave."""

import json

import pytest
import torch
from tiny_models import long_tail_delta

from hf_deltacome import ConfigError, DeltaCoMeConfig
from hf_deltacome.compression.baselines import dare_factors, hybrid_error
from hf_deltacome.compression.modules import compress_module, entry_nbytes, output_error, plan_entry
from hf_deltacome.format.budget import band_nbytes, budget_bytes, layout_nbytes
from hf_deltacome.format.storage import PackedDelta, sparse_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def hybrid(ratio: float, share: float, bits: int = 4, **kw) -> DeltaCoMeConfig:
    return DeltaCoMeConfig(method="deltacome-dare", ratio=ratio, bands=[[bits, None]], band_share=share,
                           group_size=32, quantizer="rtn", **kw)  # fmt: skip


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("ratio", [1 / 8, 1 / 32, 1 / 64])
def test_bands_take_their_share_and_dare_the_rest_of_the_budget(share, ratio):
    m, n = 192, 320
    entry = plan_entry("layers.1.mlp.up_proj", m, n, ratio, hybrid(ratio, share))
    budget = budget_bytes(m, n, ratio)
    bands = layout_nbytes(m, n, [tuple(b) for b in entry["bands"]], 32)
    assert bands <= share * budget
    assert (entry["bands"][0][1] > 0) == (band_nbytes(m, n, 4, 1, 32) <= share * budget)  # 1/64 at 10%: none
    # the DARE values spend what the bands leave, every byte counted, and the loader allocates exactly that
    assert entry_nbytes(entry) <= budget and entry_nbytes(entry) - bands > 0.9 * (budget - bands)
    assert PackedDelta.from_layout(entry).nbytes() == entry_nbytes(entry)
    # a larger band share leaves DARE a lower keep-rate (once it buys a band at all)
    other = plan_entry("layers.1.mlp.up_proj", m, n, ratio, hybrid(ratio, share / 2))
    assert other["sparse"]["keep"] >= entry["sparse"]["keep"]
    assert (other["sparse"]["keep"] > entry["sparse"]["keep"]) == (other["bands"] != entry["bands"])


@pytest.mark.parametrize("ratio", [1 / 16, 1 / 64, 1 / 128])
@pytest.mark.parametrize("shape", [(192, 320), (576, 576)])
def test_uniform_dare_fills_the_budget_not_a_bernoulli_counts_scatter(shape, ratio):
    """Uniform DARE's threshold is the draw just past the count the budget holds: the seeded mask keeps exactly that
    many values (a Bernoulli count sized to fit would leave about two standard deviations of them unspent)."""
    from hf_deltacome.compression.baselines import dare_plan, dare_values
    from hf_deltacome.format.packing import stored_nbytes

    m, n = shape
    for name in ("layers.0.q", "layers.7.mlp.down_proj"):
        sparse = dare_plan(name, m, n, ratio, 2, 32)
        budget = budget_bytes(m, n, ratio)
        cap = dare_values(budget, 2, 32, m * n)
        assert sparse["nnz"] == cap == int(sparse_mask(m, n, sparse["keep"], sparse["seed"], draws="hash").sum())
        assert stored_nbytes(1, cap, 2, 32) <= budget < stored_nbytes(1, cap + 1, 2, 32)
        assert abs(sparse["keep"] - cap / (m * n)) < 4 / (m * n) ** 0.5  # the draw's quantile: keep ~ nnz / (m n)


@pytest.mark.parametrize("rates", ["uniform", "importance"])
def test_band_share_zero_is_plain_dare(rates):
    d = long_tail_delta(96, 160, seed=3)
    cfg = hybrid(1 / 16, 0.0, dare_rates=rates)
    entry = plan_entry("layers.0.q", 96, 160, 1 / 16, cfg)
    dare_cfg = DeltaCoMeConfig(method="dare", ratio=1 / 16, group_size=32, dare_rates=rates)
    dare = plan_entry("layers.0.q", 96, 160, 1 / 16, dare_cfg)
    assert entry["sparse"] == dare["sparse"] and all(r == 0 for _, r in entry["bands"])
    assert ("rates" in entry["sparse"]) == (rates == "importance") and entry["format"] == 5  # hashed draws
    a = compress_module(d, None, entry, cfg).dense(96, 160, entry["sparse"])
    b = compress_module(d, None, dare, dare_cfg).dense(96, 160, dare["sparse"])
    assert torch.equal(a, b)


def test_dare_part_stores_the_residual_of_the_stored_bands():
    m, n, ratio = 96, 160, 1 / 8
    d = long_tail_delta(m, n, seed=1)
    cfg = hybrid(ratio, 0.5, dare_rates="uniform")  # importance rates: tests/test_dare_rates.py
    entry = plan_entry("layers.2.o", m, n, ratio, cfg)
    factors = compress_module(d, None, entry, cfg)
    assert factors.bands and factors.sparse is not None
    sparse = entry["sparse"]
    mask = sparse_mask(m, n, sparse["keep"], sparse["seed"], draws="hash")
    bands = bands_dense(factors, m, n)
    values = factors.sparse.values.dequantize().reshape(-1)
    # each kept value is the entry of Δ − U_q S V_qᵀ rescaled by 1/keep (up to its 4-bit rounding): not the delta's
    # entry, nor that of the exact truncation's residual (the bands' rounding is DARE'd too: no bias is left)
    want = (d - bands)[mask] / sparse["keep"]
    step = (want.abs().max() / 7).item()
    assert (values - want).abs().max() <= step
    assert (values - d[mask] / sparse["keep"]).abs().max() > 4 * step
    exact = (d - truncation(d, entry["bands"][0][1]))[mask] / sparse["keep"]
    assert (values - exact).abs().max() > step
    # the stored parts, as the loader builds them, sum to the same dense approximation, the bands where nothing is kept
    packed = PackedDelta.from_layout(entry)
    factors.fill(packed)
    dense = factors.dense(m, n, sparse)
    torch.testing.assert_close(packed.delta_weight(), dense, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dense[~mask], bands[~mask])


def test_hybrid_is_unbiased_over_masks():
    """Over DARE's seeds, bands + DARE of their residual average to the delta: the bands' 3-bit rounding is noise
    that averages out, not a bias that stays (as it would if DARE took the exact truncation's residual)."""
    m, n, ratio = 48, 96, 1 / 4
    d = long_tail_delta(m, n, seed=2)
    cfg = hybrid(ratio, 0.5, bits=3, dare_rates="uniform")
    entry = plan_entry("a", m, n, ratio, cfg)
    bands = bands_dense(compress_module(d, None, entry, cfg), m, n)
    seeds = 400
    total = torch.zeros(m, n)
    for seed in range(seeds):
        sparse = {**entry["sparse"], "seed": seed}
        mask = sparse_mask(m, n, sparse["keep"], seed, draws="hash")
        sparse["nnz"] = int(mask.sum())
        total[mask] += dare_factors(d - bands, sparse).values.dequantize().reshape(-1)
    mean = bands + total / seeds
    rounding = float((bands - truncation(d, entry["bands"][0][1])).square().sum())
    assert rounding > 0.01 * float(d.square().sum())  # 3-bit bands do leave rounding error
    assert float((mean - d).square().sum()) < 0.2 * rounding


def bands_dense(factors, m: int, n: int) -> torch.Tensor:
    return sum(((uq.dequantize().t() * s) @ vq.dequantize() for vq, uq, s in factors.bands), torch.zeros(m, n))


def truncation(d: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def test_hybrid_beats_dare_where_the_energy_sits_in_a_few_directions():
    """DARE's noise is ``(1/keep - 1)`` times the energy it sparsifies: taking the top directions out first pays
    when they hold most of it (the long-tail delta's first 3 singular values are tripled)."""
    m, n = 192, 320
    d = long_tail_delta(m, n, seed=0, decay=1.0)
    for ratio in (1 / 16, 1 / 64):
        dare_cfg = DeltaCoMeConfig(method="dare", ratio=ratio, group_size=32)
        dare = plan_entry("a", m, n, ratio, dare_cfg)
        err_dare = output_error(d - compress_module(d, None, dare, dare_cfg).dense(m, n, dare["sparse"]), None)
        cfg = hybrid(ratio, 0.5)
        entry = plan_entry("a", m, n, ratio, cfg)
        err = output_error(d - compress_module(d, None, entry, cfg).dense(m, n, entry["sparse"]), None)
        assert err < 0.5 * err_dare, (ratio, err, err_dare)


def test_band_share_is_checked():
    with pytest.raises(ConfigError, match="band_share must be null, 'auto' or a number in \\[0, 1\\], got 1.5"):
        DeltaCoMeConfig(method="deltacome-dare", band_share=1.5)
    with pytest.raises(ConfigError, match="band_share applies to method 'deltacome-dare', not 'dare'"):
        DeltaCoMeConfig(method="dare", band_share=0.25)
    with pytest.raises(ConfigError, match="allocation='adaptive'"):
        DeltaCoMeConfig(method="deltacome-dare", allocation="adaptive")


def test_auto_share_follows_the_spectrum_and_its_error_model_holds():
    m, n, ratio = 192, 320, 1 / 16
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(m, n, generator=g) * 0.01  # no direction stands out: bands only cost DARE keep-rate
    peaked = long_tail_delta(m, n, seed=0, decay=1.0)
    cfg = hybrid(ratio, "auto")
    chosen = {}
    for label, d in (("flat", flat), ("peaked", peaked)):
        spectrum = torch.linalg.svdvals(d)
        entry = plan_entry("layers.0.mlp.up_proj", m, n, ratio, cfg, spectrum=spectrum)
        chosen[label] = entry["bands"][0][1]
        err = output_error(d - compress_module(d, None, entry, cfg).dense(m, n, entry["sparse"]), None)
        want = hybrid_error(m, n, entry["bands"], budget_bytes(m, n, ratio), 4, 32, spectrum)
        assert 0.7 * want < err < 1.3 * want, (label, err, want)  # the expected error it chose by
    assert chosen["flat"] == 0 and chosen["peaked"] > 0, chosen
    # without a spectrum (a streamed run) the default share
    entry = plan_entry("layers.0.mlp.up_proj", m, n, ratio, cfg)
    assert entry["bands"] == plan_entry("layers.0.mlp.up_proj", m, n, ratio, hybrid(ratio, 0.25))["bands"]


def test_cli_compresses_bands_and_dare_and_refuses_a_bad_share(tmp_path, capsys):
    from tiny_models import make_finetune, make_model, save_with_tokenizer

    from hf_deltacome.cli import main

    base = make_model("llama")
    ft = make_finetune(base, seed=2)
    save_with_tokenizer(tmp_path, base=base, ft=ft)
    out = tmp_path / "adapter"
    args = ["compress", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--output", str(out),
            "--quantizer", "rtn", "--ratio", "1/8", "--bands", "8:rest", "--method", "deltacome-dare"]  # fmt: skip
    assert main([*args, "--band-share", "auto", "--stream"]) == 0  # streamed: no spectrum at plan time, the default share
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["method"] == "deltacome-dare" and cfg["band_share"] == "auto"
    capsys.readouterr()
    assert main(["info", str(out), "--modules"]) == 0
    shown = capsys.readouterr().out
    assert "method deltacome-dare" in shown and "b (keep 0." in shown and "@8b" in shown
    assert main([*args, "--overwrite", "--band-share", "1.5"]) == 2
    assert "band_share must be null, 'auto' or a number in [0, 1], got 1.5" in capsys.readouterr().err
