"""Baselines at equal budget, band-split search and adaptive allocation (hf_deltacome.methods)."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from tiny_models import (
    MARGIN,
    assert_beats_baselines,
    long_tail_delta,
    make_finetune,
    make_model,
    random_ids,
    relative_logits_error,
    target_linears,
)

from hf_deltacome import AdapterFileError, ConfigError, DeltaCoMeConfig, DeltaCoMeError
from hf_deltacome.compression.allocation import Candidates, allocate
from hf_deltacome.compression.baselines import bitdelta_factors
from hf_deltacome.compression.modules import (
    approximation_error,
    compress_module,
    entry_nbytes,
    output_error,
    plan_entry,
)
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.compression.search import search_split
from hf_deltacome.format.budget import budget_bytes, solve_ranks
from hf_deltacome.format.storage import PackedDelta, SignPart, SparsePart
from hf_deltacome.io.summary import summarize_adapter
from hf_deltacome.layer import DeltaCoMeLayer
from hf_deltacome.quant.hessian import model_hessians


def collect_hessians(model, names, ids, **kw):
    return {k: v for part in model_hessians(model, names, ids, **kw) for k, v in part.items()}


METHODS = ["deltacome", "bitdelta", "lowrank", "svd-uniform", "dare", "impart", "deltacome-dare", "vq"]
RATIOS = [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64]




def input_hessian(n: int, seed: int = 1, tokens: int = 2048) -> torch.Tensor:
    """Second moment of inputs with unequal channel scales (some outlier features), as in real activations."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(n, generator=g) * 0.7)
    x = torch.randn(tokens, n, generator=g) * scale
    return x.t() @ x / tokens


# ------------------------------------------------------------------------------------------------ budgets


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(64, 64), (32, 64), (160, 64), (64, 160), (50, 70)])
def test_every_method_fits_the_budget_with_exact_byte_count(method, shape):
    m, n = shape
    for ratio in RATIOS:
        cfg = DeltaCoMeConfig(method=method, ratio=ratio, group_size=32)
        entry = plan_entry(f"layers.0.{method}", m, n, ratio, cfg)
        planned = entry_nbytes(entry)
        assert planned <= budget_bytes(m, n, ratio), (method, shape, ratio)
        # the buffers the loader allocates are exactly what was budgeted
        assert PackedDelta.from_layout(entry).nbytes() == planned
        cfg.layout = {"layers.0.x": entry}
        cfg.validate_layout()


def test_bitdelta_uses_one_bit_per_weight_and_keeps_rows_below_one_sixteenth():
    cfg = DeltaCoMeConfig(method="bitdelta", ratio=1 / 8)
    e8 = plan_entry("a", 256, 256, 1 / 8, cfg)
    assert e8["sign"]["rows"] == 256  # everything fits: one bit per weight is half of this budget
    e16 = plan_entry("a", 256, 256, 1 / 16, cfg)
    assert e16["sign"]["rows"] == 254  # one bit per weight plus the scale and row mask: two rows too many
    e64 = plan_entry("a", 256, 256, 1 / 64, cfg)
    assert 56 <= e64["sign"]["rows"] <= 64


def test_unchanged_module_stores_nothing():
    for method in METHODS:
        cfg = DeltaCoMeConfig(method=method)
        entry = plan_entry("a", 64, 64, 1 / 16, cfg, unchanged=True)
        assert entry_nbytes(entry) == 0


# ------------------------------------------------------------------------------------------------ storage parts


def test_sign_part_roundtrip_and_forward():
    torch.manual_seed(0)
    d = torch.randn(12, 40)
    positive, scale, rows = bitdelta_factors(d, None, 5, per_row=True)
    part = SignPart(12, 40, 5, per_row=True)
    part.set(positive, scale, rows)
    dense = part.delta_weight()
    kept = rows.long()
    # least-squares per-row scale without a Hessian is BitDelta's mean |Δ| of the row
    assert torch.allclose(part.scale, d[kept].abs().mean(1), atol=1e-6)
    assert torch.equal(torch.sign(dense[kept]), torch.where(d[kept] >= 0, 1.0, -1.0))
    others = torch.ones(12, dtype=torch.bool)
    others[kept] = False
    assert dense[others].abs().sum() == 0
    # the rows kept are those with the largest mean |Δ| (largest error reduction)
    assert set(kept.tolist()) == set(torch.topk(d.abs().sum(1), 5).indices.tolist())
    x = torch.randn(3, 7, 40)
    assert torch.allclose(part.forward_delta(x), x @ dense.t(), atol=1e-5)


