"""``residual="auto"``: the default weighs a low-bit DARE of the bands' residual against the bands alone, by the whole
model's next-token KL to the fine-tune, and keeps what brings the model closest."""

import copy

import pytest
import torch
from tiny_models import make_finetune, make_model, random_ids, relative_logits_error, target_linears

from hf_deltacome import ConfigError, DeltaCoMeConfig
from hf_deltacome.compression.baselines import mask_seed
from hf_deltacome.compression.modules import entry_nbytes, plan_entry, rtn_bands_dense
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.compression.plan import plan_layouts
from hf_deltacome.config import RESIDUAL_ALONE_MARGIN, RESIDUAL_MARGIN, RESIDUAL_SHARES
from hf_deltacome.format.budget import budget_bytes
from hf_deltacome.hub import render_model_card
from hf_deltacome.io.summary import summarize_adapter
from hf_deltacome.serving import export_lora

pytestmark = pytest.mark.usefixtures("one_thread")
DRAWS = 3  # mask_draws asked for (the default, 1, weighs no other draw)


@pytest.fixture(scope="module")
def pairs():
    """A delta carried by a few strong directions and one spread evenly over many (as a knowledge fine-tune's)."""
    base = make_model("llama", hidden_size=128, intermediate_size=352, head_dim=32)
    return base, {"peaked": make_finetune(base, rank=4), "flat": make_finetune(base, rank=0, decay=0.05)}


def test_the_residual_follows_the_delta_and_lowers_the_error(pairs, tmp_path):
    """At 1/8 the spread delta gets DARE (the bands' rank runs out), the peaked one keeps its bands; a residual is
    chosen by the least calibration KL and must beat the bands as GPTQ stores them, stays in the budget, is better
    than the bands alone on held-out text (0.54 against 0.73 of the fine-tune's effect missed), and loads back to the same logits."""
    from peft import PeftModel

    base, fts = pairs
    calib, held_out = random_ids(base, 16, 64, seed=1), random_ids(base, 8, 64, seed=2)
    chosen = {}
    for label, ft in fts.items():
        config = DeltaCoMeConfig(ratio=1 / 8, mask_draws=DRAWS, dare_modules=None)  # every module as bands
        auto = compress(copy.deepcopy(base), ft, config, calibration=calib,
                        progress=False)  # fmt: skip
        cfg = auto.peft_config["default"]
        info = cfg.compression_info["residual"]
        chosen[label] = info["chosen"]
        assert set(info["kl"]) == {"none", *map(str, RESIDUAL_SHARES)}
        best = min(v for k, v in info["kl"].items() if k != "none")
        # a residual that beats the rounded bands is weighed against the bands as GPTQ stores them (the Hessians of
        # a tiny model fit); against DARE alone the bands need its margin
        assert ("bands_as_stored" in info) == (best < info["kl"]["none"]) and "margin" not in info
        if info["chosen"] == "none":
            assert best >= info["kl"]["none"] or info["bands_as_stored"] < best
        else:  # the least KL of the residuals (or DARE alone, within its margin)
            kl = info["kl"][str(info["chosen"])]
            assert kl == best or kl <= best / RESIDUAL_ALONE_MARGIN and info["chosen"] == 0.0
            assert (RESIDUAL_ALONE_MARGIN if info["chosen"] == 0.0 else 1.0) * kl <= info["bands_as_stored"]
        assert sum(map(entry_nbytes, cfg.layout.values())) <= sum(budget_bytes(*e["shape"], 1 / 8) for e in cfg.layout.values())
        for name, entry in cfg.layout.items():
            assert bool(entry.get("sparse")) == (info["chosen"] != "none"), name
        if info["chosen"] != "none":  # the kept residual's masks: the draw of least KL, its seeds in the layout
            draws = info["draws"]
            assert list(draws["kl"]) == [str(k) for k in range(DRAWS)]
            assert draws["kl"]["0"] == info["kl"][str(info["chosen"])]
            assert draws["chosen"] == min(range(DRAWS), key=lambda k: (draws["kl"][str(k)], k))
            seeds = {nm: e["sparse"]["seed"] for nm, e in cfg.layout.items() if e.get("sparse")}
            assert seeds and all(seed == mask_seed(nm, draws["chosen"]) for nm, seed in seeds.items())
        else:
            assert "draws" not in info
        config = DeltaCoMeConfig(ratio=1 / 8, residual="none", dare_modules=None)
        bands = compress(copy.deepcopy(base), ft, config, calibration=calib,
                         progress=False)  # fmt: skip
        assert "residual" not in bands.peft_config["default"].compression_info
        assert all("sparse" not in e for e in bands.peft_config["default"].layout.values())
        err_auto = relative_logits_error(auto, ft, base, held_out)
        err_bands = relative_logits_error(bands, ft, base, held_out)
        assert err_auto == err_bands if info["chosen"] == "none" else err_auto < 0.85 * err_bands, label
        if info["chosen"] != "none":
            auto.save_pretrained(tmp_path / label)
            text = summarize_adapter(tmp_path / label).format()
            assert f"3-bit bands with {info['chosen']} of each budget, 2-bit DARE of their residual" in text
            assert f"DARE masks: draw {info['draws']['chosen']} of {DRAWS}, by KL: 0: " in text
            # the DARE part is full rank: the LoRA export takes the SVD of its dense delta, exact at min(out, in)
            exported = export_lora(tmp_path / label, tmp_path / f"{label}-lora", dtype="float32")
            assert exported.weight_error < 1e-6
            card = render_model_card(cfg)  # the model card says what the file holds
            assert "| bits per band | 3 (one band), then a 2-bit DARE residual |" in card
            assert f"| residual | {info['chosen']} of each module's budget in bands" in card
            loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / label)
            with torch.no_grad():
                assert torch.equal(loaded(held_out).logits, auto(held_out).logits)
    assert chosen["peaked"] == "none" and chosen["flat"] != "none"


