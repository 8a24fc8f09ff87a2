"""Mixture-of-experts pairs streamed from their checkpoints: transformers' load-time conversion of the per-expert
tensors (Mixtral's ``w1``/``w3``, Qwen2-MoE's ``gate_proj``/``up_proj``) replayed one expert at a time, and a
checkpoint that stores the experts fused (GPT-OSS) read one expert's row at a time; the adapter is byte-identical to
the loaded path's."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from test_experts import FAMILIES, finetune, ids, mixtral
from test_streaming import loaded, written
from tiny_models import logits, make_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

import hf_deltacome.compression.pipeline as pipeline_mod
import hf_deltacome.compression.streaming as streaming
from hf_deltacome import DeltaCoMeConfig
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.compression.stream_keys import Converted, ExpertSlice
from hf_deltacome.errors import ConfigError
from hf_deltacome.linears import ExpertsAsLinears

pytestmark = pytest.mark.usefixtures("one_thread")

# the loaded run's whole-model checks (residual, rank share, distillation) have a streamed fallback: both runs are
# asked for the fallback's choice, so they write the same bytes
CONFIG = dict(min_rank_share=0.0, residual="none", distill_bands=False, ratio="1/4")


def family(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "Mixtral":
        return mixtral()
    if arch == "GptOss":  # expert weights stored fused in the checkpoint, in x out, with biases
        cfg = transformers.GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                        num_experts_per_tok=2, layer_types=["full_attention"] * 2)  # fmt: skip
    else:
        cfg = getattr(transformers, f"{arch}Config")(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=2, **FAMILIES[arch])  # fmt: skip
    return getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()


def save(tmp_path: Path, base: nn.Module, ft: nn.Module) -> tuple[str, str]:
    for role, model in (("base", base), ("ft", ft)):
        model.save_pretrained(tmp_path / role, max_shard_size="200KB")  # several shards
        make_tokenizer().save_pretrained(tmp_path / role)
    return str(tmp_path / "base"), str(tmp_path / "ft")


def perturbed(base: nn.Module) -> nn.Module:
    if isinstance(base, transformers.MixtralForCausalLM):
        return finetune(base)
    ft, g = copy.deepcopy(base), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "layers" in name and (p.dim() >= 2 or "experts" in name):  # expert biases too (GPT-OSS)
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return ft


@pytest.mark.parametrize("arch", ["Mixtral", "Qwen2Moe", "DeepseekV3", "GptOss"])
def test_streamed_mixture_is_byte_identical_to_loaded(arch, tmp_path):
    base = family(arch)
    b, f = save(tmp_path, base, perturbed(base))
    cfg = DeltaCoMeConfig(**CONFIG)
    reference = compress(loaded(b), loaded(f), cfg, calibration=ids(1), progress=False)
    streamed = compress(b, f, cfg, calibration=ids(1), progress=False)
    info = streamed.peft_config["default"].compression_info
    assert info["streamed"] is True and info["fused_experts"] == reference.peft_config["default"].compression_info[
        "fused_experts"]  # fmt: skip
    assert any(".experts.3." in n for n in streamed.peft_config["default"].layout)
    assert written(streamed, tmp_path / "streamed") == written(reference, tmp_path / "loaded")
    again = PeftModel.from_pretrained(loaded(b), tmp_path / "streamed").eval()  # onto the fused base
    x = ids(2, 2, 16)
    torch.testing.assert_close(logits(again, x), logits(reference, x))


def test_each_expert_is_read_alone(tmp_path, monkeypatch):
    """While one expert's linear is compressed, only that expert's checkpoint tensors are read (Mixtral: its w1 and
    w3 for gate_up_proj; GPT-OSS: one row of the fused tensor), not the layer's fused 3-D weights."""
    reads: list[tuple[str, int | None]] = []
    real_handle = streaming.Checkpoint._handle

    class Spy:
        def __init__(self, handle):
            self.handle = handle

        def get_tensor(self, key):
            reads.append((key, None))
            return self.handle.get_tensor(key)

        def get_slice(self, key):
            sl = self.handle.get_slice(key)

            class Row:
                def __getitem__(self, i):
                    reads.append((key, i))
                    return sl[i]

            return Row()

    monkeypatch.setattr(streaming.Checkpoint, "_handle", lambda self, key: Spy(real_handle(self, key)))
    per_fill: dict[tuple[str, str], list] = {}
    real_fill = pipeline_mod._Filler.fill
    arch = ""

    def fill(self, name, hessian, device):
        reads.clear()
        real_fill(self, name, hessian, device)
        per_fill[arch, name] = list(reads)

    monkeypatch.setattr(pipeline_mod._Filler, "fill", fill)
    for arch in ("Mixtral", "GptOss"):
        base = family(arch)
        b, f = save(tmp_path / arch, base, perturbed(base))
        model = compress(b, f, DeltaCoMeConfig(**CONFIG), calibration=ids(1), progress=False)
        assert isinstance(model.base_model.model.model.layers[0].mlp.experts, ExpertsAsLinears)
        assert all(p.is_meta for n, p in model.base_model.model.named_parameters() if "base_layer" in n)
    mixtral_gate = per_fill["Mixtral", "model.layers.1.mlp.experts.2.gate_up_proj"]
    assert sorted(mixtral_gate) == sorted([(f"model.layers.1.block_sparse_moe.experts.2.{w}.weight", None)
                                           for w in ("w1", "w3")] * 2)  # base and fine-tune  # fmt: skip
    oss_down = per_fill["GptOss", "model.layers.0.mlp.experts.3.down_proj"]
    assert sorted(set(oss_down)) == [("model.layers.0.mlp.experts.down_proj", 3),
                                     ("model.layers.0.mlp.experts.down_proj_bias", 3)]  # fmt: skip


