"""Scale distillation of the bands (``distill_bands``): only stored float scales move, the KL to the fine-tune falls,
the file keeps its bytes and loads back to the same logits, bad settings are refused naming them."""

import copy

import pytest
import torch
from peft import PeftModel
from tiny_models import make_finetune, make_model, random_ids

from hf_deltacome import CalibrationError, ConfigError, DeltaCoMeConfig
from hf_deltacome.compression import distill
from hf_deltacome.compression.distill import distill_scales, distills_bands
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.io.summary import summarize_adapter
from hf_deltacome.layer import DeltaCoMeLayer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _distil_any_kl(monkeypatch):
    """The tiny pair's KL is far under the real-model threshold below which the bands are not distilled."""
    monkeypatch.setattr(distill, "MIN_KL", 0.0)


@pytest.fixture(scope="module")
def pair():
    base = make_model("llama")
    return base, make_finetune(base, seed=3, scale=1.0)  # a delta large enough to leave error at 1/32


def _compress(pair, calib, **kw):
    base, ft = pair
    kw = {"dare_modules": None, **kw}
    cfg = DeltaCoMeConfig(group_size=32, ratio=1 / 32, residual="none", min_rank_share=0.0, **kw)
    return compress(copy.deepcopy(base), ft, cfg, calibration=calib, progress=False)


def _kl(model, ft, ids) -> float:
    with torch.no_grad():
        p = torch.log_softmax(ft(input_ids=ids).logits.float(), -1)
        q = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum") / ids.numel())


def _moved_parts(plain, distilled) -> set[str]:
    """Keys of the blob parts whose bytes differ between two compressions of one pair with one layout."""
    moved = set()
    for name, mod in distilled.named_modules():
        if isinstance(mod, DeltaCoMeLayer):
            new, old = mod.deltacome_delta["default"], plain.get_submodule(name).deltacome_delta["default"]
            assert old._segs.nbytes == new._segs.nbytes, name
            for seg in new._segs.order:
                if not torch.equal(new.part(seg.key), old.part(seg.key)):
                    moved.add(seg.key)
    return moved


def test_distilled_bands_move_only_scales_lower_the_kl_and_load_back(pair, tmp_path):
    base, ft = pair
    calib = random_ids(base, 8, 32, seed=9)
    plain = _compress(pair, calib, distill_bands=False, distill_steps=20)
    distilled = _compress(pair, calib, distill_steps=20)  # the default method distils its bands
    info = distilled.peft_config["default"].compression_info["distill"]
    assert "distill" not in plain.peft_config["default"].compression_info
    bands = [b for m in distilled.modules() if isinstance(m, DeltaCoMeLayer) for b in m.deltacome_delta["default"].bands]
    assert info["steps"] == 20 and info["scales"] == sum(b.rank + b.v.scales.numel() + b.u.scales.numel() for b in bands)
    # the codes, zeros and every other byte stay; the singular values and group scales moved
    moved = _moved_parts(plain, distilled)
    assert moved and all(k.endswith((".s", ".scales")) for k in moved), moved
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in moved} >= {"0.s", "v.scales", "u.scales"}
    # closer to the fine-tune on the calibration text (held-out text: benchmarks/RESULTS.md; this pair's random
    # tokens share no structure for a few hundred scales to learn)
    assert _kl(distilled, ft, calib) < 0.9 * _kl(plain, ft, calib)
    assert info["check_kl"]["kept"] and info["check_kl"]["after"] < info["check_kl"]["before"]
    # same bytes on disk; the loaded adapter computes what was saved; `deltacome info` says what was done
    plain.save_pretrained(tmp_path / "plain")
    distilled.save_pretrained(tmp_path / "distilled")
    text = summarize_adapter(tmp_path / "distilled").format()
    assert "scale distillation: 20 steps over" in text and ", kept" in text
    size = [(tmp_path / d / "adapter_model.safetensors").stat().st_size for d in ("plain", "distilled")]
    assert size[0] == size[1]
    ids = random_ids(base, 2, 16, seed=5)
    with torch.no_grad():
        want = distilled(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "distilled").eval()
        assert torch.equal(loaded(input_ids=ids).logits, want)