def test_no_data_or_another_plan_means_no_residual(pairs):
    """Without calibration data, with a search, an adaptive allocation or a sparse tail, the bands stay alone."""
    base, fts = pairs
    names = target_linears(base)
    calib = random_ids(base, 8, 32, seed=1)
    for cfg, ids in (
        (DeltaCoMeConfig(ratio=1 / 8), None),
        (DeltaCoMeConfig(ratio=1 / 8, quantizer="rtn", search="greedy"), calib),
        (DeltaCoMeConfig(ratio=1 / 8, sparse_tail=0.5), calib),
        (DeltaCoMeConfig(ratio=1 / 8, residual="none"), calib),
    ):
        layout, info = plan_layouts(base, fts["flat"], names, cfg, calibration_ids=ids)
        assert "residual" not in info and all("sparse" not in e for e in layout.values())


@pytest.mark.parametrize(
    ("kls", "chosen"),
    [
        ({"none": 1.31, 0.0: 0.437, 0.25: 0.399, 0.5: 0.506}, 0.0),  # bands at 0.91x of DARE alone: not a win
        ({"none": 0.86, 0.0: 0.201, 0.25: 0.152, 0.5: 0.175}, 0.25),  # 0.75x: the bands pay
        ({"none": 0.86, 0.0: 0.201, 0.25: 0.157, 0.5: 0.175}, 0.0),  # 0.78x: not enough (facts 1/128)
        ({"none": 2.0, 0.0: 0.85, 0.25: 0.95, 0.5: 1.16}, 0.0),  # DARE alone is the least anyway
        ({"none": 0.016, 0.0: 0.071, 0.25: 0.0093, 0.5: 0.0081}, "none"),  # no residual reaches half the bands' KL
    ],
)
def test_dare_alone_unless_the_bands_cut_its_kl_by_a_margin(monkeypatch, kls, chosen):
    from hf_deltacome.compression import plan
    from hf_deltacome.io.summary import _plan_text

    monkeypatch.setattr(plan, "_kls", lambda *args, **kwargs: dict(kls))
    config, info = DeltaCoMeConfig(ratio=1 / 64, mask_draws=1), {}
    planned = plan._choose_residual(None, config, [], {}, info)
    assert info["residual"]["chosen"] == chosen and info["residual"]["alone_margin"] == RESIDUAL_ALONE_MARGIN
    if chosen == "none":
        assert planned is config
    else:
        assert planned.method == "deltacome-dare" and planned.band_share == chosen
    text = "\n".join(_plan_text({"residual": info["residual"]}))
    assert ("DARE alone: bands did not bring its KL under" in text) == (chosen == 0.0 and kls[0.25] < kls[0.0])


