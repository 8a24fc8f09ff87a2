"""DARE with importance rates (``dare_rates="importance"``, format 3): a keep-rate per row and column from the
output energy, 4-bit codes stored beside the values, the mask still regenerated from its seed."""

import pytest
import torch
from tiny_models import long_tail_delta

from hf_deltacome import AdapterFileError, ConfigError, DeltaCoMeConfig
from hf_deltacome.compression.baselines import dare_factors
from hf_deltacome.compression.modules import compress_module, entry_nbytes, plan_entry
from hf_deltacome.format.baseline_parts import pack_rates, rate_factors
from hf_deltacome.format.budget import budget_bytes
from hf_deltacome.format.layout_entry import check_layout_entry
from hf_deltacome.format.storage import PackedDelta

pytestmark = pytest.mark.usefixtures("one_thread")


def dare(rates: str, ratio: float = 1 / 8) -> DeltaCoMeConfig:
    return DeltaCoMeConfig(method="dare", ratio=ratio, group_size=32, uniform_bits=2, quantizer="rtn",
                           dare_rates=rates)  # fmt: skip


def outlier_inputs(n: int, tokens: int = 2048, seed: int = 1) -> torch.Tensor:
    """Second moment of inputs whose channel scales spread widely (a few outlier features, as in real models)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) * torch.exp(torch.randn(n, generator=g) * 1.2)
    return x.t() @ x / tokens


def output_error(err: torch.Tensor, h: torch.Tensor) -> float:
    return float(((err @ h) * err).sum())


def scale_of(stored: torch.Tensor, d: torch.Tensor) -> float:
    """The scale of ``d`` that ``stored`` projects to, ``<stored, d> / ||d||²`` (below 1: a shrunk delta)."""
    return float((stored * d).sum() / d.square().sum())


def test_codes_pack_two_to_a_byte_and_map_to_factors():
    codes = torch.tensor([0, 15, 8, 3, 9, 1, 7], dtype=torch.uint8)  # 3 rows, 4 columns (odd: padded)
    packed = pack_rates(codes[:3], codes[3:])
    assert packed.numel() == 4
    a, b = rate_factors(packed, 3, 4)
    assert torch.equal(a, torch.tensor([2.0**-2, 2.0**1.75, 1.0]))
    assert torch.equal(b, torch.tensor([2.0**-1.25, 2.0**0.25, 2.0**-1.75, 2.0**-0.25]))
    with pytest.raises(AdapterFileError, match="do not fit a 5x4 delta"):
        rate_factors(packed, 5, 4)


def test_the_plan_pays_for_the_codes_and_the_loader_allocates_exactly_that():
    m, n, ratio = 96, 160, 1 / 16
    uniform, rated = plan_entry("l.q", m, n, ratio, dare("uniform")), plan_entry("l.q", m, n, ratio, dare("importance"))
    assert rated["format"] == uniform["format"] == 5 and rated["sparse"]["rates"] == "importance"  # hashed draws
    assert entry_nbytes(rated) <= budget_bytes(m, n, ratio) and PackedDelta.from_layout(rated).nbytes() == entry_nbytes(rated)
    # the codes (one nibble per row and column) and the threshold cost values
    assert rated["sparse"]["nnz"] < uniform["sparse"]["nnz"] + 4 * ((m + n) // 2 + 4)


def test_importance_rates_cut_the_output_error_at_the_same_bytes():
    """Rows and columns that carry more of the output (large delta entries, outlier input channels) are kept more
    often: at equal bytes the expected output error ``||(Δ − Δ̂) X||²`` falls well below uniform DARE's."""
    m, n, ratio = 128, 192, 1 / 16
    g = torch.Generator().manual_seed(0)
    d = long_tail_delta(m, n, seed=5) * torch.exp(torch.randn(m, 1, generator=g) * 0.8)
    h = outlier_inputs(n)
    errs = {}
    for rates in ("uniform", "importance"):
        cfg = dare(rates, ratio)
        entry = plan_entry("layers.0.mlp.down_proj", m, n, ratio, cfg)
        errs[rates] = 0.0
        for seed in range(4):
            e = {**entry, "sparse": {**entry["sparse"], "seed": seed}}
            if rates == "uniform":  # a fresh seed draws another count: re-plan it as the planner would
                e = plan_entry(f"layers.{seed}.mlp.down_proj", m, n, ratio, cfg)
            approx = compress_module(d, h, e, cfg).dense(m, n, e["sparse"])
            errs[rates] += output_error(d - approx, h)
    assert errs["importance"] < 0.6 * errs["uniform"], errs