def test_scales_that_raise_the_kl_are_not_kept(pair):
    """Distillation that makes the calibration KL worse (here: a step size far too large) leaves the bytes as
    compressed; the check is recorded."""
    base, ft = pair
    calib = random_ids(base, 8, 32, seed=9)
    plain = _compress(pair, calib, distill_bands=False)
    before = {n: m.deltacome_delta["default"].blob.clone() for n, m in plain.named_modules() if isinstance(m, DeltaCoMeLayer)}
    info = distill_scales(plain, ft, calib, bands=True, steps=5, lr=3.0, batch_size=1, seq_len=32)
    assert info["check_kl"]["after"] > info["check_kl"]["before"] and info["check_kl"]["kept"] is False
    for name, blob in before.items():
        assert torch.equal(plain.get_submodule(name).deltacome_delta["default"].blob, blob), name
    good = distill_scales(plain, ft, calib, bands=True, steps=20, batch_size=1, seq_len=32)
    assert good["check_kl"]["kept"] and good["check_kl"]["after"] < good["check_kl"]["before"]
    # bands already that close to the fine-tune are not tried at all
    moved = {n: m.deltacome_delta["default"].blob.clone() for n, m in plain.named_modules() if isinstance(m, DeltaCoMeLayer)}
    info = distill_scales(plain, ft, calib, bands=True, steps=20, batch_size=1, seq_len=32, min_kl=1.0)
    assert info["steps"] == 0 and info["check_kl"]["kept"] is False and "under 1.0" in info["check_kl"]["skipped"]
    assert "after" not in info["check_kl"]
    for name, blob in moved.items():
        assert torch.equal(plain.get_submodule(name).deltacome_delta["default"].blob, blob), name


def test_info_says_when_distillation_was_not_tried():
    from hf_deltacome.io.summary import _plan_lines

    record = {"steps": 0, "scales": 5, "check_kl": {"before": 0.012, "kept": False, "skipped": "under 0.03: kept"}}
    text = "\n".join(_plan_lines({"distill": record}))
    assert "scale distillation: not tried, KL to the fine-tune on calibration text 0.012 (under 0.03" in text


def test_baselines_stay_as_published_unless_asked(pair):
    base, ft = pair
    calib = random_ids(base, 4, 16, seed=9)
    cfg = DeltaCoMeConfig(method="svd-uniform", uniform_bits=2, group_size=32, ratio=1 / 16, distill_steps=5)
    assert not distills_bands(cfg) and distills_bands(DeltaCoMeConfig(distill_steps=5))
    assert not distills_bands(DeltaCoMeConfig(distill_steps=0))
    plain = compress(copy.deepcopy(base), ft, cfg, calibration=calib, progress=False)
    assert "distill" not in plain.peft_config["default"].compression_info
    cfg = DeltaCoMeConfig(method="svd-uniform", uniform_bits=2, group_size=32, ratio=1 / 16, distill_steps=5,
                          distill_bands=True)  # fmt: skip
    asked = compress(copy.deepcopy(base), ft, cfg, calibration=calib, progress=False)
    assert asked.peft_config["default"].compression_info["distill"]["steps"] == 5


def test_distill_bands_settings_are_checked():
    with pytest.raises(ConfigError, match="method 'dare' stores no bands"):
        DeltaCoMeConfig(method="dare", distill_bands=True)
    with pytest.raises(ConfigError, match="distill_bands must be null, true or false, got 'yes'"):
        DeltaCoMeConfig(distill_bands="yes")
    assert DeltaCoMeConfig(method="deltacome-dare", distill_bands=True).distill_bands


