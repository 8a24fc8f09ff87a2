"""Mixture-of-experts fine-tunes whose fused 3-D expert weights changed (transformers 5's experts modules):
compressed one linear per expert, saved, loaded onto the fused base, merged back into fused weights."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from peft import PeftModel
from tiny_models import logits, long_tail_delta
from torch import nn

from hf_deltacome import DeltaCoMeConfig
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.errors import BaseModelMismatchError, ConfigError
from hf_deltacome.io.summary import summarize_adapter
from hf_deltacome.linears import ExpertsAsLinears, is_fused_experts, named_linears
from hf_deltacome.serving.export import export_lora
from hf_deltacome.serving.merge import merge_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread

# (config class, model module, experts class, config fields): gated (Mixtral, Qwen2-MoE), transposed with biases and
# an interleaved clamped gate (GPT-OSS), transposed (Aria), ungated (NemotronH), a norm after each expert (MuseSpark)
EXPERTS = {
    "mixtral": ("MixtralConfig", "mixtral", "MixtralExperts", {"num_local_experts": 4}),
    "qwen2_moe": ("Qwen2MoeConfig", "qwen2_moe", "Qwen2MoeExperts", {"moe_intermediate_size": 48, "num_experts": 4}),
    "gpt_oss": ("GptOssConfig", "gpt_oss", "GptOssExperts", {"num_local_experts": 4}),
    "aria": ("AriaTextConfig", "aria", "AriaExperts", {"moe_num_experts": 4, "moe_intermediate_size": 48}),
    "nemotron_h": ("NemotronHConfig", "nemotron_h", "NemotronHExperts", {"moe_intermediate_size": 48,
                                                                        "n_routed_experts": 4}),  # fmt: skip
    "muse_spark": ("MuseSparkTextConfig", "muse_spark", "MuseSparkExperts", {"moe_intermediate_size": 48,
                                                                            "num_experts": 4}),  # fmt: skip
}


def experts_module(key: str) -> nn.Module:
    cfg_name, module, cls, fields = EXPERTS[key]
    import transformers

    try:
        config_cls = getattr(transformers, cfg_name)
        experts_cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)
    except (AttributeError, ImportError):
        pytest.skip(f"{cls} is not in this transformers")
    config = config_cls(hidden_size=32, intermediate_size=48, num_attention_heads=4, **fields)
    experts = experts_cls(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return experts


@pytest.mark.parametrize("key", sorted(EXPERTS))
def test_stand_in_computes_what_the_fused_experts_compute(key):
    experts = experts_module(key)
    assert is_fused_experts(experts)
    g = torch.Generator().manual_seed(1)
    width = experts.down_proj.shape[2 if experts.is_transposed else 1]
    hidden = torch.randn(12, width, generator=g)
    index = torch.stack([torch.randperm(experts.num_experts, generator=g)[:2] for _ in range(12)])
    weights = torch.rand(12, 2, generator=g)
    stand_in = ExpertsAsLinears(experts)
    with torch.no_grad():
        torch.testing.assert_close(stand_in(hidden, index, weights), experts(hidden, index, weights))
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    for e in range(experts.num_experts):  # views of the fused storage, in out x in layout
        w = getattr(experts, first)[e]
        linear = stand_in.get_submodule(f"{e}.{first}")
        assert linear.weight.data_ptr() == w.data_ptr()
        assert torch.equal(linear.weight, w.t() if experts.is_transposed else w)
    assert stand_in.fused() is experts  # nothing moved: the fused module holds the values


def mixtral(seed: int = 0, layers: int = 2) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    model = MixtralForCausalLM(cfg).eval()
    model.config._name_or_path = "tiny-random-mixtral"
    return model


def finetune(base: nn.Module) -> nn.Module:
    """Every expert of every layer gets a long-tailed delta of its own; the attention's projections change too."""
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for i, (name, p) in enumerate(ft.named_parameters()):
            if "experts" in name:
                for e in range(p.shape[0]):
                    p[e].add_(6 * long_tail_delta(*p.shape[1:], seed=100 * i + e))
            elif "self_attn" in name:
                p.add_(6 * long_tail_delta(*p.shape, seed=i))
    return ft


def ids(seed: int, n: int = 8, length: int = 48) -> torch.Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def error(model: nn.Module, ft: nn.Module, base: nn.Module, x: torch.Tensor) -> float:
    out, want, ref = logits(model, x), logits(ft, x), logits(base, x)
    return float((out - want).norm() / (want - ref).norm())