def test_sources_replay_transformers_conversion(tmp_path):
    """The skeleton's sources: a fused parameter of Mixtral is converted from its experts' tensors (in expert order,
    10 after 9), each per-expert linear a slice of it; the router is renamed (block_sparse_moe.gate -> mlp.gate)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=11)  # fmt: skip
    model = MixtralForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    pair_model, keys = streaming.skeleton(streaming.Checkpoint(tmp_path, "base"))
    fused = keys["model.layers.0.mlp.experts.gate_up_proj"]
    assert isinstance(fused, Converted)
    w1 = dict(fused.sources)[next(p for p, _ in fused.sources if "w1" in p)]
    assert [int(re.search(r"experts\.(\d+)\.", k).group(1)) for k in w1] == list(range(11))
    assert keys["model.layers.0.mlp.gate.weight"] == "model.layers.0.block_sparse_moe.gate.weight"
    streaming.unfused_skeleton(pair_model, keys)
    assert keys["model.layers.0.mlp.experts.10.down_proj.weight"] == ExpertSlice(
        keys["model.layers.0.mlp.experts.down_proj"], 10, False)  # fmt: skip
    ckpt = streaming.Checkpoint(tmp_path, "base")
    want = model.model.layers[0].mlp.experts
    torch.testing.assert_close(ckpt.read(keys["model.layers.0.mlp.experts.10.gate_up_proj.weight"]),
                               want.gate_up_proj[10], rtol=0, atol=0)  # fmt: skip
    assert torch.equal(ckpt.read(fused), want.gate_up_proj)


def test_experts_hessians_are_collected_a_few_at_a_time(tmp_path, monkeypatch):
    """Past PASS_HESSIAN_BYTES a width's linears take several passes of the layer (a mixture's experts have a
    Hessian each): the same adapter, with fewer Hessians alive at once."""
    base = family("Mixtral")
    b, f = save(tmp_path, base, perturbed(base))
    cfg = DeltaCoMeConfig(**CONFIG)
    reference = written(compress(b, f, cfg, calibration=ids(1), progress=False), tmp_path / "one")
    passes: list[list[str]] = []
    real = pipeline_mod._Filler._hessians

    def spy(self, layer_name, inputs, *args):
        passes.append(sorted(re.sub(r"^model\.layers\.\d+\.(self_attn|mlp)\.", "", n) for n in inputs))
        return real(self, layer_name, inputs, *args)

    monkeypatch.setattr(pipeline_mod._Filler, "_hessians", spy)
    monkeypatch.setattr(pipeline_mod, "ONE_PASS_HESSIAN_BYTES", 0)
    monkeypatch.setattr(pipeline_mod, "PASS_HESSIAN_BYTES", 2 * 96**2 * 4)  # two experts' down_proj (96 wide)
    assert written(compress(b, f, cfg, calibration=ids(1), progress=False), tmp_path / "split") == reference
    # each layer: the attention's four 64-wide projections (one parent, kept together), the experts' 64-wide
    # gate_up_proj, then their 96-wide down_proj two by two
    assert passes[:4] == [["k_proj", "o_proj", "q_proj", "v_proj"], [f"experts.{e}.gate_up_proj" for e in range(4)],
                          ["experts.0.down_proj", "experts.1.down_proj"], ["experts.2.down_proj", "experts.3.down_proj"]]
    assert passes[4:] == passes[:4] and len(passes) == 8


def test_a_missing_expert_tensor_is_named(tmp_path):
    """A checkpoint that lacks one expert's tensor: the error names the fused parameter and both shapes."""
    from safetensors.torch import load_file, save_file

    base = family("Mixtral")
    b, f = save(tmp_path, base, perturbed(base))
    index = Path(b) / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    shard = Path(b) / weight_map.pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ConfigError, match=r"--base .*model\.layers\.1\.mlp\.experts\.down_proj \(converted from its "
                                          r"checkpoint tensors\)' has shape \[3, 64, 96\].*expects \[4, 64, 96\]"):  # fmt: skip
        compress(b, f, DeltaCoMeConfig(**CONFIG), calibration=ids(1), progress=False)