class _Stored:
    """Stands in for plan._StoredBands: the bands' KL as stored (``None``: the Hessians would not fit)."""

    def __init__(self, kl):
        self.value, self.calls, self.why_not = kl, 0, "" if kl is not None else "too large"

    def kl(self, config):
        self.calls += 1
        return self.value


@pytest.mark.parametrize(
    ("kls", "stored_kl", "chosen", "asked"),
    [
        # facts-hot 1/32: the residual beats the rounded bands (0.48) but not the bands as GPTQ stores them (0.106)
        ({"none": 0.484, 0.0: 0.236, 0.25: 0.167, 0.5: 0.145}, 0.106, "none", True),
        # facts-hot 1/64: DARE alone (the bands in the residual within its margin); the stored bands at 0.98x of its
        # KL are no win either (they keep 23 fewer of 240 held-out questions)
        ({"none": 1.314, 0.0: 0.437, 0.25: 0.399, 0.5: 0.506}, 0.429, 0.0, True),
        # a residual that the stored bands do not approach
        ({"none": 1.23, 0.0: 0.437, 0.25: 0.30, 0.5: 0.506}, 0.412, 0.25, True),
        # no residual beats the rounded bands: nothing to weigh again
        ({"none": 0.016, 0.0: 0.071, 0.25: 0.02, 0.5: 0.018}, 0.001, "none", False),
        # no Hessians (too large a model): the margin over the rounded bands decides
        ({"none": 0.484, 0.0: 0.236, 0.25: 0.167, 0.5: 0.145}, None, 0.5, True),
    ],
)
def test_a_residual_must_beat_the_bands_as_stored(monkeypatch, kls, stored_kl, chosen, asked):
    from hf_deltacome.compression import plan
    from hf_deltacome.io.summary import _plan_text

    monkeypatch.setattr(plan, "_kls", lambda *args, **kwargs: dict(kls))
    config, info, stored = DeltaCoMeConfig(ratio=1 / 32, mask_draws=1), {}, _Stored(stored_kl)
    planned = plan._choose_residual(None, config, [], {}, info, stored=stored)
    assert info["residual"]["chosen"] == chosen and stored.calls == int(asked)
    assert (planned is config) == (chosen == "none")
    text = "\n".join(_plan_text({"residual": info["residual"]}))
    assert ("the bands alone as GPTQ stores them" in text) == (asked and stored_kl is not None)
    assert (f"must reach {RESIDUAL_MARGIN}x of the bands' (too large)" in text) == (stored_kl is None)


def test_a_bad_residual_names_the_field():
    with pytest.raises(ConfigError, match=r"residual must be one of \('auto', 'none'\), got 'dare'"):
        DeltaCoMeConfig(residual="dare")
    with pytest.raises(ConfigError, match=r"mask_draws must be an integer >= 1, got 0"):
        DeltaCoMeConfig(mask_draws=0)
    with pytest.raises(ConfigError, match=r"mask_draw must be an integer >= 0, got -1"):
        DeltaCoMeConfig(mask_draw=-1)


@pytest.mark.parametrize(("first", "draws", "kls", "chosen"),
                         [(0, 4, {1: 0.428, 2: 0.323, 3: 0.528}, 2),  # facts-hot 1/32, dare-2's draws
                          (0, 4, {1: 0.5, 2: 0.5, 3: 0.5}, 0),  # ties: the first draw
                          (5, 2, {6: 0.2}, 6),  # from the configured draw onwards
                          (0, 1, {}, 0)])  # fmt: skip