def test_bitdelta_matrix_scale_is_mean_abs_without_data_and_least_squares_with():
    torch.manual_seed(0)
    d = torch.randn(16, 64) * 0.01
    _, scale, rows = bitdelta_factors(d, None, 16, per_row=False)
    assert rows is None and torch.allclose(scale, d.abs().mean().reshape(1), rtol=1e-5)
    H = input_hessian(64)
    pos, scale_h, _ = bitdelta_factors(d, H, 16, per_row=False)
    approx = (pos.float() * 2 - 1) * scale_h

    def err(a):
        return output_error(d - (pos.float() * 2 - 1) * a, H)

    assert err(scale_h) <= err(scale_h * 1.05) and err(scale_h) <= err(scale_h * 0.95)
    assert err(scale_h) <= output_error(d - (pos.float() * 2 - 1) * scale, H) + 1e-12
    del approx


def test_sparse_part_regenerates_its_mask_and_checks_it():
    torch.manual_seed(0)
    d = torch.randn(30, 50)
    cfg = DeltaCoMeConfig(method="dare", ratio=1 / 4, group_size=32, uniform_bits=8)
    entry = plan_entry("layers.3.mlp", 30, 50, 1 / 4, cfg)
    factors = compress_module(d, None, entry, cfg)
    packed = PackedDelta.from_layout(entry)
    factors.fill(packed)
    w = packed.delta_weight()
    keep = entry["sparse"]["keep"]
    mask = w != 0
    # the kept entries are the stored ones (an 8-bit code may round a few to zero): measured 647 of 651
    assert 0.95 * entry["sparse"]["nnz"] <= int(mask.sum()) <= entry["sparse"]["nnz"]
    # kept entries are rescaled by 1/keep (8-bit quantization error aside)
    assert torch.allclose(w[mask], d[mask] / keep, atol=0.05 * (d.abs().max() / keep))
    bad = dict(entry["sparse"], nnz=entry["sparse"]["nnz"] + 1)
    part = SparsePart.from_layout(30, 50, bad)
    with pytest.raises(AdapterFileError, match="regenerated"):
        part.delta_weight()


# ------------------------------------------------------------------------------------------------ quality ordering


def test_error_ordering_on_a_long_tail_delta():
    """At equal budget Delta-CoMe's mixed precision beats plain low rank, one bit per weight and uniform 2 bits."""
    m, n = 256, 256
    d = long_tail_delta(m, n)
    H = input_hessian(n)
    errs = {}
    for method, extra in [
        ("deltacome", {}),
        ("lowrank", {}),
        ("bitdelta", {}),
        ("svd-uniform", {"uniform_bits": 2}),
        ("svd-uniform", {"uniform_bits": 8}),
        ("dare", {}),
    ]:
        cfg = DeltaCoMeConfig(method=method, ratio=1 / 16, group_size=64, **extra)
        entry = plan_entry("layers.0.q", m, n, 1 / 16, cfg)
        errs[method + str(extra.get("uniform_bits", ""))] = approximation_error(d, H, entry, cfg) / output_error(d, H)
    best_baseline = min(v for k, v in errs.items() if k != "deltacome")
    assert errs["deltacome"] < best_baseline, errs
    assert errs["lowrank"] < errs["dare"], errs


# ------------------------------------------------------------------------------------------------ search


@pytest.mark.parametrize("strategy", ["greedy", "genetic"])
def test_search_is_never_worse_than_the_default_split(strategy):
    m, n = 96, 128
    samples = [(long_tail_delta(m, n, seed=s, decay=0.5 + 0.2 * s), input_hessian(n, seed=s)) for s in range(2)]
    cfg = DeltaCoMeConfig(ratio=1 / 8, group_size=32, quantizer="rtn")
    res = search_split(samples, m, n, 1 / 8, cfg, strategy=strategy, max_evals=25)
    assert res.objective <= res.default_objective
    assert res.evaluations <= 26
    # the reported objective is what the chosen split really gives, and it fits the budget
    entry = {"shape": [m, n], "bands": res.layout, "group_size": 32}
    again = sum(approximation_error(d, h, entry, cfg) / output_error(d, h) for d, h in samples) / 2
    assert again == pytest.approx(res.objective, rel=1e-6)
    assert entry_nbytes(entry) <= budget_bytes(m, n, 1 / 8)


