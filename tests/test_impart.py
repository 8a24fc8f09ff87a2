"""Sparse singular vectors: ``method="impart"`` and Delta-CoMe's ``sparse_tail`` (hf_deltacome.compression.impart)."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from tiny_models import (
    assert_beats_baselines,
    long_tail_delta,
    make_finetune,
    make_model,
    random_ids,
    relative_logits_error,
)

from hf_deltacome import AdapterFileError, ConfigError, DeltaCoMeConfig
from hf_deltacome.backend import _kernel_ready
from hf_deltacome.compression.impart import keep_rates
from hf_deltacome.compression.modules import approximation_error, compress_module, entry_nbytes, plan_entry
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.format.budget import budget_bytes
from hf_deltacome.format.storage import PackedDelta, SparseBand, sparse_band_masks, sparse_mask
from hf_deltacome.io.adapter_files import read_adapter
from hf_deltacome.io.summary import summarize_adapter
from hf_deltacome.serving.export import lora_factors

CONFIGS = {
    "impart": {"method": "impart"},
    "sparse-tail": {"method": "deltacome", "sparse_tail": 0.4, "dare_modules": None},  # every module's tail sparse
    "impart-2bit": {"method": "impart", "bands": [[2, None]], "sparse_tail": 0.3},
}


# ------------------------------------------------------------------------------------------------ layout and budget


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("shape", [(64, 64), (160, 64), (64, 160), (256, 256)])
def test_sparse_layouts_fit_the_budget_with_exact_byte_count(case, shape):
    m, n = shape
    spectrum = torch.linalg.svdvals(long_tail_delta(m, n))
    for ratio in (1 / 4, 1 / 16, 1 / 64):
        cfg = DeltaCoMeConfig(ratio=ratio, group_size=32, min_rank_share=0.0, **CONFIGS[case])
        entry = plan_entry(f"layers.0.{case}", m, n, ratio, cfg, spectrum=spectrum)
        assert entry_nbytes(entry) <= budget_bytes(m, n, ratio), (case, shape, ratio)
        assert PackedDelta.from_layout(entry).nbytes() == entry_nbytes(entry)  # what the loader allocates
        keeps = [b["keep"] for b in entry["sparse_bands"]]
        assert keeps == sorted(keeps, reverse=True) and all(k >= (cfg.sparse_tail or 0.5) for k in keeps)
        cfg.layout = {"layers.0.x": entry}
        cfg.validate_layout()


def test_sparsity_buys_rank_and_keep_rates_follow_the_singular_values():
    m, n, ratio = 256, 256, 1 / 8
    d = long_tail_delta(m, n)
    spectrum = torch.linalg.svdvals(d)
    dense = plan_entry("a", m, n, ratio, DeltaCoMeConfig(method="svd-uniform", uniform_bits=2, group_size=32))
    dense_rank = sum(r for _, r in dense["bands"])

    def rank(entry):
        return sum(r for _, r in entry["bands"]) + sum(b["rank"] for b in entry["sparse_bands"])

    tails = {}
    for keep in (0.8, 0.5, 0.3):
        cfg = DeltaCoMeConfig(method="deltacome", bands=[[2, None]], sparse_tail=keep, group_size=32)
        tails[keep] = plan_entry("a", m, n, ratio, cfg)
        (band,) = tails[keep]["sparse_bands"]
        assert band["keep"] == keep and tails[keep]["bands"] == [[2, 0]]
    assert dense_rank < rank(tails[0.8]) < rank(tails[0.5]) < rank(tails[0.3])  # more rank at lower density
    cfg = DeltaCoMeConfig(method="impart", bands=[[2, None]], sparse_tail=0.3, group_size=32)
    imp = plan_entry("a", m, n, ratio, cfg, spectrum=spectrum)
    assert imp["bands"][0][1] > 0  # the largest tail vectors are kept whole
    keeps = [b["keep"] for b in imp["sparse_bands"]]
    assert len(keeps) > 1 and keeps == sorted(keeps, reverse=True) and keeps[-1] >= 0.3
    assert dense_rank < rank(imp) < rank(tails[0.3])


def test_keep_rates_grow_with_the_singular_value():
    sigma = torch.tensor([8.0, 4.0, 2.0, 1.5, 1.0])
    p = keep_rates(sigma, 0.25, importance=True)
    assert p.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.375, 0.25])
    assert keep_rates(sigma, 0.25, importance=False).tolist() == [0.25] * 5


# ------------------------------------------------------------------------------------------------ storage


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_sparse_bands_regenerate_their_masks_and_reload_identically(quantizer):
    m, n = 96, 128
    d = long_tail_delta(m, n)
    H = torch.eye(n) + 0.1 * torch.ones(n, n)
    cfg = DeltaCoMeConfig(method="impart", ratio=1 / 4, group_size=32, quantizer=quantizer, min_rank_share=0.0)
    entry = plan_entry("layers.1.mlp", m, n, 1 / 4, cfg, spectrum=torch.linalg.svdvals(d))
    assert entry["sparse_bands"]
    factors = compress_module(d, H, entry, cfg)
    packed = PackedDelta.from_layout(entry)
    factors.fill(packed)
    assert torch.allclose(packed.delta_weight(), factors.dense(m, n), atol=1e-6)
    again = PackedDelta.from_layout(json.loads(json.dumps(entry)))  # from the JSON alone: masks from the seeds
    again.load_state_dict(packed.state_dict())
    assert torch.equal(again.delta_weight(), packed.delta_weight())
    for band, spec in zip(again.sparse_bands, entry["sparse_bands"]):
        assert spec["draws"] == "hash" and entry["format"] == 6  # the kernel replays them (format/draws.py)
        mv, mu = sparse_band_masks(m, n, spec["rank"], spec["keep"], spec["seed"], "hash")
        assert torch.equal(mv, sparse_mask(spec["rank"], n, spec["keep"], spec["seed"], draws="hash"))  # DARE's
        assert [int(mv.sum()), int(mu.sum())] == spec["nnz"]
        assert (band.vt_dense()[~mv] == 0).all() and (band.ut_dense()[~mu] == 0).all()
    assert _kernel_ready(packed)  # the kernels read its dense bands, its sparse bands are added beside them
    a, b, _ = lora_factors(packed)  # still low rank: a LoRA export is exact
    assert torch.allclose((b @ a).float(), packed.delta_weight(), atol=1e-5)
    bad = dict(entry["sparse_bands"][0], nnz=[entry["sparse_bands"][0]["nnz"][0] + 1, 1])
    with pytest.raises(AdapterFileError, match="regenerated from seed"):
        SparseBand.from_layout(m, n, bad, 32).vt_dense()


def test_sparse_values_are_the_kept_entries_rescaled_by_one_over_keep():
    m, n = 64, 96
    d = long_tail_delta(m, n)
    cfg = DeltaCoMeConfig(method="deltacome", bands=[[8, None]], sparse_tail=0.5, group_size=32, quantizer="rtn")
    entry = plan_entry("x", m, n, 1 / 2, cfg)
    ((_, _, s, vt, ut),) = compress_module(d, None, entry, cfg).sparse_bands
    band = entry["sparse_bands"][0]
    r, keep = band["rank"], band["keep"]
    mv, mu = sparse_band_masks(m, n, r, keep, band["seed"], band["draws"])
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    want = (U[:, :r] * mu.t() / keep * S[:r]) @ (Vh[:r] * mv / keep)  # unbiased: E[mask / keep] = 1
    got = (ut.t() * s) @ vt
    assert float((got - want).norm() / want.norm()) < 0.02  # 8-bit rounding only
    # unbiased is not least squares: a vector kept at p costs σ²(1/p² − 1) in expectation (3σ² at p = 0.5, more
    # than dropping it); with an input Hessian the kept entries of U are refit by least squares instead
    H = torch.eye(n) + 0.05 * torch.ones(n, n)
    unbiased = approximation_error(d, H, entry, cfg)
    refit = approximation_error(d, H, entry, cfg, quantizer="gptq")
    assert refit < 0.5 * unbiased, (refit, unbiased)


def test_config_refuses_bad_sparse_settings_by_name():
    for bad in (0, 1.0, 1.5, -0.2, True, "half"):
        with pytest.raises(ConfigError, match="sparse_tail"):
            DeltaCoMeConfig(sparse_tail=bad)
    with pytest.raises(ConfigError, match="sparse_tail applies"):
        DeltaCoMeConfig(method="dare", sparse_tail=0.5)
    with pytest.raises(ConfigError, match="search"):
        DeltaCoMeConfig(method="impart", search="greedy")
    with pytest.raises(ConfigError, match="allocation"):
        DeltaCoMeConfig(sparse_tail=0.5, allocation="adaptive")
    with pytest.raises(ConfigError, match="rest of the budget"):
        DeltaCoMeConfig(method="impart", bands=[[8, 2], [2, 10]])
    good = {"bits": 2, "rank": 3, "keep": 0.5, "seed": 7, "nnz": [10, 12]}
    DeltaCoMeConfig(layout={"m.a": {"shape": [8, 8], "bands": [[2, 1]], "sparse_bands": [good]}})
    for field, value in (("keep", 0.0), ("keep", 1.5), ("bits", 5), ("rank", -1), ("seed", "s"), ("nnz", [25, 1]),
                         ("nnz", [3]), ("bits", True)):  # fmt: skip
        with pytest.raises(ConfigError, match=r"module 'm\.a'.*sparse band 0"):
            DeltaCoMeConfig(layout={"m.a": {"shape": [8, 8], "bands": [], "sparse_bands": [{**good, field: value}]}})
    with pytest.raises(ConfigError, match="total rank 9 exceeds"):
        DeltaCoMeConfig(layout={"m.a": {"shape": [8, 8], "bands": [[2, 6]], "sparse_bands": [good]}})


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def wide_pair():
    """One decoder layer 256 wide: large enough for 1/64 to leave the targets real bytes after the dense extras."""
    base = make_model("llama", hidden_size=256, intermediate_size=512, head_dim=64, num_hidden_layers=1)
    return base, make_finetune(base, seed=3, change_norms=False, change_biases=False)


def _compress(pair, **kw):
    base, ft = pair
    cfg = DeltaCoMeConfig(**{"method": "impart", **kw})
    return compress(copy.deepcopy(base), ft, cfg, calibration=random_ids(base, 8, 32, seed=1), progress=False)


@pytest.mark.parametrize("case", ["impart", "sparse-tail"])
def test_save_load_equal_logits_within_the_budget_and_info_shows_the_layout(wide_pair, case, tmp_path):
    base, ft = wide_pair
    model = _compress(wide_pair, ratio=1 / 16, **CONFIGS[case])
    ids = random_ids(base, 2, 16, seed=4)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)
    cfg = model.peft_config["default"]
    assert any(e.get("sparse_bands") for e in cfg.layout.values())
    unspent = cfg.compression_info["unspent"]  # what the modules left: the sparse bands planned again with it
    assert unspent["spent_on"].startswith("sparse bands") and unspent["unspent_bytes"] < unspent["unspent_before"]
    summary = summarize_adapter(tmp_path)
    assert summary.file_bytes <= int(cfg.ratio * summary.target_fp16_bytes)  # the whole file holds the ratio
    text = summary.format(per_module=True)
    band = next(b for e in cfg.layout.values() for b in e.get("sparse_bands", []) if b["rank"])
    assert f"{band['rank']}@{band['bits']}b keep {band['keep']:.2f}" in text and f"method {cfg.method}" in text


def test_error_falls_as_the_ratio_grows_and_beats_no_delta_at_one_64th(wide_pair):
    base, ft = wide_pair
    ids = random_ids(base, 4, 32, seed=4)
    errors = {}
    for ratio in (1 / 64, 1 / 16, 1 / 4):
        model = _compress(wide_pair, ratio=ratio)
        errors[ratio] = relative_logits_error(model, ft, base, ids)
        if ratio == 1 / 64:
            # measured 0.25 (a zero delta scores 1.0, a shuffled adapter of the same size 1.4)
            assert_beats_baselines(model, ft, base, ids, 0.4)
    assert errors[1 / 4] < errors[1 / 16] < errors[1 / 64], errors


def test_a_tampered_layout_is_refused_at_load(wide_pair, tmp_path):
    model = _compress(wide_pair, ratio=1 / 16, quantizer="rtn")
    model.save_pretrained(tmp_path)
    read_adapter(tmp_path)  # as saved: valid
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    name, entry = next((k, e) for k, e in cfg["layout"].items() if e.get("sparse_bands"))
    entry["sparse_bands"][0]["seed"] += 1  # same sizes, another mask: the stored count no longer matches
    path.write_text(json.dumps(cfg))
    base, _ = wide_pair
    with pytest.raises(AdapterFileError, match=rf"module '{name}', sparse band 0: the masks regenerated from seed"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    entry["sparse_bands"][0]["keep"] = 2
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"{name}.*sparse band 0"):
        read_adapter(tmp_path)


def test_cli_compresses_with_impart_and_a_sparse_tail_and_refuses_bad_keep_rates(tmp_path, capsys):
    from tiny_models import save_with_tokenizer

    from hf_deltacome.cli import main

    base = make_model("llama")
    ft = make_finetune(base, seed=2)
    save_with_tokenizer(tmp_path, base=base, ft=ft)
    out = tmp_path / "adapter"
    args = ["compress", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--output", str(out),
            "--quantizer", "rtn", "--ratio", "1/4", "--bands", "2:rest"]  # fmt: skip
    assert main([*args, "--method", "impart", "--sparse-tail", "0.4"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["method"] == "impart" and cfg["sparse_tail"] == 0.4
    capsys.readouterr()
    assert main(["info", str(out), "--modules"]) == 0
    shown = capsys.readouterr().out
    assert "method impart" in shown and " keep 0." in shown
    assert main([*args, "--overwrite", "--sparse-tail", "0.6"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["method"] == "deltacome"
    capsys.readouterr()
    assert main([*args, "--overwrite", "--sparse-tail", "1.5"]) == 2
    assert "sparse_tail must be null or a keep-rate in (0, 1), got 1.5" in capsys.readouterr().err


def test_a_streamed_run_plans_with_the_model_spectrum_and_loads_back(wide_pair, tmp_path):
    """Streamed, no delta is in memory at plan time: the keep-rates come from ``MODEL_DECAY``'s spectrum; the file
    still fits, loads through PEFT and carries the fine-tune."""
    from test_streaming import save_pair

    base, ft = wide_pair
    b, f = save_pair(tmp_path, base, ft, shard="2MB")
    cfg = DeltaCoMeConfig(method="impart", ratio=1 / 16, quantizer="rtn")
    model = compress(b, f, cfg, progress=False)
    assert model.peft_config["default"].compression_info["streamed"]
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    ids = random_ids(base, 2, 16, seed=4)
    assert relative_logits_error(loaded, ft, base, ids) < 0.4  # measured 0.19
    summary = summarize_adapter(tmp_path / "adapter")
    assert summary.file_bytes <= int(cfg.ratio * summary.target_fp16_bytes)


def test_sparse_bands_live_in_the_one_blob_and_merge_streamed_as_loaded(tmp_path, caplog):
    """Sparse bands are segments of their module's one ``blob`` (no module or tensor of their own, masks not
    stored); the streamed merge reads them from the file and writes what the loaded merge writes, bit for bit."""
    import logging

    from test_merge_stream import save_base, tensors

    from hf_deltacome.serving.merge import merge_adapter

    base = make_model("llama")
    cfg = DeltaCoMeConfig(method="impart", ratio=1 / 4, quantizer="rtn")
    model = compress(copy.deepcopy(base), make_finetune(base, seed=2), cfg, progress=False)
    deltas = [m for m in model.modules() if isinstance(m, PackedDelta)]
    assert any(d.sparse_bands for d in deltas)
    for d in deltas:
        assert list(d.state_dict()) == ["blob"] and not list(d.children()) and len(list(d.buffers())) == 1
    d = next(d for d in deltas if d.sparse_bands)
    keys = [key for key, *_ in d.segments()]
    assert {"sparse_bands.0.s", "sparse_bands.0.v.qweight", "sparse_bands.0.u.scales"} <= set(keys)
    assert not any("mask" in key for key in keys)
    band = d.sparse_bands[0]
    assert band.s.untyped_storage().data_ptr() == d.blob.untyped_storage().data_ptr()  # a view, made when read
    model.save_pretrained(tmp_path / "adapter")
    save_base(tmp_path / "base", base)
    with caplog.at_level(logging.INFO, logger="hf_deltacome"):
        streamed = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "streamed")
    assert "merging with the whole base in memory" not in caplog.text
    loaded = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "loaded", in_memory=True)
    got, want = tensors(streamed), tensors(loaded)
    assert list(got) and sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    layout = model.peft_config["default"].layout
    key = next(n for n, e in layout.items() if e.get("sparse_bands")) + ".weight"
    assert not torch.equal(got[key], base.state_dict()[key])  # the delta, sparse bands included, was merged


def test_hashed_sparse_bands_need_format_6_and_known_draws():
    """Sparse bands written since format 6 draw their masks by the hash the kernels replay; the validator names an
    entry that says an older format, an unknown draw and a seed whose ``U`` mask (``seed + 1``) would not fit 32 bits."""
    from hf_deltacome.format.layout_entry import check_layout_entry

    cfg = DeltaCoMeConfig(method="impart", ratio=1 / 4, group_size=32, min_rank_share=0.0)
    entry = plan_entry("layers.1.mlp", 96, 128, 1 / 4, cfg, spectrum=torch.linalg.svdvals(long_tail_delta(96, 128)))
    assert entry["format"] == 6 and {b["draws"] for b in entry["sparse_bands"]} == {"hash"}
    check_layout_entry("layers.1.mlp", entry, 32)
    with pytest.raises(ConfigError, match="module 'layers.1.mlp': sparse band 0 with hashed draws needs format 6, the "
                                          "entry says 5"):  # fmt: skip
        check_layout_entry("layers.1.mlp", {**entry, "format": 5}, 32)
    band = entry["sparse_bands"][0]
    for bad in ({**band, "draws": "philox"}, {**band, "seed": 2**32 - 1}):
        with pytest.raises(ConfigError, match=r"sparse band 0 must be .*optional 'draws': one of \('generator', 'hash'\)"):
            check_layout_entry("layers.1.mlp", {**entry, "sparse_bands": [bad, *entry["sparse_bands"][1:]]}, 32)
    older = {**entry, "format": 2, "sparse_bands": [{k: v for k, v in b.items() if k != "draws"}
                                                    for b in entry["sparse_bands"]]}  # fmt: skip
    check_layout_entry("layers.1.mlp", older, 32)  # the generator's draws: any format that has sparse bands