def test_fused_experts_compress_load_and_merge_back(tmp_path):
    base, x = mixtral(), ids(2, 4, 32)
    ft = finetune(base)
    ft_state = {k: v.clone() for k, v in ft.state_dict().items()}
    errors, models = {}, {}
    for ratio in (1 / 16, 1 / 2):
        models[ratio] = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=ratio), calibration=ids(1),
                                 progress=False)  # fmt: skip
        errors[ratio] = error(models[ratio], ft, base, x)
    # the default's MLP rule (DARE from 1/8 down) finds the experts by their leaf names
    assert sorted(models[1 / 16].peft_config["default"].dare_modules) == ["down_proj", "gate_up_proj"]
    model = models[1 / 2]
    assert errors[1 / 2] < 0.5 * errors[1 / 16] and errors[1 / 2] < 0.2, errors
    # the fine-tune is read through views and left as it was: fused, every value unchanged
    assert is_fused_experts(ft.model.layers[0].mlp.experts)
    assert all(torch.equal(v, ft_state[k]) for k, v in ft.state_dict().items())
    config = model.peft_config["default"]
    assert "model.layers.1.mlp.experts.3.down_proj" in config.layout
    assert config.compression_info["fused_experts"] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    before = logits(model, x)
    model.save_pretrained(tmp_path / "adapter")
    kinds = summarize_adapter(tmp_path / "adapter").per_kind()  # `deltacome info`: the experts' linears as one row
    assert kinds["down_proj"]["count"] == 8 and kinds["gate_up_proj"]["count"] == 8

    loaded = PeftModel.from_pretrained(mixtral(), tmp_path / "adapter")
    assert isinstance(loaded.base_model.model.model.layers[0].mlp.experts, ExpertsAsLinears)
    assert torch.equal(logits(loaded, x), before)
    merged = loaded.merge_and_unload()
    experts = merged.model.layers[1].mlp.experts
    assert type(experts).__name__ == "MixtralExperts" and isinstance(experts.down_proj, nn.Parameter)
    torch.testing.assert_close(logits(merged, x), before, atol=2e-4, rtol=1e-4)
    assert "model.layers.1.mlp.experts.down_proj" in merged.state_dict()  # saves as the fused model does

    plain = mixtral()
    unloaded = PeftModel.from_pretrained(plain, tmp_path / "adapter").unload()
    assert is_fused_experts(unloaded.model.layers[0].mlp.experts)
    assert all(torch.equal(v, mixtral().state_dict()[k]) for k, v in unloaded.state_dict().items())

    # the base check sketches the fused weights: an edited expert of the base is refused
    edited = mixtral()
    with torch.no_grad():
        edited.model.layers[1].mlp.experts.gate_up_proj[2, 5].add_(0.05)
    with pytest.raises(BaseModelMismatchError, match=r"experts\.gate_up_proj"):
        PeftModel.from_pretrained(edited, tmp_path / "adapter")

    # `deltacome merge` of a fused base (streamed: test_stream_experts.py) and the LoRA export
    mixtral().save_pretrained(tmp_path / "base")
    out = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out).eval(), x), before, atol=2e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match=r"fused mixture-of-experts weights of model\.layers\.0\.mlp\.experts and 1 "
                                          r"more.*deltacome merge"):  # fmt: skip
        export_lora(tmp_path / "adapter", tmp_path / "lora")


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Two expert adapters of one Mixtral base, saved: ``{"a": folder, "b": folder}``."""
    root, base = tmp_path_factory.mktemp("experts"), mixtral()
    ft_a = finetune(base)
    folders = {}
    for name, ft in (("a", ft_a), ("b", finetune(ft_a))):
        compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=1 / 4), calibration=ids(1),
                 progress=False).save_pretrained(root / name)  # fmt: skip
        folders[name] = root / name
    return folders


def test_two_expert_adapters_serve_one_batch(two_adapters):
    x = ids(3, 2, 24)
    model = PeftModel.from_pretrained(mixtral(), two_adapters["a"], adapter_name="a")
    model.load_adapter(two_adapters["b"], adapter_name="b")
    single = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        single[name] = logits(model, x)
    with torch.no_grad():
        mixed = model(x, adapter_names=["b", "a"]).logits
    torch.testing.assert_close(mixed[0], single["b"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], single["a"][1], atol=1e-5, rtol=1e-5)


def test_engine_serves_expert_adapters_side_by_side(two_adapters):
    """Continuous batching over two expert adapters and the base: each request's text is what its adapter alone
    generates (the routed tokens of one step belong to rows of different adapters)."""
    import threading

    from serving_fixtures import greedy_alone
    from tiny_models import make_tokenizer

    from hf_deltacome.serving import load_deltas
    from hf_deltacome.serving.engine import Engine, GenerationRequest, SamplingParams

    tok = make_tokenizer()
    model = load_deltas(mixtral(), {name: str(folder) for name, folder in two_adapters.items()})
    refs = {name: PeftModel.from_pretrained(mixtral(), folder).eval() for name, folder in two_adapters.items()}
    refs["__base__"] = mixtral()
    jobs = [("a", "The first prompt", 12), ("b", "x=", 10), ("__base__", "Hi", 8), ("b", "def f(", 12)]
    with Engine(model, tok, max_batch=4) as engine:
        started = []
        for adapter, text, n in jobs:
            events, done = [], threading.Event()

            def sink(event, events=events, done=done):
                events.append(event)
                if event.kind != "text":
                    done.set()

            request = engine.submit(GenerationRequest(tok(text).input_ids, adapter,
                                                      SamplingParams(max_tokens=n, temperature=0), sink))  # fmt: skip
            started.append((request, events, done, n))
        for request, events, done, n in started:
            assert done.wait(60)
            _, expected = greedy_alone(refs[request.adapter], tok, request.prompt_ids, n)
            assert "".join(e.text for e in events if e.kind == "text") == expected
        assert engine.stats["max_rows"] >= 2  # rows of different adapters decoded together


def test_gpt_oss_experts_with_biases_round_trip(tmp_path):
    """Transposed (in x out) expert weights with biases and a clamped interleaved gate."""
    base, x = tiny_mixture("GptOss"), ids(2, 4, 32)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.model.layers[0].mlp.experts.gate_up_proj.add_(0.02 * torch.randn(ft.model.layers[0].mlp.experts.gate_up_proj.shape))
        ft.model.layers[1].mlp.experts.down_proj_bias.add_(0.05)
    model = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=1 / 2), calibration=ids(1), progress=False)
    layout = model.peft_config["default"].layout
    assert layout["model.layers.0.mlp.experts.1.gate_up_proj"]["shape"] == [128, 64]  # out x in, as a linear's
    assert layout["model.layers.1.mlp.experts.1.down_proj"]["bias"]
    assert error(model, ft, base, x) < 0.5
    before = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_mixture("GptOss"), tmp_path)
    assert torch.equal(logits(loaded, x), before)
    merged = loaded.merge_and_unload()
    assert merged.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 64, 128)
    torch.testing.assert_close(logits(merged, x), before, atol=2e-4, rtol=1e-4)


def test_failed_compression_puts_the_fused_experts_back(monkeypatch):
    base = mixtral()
    ft = finetune(base)
    originals = [base.model.layers[i].mlp.experts for i in range(2)]

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("hf_deltacome.compression.pipeline.walk_layers", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        compress(base, ft, DeltaCoMeConfig(ratio=1 / 4), calibration=ids(1), progress=False)
    for i in range(2):
        assert base.model.layers[i].mlp.experts is originals[i]
        assert is_fused_experts(ft.model.layers[i].mlp.experts)
    assert not any(isinstance(m, ExpertsAsLinears) for m in [*base.modules(), *ft.modules()])


def test_named_linears_reads_a_fused_fine_tune_by_expert():
    model = mixtral()
    found = named_linears(model)
    w = found["model.layers.0.mlp.experts.2.down_proj"].weight
    assert torch.equal(w, model.model.layers[0].mlp.experts.down_proj[2])
    assert is_fused_experts(model.model.layers[0].mlp.experts)  # left as it was


FAMILIES = {  # beside the fused experts: a shared expert of plain linears (Qwen2-MoE), a dense first layer (DeepSeek)
    "Qwen2Moe": {"moe_intermediate_size": 48, "intermediate_size": 96, "shared_expert_intermediate_size": 64,
                 "num_experts": 4, "num_experts_per_tok": 2},  # fmt: skip
    "Qwen3Moe": {"moe_intermediate_size": 48, "intermediate_size": 96, "num_experts": 4, "num_experts_per_tok": 2,
                 "head_dim": 16},  # fmt: skip
    "Olmoe": {"intermediate_size": 48, "num_experts": 4, "num_experts_per_tok": 2},
    "DeepseekV3": {"moe_intermediate_size": 48, "intermediate_size": 96, "n_routed_experts": 4, "num_experts_per_tok": 2,
                   "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": None, "kv_lora_rank": 16,
                   "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "n_shared_experts": 1},  # fmt: skip
}


GPT_OSS = {"intermediate_size": 64, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
           "layer_types": ["full_attention"] * 2}  # fmt: skip


def tiny_mixture(arch: str) -> nn.Module:
    """A tiny random transformers mixture of family ``arch`` (``"GptOss"`` or a key of `FAMILIES`), its expert biases
    drawn (GPT-OSS initialises them to zero)."""
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 **(GPT_OSS if arch == "GptOss" else FAMILIES[arch]))  # fmt: skip
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name and "bias" in name:
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_other_mixture_families_round_trip(arch, tmp_path):
    base, x = tiny_mixture(arch), ids(2, 2, 24)
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "layers" in name and p.dim() >= 2:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    model = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=1 / 4), calibration=ids(1), progress=False)
    fused = model.peft_config["default"].compression_info["fused_experts"]
    assert fused == [n for n, m in base.named_modules() if is_fused_experts(m)]
    before = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_mixture(arch), tmp_path)
    assert torch.equal(logits(loaded, x), before)
    merged = loaded.merge_and_unload()
    assert [n for n, m in merged.named_modules() if is_fused_experts(m)] == fused
    torch.testing.assert_close(logits(merged, x), before, atol=2e-4, rtol=1e-4)
    if arch == "Qwen2Moe":  # `deltacome info`: the experts and the shared expert as rows of their own
        kinds = summarize_adapter(tmp_path).per_kind()
        assert kinds["experts.*.down_proj"]["count"] == 8 and kinds["shared_expert.down_proj"]["count"] == 2


def test_fused_weights_follow_a_dtype_change_while_unfused(tmp_path):
    """``.to()`` on a model carrying an expert adapter gives each per-expert linear its own storage: unloading
    stacks them back into fused weights of the new dtype."""
    base = mixtral()
    compress(copy.deepcopy(base), finetune(base), DeltaCoMeConfig(ratio=1 / 4), calibration=ids(1),
             progress=False).save_pretrained(tmp_path)  # fmt: skip
    model = PeftModel.from_pretrained(mixtral(), tmp_path).to(torch.bfloat16)
    model.merge_adapter()
    x = ids(2, 2, 16)
    want = logits(model, x)  # the per-expert linears, merged in bfloat16
    merged = model.unload()
    experts = merged.model.layers[0].mlp.experts
    assert is_fused_experts(experts) and experts.gate_up_proj.dtype == torch.bfloat16
    torch.testing.assert_close(logits(merged, x), want, atol=0.05, rtol=0.02)


def test_cli_compresses_a_mixture_loaded_or_streamed(tmp_path):
    """`deltacome compress` loads a small mixture-of-experts pair (the default's whole-model checks run) and streams
    it with --stream (one expert's linear at a time: test_stream_experts.py); both adapters load onto the base."""
    from tiny_models import make_tokenizer

    from hf_deltacome.cli import main

    base = mixtral()
    for name, model in (("base", base), ("ft", finetune(base))):
        model.save_pretrained(tmp_path / name)
        make_tokenizer().save_pretrained(tmp_path / name)
    args = ["compress", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--quantizer", "rtn",
            "--ratio", "1/8", "--no-save-tokenizer"]  # fmt: skip
    for out, extra in (("out", []), ("streamed", ["--stream"])):
        assert main([*args, "--output", str(tmp_path / out), *extra]) == 0
        loaded = PeftModel.from_pretrained(mixtral(), tmp_path / out)
        assert "model.layers.0.mlp.experts.3.gate_up_proj" in loaded.peft_config["default"].layout
        assert loaded.peft_config["default"].compression_info["streamed"] is (out == "streamed")


def test_offloaded_experts_are_named():
    """Experts whose weights accelerate left on the meta device cannot be viewed per expert: the error names them."""
    from hf_deltacome.linears import unfuse_experts

    with torch.device("meta"):
        model = mixtral()
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.experts has its weights on the meta device"):
        unfuse_experts(model)


def test_experts_carried_dense_load_onto_the_fused_base(tmp_path):
    """A layer whose experts are excluded from compression is carried dense (PEFT's modules_to_save of its per-expert
    linears): loading swaps in that layer's stand-in too, though the layout names none of its linears."""
    base = mixtral(layers=6)
    ft = finetune(base)
    model = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=1 / 2, exclude_modules=r".*layers\.5\.mlp\.experts\..*"),
                     calibration=ids(1), progress=False)  # fmt: skip
    config = model.peft_config["default"]
    assert "model.layers.5.mlp.experts.3.down_proj" in config.modules_to_save
    assert not any(n.startswith("model.layers.5.mlp.experts.") for n in config.layout)
    assert config.compression_info["fused_experts"] == [f"model.layers.{i}.mlp.experts" for i in range(6)]
    x = ids(2, 2, 16)
    before = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mixtral(layers=6), tmp_path)
    assert torch.equal(logits(loaded, x), before)
    with torch.no_grad():  # a mixed batch: the dense copies take each routed token's row adapter too
        mixed = loaded(x, adapter_names=["__base__", "default"]).logits
    torch.testing.assert_close(mixed[1], before[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], logits(mixtral(layers=6), x)[0], atol=1e-5, rtol=1e-5)
    merged = loaded.merge_and_unload()
    assert is_fused_experts(merged.model.layers[5].mlp.experts)
    assert torch.equal(merged.model.layers[5].mlp.experts.down_proj, ft.model.layers[5].mlp.experts.down_proj)