@pytest.mark.parametrize("strategy", ["greedy", "genetic"])
def test_search_reaches_single_band_splits_when_the_default_bands_eat_a_small_budget(strategy):
    """At 1/128 of a GQA k/v shape, 2 x 8-bit + 32 x 3-bit do not fit and every band pays its own scales, zeros and
    word padding: the configured split keeps 2 ranks while one 2-bit band keeps several times more. The search must
    find a split at least as good as the best single-band one (a coordinate search from the default alone cannot).
    ``min_rank_share=0`` keeps the published bands as they are, the case the search has to get out of."""
    m, n, ratio = 192, 576, 1 / 128
    samples = [(long_tail_delta(m, n, seed=s), input_hessian(n, seed=s)) for s in range(2)]
    cfg = DeltaCoMeConfig(ratio=ratio, group_size=128, quantizer="rtn", min_rank_share=0.0)
    res = search_split(samples, m, n, ratio, cfg, strategy=strategy, max_evals=30)

    def objective(layout):
        entry = {"shape": [m, n], "bands": layout, "group_size": 128}
        assert entry_nbytes(entry) <= budget_bytes(m, n, ratio)
        return sum(approximation_error(d, h, entry, cfg) / output_error(d, h) for d, h in samples) / 2

    default_rank = sum(r for _, r in solve_ranks(m, n, ratio, cfg.bands, 128))
    single = {b: solve_ranks(m, n, ratio, [[b, None]], 128) for b in (2, 3)}
    assert sum(r for _, r in single[2]) >= 3 * default_rank  # the situation this test is about
    assert res.objective <= min(objective(lay) for lay in single.values()) + 1e-12
    assert res.objective < res.default_objective
    assert objective(res.layout) == pytest.approx(res.objective, rel=1e-6)


def test_search_keeps_the_default_when_nothing_beats_it():
    m, n = 64, 64
    samples = [(long_tail_delta(m, n), None)]
    cfg = DeltaCoMeConfig(ratio=1 / 8, group_size=32, quantizer="rtn", min_rank_share=0.0)
    res = search_split(samples, m, n, 1 / 8, cfg, strategy="greedy", max_evals=1)
    assert res.spec == cfg.bands and res.objective == res.default_objective


def test_search_starts_from_the_split_min_rank_share_gives():
    m, n, ratio = 192, 576, 1 / 32
    samples = [(long_tail_delta(m, n), None)]
    cfg = DeltaCoMeConfig(ratio=ratio, group_size=128, quantizer="rtn", min_rank_share=0.7)
    res = search_split(samples, m, n, ratio, cfg, strategy="greedy", max_evals=1)
    shrunk = solve_ranks(m, n, ratio, cfg.bands, 128, 0.7)
    assert shrunk != solve_ranks(m, n, ratio, cfg.bands, 128)  # the share changes this layer's split
    assert [tuple(b) for b in res.layout] == shrunk and res.objective == res.default_objective


# ------------------------------------------------------------------------------------------------ allocation


def test_allocate_keeps_the_total_and_lowers_the_worst_error():
    g = torch.Generator().manual_seed(0)
    cands = []
    for i in range(12):
        sens = float(torch.rand(1, generator=g)) * 10 + 0.1
        nbytes = [int(1000 * lv) for lv in (0.25, 0.5, 1, 2, 4)]
        errors = [sens / b for b in nbytes]
        cands.append(Candidates(f"m{i}", [{}] * 5, nbytes, errors, 1000))
    budget = 12 * 1000
    picks, tau = allocate(cands, budget)
    used = sum(c.nbytes[j] for c, j in zip(cands, picks))
    assert used <= budget
    worst = max(c.errors[j] for c, j in zip(cands, picks))
    uniform_worst = max(c.errors[2] for c in cands)
    assert worst <= uniform_worst
    assert worst <= tau or all(j == len(c.nbytes) - 1 for c, j in zip(cands, picks) if c.errors[j] > tau)
    # the more sensitive a module, the more bytes it gets
    order = sorted(range(12), key=lambda i: cands[i].errors[0])
    got = [cands[i].nbytes[picks[i]] for i in order]
    assert got == sorted(got)