def test_importance_rated_dare_stays_unbiased():
    """Each kept entry is divided by its own rate ``min(1, threshold · a_i b_j)``: over seeds the mean is the delta."""
    m, n = 32, 48
    d = long_tail_delta(m, n, seed=2)
    h = outlier_inputs(n, seed=3)
    entry = plan_entry("a", m, n, 1 / 4, dare("importance", 1 / 4))
    total, seeds = torch.zeros(m, n), 300
    for seed in range(seeds):
        sparse = {**entry["sparse"], "seed": seed, "bits": 8}
        total += dare_factors(d, sparse, h.diagonal()).dense(m, n, sparse)
    mean = total / seeds
    assert float((mean - d).square().sum()) < 0.05 * float(d.square().sum())


def test_the_stored_rates_and_threshold_rebuild_the_mask_and_a_tampered_threshold_is_refused():
    m, n, ratio = 64, 96, 1 / 8
    d = long_tail_delta(m, n, seed=4)
    cfg = dare("importance", ratio)
    entry = plan_entry("layers.1.self_attn.o_proj", m, n, ratio, cfg)
    factors = compress_module(d, outlier_inputs(n), entry, cfg)
    packed = PackedDelta.from_layout(entry)
    factors.fill(packed)
    part = packed.sparse
    assert part.rated and torch.equal(part.mask(), factors.sparse.part(m, n, entry["sparse"]).mask())
    assert 0.95 * entry["sparse"]["nnz"] <= int(part.mask().sum()) <= entry["sparse"]["nnz"]
    torch.testing.assert_close(packed.delta_weight(), factors.dense(m, n, entry["sparse"]))
    part.threshold.mul_(4.0)  # keeps more entries than values are stored
    with pytest.raises(AdapterFileError, match=r"64x96 delta: its rates and threshold keep \d+ entries but only"):
        part.mask()


def test_rated_and_hashed_parts_need_their_formats_and_known_values():
    entry = plan_entry("layers.0.q", 96, 160, 1 / 16, dare("importance", 1 / 16))
    check_layout_entry("layers.0.q", {**entry}, 32)
    with pytest.raises(ConfigError, match="module 'layers.0.q': an importance-rated 'sparse' part needs format 3, the entry says 2"):
        check_layout_entry("layers.0.q", {**entry, "format": 2}, 32)
    with pytest.raises(ConfigError, match="module 'layers.0.q': a 'sparse' part with hashed draws needs format 5, the entry says 4"):
        check_layout_entry("layers.0.q", {**entry, "format": 4}, 32)
    with pytest.raises(ConfigError, match=r"optional 'draws': one of \('generator', 'hash'\)"):
        check_layout_entry("layers.0.q", {**entry, "sparse": {**entry["sparse"], "draws": "philox"}}, 32)
    with pytest.raises(ConfigError, match=r"unknown format 7; this version reads formats \(1, 2, 3, 4, 5, 6\) \(a newer"):
        check_layout_entry("layers.0.q", {**entry, "format": 7}, 32)
    with pytest.raises(ConfigError, match="a hashed seed under 2\\^32"):
        check_layout_entry("layers.0.q", {**entry, "sparse": {**entry["sparse"], "seed": 2**32}}, 32)
    with pytest.raises(ConfigError, match="module 'layers.0.q': 'sparse' must be .*optional 'rates': 'importance'"):
        check_layout_entry("layers.0.q", {**entry, "sparse": {**entry["sparse"], "rates": "magnitude"}}, 32)
    with pytest.raises(ConfigError, match="dare_rates must be null or one of"):
        DeltaCoMeConfig(method="dare", dare_rates="random")


