"""AMLQ: the packed linear, the allocation, quantizing a model, transformers loading, and Delta-CoMe on top."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from tiny_models import logits, make_finetune, make_model, random_ids, relative_logits_error

from hf_deltacome import BaseModelMismatchError, ConfigError, DeltaCoMeConfig, compress
from hf_deltacome.amlq import AmlqConfig, AmlqLinear, quantize_model, save_quantized
from hf_deltacome.amlq.allocation import Sensitivity, allocate, estimated_kl, linear_options
from hf_deltacome.amlq.lowrank import damped_cholesky, error_factors, output_error
from hf_deltacome.amlq.pipeline import pack_planes
from hf_deltacome.errors import QuantizedBaseWarning
from hf_deltacome.format.amlq_layout import column_groups, entry_nbytes, layout_bpw, uniform_layout
from hf_deltacome.quant.gptq import GPTQ

GS = (32, 64)  # tiny models are 64 wide: units of 64 columns, groups of 32 or 64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def _hessian(n: int, seed: int = 0) -> GPTQ:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, n, generator=g) * torch.linspace(0.2, 3.0, n)  # uneven input channels
    gptq = GPTQ(n)
    gptq.add_batch(x)
    return gptq


def _quantize(model, bpw, ids, **kwargs):
    kwargs = {"group_sizes": GS, "low_bit_share": 1.0, "progress": False} | kwargs
    return quantize_model(model, bpw, calibration=ids, **kwargs)


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory):
    """A tiny Llama, its calibration ids, and its AMLQ quantization at 3 bpw saved to a folder."""
    base = make_model("llama")
    ids = random_ids(base, 16, 64, seed=1)
    q = _quantize(copy.deepcopy(base), 3.0, ids)
    folder = tmp_path_factory.mktemp("amlq") / "q3"
    save_quantized(q, folder)
    return base, ids, q, folder


def _load(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **kwargs).eval()


# ------------------------------------------------------------------------------------------------ packed linear


def test_amlq_linear_planes_roundtrip_with_short_unit_and_rank():
    n = 160  # units of 64: 64, 64, 32 (short last unit)
    entry = {"shape": [48, n], "unit": 64, "planes": [[2, 32], [3, 64], [4, 64]], "units": [1, 0, 2], "rank": 4}
    g = _hessian(n, seed=2)
    W = torch.randn(48, n)
    codes, scales, zeros, dq = g.quantize_groups(W, column_groups(entry))
    assert column_groups(entry) == [(3, 64), (2, 32), (2, 32), (4, 32)]
    planes = pack_planes(entry, codes, scales, zeros)
    Lq, Rq, left = error_factors(W - dq, damped_cholesky(g.H), 4)
    lin = AmlqLinear(n, 48, entry, bias=True)
    lin.fill(planes, (Lq, Rq))
    assert torch.equal(lin.dequantized_planes(), dq)
    dense = dq + Lq.dequantize() @ Rq.dequantize()
    assert torch.allclose(lin.weight, dense, atol=1e-6)
    x = torch.randn(3, 5, n)
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, dense, lin.bias), atol=1e-5)
    assert lin.stored_nbytes() == entry_nbytes(entry)
    assert lin.device_and_dtype() == (torch.device("cpu"), torch.float32)
    lin.set_cache(True)  # the cache gives the same output
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, dense, lin.bias), atol=1e-5)


def test_lowrank_correction_error_falls_with_rank_and_bits():
    g = _hessian(64, seed=3)
    W = torch.randn(80, 64)
    E = W - g.quantize(W, 2, 32).dequantize()
    C = damped_cholesky(g.H)
    lefts = [error_factors(E, C, r)[2] for r in (1, 4, 16, 64)]
    assert all(a > b for a, b in zip(lefts, lefts[1:], strict=False))
    assert lefts[-1] < 1e-3  # full rank: only the 8-bit storage of the factors is left
    Lq, Rq, left = error_factors(E, C, 8)
    measured = output_error(E - Lq.dequantize() @ Rq.dequantize(), C) / output_error(E, C)
    assert measured == pytest.approx(left, rel=1e-6)
    L4, R4, left4 = error_factors(E, C, 8, bits=4)
    assert L4.bits == R4.bits == 4 and left < left4 < 1.0  # 4-bit factors: cheaper, still remove error


# ------------------------------------------------------------------------------------------------ allocation


def _sens(name: str, shape: tuple[int, int], kl_scale: float, seed: int) -> Sensitivity:
    g = torch.Generator().manual_seed(seed)
    cands = [(2, 32), (2, 64), (3, 64), (4, 64), (8, 64)]
    units = -(-shape[1] // 64)
    base = torch.tensor([4.0, 5.0, 1.2, 0.3, 0.001], dtype=torch.float64).view(-1, 1)
    errs = base * (0.5 + torch.rand(1, units, generator=g, dtype=torch.float64))
    fr = torch.tensor([[0.3, 0.5]] * len(cands))
    curve = [(0.01, 0.01 * kl_scale), (0.05, 0.2 * kl_scale)]  # KL grows faster than the error (slope ~1.9)
    return Sensitivity(name, shape, 64, cands, errs, 100.0, ranks=[8, 16], rank_fractions=fr, curve=curve)


def test_estimated_kl_follows_the_measured_curve():
    s = _sens("l", (64, 128), 1.0, 0)
    assert estimated_kl(s, 0.01) == pytest.approx(0.01) and estimated_kl(s, 0.05) == pytest.approx(0.2)
    assert estimated_kl(s, 0.005) == pytest.approx(0.005)  # below the probes: linear
    mid = estimated_kl(s, 0.025)
    assert 0.01 * 2.5 < mid < 0.2 / 2  # log-log between the probes: above linear from the first
    slope = math.log(0.2 / 0.01) / math.log(5)
    assert estimated_kl(s, 0.1) == pytest.approx(0.2 * 2**slope)  # beyond: the measured slope
    flat = Sensitivity("f", (4, 4), 4, [(2, 4)], torch.zeros(1, 1), 1.0, weight=3.0)
    assert estimated_kl(flat, 0.5) == pytest.approx(1.5)  # no curve: weight x error


def test_allocation_meets_every_target_and_spends_bits_where_kl_is():
    sens = [_sens(f"l{i}", (64, 192), kl_scale=20.0 if i == 0 else 1.0, seed=i) for i in range(4)]
    costs = []
    for target in (2.5, 3.0, 3.5, 4.0, 5.0):
        layout, info = allocate(sens, target, "auto")
        assert layout_bpw(layout) <= target
        assert target - layout_bpw(layout) < 0.5  # and does not leave much unused
        costs.append(info["estimated_kl"])
        sizes = {n: entry_nbytes(e) for n, e in layout.items()}
        assert sizes["l0"] == max(sizes.values())  # the sensitive linear gets the most bytes
    assert all(a > b for a, b in zip(costs, costs[1:], strict=False))
    with pytest.raises(ConfigError, match="below the cheapest layout"):
        allocate(sens, 1.5)
    no_rank, _ = allocate(sens, 3.0, 0)
    assert all(e["rank"] == 0 for e in no_rank.values())
    eight = {(tuple(o.units), o.rank): o.nbytes for o in linear_options(sens[0], 16)}
    four = {(tuple(o.units), o.rank): o.nbytes for o in linear_options(sens[0], 16, rank_bits=4)}
    same = set(eight) & set(four)
    assert same and all(four[k] < eight[k] for k in same)  # 4-bit factors: the same options, cheaper
    layout, _ = allocate(sens, 4.5, 16, rank_bits=4)
    assert all(e["rank"] == 16 and e["rank_bits"] == 4 for e in layout.values())
    with pytest.raises(ConfigError, match="needs rank"):
        linear_options(sens[0], 32)


def test_low_bit_share_keeps_two_bits_a_minority():
    sens = [_sens(f"l{i}", (64, 256), kl_scale=1.0, seed=i) for i in range(3)]
    free, _ = allocate(sens, 2.7, 0, low_bit_share=1.0)
    capped, _ = allocate(sens, 3.2, 0, low_bit_share=0.25)
    for layout, cap in ((free, 1.0), (capped, 0.25)):
        for e in layout.values():
            low = sum(1 for u in e["units"] if e["planes"][u][0] == 2) / len(e["units"])
            assert low <= cap
    assert any(sum(e["planes"][u][0] == 2 for u in e["units"]) > 1 for e in free.values())
    with pytest.raises(ConfigError, match="below the cheapest"):
        allocate(sens, 2.7, 0, low_bit_share=0.25)  # one 2-bit unit in four cannot reach 2.7 bpw


def test_allocation_never_estimates_worse_than_the_uniform_layout_of_the_same_bytes():
    sens = [_sens(f"l{i}", (64, 256), kl_scale=3.0 if i == 1 else 1.0, seed=i) for i in range(3)]
    for s in sens:  # 3 bits save little over 2: (3, 64) is off every unit's convex hull (2 bits -> 4 bits directly)
        s.unit_errors[2] = 0.6 * s.unit_errors[1]
    uniform = uniform_layout({s.name: s.shape for s in sens}, 3, 64)
    target = layout_bpw(uniform)
    uniform_kl = sum(estimated_kl(s, float(s.unit_errors[2].sum()) / s.signal) for s in sens)  # (3, 64) everywhere
    for share in (0.0, 0.5, 1.0):  # with no 2-bit units allowed, the uniform 3-bit layout is still reachable
        layout, info = allocate(sens, target, 0, low_bit_share=share)
        assert layout_bpw(layout) <= target and info["estimated_kl"] <= uniform_kl * (1 + 1e-9)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="bits"):
        AmlqConfig(bits=[5])
    with pytest.raises(ConfigError, match="group sizes"):
        AmlqConfig(group_sizes=[48])
    with pytest.raises(ConfigError, match="error_rank"):
        AmlqConfig(error_rank="some")
    with pytest.raises(ConfigError, match="rank_bits"):
        AmlqConfig(rank_bits=3)
    with pytest.raises(ConfigError, match="low_bit_share"):
        AmlqConfig(low_bit_share=1.5)
    bad = uniform_layout({"m.q": (8, 64)}, 2, 32)
    bad["m.q"]["units"] = [0]  # 64 columns in units of 32 need 2
    with pytest.raises(ConfigError, match="'m.q'"):
        AmlqConfig(layout=bad)


# ------------------------------------------------------------------------------------------------ whole model


def test_quantize_model_true_bpw_and_records(tiny_quantized):
    base, ids, q, folder = tiny_quantized
    cfg = q.config.quantization_config
    assert isinstance(cfg, AmlqConfig) and cfg.info["true_bpw"] <= 3.0
    linears = [m for m in q.modules() if isinstance(m, AmlqLinear)]
    assert len(linears) == 14 and len(cfg.layout) == 14
    stored = sum(m.stored_nbytes() for m in linears) * 8 / sum(m.in_features * m.out_features for m in linears)
    assert stored == pytest.approx(cfg.info["true_bpw"])
    saved = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "amlq" and saved["layout"] == json.loads(json.dumps(cfg.layout))


def test_error_falls_as_bpw_grows():
    base = make_model("qwen2")
    ids, ev = random_ids(base, 16, 64, seed=1), random_ids(base, 4, 64, seed=2)
    ref = logits(base, ev)
    errs = []
    for bpw in (2.75, 3.5, 5.0):
        q = _quantize(copy.deepcopy(base), bpw, ids)
        errs.append(float((logits(q, ev) - ref).norm() / ref.norm()))
    assert errs[0] > errs[1] > errs[2]


def test_loads_with_from_pretrained_and_generates(tiny_quantized, tokenizer):
    from transformers import pipeline

    base, ids, q, folder = tiny_quantized
    loaded = _load(folder)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, AmlqLinear)
    assert loaded.model.layers[1].mlp.down_proj.planes[0].qweight.dtype == torch.int32  # stays packed
    ev = random_ids(base, 2, 32, seed=3)
    assert torch.allclose(logits(loaded, ev), logits(q, ev), atol=1e-5)
    out = loaded.generate(ev[:, :8], max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 13)
    text = pipeline("text-generation", model=loaded, tokenizer=tokenizer)("Hi", max_new_tokens=4, do_sample=False)
    assert text[0]["generated_text"].startswith("Hi")
    auto = _load(folder, device_map="auto")
    assert torch.allclose(logits(auto, ev), logits(q, ev), atol=1e-5)
    dense = _load(folder).dequantize()
    assert not any(isinstance(m, AmlqLinear) for m in dense.modules())
    assert torch.allclose(logits(dense, ev), logits(q, ev), atol=1e-5)


def test_loads_in_a_process_that_never_imports_peft(tiny_quantized):
    """``import hf_deltacome`` + ``from_pretrained``: the quantizer is registered without PEFT (integration.EARLY)."""
    folder = tiny_quantized[3]
    script = textwrap.dedent(f"""
        import sys
        import hf_deltacome
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(folder)!r})
        print(type(m.model.layers[0].mlp.down_proj).__name__, "peft" in sys.modules)
    """)  # fmt: skip
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["AmlqLinear", "False"], done.stdout


def test_adapter_on_quantized_base(tiny_quantized, tmp_path):
    from peft import PeftModel

    base, ids, _, folder = tiny_quantized
    ft = make_finetune(base)
    ev = random_ids(base, 4, 64, seed=2)
    cfg = DeltaCoMeConfig(ratio=1 / 4)
    on_q = compress(_load(folder), ft, cfg, calibration=ids, progress=False)
    assert isinstance(on_q.base_model.model.model.layers[0].self_attn.q_proj.base_layer, AmlqLinear)
    on_q.save_pretrained(tmp_path / "q")
    compress(copy.deepcopy(base), ft, cfg, calibration=ids, progress=False).save_pretrained(tmp_path / "fp")
    reads = []
    original = AmlqLinear.weight.fget
    try:  # count dequantizations while the adapter is injected, checked and loaded
        AmlqLinear.weight = property(lambda self: reads.append(1) or original(self))
        loaded_q = PeftModel.from_pretrained(_load(folder), tmp_path / "q")
    finally:
        AmlqLinear.weight = property(original)
    assert len(reads) == 14  # once per packed linear, by the base check; PEFT's device/dtype queries read none
    assert torch.allclose(logits(loaded_q, ev), logits(on_q, ev), atol=1e-5)
    with pytest.warns(QuantizedBaseWarning, match=r"calibration perplexity .* -> "):
        loaded_fp = PeftModel.from_pretrained(_load(folder), tmp_path / "fp")
    # the adapter made against the quantized base also absorbs the base's quantization error
    assert relative_logits_error(loaded_q, ft, base, ev) < relative_logits_error(loaded_fp, ft, base, ev)
    with pytest.raises(ConfigError, match="bit-packed"):
        loaded_q.merge_and_unload()
    # another quantization of the same base is not the base the adapter was made against
    other = _quantize(copy.deepcopy(base), 4.0, ids)
    save_quantized(other, tmp_path / "q4")
    with pytest.raises(BaseModelMismatchError, match="weights differ"):
        PeftModel.from_pretrained(_load(tmp_path / "q4"), tmp_path / "q")


def test_fp_adapter_on_unrelated_quantized_base_still_fails(tiny_quantized, tmp_path):
    from peft import PeftModel

    _, _, _, folder = tiny_quantized
    other = make_model("llama", seed=7)
    cfg = DeltaCoMeConfig(ratio=1 / 4, quantizer="rtn")
    compress(other, make_finetune(other), cfg, progress=False).save_pretrained(tmp_path / "other")
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizedBaseWarning)
        with pytest.raises(BaseModelMismatchError):
            PeftModel.from_pretrained(_load(folder), tmp_path / "other")


def test_cli_quantize_and_info(tmp_path, tokenizer, capsys):
    from hf_deltacome.amlq.config import DEFAULT_BITS, DEFAULT_GROUP_SIZES, DEFAULT_LOW_BIT_SHARE
    from hf_deltacome.cli import build_parser, main

    args = build_parser().parse_args(["quantize", "m", "--bpw", "3", "--output", "o"])
    defaults = AmlqConfig()
    assert (tuple(args.bits), tuple(args.group_sizes)) == (DEFAULT_BITS, DEFAULT_GROUP_SIZES)
    assert (args.error_rank, args.rank_bits, args.low_bit_share) == (
        defaults.error_rank, defaults.rank_bits, DEFAULT_LOW_BIT_SHARE)  # fmt: skip
    model = make_model("llama")
    model.save_pretrained(tmp_path / "fp")
    tokenizer.save_pretrained(tmp_path / "fp")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    common = ["--calibration", str(calib), "--num-samples", "8", "--seq-len", "32", "--group-sizes", "32,64"]
    assert main(["quantize", str(tmp_path / "fp"), "--bpw", "3.5", "--output", str(tmp_path / "q"), *common]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "true" in printed
    assert main(["info", str(tmp_path / "q")]) == 0
    info = capsys.readouterr().out
    assert "AMLQ quantized model" in info and "rank" in info
    assert main(["info", str(tmp_path / "q"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["info"]["true_bpw"] <= 3.5
    assert isinstance(_load(tmp_path / "q").model.layers[0].mlp.up_proj, AmlqLinear)
    # `deltacome compress --base DIR_AMLQ`: the delta is taken against the quantized base, and the adapter loads on it
    make_finetune(model).save_pretrained(tmp_path / "ft")
    tokenizer.save_pretrained(tmp_path / "ft")
    compress_args = ["compress", "--base", str(tmp_path / "q"), "--finetuned", str(tmp_path / "ft"), "--output",
                     str(tmp_path / "a"), "--quantizer", "rtn", "--ratio", "1/4"]  # fmt: skip
    assert main(compress_args) == 0
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizedBaseWarning)  # made against this very base: no warning
        PeftModel.from_pretrained(_load(tmp_path / "q"), tmp_path / "a")
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "fp"), "--bpw", "1.0", "--output", str(tmp_path / "q1"), *common]) == 2
    assert "below the cheapest layout" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "fp"), "--bpw", "3", "--output", str(tmp_path / "q")]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CI") == "true" and os.environ.get("DELTACOME_AMLQ_SLOW") != "1",
    reason="quantizing all of SmolLM2 takes about 10 min on 2 cores (half of CI): DELTACOME_AMLQ_SLOW=1 runs it",
)
def test_smollm2_quantize_load_and_perplexity(tmp_path):
    import pydoc_data.topics as topics  # real English prose shipped with CPython: calibration and held-out text

    import zoo

    from hf_deltacome.amlq.pipeline import perplexity

    fp, tok = zoo.load_smollm2()
    text = tok("\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:60_000], return_tensors="pt").input_ids
    ids, ev = text[0, : 8 * 128].view(8, 128), text[:, 8 * 128 : 12 * 128].reshape(4, 128)
    ppl_fp = perplexity(fp, ev)
    q = quantize_model(copy.deepcopy(fp), 3.25, calibration=ids, bits=(2, 3, 4), group_sizes=(128,), error_rank=0,
                       progress=False)  # fmt: skip
    assert q.config.quantization_config.info["true_bpw"] <= 3.25
    save_quantized(q, tmp_path / "q", tok)
    loaded = _load(tmp_path / "q")
    ppl_q = perplexity(loaded, ev)
    assert ppl_q == pytest.approx(perplexity(q, ev), rel=1e-4)
    # quality at ~3 bpw on a 135M model is poor for every method (benchmarks/RESULTS.md, AMLQ section): sanity only
    assert math.isfinite(ppl_q) and ppl_fp < ppl_q < 20 * ppl_fp