def test_allocate_refuses_an_impossible_budget():
    cands = [Candidates("a", [{}, {}], [500, 1000], [1.0, 0.5], 1000)]
    with pytest.raises(DeltaCoMeError, match="over the budget"):
        allocate(cands, 100)


# ------------------------------------------------------------------------------------------------ activations


def test_collect_hessians_shares_inputs_and_matches_a_direct_computation():
    base = make_model("llama")
    ids = random_ids(base, 4, 16)
    names = target_linears(base)
    H = collect_hessians(base, names, ids, batch_size=2)
    q, k = names[0], names[1]
    assert H[q] is H[k]  # q_proj and k_proj read the same tensor
    seen = {}
    handle = base.get_submodule(q).register_forward_hook(lambda m, i, o: seen.setdefault("x", []).append(i[0]))
    with torch.no_grad():
        base(input_ids=ids)
    handle.remove()
    x = torch.cat(seen["x"]).reshape(-1, base.config.hidden_size)
    assert torch.allclose(H[q], 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-6)  # GPTQ's H = 2/N sum x x^T


# ------------------------------------------------------------------------------------------------ config


def test_config_validates_method_options():
    with pytest.raises(ConfigError, match="method"):
        DeltaCoMeConfig(method="magic")
    with pytest.raises(ConfigError, match="search"):
        DeltaCoMeConfig(method="bitdelta", search="greedy")
    with pytest.raises(ConfigError, match="search"):
        DeltaCoMeConfig(search="annealing")
    with pytest.raises(ConfigError, match="adaptive"):
        DeltaCoMeConfig(method="dare", allocation="adaptive")
    with pytest.raises(ConfigError, match="uniform_bits"):
        DeltaCoMeConfig(method="svd-uniform", uniform_bits=5)
    with pytest.raises(ConfigError, match="bitdelta_scale"):
        DeltaCoMeConfig(method="bitdelta", bitdelta_scale="column")
    bad = {"a": {"shape": [4, 4], "bands": [], "group_size": 32, "sign": {"rows": 9}}}
    with pytest.raises(ConfigError, match="'sign'"):
        DeltaCoMeConfig(layout=bad)
    bad = {"a": {"shape": [4, 4], "bands": [], "group_size": 32, "sparse": {"nnz": 3, "keep": 2.0}}}
    with pytest.raises(ConfigError, match="'sparse'"):
        DeltaCoMeConfig(layout=bad)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def llama_pair():
    base = make_model("llama")
    return base, make_finetune(base, seed=2)


def _compress(pair, **kw):
    base, ft = pair
    cfg = DeltaCoMeConfig(group_size=32, **{"ratio": 1 / 8, **kw})
    return compress(copy.deepcopy(base), ft, cfg, calibration=random_ids(base, 8, 32, seed=9), progress=False)


# (config, bound on the relative logits error of the reloaded adapter, margin over the baselines). Measured on this
# pair: bitdelta 0.54, bitdelta-row 0.62, lowrank 0.40, svd-uniform 0.19, dare 0.43 (0.53 since format 2 pays the
# dense extras and the header out of the same budget), greedy 0.20, adaptive 0.21;
# a zero delta scores 0.94 and a shuffled adapter of the same size 1.1-1.5 (`assert_beats_baselines` measures both).
# DARE runs at 1/4 (keeps ~82% of the entries): at 1/8 it is worse than no delta here (benchmarks/RESULTS.md).
# One bit per weight recovers about 40% of the effect on 64-wide layers: BitDelta's bounds get a wider margin.
EACH_METHOD = {
    "bitdelta": ({"method": "bitdelta", "distill_steps": 3}, 0.65, 0.75),
    "bitdelta-row-1/16": (
        {"method": "bitdelta", "bitdelta_scale": "row", "ratio": 1 / 16, "distill_steps": 0},
        0.7,
        0.75,
    ),
    "lowrank": ({"method": "lowrank"}, 0.5, MARGIN),
    "svd-uniform": ({"method": "svd-uniform", "uniform_bits": 3}, 0.3, MARGIN),
    "dare-1/4": ({"method": "dare", "ratio": 1 / 4}, 0.6, 0.65),  # draws 0-5: 0.49-0.63 (hashed), 0.49-0.56
    "dare-importance-1/4": ({"method": "dare", "ratio": 1 / 4, "dare_rates": "importance"}, 0.6, 0.65),
    # bands + DARE of what they leave, at 1/8, where plain DARE (1.29) is worse than no delta on this pair: over mask
    # draws 0-5, 0.51-0.67 (mean 0.58) with the CPU generator's masks, 0.53-0.68 (mean 0.61) with the hashed ones
    "deltacome-dare": ({"method": "deltacome-dare", "bands": [[4, None]], "band_share": 0.5}, 0.72, 0.77),
    "greedy": ({"search": "greedy"}, 0.3, MARGIN),
    "adaptive": ({"allocation": "adaptive"}, 0.3, MARGIN),
}