def test_a_budget_that_buys_every_entry_keeps_them_all_unscaled():
    m, n = 16, 24
    d = long_tail_delta(m, n, seed=6)
    cfg = dare("importance", 1 / 2)
    entry = plan_entry("l.v", m, n, 1 / 2, cfg)
    assert entry["sparse"]["nnz"] >= m * n
    factors = compress_module(d, None, entry, cfg)
    assert factors.sparse.threshold < float("inf") and bool(factors.sparse.part(m, n, entry["sparse"]).mask().all())
    err = float((factors.dense(m, n, entry["sparse"]) - d).norm() / d.norm())
    assert err < 0.5, err  # only the 2-bit rounding of the delta itself (each value at rate 1: no rescaling noise)


def test_cli_dare_rates_reaches_the_file_and_info_and_a_bad_value_is_refused(tmp_path, capsys):
    import json

    from tiny_models import make_finetune, make_model, save_with_tokenizer

    from hf_deltacome.cli import main

    base = make_model("llama")
    save_with_tokenizer(tmp_path, base=base, ft=make_finetune(base, seed=3))
    out = tmp_path / "adapter"
    args = ["compress", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--output", str(out),
            "--quantizer", "rtn", "--ratio", "1/8", "--method", "dare", "--uniform-bits", "2"]  # fmt: skip
    assert main([*args, "--dare-rates", "importance"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["dare_rates"] == "importance"
    assert all(e["sparse"]["rates"] == "importance" for e in cfg["layout"].values() if e.get("sparse"))
    capsys.readouterr()
    assert main(["info", str(out), "--modules"]) == 0
    assert "importance rates" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # argparse: the choices named
        main([*args, "--overwrite", "--dare-rates", "weighted"])
    assert exit_info.value.code == 2
    assert "--dare-rates: invalid choice: 'weighted'" in capsys.readouterr().err


@pytest.mark.parametrize("rates", ["uniform", "importance"])
def test_the_dense_delta_of_fresh_dare_factors_is_what_the_loader_reads(rates):
    """``DareFactors.dense`` reuses the mask it drew; the loader regenerates it from the stored seed, rates and
    threshold: both give the same dense delta, entry for entry."""
    m, n = 48, 80
    d = long_tail_delta(m, n, seed=6)
    for seed in range(3):
        entry = plan_entry(f"layers.{seed}.mlp.up_proj", m, n, 1 / 8, dare(rates, 1 / 8))
        sparse = entry["sparse"]
        fresh = dare_factors(d, sparse, outlier_inputs(n, seed=seed).diagonal())
        assert fresh.mask is not None
        loaded = fresh.part(m, n, sparse).delta_weight()
        assert torch.equal(fresh.dense(m, n, sparse), loaded) and int((loaded != 0).sum()) > 0


def fitted(rates: str, ratio: float = 1 / 8) -> DeltaCoMeConfig:
    return DeltaCoMeConfig(method="dare", ratio=ratio, group_size=32, uniform_bits=2, dare_rates=rates,
                           dare_fit="gptq")  # fmt: skip


@pytest.mark.parametrize("rates", ["uniform", "importance"])
def test_fitted_dare_values_keep_the_layout_and_cut_the_rounding_error(rates):
    """``dare_fit="gptq"``: the same mask, bytes and loader as rescaled DARE, but the rounding of the rescaled values
    is compensated column by column, so the output error against what DARE rescales (``||(T − Δ̂) X||²``) falls,
    and against the delta itself it is no worse."""
    m, n = 96, 160
    d = long_tail_delta(m, n, seed=7)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4096, 24, generator=g) @ torch.randn(24, n, generator=g) + 0.3 * torch.randn(4096, n, generator=g)
    h = x.t() @ x / x.shape[0]  # strongly correlated inputs, as a model's are: what the loop compensates through
    rescaled_cfg = DeltaCoMeConfig(method="dare", ratio=1 / 8, group_size=32, uniform_bits=2, dare_rates=rates)
    entry = plan_entry("layers.3.mlp.up_proj", m, n, 1 / 8, rescaled_cfg)
    sparse = entry["sparse"]
    rescaled = compress_module(d, h, entry, rescaled_cfg)
    fit = compress_module(d, h, entry, fitted(rates))
    assert fit.sparse.values.nbytes() == rescaled.sparse.values.nbytes()
    assert torch.equal(fit.sparse.mask, rescaled.sparse.mask)
    approx = fit.dense(m, n, sparse)
    assert torch.equal(approx, fit.sparse.part(m, n, sparse).delta_weight())  # what the loader reads
    assert not approx[~fit.sparse.mask].any()
    target = dare_factors(d, {**sparse, "bits": 8}, h.diagonal()).dense(m, n, sparse)  # DARE's rescaled values
    ours, theirs = output_error(target - approx, h), output_error(target - rescaled.dense(m, n, sparse), h)
    assert ours < 0.8 * theirs, (ours, theirs)
    assert output_error(d - approx, h) <= output_error(d - rescaled.dense(m, n, sparse), h)


def test_unbiased_rounding_stretches_only_the_scales_so_each_group_projects_at_one():
    """``quant.rtn.unbiased``: the least-squares grid of heavy-tailed values shrinks them (each group's values
    project onto the originals at well under 1); stretching each group's scale keeps the codes, zeros and bytes and
    brings every group's projection to 1 (up to the float16 scale), at a larger squared error: it trades bias for
    no more than the rounding's noise."""
    from hf_deltacome.quant.rtn import quantize_rtn, unbiased

    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 200, generator=g) ** 3  # heavy tails, a partial last group
    shrunk = quantize_rtn(w, 2, 32, clip=True)
    fixed = unbiased(shrunk, w)
    assert torch.equal(fixed.int_codes(), shrunk.int_codes()) and torch.equal(fixed.zeros, shrunk.zeros)
    assert fixed.nbytes() == shrunk.nbytes()

    def projections(q):
        pad = 7 * 32 - 200
        x = torch.nn.functional.pad(w, (0, pad)).view(3, 7, 32)
        dq = torch.nn.functional.pad(q.dequantize(), (0, pad)).view(3, 7, 32)
        return (x * dq).sum(-1) / x.square().sum(-1)

    assert projections(shrunk).mean() < 0.9
    assert torch.allclose(projections(fixed), torch.ones(3, 7), atol=2e-3)
    assert (fixed.dequantize() - w).square().sum() > (shrunk.dequantize() - w).square().sum()
    assert unbiased(quantize_rtn(w, 16, 32), w).nbytes() == quantize_rtn(w, 16, 32).nbytes()  # float16: as is