def test_the_kept_residual_gets_the_draw_of_least_kl(monkeypatch, first, draws, kls, chosen):
    """``_choose_draw`` weighs ``mask_draws`` draws of the kept layout's masks, ``mask_draw`` onwards, keeps the least
    KL and records every draw's; the residual's layout is otherwise unchanged."""
    from hf_deltacome.compression import plan
    from hf_deltacome.compression.modules import with_changes

    asked = []

    def fake_kls(check, candidates, *args, **kwargs):
        asked.append(sorted(candidates))
        assert all(cfg.mask_draw == k for k, cfg in candidates.items())
        return {k: kls[k] for k in candidates}

    monkeypatch.setattr(plan, "_kls", fake_kls)
    config = with_changes(DeltaCoMeConfig(ratio=1 / 32, mask_draw=first, mask_draws=draws), method="deltacome-dare",
                          bands=[[3, None]], band_share=0.25, uniform_bits=2)  # fmt: skip
    record = {}
    planned = plan._choose_draw(None, config, 0.366, [], {}, record)
    assert planned.mask_draw == chosen and planned.band_share == 0.25 and planned.method == "deltacome-dare"
    assert asked == ([] if draws == 1 else [list(range(first + 1, first + draws))])
    if draws > 1:
        assert record["draws"] == {"chosen": chosen, "kl": {str(first): 0.366, **{str(k): v for k, v in kls.items()}}}
    else:
        assert planned is config and not record


def test_mask_seeds_of_draw_0_are_those_files_already_store():
    """Draw 0 derives a module's seed from its name alone, as every file written before ``mask_draw`` did; other draws
    from ``name#k``, a different mask."""
    import zlib

    from hf_deltacome.compression.baselines import dare_plan
    from hf_deltacome.compression.impart import module_seed

    name = "model.layers.3.mlp.down_proj"
    assert mask_seed(name) == zlib.crc32(name.encode()) & 0x7FFFFFFF == dare_plan(name, 64, 96, 1 / 16, 2, 32)["seed"]
    assert module_seed(name) == zlib.crc32(name.encode()) & 0x3FFFFFFF
    assert mask_seed(name, 2) == zlib.crc32(f"{name}#2".encode()) & 0x7FFFFFFF != mask_seed(name)
    assert dare_plan(name, 64, 96, 1 / 16, 2, 32, draw=2)["seed"] == mask_seed(name, 2)


def test_rtn_dense_of_a_hybrid_entry_is_what_the_factors_store():
    """The check's approximation of a bands + DARE entry equals the factors compress_module stores (rtn)."""
    from hf_deltacome.compression.modules import compress_module, with_changes

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(96, 160, generator=g) @ torch.diag(torch.linspace(1, 0.01, 160))
    cfg = with_changes(DeltaCoMeConfig(ratio=1 / 8, quantizer="rtn", group_size=32), method="deltacome-dare",
                       bands=[[3, None]], band_share=0.5, uniform_bits=2)  # fmt: skip
    entry = plan_entry("layers.0.mlp.up_proj", 96, 160, 1 / 8, cfg)
    assert entry["bands"][0][1] > 0 and entry["sparse"]["nnz"] > 0
    stored = compress_module(delta, None, entry, cfg).dense(96, 160, entry["sparse"])
    torch.testing.assert_close(rtn_bands_dense(delta, entry), stored, rtol=1e-5, atol=1e-6)