@pytest.mark.parametrize("case", list(EACH_METHOD))
def test_each_method_saves_loads_back_with_equal_logits_and_fits_the_budget(llama_pair, case, tmp_path):
    kw, bound, margin = EACH_METHOD[case]
    base, ft = llama_pair
    model = _compress(llama_pair, **kw)
    ids = random_ids(base, 2, 12, seed=4)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)
    # it really carries the fine-tune: well below what no delta and a random delta of the same size score
    assert_beats_baselines(loaded, ft, base, ids, bound, margin=margin)
    summary = summarize_adapter(tmp_path)
    cfg = model.peft_config["default"]
    assert summary.file_bytes <= int(cfg.ratio * summary.target_fp16_bytes)  # the whole file holds the ratio
    factor_ratio = cfg.compression_info["budget"]["factor_ratio"]  # the modules' share of it
    budgets = {m.name: budget_bytes(*m.shape, factor_ratio) for m in summary.modules}
    bias = {m.name: 4 * m.shape[0] * bool(cfg.layout[m.name]["bias"]) for m in summary.modules}
    assert summary.factor_bytes <= sum(budgets.values()) + sum(bias.values())
    unspent = cfg.compression_info["unspent"]  # what the modules left went back to the DARE parts or the bands
    assert summary.factor_bytes == sum(budgets.values()) + sum(bias.values()) - unspent["unspent_bytes"]
    assert unspent["unspent_bytes"] < max(unspent["unspent_before"], 1) or unspent["spent_on"] == "none"
    if unspent["spent_on"] == "none":  # nothing given back: each module within its own budget
        for m in summary.modules:
            assert m.nbytes <= budgets[m.name] + bias[m.name], m.name
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["method"] == kw.get("method", "deltacome")
    # `deltacome info --modules` renders every module with the layout and bytes the loader really allocated
    text = summary.format(per_module=True).splitlines()
    packed = {
        n.removeprefix("base_model.model."): m.deltacome_delta["default"]
        for n, m in loaded.named_modules()
        if isinstance(m, DeltaCoMeLayer)
    }
    assert sorted(m.name for m in summary.modules) == sorted(packed)
    for name, pd in packed.items():
        line = next(row for row in text if row.split()[:1] == [name])
        assert line.split()[-1] == f"{pd.nbytes():,}", line
        shown = [f"{rank}@{bits}b" for bits, rank in pd.layout if rank]
        shown += [f"sign@1b x {pd.sign.rows} rows"] if pd.sign is not None else []
        shown += [f"{pd.sparse.nnz} values@{pd.sparse.bits}b"] if pd.sparse is not None else []
        shown += [f"vq {pd.vq.rows}/{pd.out_features} rows in {pd.vq.dim}-dim vectors"] if pd.vq is not None else []
        assert shown and all(part in line for part in shown), (shown, line)


def test_bitdelta_distillation_lowers_the_loss(llama_pair):
    model = _compress(llama_pair, method="bitdelta", distill_steps=8)
    info = model.peft_config["default"].compression_info["distill"]
    assert info["last_loss"] < info["first_loss"]


