"""AMLQ's GPTQ damping chosen from calibration tokens per input column, and ``low_bit_share="auto"``."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from tiny_models import make_model, random_ids

from hf_deltacome import ConfigError
from hf_deltacome.amlq import AmlqConfig, quantize_model, save_quantized
from hf_deltacome.amlq.allocation import Sensitivity, allocate
from hf_deltacome.amlq.config import auto_damp, resolve_damp
from hf_deltacome.format.amlq_layout import layout_bpw, uniform_layout
from hf_deltacome.io.summary import quantized_base_summary

pytestmark = pytest.mark.usefixtures("one_thread")


def test_auto_damp_rule_small_large_and_between():
    assert auto_damp(1024, 576) == 0.1 and auto_damp(1024, 1536) == 0.1  # SmolLM2, 8 x 128 tokens: 1.8 / 0.7 per column
    assert auto_damp(4 * 100, 100) == 0.1 and auto_damp(64 * 100, 100) == pytest.approx(0.01)
    assert auto_damp(128 * 2048, 4096) == pytest.approx(0.01)  # GPTQ's usual calibration on a 7B: its usual damping
    assert auto_damp(16 * 100, 100) == pytest.approx(0.1 * 10**-0.5)  # geometric middle of 4 and 64 per column
    values = [auto_damp(t, 256) for t in (256, 1024, 2048, 8192, 16384, 65536)]
    assert values == sorted(values, reverse=True) and len(set(values)) > 3  # falls with more tokens, no cliff
    assert resolve_damp(0.05, 10, 4096) == 0.05 and resolve_damp("auto", 10, 4096) == 0.1  # explicit wins


def test_config_damp_and_share_fields():
    assert AmlqConfig().damp == "auto" and AmlqConfig().low_bit_share == "auto"
    assert AmlqConfig(damp="0.05").damp == 0.05
    for bad in (0, 1.5, "some"):
        with pytest.raises(ConfigError, match="damp"):
            AmlqConfig(damp=bad)
    with pytest.raises(ConfigError, match="low_bit_share"):
        AmlqConfig(low_bit_share="most")


@pytest.fixture(scope="module")
def tiny():
    base = make_model("llama")
    ids = random_ids(base, 16, 64, seed=1)  # 1,024 tokens
    shapes = {n: (m.out_features, m.in_features) for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in n}  # fmt: skip
    return base, ids, uniform_layout(shapes, 3, 32)


def test_quantize_model_records_auto_damping_per_linear_and_explicit_wins(tiny, tmp_path):
    base, ids, layout = tiny
    auto = quantize_model(copy.deepcopy(base), 16.0, calibration=ids, layout=layout, progress=False)
    cfg = auto.config.quantization_config
    assert cfg.damp == "auto" and set(cfg.info["damping"]) == set(layout)
    for name, d in cfg.info["damping"].items():
        assert d == pytest.approx(auto_damp(1024, layout[name]["shape"][1]))
    assert len(set(cfg.info["damping"].values())) > 1  # 64- and wider-input linears get different values
    fixed = quantize_model(copy.deepcopy(base), 16.0, calibration=ids, layout=layout, damp=0.3, progress=False)
    assert set(fixed.config.quantization_config.info["damping"].values()) == {0.3}
    name = next(iter(layout))
    a, f = auto.get_submodule(name).weight, fixed.get_submodule(name).weight
    assert not torch.equal(a, f)  # the damping reached GPTQ
    save_quantized(auto, tmp_path / "q")
    shown = quantized_base_summary(tmp_path / "q")
    assert re.search(r"GPTQ damping auto \(1,024 calibration tokens\): 0\.\d+ in \d+ linears", shown)


def _sens(name: str, seed: int) -> Sensitivity:
    g = torch.Generator().manual_seed(seed)
    cands = [(2, 64), (3, 64), (4, 64), (8, 64)]
    errs = torch.tensor([5.0, 1.2, 0.3, 0.001], dtype=torch.float64).view(-1, 1) * (
        0.5 + torch.rand(1, 4, generator=g, dtype=torch.float64)
    )
    return Sensitivity(name, (64, 256), 64, cands, errs, 100.0, curve=[(0.01, 0.01), (0.05, 0.2)])


def test_low_bit_share_auto_drops_the_cap_only_when_the_target_needs_it():
    sens = [_sens(f"l{i}", i) for i in range(3)]
    kept, info = allocate(sens, 3.2, 0, low_bit_share="auto")
    assert info["low_bit_share"] == 0.5
    for e in kept.values():
        assert sum(e["planes"][u][0] == 2 for u in e["units"]) <= 2  # at most half of 4 units at 2 bits
    low, info = allocate(sens, 2.5, 0, low_bit_share="auto")  # 0.5 cannot reach 2.5 bpw: no cap
    assert info["low_bit_share"] == 1.0 and layout_bpw(low) <= 2.5
    with pytest.raises(ConfigError, match="below the cheapest") as err:
        allocate(sens, 2.5, 0, low_bit_share=0.5)  # an explicit share is a hard limit
    msg = str(err.value)
    reachable = float(re.search(r"cheapest reachable is ([\d.]+) bpw \(low_bit_share 1\)", msg).group(1))
    at_half = float(re.search(r"([\d.]+) bpw at low_bit_share 0.5", msg).group(1))
    assert reachable < 2.5 < at_half
    allocate(sens, reachable + 1e-3, 0, low_bit_share=1.0)  # the named floor is reachable
    with pytest.raises(ConfigError, match=r"\d bpw at low_bit_share 1\)"):
        allocate(sens, reachable - 0.05, 0, low_bit_share="auto")


def test_cli_damp_option():
    from hf_deltacome.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["quantize", "m", "--bpw", "3", "--output", "o"]).damp == "auto"
    assert parse(["quantize", "m", "--bpw", "3", "--output", "o", "--damp", "0.05"]).damp == 0.05
    assert parse(["quantize", "m", "--bpw", "3", "--output", "o", "--low-bit-share", "0.25"]).low_bit_share == 0.25
    with pytest.raises(SystemExit):
        parse(["quantize", "m", "--bpw", "3", "--output", "o", "--damp", "lots"])
