"""AMLQ on a mixture of experts: transformers' fused expert weights quantized one linear per expert, saved, loaded
with ``from_pretrained``, dequantized back to the fused module, and Delta-CoMe adapters on top."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel
from test_experts import FAMILIES, error, finetune, ids, mixtral, tiny_mixture
from tiny_models import logits

from hf_deltacome import DeltaCoMeConfig, compress
from hf_deltacome.amlq import AmlqLinear, quantize_model, save_quantized
from hf_deltacome.errors import ConfigError, QuantizedBaseWarning
from hf_deltacome.io.fingerprint import fingerprint_json
from hf_deltacome.io.summary import quantized_base_summary
from hf_deltacome.linears import ExpertsAsLinears, is_fused_experts

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantize(model, bpw: float, **kwargs):
    kwargs = {"group_sizes": (32, 64), "low_bit_share": 1.0, "progress": False} | kwargs
    return quantize_model(model, bpw, calibration=ids(1, 16, 64), **kwargs)


def _load(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def _expert_linears(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if ".experts." in n and isinstance(m, AmlqLinear)}


@pytest.fixture(scope="module")
def quantized_mixtral(tmp_path_factory):
    base = mixtral()
    q = _quantize(copy.deepcopy(base), 3.0)
    folder = tmp_path_factory.mktemp("amlq_moe") / "q3"
    save_quantized(q, folder)
    return base, q, folder


def test_every_expert_is_quantized_and_counted(quantized_mixtral):
    base, q, folder = quantized_mixtral
    cfg = q.config.quantization_config
    experts = _expert_linears(q)
    assert len(experts) == 2 * 4 * 2  # layers x experts x (gate_up_proj, down_proj)
    assert set(experts) <= set(cfg.layout) and len(cfg.layout) == len(experts) + 2 * 4  # + the attention
    assert cfg.layout["model.layers.1.mlp.experts.3.gate_up_proj"]["shape"] == [192, 64]
    linears = [m for m in q.modules() if isinstance(m, AmlqLinear)]
    weights = sum(m.in_features * m.out_features for m in linears)
    assert cfg.info["quantized_weights"] == weights  # the experts' weights are in the bits per weight
    assert cfg.info["true_bpw"] == pytest.approx(8 * sum(m.stored_nbytes() for m in linears) / weights)
    assert cfg.info["true_bpw"] <= 3.0
    stand_in = q.model.layers[0].mlp.experts
    assert isinstance(stand_in, ExpertsAsLinears) and stand_in.keep
    assert stand_in.experts.gate_up_proj.device.type == "meta"  # the full-precision fused weights are freed
    x = ids(3, 4, 32)  # the quantized model runs its packed experts: off the base by a 3-bit error, no more
    assert 0 < float((logits(q, x) - logits(base, x)).norm() / logits(base, x).norm()) < 0.2
    assert cfg.source_fingerprint == fingerprint_json(base)  # the fused fp model's (the adapters' base check)


def test_error_falls_as_bpw_grows_on_the_experts():
    base, x = mixtral(), ids(3, 4, 32)
    ref = logits(base, x)
    errs = []
    for bpw in (2.5, 4.0):
        q = _quantize(copy.deepcopy(base), bpw, skip=["q_proj", "k_proj", "v_proj", "o_proj"])
        assert all(".experts." in n for n in q.config.quantization_config.layout)
        errs.append(float((logits(q, x) - ref).norm() / ref.norm()))
    assert errs[0] > errs[1] > 0


def test_saved_mixture_loads_packed_and_dequantizes_to_the_fused_module(quantized_mixtral, tmp_path):
    base, q, folder = quantized_mixtral
    x = ids(3, 4, 32)
    loaded = _load(folder)
    stand_in = loaded.model.layers[1].mlp.experts
    assert isinstance(stand_in, ExpertsAsLinears) and stand_in.keep
    assert isinstance(stand_in._modules["2"].down_proj, AmlqLinear)
    assert stand_in._modules["2"].down_proj.planes[0].qweight.dtype == torch.int32  # stays packed
    assert torch.equal(logits(loaded, x), logits(q, x))
    assert torch.equal(logits(_load(folder, device_map="auto"), x), logits(q, x))
    out = loaded.generate(x[:, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (4, 12)
    dense = _load(folder).dequantize()
    experts = dense.model.layers[1].mlp.experts
    assert is_fused_experts(experts) and experts.gate_up_proj.shape == (4, 192, 64)
    assert experts.gate_up_proj.device.type == "cpu"
    torch.testing.assert_close(logits(dense, x), logits(q, x), atol=1e-5, rtol=1e-5)
    table = quantized_base_summary(folder)  # `deltacome info`: one row a linear, the experts' among them
    assert "model.layers.0.mlp.experts.3.down_proj" in table
    assert "model.layers.0.mlp.experts.3.down_proj" in json.loads(quantized_base_summary(folder, as_json=True))["layout"]


def test_adapters_on_a_quantized_mixture(quantized_mixtral, tmp_path):
    base, _, folder = quantized_mixtral
    ft, x, cal = finetune(base), ids(3, 4, 32), ids(1, 16, 64)
    cfg = DeltaCoMeConfig(ratio=1 / 4)
    on_q = compress(_load(folder), ft, cfg, calibration=cal, progress=False)
    stand_in = on_q.base_model.model.model.layers[0].mlp.experts
    assert isinstance(stand_in, ExpertsAsLinears) and isinstance(stand_in._modules["1"].gate_up_proj.base_layer,
                                                                 AmlqLinear)  # fmt: skip
    on_q.save_pretrained(tmp_path / "q")
    compress(copy.deepcopy(base), ft, cfg, calibration=cal, progress=False).save_pretrained(tmp_path / "fp")
    loaded_q = PeftModel.from_pretrained(_load(folder), tmp_path / "q")
    assert torch.equal(logits(loaded_q, x), logits(on_q, x))
    with pytest.warns(QuantizedBaseWarning, match=r"calibration perplexity .* -> "):
        loaded_fp = PeftModel.from_pretrained(_load(folder), tmp_path / "fp")
    # the adapter made against the quantized experts absorbs their quantization error too
    assert error(loaded_q, ft, base, x) < error(loaded_fp, ft, base, x) < 1
    with pytest.raises(ConfigError, match="bit-packed"):
        loaded_q.merge_and_unload()
    unloaded = loaded_q.unload()  # the packed stand-ins stay: there is no dense fused weight to go back to
    assert isinstance(unloaded.model.layers[0].mlp.experts._modules["0"].down_proj, AmlqLinear)
    assert torch.equal(logits(unloaded, x), logits(_load(folder), x))
    with warnings.catch_warnings():  # the adapter of the full-precision base onto its dequantized copy: no warning
        warnings.simplefilter("error", QuantizedBaseWarning)
        dense = PeftModel.from_pretrained(_load(folder).dequantize(), tmp_path / "q")
    merged = dense.merge_and_unload()
    assert is_fused_experts(merged.model.layers[0].mlp.experts)
    torch.testing.assert_close(logits(merged, x), logits(on_q, x), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["GptOss", *sorted(FAMILIES)])
def test_other_mixture_families_quantize_save_and_load(arch, tmp_path):
    base, x = tiny_mixture(arch), ids(3, 2, 24)
    fused = [n for n, m in base.named_modules() if is_fused_experts(m)]
    q = _quantize(copy.deepcopy(base), 4.0)
    assert {n.rsplit(".", 2)[0] for n in _expert_linears(q)} == set(fused)
    # the source fingerprint, taken through the per-expert linears, is the fused full-precision model's
    assert q.config.quantization_config.source_fingerprint == fingerprint_json(base)
    save_quantized(q, tmp_path / "q")
    loaded = _load(tmp_path / "q")
    assert torch.equal(logits(loaded, x), logits(q, x))
    assert 0 < float((logits(q, x) - logits(base, x)).norm() / logits(base, x).norm()) < 0.2
    dense = _load(tmp_path / "q").dequantize()
    assert [n for n, m in dense.named_modules() if is_fused_experts(m)] == fused
    torch.testing.assert_close(logits(dense, x), logits(q, x), atol=1e-5, rtol=1e-5)


def test_experts_are_quantized_whole_or_left_fused(tmp_path):
    base, x = mixtral(), ids(3, 4, 32)
    q = _quantize(copy.deepcopy(base), 3.0, skip=["gate_up_proj", "down_proj"])  # every expert left out
    assert not _expert_linears(q) and is_fused_experts(q.model.layers[0].mlp.experts)
    assert torch.equal(q.model.layers[1].mlp.experts.down_proj, base.model.layers[1].mlp.experts.down_proj)
    save_quantized(q, tmp_path / "q")
    assert torch.equal(logits(_load(tmp_path / "q"), x), logits(q, x))  # the fused weights saved and read back
    with pytest.raises(ConfigError, match=r"4 of the 8 per-expert linears of .* model\.layers\.0\.mlp\.experts "
                                          r"\(not model\.layers\.0\.mlp\.experts\.0\.down_proj"):  # fmt: skip
        _quantize(copy.deepcopy(base), 3.0, skip=["down_proj"])