def test_search_and_allocation_are_recorded_and_shown(llama_pair, tmp_path):
    model = _compress(llama_pair, search="greedy", allocation="adaptive", dare_modules=None)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    info = cfg["compression_info"]
    assert info["search"]["strategy"] == "greedy"
    for kind, r in info["search"]["types"].items():
        assert r["objective"] <= r["default_objective"], kind
    alloc = info["allocation"]
    assert alloc["factor_bytes"] <= alloc["budget_bytes"]
    assert alloc["max_error"] <= alloc["uniform_max_error"] + 1e-12
    text = summarize_adapter(tmp_path).format()
    assert "band split search (greedy)" in text and "allocation: adaptive" in text
    assert "min_rank_share" in text and "whole-model check" in text
    assert info["rank_share"]["chosen"] in (0.0, 0.5, 0.7, 0.85, 1.0)
    # the allocation was kept, so budget moved: modules of one type get other layouts in other layers, some modules
    # store more than their uniform budget and some less (in all still within the model's budget)
    assert alloc["kept"] and info["end_to_end"]["adaptive"]["kept"]
    by_type: dict[str, set[str]] = {}
    for n, e in cfg["layout"].items():
        by_type.setdefault(n.rsplit(".", 1)[-1], set()).add(json.dumps(e["bands"]))
    assert any(len(layouts) > 1 for layouts in by_type.values()), by_type
    summary = summarize_adapter(tmp_path)
    over = [m.name for m in summary.modules if m.nbytes > budget_bytes(*m.shape, 1 / 8)]
    under = [m.name for m in summary.modules if m.nbytes < 0.9 * budget_bytes(*m.shape, 1 / 8)]
    assert over and under, (over, under)
    # and the loader builds exactly these layouts, and the adapter carries the fine-tune (measured 0.19)
    base, ft = llama_pair
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    for name, module in loaded.base_model.model.named_modules():
        if isinstance(module, DeltaCoMeLayer):
            assert [list(b) for b in module.deltacome_delta["default"].layout] == cfg["layout"][name]["bands"], name
    assert_beats_baselines(loaded, ft, base, random_ids(base, 2, 12, seed=4), 0.3)


