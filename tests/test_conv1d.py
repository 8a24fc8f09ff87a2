"""GPT-2's linears (transformers' Conv1D, weight stored ``in x out``): compressed, saved, loaded, merged and exported
as any linear is, with the models holding their Conv1D modules afterwards."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel
from tiny_models import logits, long_tail_delta
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from hf_deltacome import DeltaCoMeConfig
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.errors import BaseModelMismatchError, ConfigError
from hf_deltacome.evaluation.metrics import text_metrics
from hf_deltacome.io.summary import summarize_adapter
from hf_deltacome.layer import DeltaCoMeLayer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    model.config._name_or_path = "tiny-random-gpt2"
    return model


def finetune(base: nn.Module) -> nn.Module:
    """Every Conv1D gets a long-tailed delta (a different one per module) and a bias shift; the norms change too."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i, module in enumerate(m for m in ft.modules() if isinstance(m, (Conv1D, nn.LayerNorm))):
            if isinstance(module, nn.LayerNorm):
                module.weight.mul_(1 + 0.05 * torch.randn(module.weight.shape, generator=g))
                continue
            n_in, n_out = module.weight.shape
            module.weight.add_(8 * long_tail_delta(n_out, n_in, seed=i).t())  # out x in, laid out as the Conv1D's
            module.bias.add_(0.02 * torch.randn(n_out, generator=g))
    return ft