def test_cli_distill_bands_reaches_the_config_and_a_method_without_bands_is_refused(tmp_path, capsys):
    from hf_deltacome.cli import build_parser, main

    args = ["compress", "--base", str(tmp_path / "b"), "--finetuned", str(tmp_path / "f"), "--output", str(tmp_path / "o")]
    assert build_parser().parse_args([*args, "--no-distill-bands"]).distill_bands is False
    assert build_parser().parse_args([*args, "--distill-bands"]).distill_bands is True
    assert build_parser().parse_args(args).distill_bands is None  # the config's default decides
    assert main([*args, "--method", "dare", "--distill-bands"]) == 2
    assert "distill_bands refines band scales; method 'dare' stores no bands" in capsys.readouterr().err


def test_distillation_without_token_ids_is_refused(pair):
    base, ft = pair
    model = _compress(pair, random_ids(base, 4, 16, seed=9), distill_bands=False)
    for ids in (None, torch.zeros(0, 16, dtype=torch.long)):
        with pytest.raises(CalibrationError, match="scale distillation needs calibration token ids"):
            distill_scales(model, ft, ids, bands=True)


def test_distilling_beside_dare_modules_builds_their_transposes_once_and_drops_them(pair, monkeypatch):
    """The backward passes through a DARE module (CSR at 1/32) multiply by a transpose built once per module; none
    is left on the compressed adapter."""
    from hf_deltacome.format.baseline_parts import SparsePart

    built = []
    own = SparsePart._build_transposed
    monkeypatch.setattr(SparsePart, "_build_transposed", lambda self: built.append(self.seed) or own(self))
    calib = random_ids(pair[0], 8, 32, seed=9)
    model = _compress(pair, calib, distill_steps=4, dare_modules=["down_proj", "gate_proj", "up_proj"])
    deltas = [m.deltacome_delta["default"] for m in model.modules() if isinstance(m, DeltaCoMeLayer)]
    sparse = [d for d in deltas if d.sparse is not None]
    assert model.peft_config["default"].compression_info["distill"]["steps"] == 4
    assert sparse and all(d.sparse.forward_weight().layout == torch.sparse_csr for d in sparse)
    assert sorted(built) == sorted(d.sparse.seed for d in sparse)  # once each, over the four steps
    assert not any("csr_t" in (d._derived or {}) for d in deltas)


def test_distillation_decodes_each_dare_part_once_whatever_the_cache_cap(pair, monkeypatch):
    """A cap too small for the DARE parts' CSR matrices would decode them again (their masks regenerated) at every
    forward and backward pass of the distillation: the cap is lifted for that job and holds again after it."""
    from hf_deltacome.backend import dequant_cache
    from hf_deltacome.format.baseline_parts import SparsePart

    built = []
    own = SparsePart._build_forward_weight
    in_distill = lambda: dequant_cache.max_bytes > 1  # noqa: E731 (the cap is lifted only there)
    monkeypatch.setattr(SparsePart, "_build_forward_weight",
                        lambda self: built.append((self.seed, in_distill())) or own(self))  # fmt: skip
    calib = random_ids(pair[0], 8, 32, seed=9)
    saved = dequant_cache.max_bytes
    try:
        dequant_cache.configure(1)  # one byte: nothing fits
        model = _compress(pair, calib, distill_steps=4, dare_modules=["down_proj", "gate_proj", "up_proj"])
        assert dequant_cache.bytes <= 1  # the cap holds again
    finally:
        dequant_cache.configure(saved)
    distilled = [d for m in model.modules() if isinstance(m, DeltaCoMeLayer)
                 for d in [m.deltacome_delta["default"]] if d.sparse is not None]  # fmt: skip
    assert model.peft_config["default"].compression_info["distill"]["steps"] == 4
    during = sorted(seed for seed, inside in built if inside)
    assert during == sorted(d.sparse.seed for d in distilled)  # once each over the check and the four steps