def test_the_bands_as_stored_are_rated_near_what_compress_stores(pairs):
    """``_StoredBands`` rates the bands alone close to the KL of the adapter ``compress`` writes with them (within 8%
    here; its GPTQ is fitted on the 32 sequences the check does not score, the adapter's on all 40), and below the
    check's round-to-nearest rating. (With 8 sequences of 64 tokens to fit on it rates them 1.6x too high.)"""
    from hf_deltacome.compression import plan
    from hf_deltacome.compression.endtoend import EndToEndCheck, mean_next_token_kl
    from hf_deltacome.compression.modules import with_changes

    base, fts = pairs
    ft = fts["flat"]
    names = target_linears(base)
    calib = random_ids(base, 40, 64, seed=1)
    config = with_changes(DeltaCoMeConfig(ratio=1 / 32, residual="none", dare_modules=None), min_rank_share=1.0)
    shapes = {nm: tuple(base.get_submodule(nm).weight.shape) for nm in names}
    weights = {nm: base.get_submodule(nm).weight.detach() for nm in names}

    def delta_of(name):  # the check edits the fine-tune's weights in place: read its own through it
        return check.original(name).detach().float() - weights[name].float()

    with EndToEndCheck(ft, calib, delta_of, rtn_bands_dense, input_energy=True) as check:
        check.apply({nm: plan_entry(nm, *shapes[nm], 1 / 32, config) for nm in names})
        rounded = check.kl()
        stored = plan._StoredBands(check, ft, names, shapes, calib, progress=False).kl(config)
        reference, batches = check.reference, check.batches
    adapter = compress(copy.deepcopy(base), ft, config, calibration=calib, progress=False)
    written = mean_next_token_kl(reference, adapter, batches)
    assert stored < rounded and 0.8 * written < stored < 1.25 * written, (rounded, stored, written)


def test_cli_mask_draws_and_dare_modules_reach_the_config_and_a_bad_count_is_refused(tmp_path, capsys):
    import json

    from tiny_models import save_with_tokenizer

    from hf_deltacome.cli import main

    base = make_model("llama")
    save_with_tokenizer(tmp_path, base=base, ft=make_finetune(base, seed=3))
    out = tmp_path / "adapter"
    args = ["compress", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--output", str(out),
            "--quantizer", "rtn", "--ratio", "1/8"]  # fmt: skip
    assert main([*args, "--mask-draws", "2"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["mask_draws"] == 2
    assert main([*args, "--overwrite", "--dare-modules", "up_proj, down_proj"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["dare_modules"] == ["down_proj", "up_proj"] and saved["full_rank"] == "dare"
    assert all(bool(e.get("sparse")) == name.endswith(("up_proj", "down_proj")) for name, e in saved["layout"].items())
    assert main([*args, "--overwrite", "--dare-modules", "up_proj, down_proj", "--full-rank", "vq"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert all(bool(e.get("vq")) == name.endswith(("up_proj", "down_proj")) for name, e in saved["layout"].items())
    assert main([*args, "--overwrite", "--dare-modules", "mlp"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["dare_modules"] == ["down_proj", "gate_proj", "up_proj"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--overwrite", "--mask-draws", "0"])
    assert exit_info.value.code == 2
    assert "--mask-draws: expected an integer >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--overwrite", "--full-rank", "svd"])
    assert exit_info.value.code == 2
    assert "argument --full-rank: invalid choice: 'svd'" in capsys.readouterr().err


def test_dare_modules_store_those_modules_as_dare_alone_and_load_back(tmp_path):
    """``dare_modules`` with ``full_rank="dare"``: the named leaves store DARE alone (2-bit values, uniform rates) in
    their own budget, the others the chosen bands; the file fits the budget and loads to the logits it had; a leaf no
    target has fails."""
    from peft import PeftModel

    base = make_model("llama")
    ft = make_finetune(base)
    calib, x = random_ids(base, 16, 64, seed=1), random_ids(base, 2, 16, seed=3)
    mlp = ["down_proj", "gate_proj", "up_proj"]
    model = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=1 / 8, dare_modules=mlp, full_rank="dare"),
                     calibration=calib, progress=False)  # fmt: skip
    cfg = model.peft_config["default"]
    assert cfg.dare_modules == mlp and "residual" not in cfg.compression_info  # the DARE part is there already
    for name, entry in cfg.layout.items():
        if name.rsplit(".", 1)[-1] in mlp:
            assert not any(r for _, r in entry["bands"]) and entry["sparse"]["bits"] == 2, name
            assert not entry["sparse"].get("rates"), name  # importance rates only where asked (test below)
        else:
            assert any(r for _, r in entry["bands"]) and not entry.get("sparse"), name
    assert sum(map(entry_nbytes, cfg.layout.values())) <= sum(budget_bytes(*e["shape"], 1 / 8) for e in cfg.layout.values())
    with torch.no_grad():
        before = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].dare_modules == mlp
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, before)
    by_kind = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=1 / 8, dare_modules="mlp", full_rank="dare"),
                       calibration=calib, progress=False)  # fmt: skip
    assert by_kind.peft_config["default"].dare_modules == mlp and by_kind.peft_config["default"].layout == cfg.layout
    with pytest.raises(ConfigError, match=r"dare_modules \['down_prj'\] name no target module"):
        compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=1 / 8, dare_modules=["down_prj"]), progress=False)
    with pytest.raises(ConfigError, match="dare_modules must be 'auto', 'mlp', null or a list"):
        DeltaCoMeConfig(dare_modules="down_proj")
    with pytest.raises(ConfigError, match=r"dare_modules='mlp': no target of 'tiny-random-llama' is in a decoder "):
        compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=1 / 8, dare_modules="mlp", target_modules=["q_proj"]),
                 progress=False)  # fmt: skip