def as_linears(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each Conv1D replaced by the ``nn.Linear`` that computes the same."""
    model = copy.deepcopy(model)
    for name, conv in list(model.named_modules()):
        if isinstance(conv, Conv1D):
            n_in, n_out = conv.weight.shape
            linear = nn.Linear(n_in, n_out)
            linear.weight.data, linear.bias.data = conv.weight.data.t().contiguous(), conv.bias.data.clone()
            model.set_submodule(name, linear)
    return model


def ids(seed: int = 0, n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def run(base: nn.Module, ft: nn.Module, **cfg) -> PeftModel:
    return compress(base, ft, DeltaCoMeConfig(**cfg), calibration=ids(1, 16, 48), progress=False)


def packed_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "deltacome_delta" in k}


def convs(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}


@pytest.mark.parametrize("ratio", [1 / 4, 1 / 16])
def test_a_gpt2_adapter_is_the_adapter_of_the_same_model_with_nn_linear(ratio, tmp_path):
    """The pipeline sees each Conv1D as the nn.Linear it computes: every packed tensor equals the one made from the
    models rewritten with nn.Linear, and the models hold their own Conv1D modules (and weights) afterwards."""
    base = gpt2()
    ft = finetune(base)
    reference = run(as_linears(base), as_linears(ft), ratio=ratio)
    originals, ft_weights = convs(base), {n: p.clone() for n, p in ft.named_parameters()}
    ft_modules = convs(ft)
    model = run(base, ft, ratio=ratio)
    model.save_pretrained(tmp_path)
    assert set(summarize_adapter(tmp_path).per_kind()) == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"}
    # at 1/16 the default stores the MLP as DARE: c_fc, and the c_proj in the MLP, not the attention's
    assert model.peft_config["default"].dare_modules == (["c_fc", "mlp.c_proj"] if ratio < 1 / 8 else None)
    mine, theirs = packed_state(model), packed_state(reference)
    assert mine.keys() == theirs.keys() and len(mine) > 0
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(logits(model, ids()), logits(reference, ids()))
    # `deltacome eval`'s per-module output errors take the fine-tune's delta in the Conv1D's layout too
    errors = text_metrics(model, ids(), finetuned=ft, module_errors=True, progress=False)["module_errors"]
    expected = text_metrics(reference, ids(), finetuned=as_linears(ft), module_errors=True, progress=False)
    assert errors.keys() == expected["module_errors"].keys() and len(errors) == 8
    assert all(errors[n] == pytest.approx(expected["module_errors"][n], rel=1e-4) for n in errors)
    assert all(0 < e < float("inf") for e in errors.values())  # (2-bit DARE of the MLP at 1/16 errs above 1 here)
    wrapped = {n: m for n, m in base.named_modules() if isinstance(m, DeltaCoMeLayer)}
    assert len(wrapped) == len(originals) == 8
    assert all(wrapped[n].get_base_layer() is originals[n] for n in originals)  # the very same modules
    assert convs(ft) == ft_modules
    assert all(torch.equal(p, ft_weights[n]) for n, p in ft.named_parameters())


def test_a_gpt2_adapter_saves_loads_merges_and_checks_its_base(tmp_path):
    base = gpt2()
    ft = finetune(base)
    x = ids()
    want = logits(ft, x)
    model = run(base, ft, ratio=1 / 4, exclude_modules=["attn.c_proj"])  # a Conv1D carried dense too
    got = logits(model, x)
    base_logits = logits(gpt2(), x)
    assert (got - want).norm() < 0.25 * (want - base_logits).norm()
    model.save_pretrained(tmp_path / "adapter")
    # `deltacome info` tells the attention's c_proj from the MLP's (the attention's is carried dense here)
    assert set(summarize_adapter(tmp_path / "adapter").per_kind()) == {"c_attn", "c_fc", "c_proj"}
    loaded = PeftModel.from_pretrained(gpt2(), tmp_path / "adapter").eval()
    assert torch.equal(logits(loaded, x), got)
    c_fc = loaded.base_model.model.transformer.h[0].mlp.c_fc.base_layer.weight
    before = c_fc.detach().clone()
    loaded.merge_adapter()  # in the Conv1D's in x out layout, and back
    torch.testing.assert_close(logits(loaded, x), got, atol=1e-4, rtol=0)
    loaded.unmerge_adapter()
    torch.testing.assert_close(loaded.base_model.model.transformer.h[0].mlp.c_fc.base_layer.weight, before)
    merged = loaded.merge_and_unload()
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(logits(merged, x), got, atol=1e-4, rtol=0)
    edited = gpt2()
    with torch.no_grad():
        edited.transformer.h[1].mlp.c_fc.weight[:, 5] += 0.05  # one output feature's column in the in x out layout
    with pytest.raises(BaseModelMismatchError, match="tiny-random-gpt2"):
        PeftModel.from_pretrained(edited, tmp_path / "adapter")


def test_a_failed_compression_leaves_the_conv1d_modules_in_place():
    base = gpt2()
    ft = finetune(base)
    before_base, before_ft = convs(base), convs(ft)
    with pytest.raises(ConfigError, match="nothing is left"):
        run(base, ft, ratio=1 / 64, exclude_modules=["mlp.c_fc"])  # the dense c_fc alone is over the budget
    assert convs(base) == before_base and convs(ft) == before_ft
    offloaded = ft.transformer.h[1].mlp.c_proj
    offloaded.weight = nn.Parameter(torch.empty_like(offloaded.weight, device="meta"))  # as accelerate leaves it
    with pytest.raises(ConfigError, match=r"transformer\.h\.1\.mlp\.c_proj has its weight on the meta device"):
        run(base, ft)
    assert convs(base) == before_base and convs(ft) == before_ft


def test_streamed_compression_refuses_conv1d_and_the_streamed_merge_transposes(tmp_path):
    from hf_deltacome.serving.export import export_lora
    from hf_deltacome.serving.merge import merge_adapter

    base = gpt2()
    ft = finetune(base)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel computes with transformers' Conv1D \(transformer\.h\.0"):
        compress(str(tmp_path / "base"), str(tmp_path / "ft"), DeltaCoMeConfig(quantizer="rtn"), progress=False)
    model = run(base, ft, ratio=1 / 4)
    model.save_pretrained(tmp_path / "adapter")
    want = logits(model, ids())
    for how, in_memory in (("streamed", False), ("loaded", True)):
        out = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / how, in_memory=in_memory)
        merged = GPT2LMHeadModel.from_pretrained(out).eval()
        torch.testing.assert_close(logits(merged, ids()), want, atol=1e-4, rtol=0, msg=how)
    # the LoRA export says its targets store in x out weights, so PEFT loads it without correcting its config
    report = export_lora(tmp_path / "adapter", tmp_path / "lora", base=tmp_path / "base", dtype="float32")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert report.logits_error < 1e-3
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out.*")
        lora = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(lora, ids()), want, atol=1e-3, rtol=0)


def test_layers_without_any_linear_are_refused_naming_their_class():
    """A decoder whose projections are some other module with a 2-D weight: the error names the class and where."""

    class Projection(nn.Module):
        def __init__(self, conv: nn.Module) -> None:
            super().__init__()
            self.weight = conv.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    def swapped(model: nn.Module) -> nn.Module:
        for name, conv in list(convs(model).items()):
            model.set_submodule(name, Projection(conv))
        return model

    base = gpt2()
    ft = finetune(base)
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel \(transformer\.h\.N\) hold no nn\.Linear.*Projection "
                                          r"\(transformer\.h\.0\.attn\.c_attn"):  # fmt: skip
        run(swapped(base), swapped(ft), quantizer="rtn")


AMLQ_ARGS = {"group_sizes": (32, 64), "low_bit_share": 1.0, "progress": False}


@pytest.fixture(scope="module")
def amlq_gpt2(tmp_path_factory):
    """A tiny GPT-2 quantized by AMLQ at 3 bpw (its MLP's output projections skipped) and saved; the same model
    rewritten with nn.Linear, quantized the same way."""
    from hf_deltacome.amlq import quantize_model, save_quantized

    base = gpt2()
    kw = {"calibration": ids(1, 16, 48), "skip": ["mlp.c_proj"], **AMLQ_ARGS}
    q = quantize_model(copy.deepcopy(base), 3.0, **kw)
    folder = tmp_path_factory.mktemp("amlq-gpt2") / "q3"
    save_quantized(q, folder)
    return base, q, quantize_model(as_linears(base), 3.0, **kw), folder


def test_amlq_quantizes_gpt2s_conv1d_as_the_linear_it_computes(amlq_gpt2, tmp_path):
    """AMLQ quantizes each Conv1D as the nn.Linear it computes (the packed planes of the model rewritten with
    nn.Linear, bit for bit), leaves a skipped one a Conv1D, loads with from_pretrained, and ``dequantize()`` gives
    Conv1D modules back, which save and load as a plain GPT-2."""
    from transformers import AutoModelForCausalLM

    from hf_deltacome.amlq import AmlqLinear
    from hf_deltacome.io.fingerprint import fingerprint_json

    base, q, reference, folder = amlq_gpt2
    packed = {n for n, m in q.named_modules() if isinstance(m, AmlqLinear)}
    assert packed == {f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")}
    assert set(convs(q)) == {f"transformer.h.{i}.mlp.c_proj" for i in range(2)}  # skipped: the Conv1D it was
    mine, theirs = q.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys() and any(k.endswith("planes.0.qweight") for k in mine)
    assert all(torch.equal(mine[k], theirs[k].t() if k.endswith("mlp.c_proj.weight") else theirs[k]) for k in mine)
    assert q.config.quantization_config.source_fingerprint == fingerprint_json(base)
    ev = ids(2, 4, 32)
    want = logits(q, ev)
    assert torch.equal(want, logits(reference, ev))
    assert 0 < float((want - logits(base, ev)).norm() / logits(base, ev).norm()) < 0.2
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(loaded.transformer.h[0].attn.c_attn, AmlqLinear) and set(convs(loaded)) == set(convs(q))
    torch.testing.assert_close(logits(loaded, ev), want, atol=1e-5, rtol=0)
    dense = loaded.dequantize()
    assert len(convs(dense)) == 8 and dense.transformer.h[0].attn.c_attn.weight.shape == (64, 192)
    torch.testing.assert_close(logits(dense, ev), want, atol=1e-5, rtol=0)
    dense.save_pretrained(tmp_path / "dense")
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "dense").eval()
    assert getattr(plain.config, "quantization_config", None) is None and len(convs(plain)) == 8
    torch.testing.assert_close(logits(plain, ev), want, atol=1e-5, rtol=0)


def test_a_delta_compressed_against_an_amlq_gpt2_loads_onto_it(amlq_gpt2, tmp_path):
    """A GPT-2 fine-tune compressed against its AMLQ base: the adapter saves, loads onto the base loaded again with
    the same logits, and is closer to the fine-tune than the quantized base alone."""
    from transformers import AutoModelForCausalLM

    base, _, _, folder = amlq_gpt2
    ft = finetune(base)
    on_q = run(AutoModelForCausalLM.from_pretrained(folder).eval(), ft, ratio=1 / 4)
    on_q.save_pretrained(tmp_path / "adapter")
    quantized = AutoModelForCausalLM.from_pretrained(folder).eval()
    ev = ids(2, 4, 32)
    alone = logits(quantized, ev)
    loaded = PeftModel.from_pretrained(quantized, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded, ev), logits(on_q, ev), atol=1e-5, rtol=0)
    target = logits(ft, ev)
    assert (logits(loaded, ev) - target).norm() < 0.5 * (alone - target).norm()