@pytest.mark.parametrize("rates", ["uniform", "importance"])
def test_unbiased_dare_keeps_the_layout_and_stores_the_whole_delta_not_a_shrunk_one(rates):
    """``dare_fit="unbiased"``: the same mask, bytes and loader as rescaled DARE (data-free, RTN), and the stored
    delta projects onto the fine-tune's at ~1 where the rescaled one's least-squares grid stores ~0.85 of it."""
    m, n = 96, 160
    d = long_tail_delta(m, n, seed=7)
    cfg = dare(rates)
    entry = plan_entry("layers.3.mlp.up_proj", m, n, 1 / 8, cfg)
    sparse = entry["sparse"]
    rescaled = compress_module(d, None, entry, cfg)
    fixed = compress_module(d, None, entry, DeltaCoMeConfig(**{**cfg.to_dict(), "dare_fit": "unbiased"}))
    assert fixed.sparse.values.nbytes() == rescaled.sparse.values.nbytes()
    assert torch.equal(fixed.sparse.mask, rescaled.sparse.mask)
    approx = fixed.dense(m, n, sparse)
    assert torch.equal(approx, fixed.sparse.part(m, n, sparse).delta_weight())  # what the loader reads

    shrunk = scale_of(rescaled.dense(m, n, sparse), d)
    assert shrunk < 0.92 and 0.95 < scale_of(approx, d) < 1.05, (shrunk, scale_of(approx, d))