def test_the_default_stores_the_mlp_as_dare_and_none_turns_it_off(tmp_path):
    """``dare_modules="auto"`` (the default): ``deltacome`` with GPTQ stores the feed-forward targets as DARE alone
    (as vector codes with ``full_rank="vq"``),
    and from 1/64 down the attention's output projections too, the same bytes as naming them (the variants measured
    in benchmarks/RESULTS.md, residual "none"), and weighs no residual; ``None`` / ``[]`` / ``--dare-modules none``
    store every target as bands; the baselines and RTN store none; targets without a feed-forward one keep the bands
    where ``"mlp"`` would fail."""
    import hashlib
    import json

    from tiny_models import save_with_tokenizer

    from hf_deltacome.cli import main
    from hf_deltacome.compression.inputs import _resolve_dare_modules

    base = make_model("llama")
    ft = make_finetune(base)
    calib = random_ids(base, 16, 64, seed=1)
    mlp = ["down_proj", "gate_proj", "up_proj"]

    def written(config: DeltaCoMeConfig, folder: str) -> tuple[DeltaCoMeConfig, str]:
        model = compress(copy.deepcopy(base), ft, config, calibration=calib, progress=False)
        model.save_pretrained(tmp_path / folder)
        return model.peft_config["default"], hashlib.sha256((tmp_path / folder / "adapter_model.safetensors")
                                                            .read_bytes()).hexdigest()  # fmt: skip

    assert DeltaCoMeConfig().dare_modules == "auto" and DeltaCoMeConfig(dare_modules=[]).dare_modules is None
    default, default_sha = written(DeltaCoMeConfig(ratio=1 / 8), "default")
    assert default.dare_modules == mlp and "residual" not in default.compression_info
    assert {n.rsplit(".", 1)[-1] for n, e in default.layout.items() if e.get("sparse")} == set(mlp)
    card = render_model_card(default)  # the model card says which modules hold DARE
    assert "| stored as DARE alone | `down_proj`, `gate_proj`, `up_proj` (a seeded random share" in card
    assert "entries, uniform rates; no singular vectors" in card
    assert "singular vectors and DARE (see the table) in" in card
    as_vq, _ = written(DeltaCoMeConfig(ratio=1 / 8, full_rank="vq"), "as-vq")  # the same modules as vector codes
    assert {n.rsplit(".", 1)[-1] for n, e in as_vq.layout.items() if e.get("vq")} == set(mlp)
    assert not any(e.get("sparse") for e in as_vq.layout.values())
    card = render_model_card(as_vq)
    assert "| stored whole as vector codes | `down_proj`, `gate_proj`, `up_proj` (4-bit codes of short" in card
    assert "singular vectors and vector codes (see the table) in" in card
    named, named_sha = written(DeltaCoMeConfig(ratio=1 / 8, dare_modules=mlp, residual="none"), "named")
    assert named.layout == default.layout and named_sha == default_sha
    bands, _ = written(DeltaCoMeConfig(ratio=1 / 8, dare_modules=None), "bands")
    assert bands.dare_modules is None and bands.compression_info["residual"]["chosen"]
    assert all(any(r for _, r in e["bands"]) for e in bands.layout.values())
    uniform, _ = written(DeltaCoMeConfig(ratio=1 / 8, method="svd-uniform"), "uniform")
    assert uniform.dare_modules is None and not any(e.get("sparse") for e in uniform.layout.values())
    attention = DeltaCoMeConfig()
    _resolve_dare_modules(attention, base, [n for n in target_linears(base) if n.endswith(("q_proj", "v_proj"))])
    assert attention.dare_modules is None  # where dare_modules="mlp" raises (test above)
    for ratio, leaves in (("1/2", None), ("1/4", None), ("1/7", None), ("1/8", mlp), ("1/32", mlp),
                          ("1/64", sorted([*mlp, "o_proj"])), ("1/128", sorted([*mlp, "o_proj"]))):  # fmt: skip
        cfg = DeltaCoMeConfig(ratio=ratio)  # from 1/64 down the attention's output projections are DARE too; above
        # 1/8 nothing (2-bit DARE could not spend the budget)
        _resolve_dare_modules(cfg, base, target_linears(base))
        assert cfg.dare_modules == leaves, (ratio, cfg.dare_modules)
    wide = make_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=8, head_dim=32)
    wide_ft = make_finetune(wide, change_norms=False)  # 1/64 of the tiny model's delta is less than a file's header
    for folder, config in (("default-1-64", DeltaCoMeConfig(ratio=1 / 64)),  # quality.py's deltacome-mlp-o-dare:
                           ("named-1-64", DeltaCoMeConfig(ratio=1 / 64, dare_modules=[*mlp, "o_proj"], residual="none"))):
        model = compress(copy.deepcopy(wide), wide_ft, config, calibration=random_ids(wide, 16, 64, seed=1),
                         progress=False)  # fmt: skip
        model.save_pretrained(tmp_path / folder)
    low = DeltaCoMeConfig.from_pretrained(tmp_path / "default-1-64")
    assert {n.rsplit(".", 1)[-1] for n, e in low.layout.items() if e.get("sparse")} == {*mlp, "o_proj"}
    assert "`down_proj`, `gate_proj`, `o_proj`, `up_proj` (a seeded random share" in render_model_card(low)
    assert DeltaCoMeConfig.from_pretrained(tmp_path / "named-1-64").layout == low.layout
    assert ((tmp_path / "named-1-64" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "default-1-64" / "adapter_model.safetensors").read_bytes())
    mlp_low = DeltaCoMeConfig(ratio=1 / 64, dare_modules="mlp")  # "mlp" stays the feed-forward block at any ratio
    _resolve_dare_modules(mlp_low, base, target_linears(base))
    assert mlp_low.dare_modules == mlp
    rtn, _ = written(DeltaCoMeConfig(ratio=1 / 8, quantizer="rtn"), "rtn")  # data-free: nothing to distil with
    assert rtn.dare_modules is None
    rated_mlp, _ = written(DeltaCoMeConfig(ratio=1 / 8, dare_rates="importance"), "rated-mlp")  # dare_rates applies
    parts = [e["sparse"] for e in rated_mlp.layout.values() if e.get("sparse")]
    assert len(parts) == 3 * 2 and all(p["rates"] == "importance" for p in parts) and not any(p.get("rates") for p in (
        e["sparse"] for e in default.layout.values() if e.get("sparse")))  # uniform rates unless asked: fmt: skip
    assert "entries, importance rates; no singular vectors" in render_model_card(rated_mlp)
    rated_mlp.dare_rates = None  # as an adapter written before 679f507 says it: the card reads its layout
    assert "entries, importance rates; no singular vectors" in render_model_card(rated_mlp)

    save_with_tokenizer(tmp_path, base=base, ft=ft)
    out = tmp_path / "cli"
    args = ["compress", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--output", str(out),
            "--ratio", "1/8", "--num-samples", "2", "--seq-len", "16", "--dare-modules"]  # fmt: skip
    assert main([*args, "none"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["dare_modules"] is None and not any(e.get("sparse") for e in saved["layout"].values())
    assert main([*args, "auto", "--overwrite"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["dare_modules"] == mlp


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "opt"])
def test_dare_modules_mlp_finds_the_feed_forward_targets_by_structure(arch):
    """``dare_modules="mlp"`` means the feed-forward block's targets whatever their leaf names (OPT's ``fc1`` and
    ``fc2`` sit beside its attention, not in an ``mlp`` module) and never an attention projection; the attention's
    output projection is found inside the attention module by its leaf name."""
    from hf_deltacome.compression.targets import attention_output_targets, mlp_targets, select_targets

    if arch == "opt":
        from transformers import OPTConfig, OPTForCausalLM

        model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32))  # fmt: skip
        expected = {"fc1", "fc2"}
    else:
        model, expected = make_model(arch), {"gate_proj", "up_proj", "down_proj"}
    _, targets = select_targets(model, DeltaCoMeConfig())
    mlp = mlp_targets(model, targets)
    assert {nm.rsplit(".", 1)[-1] for nm in mlp} == expected
    assert len(mlp) == 2 * len(expected) and all(nm in targets for nm in mlp)
    out = attention_output_targets(model, targets)  # what dare_modules="auto" adds from 1/64 down
    assert {nm.rsplit(".", 1)[-1] for nm in out} == {"out_proj" if arch == "opt" else "o_proj"} and len(out) == 2