@pytest.mark.parametrize("arch", ["Mixtral", "GptOss"])
def test_streamed_merge_of_a_mixture_is_bit_identical_to_the_loaded_merge(arch, tmp_path, caplog, monkeypatch):
    """`deltacome merge` streams a mixture's base: each fused experts parameter is read through the conversion, every
    expert's delta (or dense copy) merged, and written back as save_pretrained writes it (Mixtral: one tensor per
    expert and projection), bit for bit what the loaded merge writes."""
    from test_merge_stream import tensors

    from hf_deltacome.io.adapter_files import packed_delta
    from hf_deltacome.serving import merge_stream
    from hf_deltacome.serving.merge import merge_adapter

    base = family(arch)
    ft = perturbed(base)
    dense = r".*layers\.1\.mlp\.experts\.1\.down_proj"  # one expert's linear carried dense
    model = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(quantizer="rtn", ratio="1/2", exclude_modules=dense),
                     progress=False)  # fmt: skip
    assert "model.layers.1.mlp.experts.1.down_proj" in model.peft_config["default"].modules_to_save
    model.save_pretrained(tmp_path / "adapter")
    base.save_pretrained(tmp_path / "base", max_shard_size="200KB")
    make_tokenizer().save_pretrained(tmp_path / "base")
    caplog.set_level("INFO", logger="hf_deltacome")
    built = []  # the packed deltas the streamed merge fills from the file: one a module (GPT-OSS: a weight, a bias)
    monkeypatch.setattr(merge_stream, "packed_delta", lambda c, s, m: built.append(m) or packed_delta(c, s, m))
    out = {mode: merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / mode, max_shard_size="100KB",
                               in_memory=mode == "loaded") for mode in ("streamed", "loaded")}  # fmt: skip
    assert "merging streamed" in caplog.text
    assert sorted(built) == sorted(model.peft_config["default"].layout)
    streamed, loaded_ = tensors(out["streamed"]), tensors(out["loaded"])
    assert sorted(streamed) == sorted(loaded_)
    assert all(torch.equal(t, loaded_[n]) for n, t in streamed.items())
    saved = tensors(tmp_path / "base")
    assert sorted(streamed) == sorted(saved)  # the checkpoint's own layout
    if arch == "Mixtral":
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in streamed
    # the merged model is the fine-tune where the adapter is exact (the dense copies) and close elsewhere
    merged = AutoModelForCausalLM.from_pretrained(out["streamed"], dtype=torch.float32)
    want = ft.model.layers[1].mlp.experts
    got = merged.model.layers[1].mlp.experts
    assert torch.equal(got.down_proj[1], want.down_proj[1]) and not torch.equal(got.down_proj[3], base.model.layers[
        1].mlp.experts.down_proj[3])  # fmt: skip


def test_a_merge_whose_saved_tensors_cannot_be_replayed_is_merged_loaded(tmp_path, monkeypatch, caplog):
    """When transformers' reverted conversion cannot be replayed one tensor at a time, the streamed merge is refused
    with the model named and the merge runs loaded (same output), instead of failing deep inside transformers."""
    from test_merge_stream import tensors

    import hf_deltacome.compression.stream_keys as stream_keys
    from hf_deltacome.serving.merge import merge_adapter

    base = family("Mixtral")
    model = compress(copy.deepcopy(base), perturbed(base), DeltaCoMeConfig(quantizer="rtn", ratio="1/2"),
                     progress=False)  # fmt: skip
    model.save_pretrained(tmp_path / "adapter")
    base.save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")
    reference = tensors(merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "streamed"))

    def broken(model, state):
        raise RuntimeError("cannot chunk a meta tensor")

    monkeypatch.setattr(stream_keys, "reverted", broken)
    with pytest.raises(ConfigError, match=r"MixtralForCausalLM: save_pretrained's conversion .* cannot be replayed"):
        stream_keys.saved_origins(base)
    caplog.set_level("INFO", logger="hf_deltacome")
    out = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "loaded")
    assert "merging with the whole base in memory: MixtralForCausalLM: save_pretrained's conversion" in caplog.text
    merged = tensors(out)
    assert sorted(merged) == sorted(reference) and all(torch.equal(t, reference[n]) for n, t in merged.items())