def test_the_plans_estimate_of_a_residual_stores_it_as_the_file_will(monkeypatch):
    """The whole-model check weighs DARE residuals by ``rtn_bands_dense``: with ``dare_fit="unbiased"`` the plan
    asks for the unbiased values the file will hold (α ≈ 1), not the least-squares grid's shrunk ones."""
    import copy

    from tiny_models import make_finetune, make_model

    from hf_deltacome.compression import plan
    from hf_deltacome.compression.modules import rtn_bands_dense
    from hf_deltacome.compression.pipeline import compress

    m, n = 96, 160
    d = long_tail_delta(m, n, seed=7)
    entry = plan_entry("layers.3.mlp.up_proj", m, n, 1 / 8, dare("uniform"))

    assert scale_of(rtn_bands_dense(d, entry), d) < 0.92
    assert 0.95 < scale_of(rtn_bands_dense(d, entry, unbias=True), d) < 1.05
    seen = []

    def spy(*args, unbias=False):
        seen.append(unbias)
        return rtn_bands_dense(*args, unbias=unbias)

    monkeypatch.setattr(plan, "rtn_bands_dense", spy)
    base = make_model("llama")
    ft = make_finetune(base, seed=3)
    calib = torch.randint(0, base.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    for fit in ("rescale", "unbiased"):
        seen.clear()
        cfg = DeltaCoMeConfig(ratio=1 / 8, dare_modules=None, dare_fit=fit)  # residual="auto" weighs DARE residuals
        compress(copy.deepcopy(base), ft, cfg, calibration=calib, progress=False)
        assert seen and set(seen) == {fit == "unbiased"}, (fit, seen)


def test_an_unbiased_dare_adapter_loads_back_with_the_logits_it_was_saved_with(tmp_path):
    import copy

    from peft import PeftModel
    from tiny_models import make_finetune, make_model

    from hf_deltacome.compression.pipeline import compress

    base = make_model("llama")
    ft = make_finetune(base, seed=3)
    ids = torch.randint(0, base.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for fit in ("rescale", "unbiased"):
        cfg = DeltaCoMeConfig(method="dare", ratio=1 / 8, uniform_bits=2, quantizer="rtn", dare_fit=fit)
        model = compress(copy.deepcopy(base), ft, cfg, progress=False).eval()
        with torch.no_grad():
            before = model(ids).logits
        model.save_pretrained(tmp_path / fit)
        sizes[fit] = (tmp_path / fit / "adapter_model.safetensors").stat().st_size
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / fit).eval()
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, before, atol=1e-5)
    assert sizes["unbiased"] == sizes["rescale"]


def test_fitting_dare_values_needs_calibration_and_a_dare_part():
    with pytest.raises(ConfigError, match="needs quantizer='gptq'"):
        DeltaCoMeConfig(method="dare", dare_fit="gptq", quantizer="rtn")
    with pytest.raises(ConfigError, match="method 'svd-uniform' has none"):
        DeltaCoMeConfig(method="svd-uniform", dare_fit="gptq")
    with pytest.raises(ConfigError, match="dare_fit='unbiased' sets the values of a DARE part; method 'lowrank'"):
        DeltaCoMeConfig(method="lowrank", dare_fit="unbiased")
    DeltaCoMeConfig(method="dare", dare_fit="unbiased", quantizer="rtn")  # data-free: no calibration needed
    with pytest.raises(ConfigError, match="dare_fit must be null or one of"):
        DeltaCoMeConfig(method="dare", dare_fit="sparsegpt")


def test_cli_dare_fit_reaches_the_config_and_needs_gptq(tmp_path, capsys):
    import json

    from peft import PeftModel
    from tiny_models import make_finetune, make_model, save_with_tokenizer

    from hf_deltacome.cli import main

    base = make_model("llama")
    save_with_tokenizer(tmp_path, base=base, ft=make_finetune(base, seed=3))
    out = tmp_path / "adapter"
    args = ["compress", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--output", str(out),
            "--ratio", "1/8", "--method", "dare", "--uniform-bits", "2", "--num-samples", "4", "--seq-len", "32"]  # fmt: skip
    assert main([*args, "--dare-fit", "gptq"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["dare_fit"] == "gptq"
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), out).eval()
    ids = torch.randint(0, base.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()
    capsys.readouterr()
    assert main([*args, "--overwrite", "--dare-fit", "gptq", "--quantizer", "rtn"]) == 2
    err = capsys.readouterr().err
    assert "dare_fit='gptq'" in err and "needs quantizer='gptq'" in err
    assert main([*args, "--overwrite", "--dare-fit", "unbiased", "--quantizer", "rtn"]) == 0  # data-free
    assert json.loads((out / "adapter_config.json").read_text())["dare_fit"] == "unbiased"