def test_dare_modules_name_a_group_by_the_shortest_suffix_that_names_nothing_else():
    """A leaf name that also names a target outside the group is lengthened to a dotted suffix that does not (as
    PEFT's ``target_modules`` lists match): an ``o_proj`` outside the decoder layers, a feed-forward leaf also used in
    the attention, GPT-2's ``c_proj`` in both the attention and the MLP. ``"mlp"`` on a model without feed-forward
    targets says so."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_deltacome.compression.inputs import _resolve_dare_modules
    from hf_deltacome.compression.targets import select_targets

    base = make_model("llama")
    targets = target_linears(base)
    cfg = DeltaCoMeConfig(ratio=1 / 64)
    _resolve_dare_modules(cfg, base, [*targets, "model.o_proj"])  # an o_proj outside the decoder layers
    assert cfg.dare_modules == ["down_proj", "gate_proj", "self_attn.o_proj", "up_proj"]
    assert not cfg.stores_whole("model.o_proj") and cfg.stores_whole("model.layers.1.self_attn.o_proj")
    cfg = DeltaCoMeConfig(ratio=1 / 64)
    _resolve_dare_modules(cfg, base, [*targets, "model.layers.0.self_attn.down_proj"])  # a feed-forward leaf name
    assert cfg.dare_modules == ["gate_proj", "mlp.down_proj", "o_proj", "up_proj"]
    assert not cfg.stores_whole("model.layers.0.self_attn.down_proj")
    attention = [t for t in targets if ".self_attn." in t]
    with pytest.raises(ConfigError, match=r"dare_modules='mlp': no target of 'tiny-random-llama' is in a decoder "
                                          r"layer's feed-forward block"):  # fmt: skip
        _resolve_dare_modules(DeltaCoMeConfig(dare_modules="mlp"), base, attention)
    with pytest.raises(ConfigError, match=r"dare_modules \['mlp.q_proj'\] name no target module"):
        _resolve_dare_modules(DeltaCoMeConfig(dare_modules=["mlp.q_proj", "up_proj"]), base, targets)

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    _, targets = select_targets(gpt2, DeltaCoMeConfig())
    for ratio, want in ((1 / 16, ["c_fc", "mlp.c_proj"]), (1 / 64, ["attn.c_proj", "c_fc", "mlp.c_proj"])):
        cfg = DeltaCoMeConfig(ratio=ratio)
        _resolve_dare_modules(cfg, gpt2, targets)
        assert cfg.dare_modules == want
        assert [t for t in targets if cfg.stores_whole(t)] == [t for t in targets if not t.endswith("c_attn")
                                                               and (ratio < 1 / 32 or ".mlp." in t)]  # fmt: skip