def test_end_to_end_check_measures_kl_and_always_restores_the_finetune(llama_pair):
    from hf_deltacome.compression.endtoend import EndToEndCheck

    base, ft = llama_pair
    ft = copy.deepcopy(ft)
    base_w = {n: m.weight for n, m in base.named_modules() if n in target_linears(base)}
    ft_mods = dict(ft.named_modules())
    before = {n: ft_mods[n].weight.detach().clone() for n in base_w}

    deltas = {n: before[n] - base_w[n].detach() for n in base_w}
    scaled = {"exact": 1.0, "half": 0.5, "none": 0.0}
    check = EndToEndCheck(ft, random_ids(base, 8, 24, seed=3), deltas.__getitem__, lambda d, e: d * e["k"])
    kls = {}
    with check:
        for label, k in scaled.items():
            check.apply({n: {"k": k} for n in base_w})
            kls[label] = check.kl()
    assert kls["exact"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < kls["half"] < kls["none"]  # the base (no delta) is furthest from the fine-tune
    for n, w in before.items():  # the fine-tune is itself again
        assert torch.equal(ft_mods[n].weight, w)
    with pytest.raises(RuntimeError, match="boom"), check:  # restored on an error too
        check.apply({n: {"k": 0.0} for n in base_w})
        raise RuntimeError("boom")
    for n, w in before.items():
        assert torch.equal(ft_mods[n].weight, w)
    with pytest.raises(ConfigError, match=r"needs a \(sequences, tokens\) batch of ids, got \(24,\)"):
        EndToEndCheck(ft, random_ids(base, 1, 24)[0], deltas.__getitem__, lambda d, e: d)


def test_mean_next_token_kl_is_the_mean_kl_per_token_however_batched(llama_pair):
    """The check's metric (also what ``benchmarks/quality.py --kl`` prints for stored adapters)."""
    from hf_deltacome.compression.endtoend import mean_next_token_kl, next_token_log_probs

    base, ft = llama_pair
    ids = random_ids(base, 6, 10, seed=5)
    batches = list(ids.split(4))
    reference = [next_token_log_probs(ft, b) for b in batches]
    assert [r.shape[:2] for r in reference] == [(4, 10), (2, 10)]
    assert mean_next_token_kl(reference, ft, batches) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        p = torch.log_softmax(ft(input_ids=ids).logits.float(), -1)
        q = torch.log_softmax(base(input_ids=ids).logits.float(), -1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert expected > 1e-4
    assert mean_next_token_kl(reference, base, batches) == pytest.approx(expected, rel=1e-4)


def test_mean_next_token_kl_over_the_answers_only(llama_pair, tokenizer):
    """``scored`` (``response_positions`` of a response mask) keeps the positions that predict a response token (the
    answers' KL that ``benchmarks/quality.py --kl`` prints beside the whole text's)."""
    from hf_deltacome.compression.calibration import read_records, tokenize_records
    from hf_deltacome.compression.endtoend import (
        mean_kl,
        mean_next_token_kl,
        next_token_kls,
        next_token_log_probs,
        response_positions,
    )

    base, ft = llama_pair
    records = [{"prompt": f"Question {i}? ", "completion": f"answer {i}"} for i in range(30)]
    ids, mask = tokenize_records(read_records(records), tokenizer, num_samples=6, seq_len=20)
    scored = response_positions(mask)
    assert torch.equal(scored[:, :-1], mask[:, 1:]) and not scored[:, -1].any()
    batches, parts = list(ids.split(4)), list(scored.split(4))
    reference = [next_token_log_probs(ft, b) for b in batches]
    with torch.no_grad():
        p = torch.log_softmax(ft(input_ids=ids).logits.float(), -1)
        q = torch.log_softmax(base(input_ids=ids).logits.float(), -1)
    per_position = (p.exp() * (p - q)).sum(-1)
    answers = mean_next_token_kl(reference, base, batches, parts)
    assert answers == pytest.approx(float(per_position[scored].mean()), rel=1e-4)
    assert answers != pytest.approx(mean_next_token_kl(reference, base, batches), rel=1e-2)
    kls = next_token_kls(reference, base, batches)  # one pass, both means: the same numbers
    assert (mean_kl(kls), mean_kl(kls, parts)) == (mean_next_token_kl(reference, base, batches), answers)


def test_search_and_allocation_keep_a_change_only_where_the_whole_model_gains(llama_pair, monkeypatch):
    """The per-module objective picks splits and moves budget; the whole-model KL decides whether they stay. With a
    check that sees no gain anywhere, the plan is exactly the configured split at the uniform budget."""
    from hf_deltacome.compression import plan as plan_mod
    from hf_deltacome.compression.endtoend import EndToEndCheck

    class NoGain(EndToEndCheck):
        def kl(self) -> float:
            super().kl()
            return 1.0

    base, ft = llama_pair
    before = {n: p.detach().clone() for n, p in ft.named_parameters()}
    real = _compress(llama_pair, search="greedy", allocation="adaptive").peft_config["default"]
    monkeypatch.setattr(plan_mod, "EndToEndCheck", NoGain)
    cfg = _compress(llama_pair, search="greedy", allocation="adaptive").peft_config["default"]
    plain = _compress(llama_pair).peft_config["default"]
    e2e = cfg.compression_info["end_to_end"]
    assert e2e["search"] and not any(v["kept"] for v in e2e["search"].values() if not v.get("same_as_default"))
    assert e2e["adaptive"]["kept"] is False and cfg.compression_info["allocation"]["kept"] is False
    assert {n: e["bands"] for n, e in cfg.layout.items()} == {n: e["bands"] for n, e in plain.layout.items()}
    # the real check: every kept change lowered the KL it was measured against
    info = real.compression_info["end_to_end"]
    kl = info["default"]
    for kind, v in sorted(info["search"].items()):
        assert v["kept"] == (v["kl"] < kl) or v.get("same_as_default"), kind
        kl = v["kl"] if v["kept"] else kl
    assert info["after_search"] == kl <= info["default"]
    for n, p in ft.named_parameters():  # the fine-tune handed in is untouched
        assert torch.equal(p, before[n]), n


@pytest.fixture(scope="module")
def wide_pairs():
    """A fine-tune dominated by a few strong directions and one whose delta is spread evenly over many (as a
    knowledge fine-tune is), on a model wide enough for the bands to matter."""
    wide = dict(hidden_size=128, intermediate_size=352, head_dim=32)
    base = make_model("llama", **wide)
    return base, {"peaked": make_finetune(base, rank=4), "flat": make_finetune(base, rank=0, decay=0.05)}


def test_auto_min_rank_share_follows_the_delta(wide_pairs):
    """The share is chosen by the whole model's KL to the fine-tune: a peaked delta keeps the published bands (its
    strong directions need 8 bits; one 2-bit band loses most of them), an even one trades them for rank."""
    base, fts = wide_pairs
    calib, held_out = random_ids(base, 16, 64, seed=1), random_ids(base, 8, 64, seed=2)
    chosen, errors = {}, {}
    for label, ft in fts.items():
        for share in ("auto", 0.0, 1.0):
            # the bands everywhere: the MLP stored whole (dare_modules) would add the same floor to every share
            cfg = DeltaCoMeConfig(ratio=1 / 8, min_rank_share=share, dare_modules=None)
            model = compress(copy.deepcopy(base), ft, cfg, calibration=calib, progress=False)
            errors[label, share] = relative_logits_error(model, ft, base, held_out)
            if share == "auto":
                info = model.peft_config["default"].compression_info["rank_share"]
                chosen[label] = info["chosen"]
                assert info["kl"][str(info["chosen"])] == min(info["kl"].values())
    assert chosen["peaked"] == 0.0 and chosen["flat"] > 0.0
    assert errors["peaked", "auto"] < 0.5 * errors["peaked", 1.0]
    # format 2's bands cost little on these shapes, so the published split no longer starves the flat delta's tail:
    # the calibration KL picks a share; on held-out text it must be no worse than the published split (within 2%)
    assert errors["flat", "auto"] <= 1.02 * errors["flat", 0.0]


def test_planned_kl_does_not_depend_on_what_was_measured_before(wide_pairs):
    """The check edits the fine-tune's weights in place; every KL it records must be that of its own layout."""
    from hf_deltacome.compression.endtoend import EndToEndCheck
    from hf_deltacome.compression.modules import rtn_bands_dense as _rtn_bands_dense
    from hf_deltacome.compression.modules import with_changes as _with
    from hf_deltacome.compression.plan import plan_layouts

    base, fts = wide_pairs
    ft = fts["flat"]
    names = target_linears(base)
    calib = random_ids(base, 8, 32, seed=1)
    cfg = DeltaCoMeConfig(ratio=1 / 8)
    _, info = plan_layouts(base, ft, names, cfg, calibration_ids=calib)
    bm, fm = dict(base.named_modules()), dict(ft.named_modules())
    deltas = {n: (fm[n].weight - bm[n].weight).detach().float() for n in names}
    chosen = _with(cfg, min_rank_share=info["rank_share"]["chosen"])
    candidates = {f"share {share}": (_with(cfg, min_rank_share=float(share)), kl)
                  for share, kl in info["rank_share"]["kl"].items()}  # fmt: skip
    for share, kl in info["residual"]["kl"].items():  # residual="auto": the same check, bands + a 2-bit DARE
        hybrid = chosen if share == "none" else _with(cfg, method="deltacome-dare", bands=[[3, None]],
                                                      band_share=float(share), uniform_bits=2)  # fmt: skip
        candidates[f"residual {share}"] = (hybrid, kl)
    for label, (config, kl) in candidates.items():
        layouts = {n: plan_entry(n, *deltas[n].shape, 1 / 8, config) for n in names}
        with EndToEndCheck(ft, calib, deltas.__getitem__, _rtn_bands_dense, input_energy=True) as fresh:
            fresh.apply(layouts)
            assert fresh.kl() == pytest.approx(kl, rel=1e-4), label


def test_cli_compress_with_a_baseline_and_info_shows_its_layout(llama_pair, tmp_path, capsys):
    from tiny_models import make_tokenizer

    from hf_deltacome.cli import main

    base, ft = llama_pair
    for name, model in (("base", base), ("ft", ft)):
        model.save_pretrained(tmp_path / name)
        make_tokenizer().save_pretrained(tmp_path / name)
    out = tmp_path / "adapter"
    args = ["compress", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--output", str(out)]
    rc = main([*args, "--method", "bitdelta", "--bitdelta-scale", "row", "--quantizer", "rtn", "--ratio", "1/32"])
    assert rc == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "sign@1b" in shown and "row scale" in shown and "method bitdelta" in shown
    rc = main([*args, "--overwrite", "--search", "genetic", "--allocation", "adaptive", "--quantizer", "rtn"])
    assert rc == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["search"] == "genetic" and cfg["allocation"] == "adaptive"
    assert main([*args, "--overwrite", "--method", "bitdelta", "--search", "greedy"]) == 2
    assert "search" in capsys.readouterr().err
    rc = main([*args, "--overwrite", "--quantizer", "rtn", "--min-rank-share", "0.7"])
    assert rc == 0 and json.loads((out / "adapter_config.json").read_text())["min_rank_share"] == 0.7
    with pytest.raises(SystemExit):
        main([*args, "--overwrite", "--min-rank-share", "most"])
    assert "expected 'auto' or a number in [0, 1], got 'most'" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--min-rank-share", "2"]) == 2
    assert "min_rank_share must be 'auto' or a number in [0, 1], got 2.0" in capsys.readouterr().err
