"""Streamed compression: pairs read from sharded safetensors one layer at a time give the loaded path's bytes."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import MARGIN, assert_beats_baselines, logits, make_finetune, make_model, make_tokenizer, random_ids
from transformers import AutoModelForCausalLM

import hf_deltacome.compression.streaming as streaming
from hf_deltacome import DeltaCoMeConfig
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.errors import CalibrationError, ConfigError, DeltaCoMeError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def save_pair(folder: Path, base, ft, *, tokenizer: bool = True, shard: str = "40KB") -> tuple[str, str]:
    """Write both models as sharded safetensors (several files and an index) with a tokenizer; their paths."""
    paths = []
    for role, model in (("base", base), ("finetuned", ft)):
        model.save_pretrained(folder / role, max_shard_size=shard)
        if tokenizer:
            make_tokenizer().save_pretrained(folder / role)
        paths.append(str(folder / role))
    assert (folder / "base" / "model.safetensors.index.json").is_file()
    return paths[0], paths[1]


def written(model, folder: Path) -> dict[str, str]:
    """Hashes of the saved adapter: the weights file and the config without its timings and records."""
    model.save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.pop("compression_info")
    weights = (folder / "adapter_model.safetensors").read_bytes()
    return {"weights": hashlib.sha256(weights).hexdigest(), "config": json.dumps(cfg, sort_keys=True)}


def loaded(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


# a streamed run never holds the whole fine-tune, so it cannot distil the bands' scales: the loaded runs of the
# calibrated cases are asked not to (distill_bands=False), so both write the same bytes
CASES = {
    "rtn": (dict(quantizer="rtn"), False),
    "gptq": (dict(min_rank_share=0.0, ratio="1/8", distill_bands=False), True),
    "gptq-bias-qwen2": (dict(ratio="1/4", act_order=True, distill_bands=False), True),
    "bitdelta-no-distill": (dict(method="bitdelta", distill_steps=0, ratio="1/8"), True),
}
# (bound, margin) on the streamed adapter's relative logits error; measured in float32: rtn 0.41, gptq 0.15,
# gptq-bias-qwen2 0.075, bitdelta 0.67, against 0.94-0.98 for a zero delta and 1.1-1.27 for a shuffled one
BOUNDS = {"rtn": (0.5, MARGIN), "gptq": (0.25, MARGIN), "gptq-bias-qwen2": (0.15, MARGIN),
          "bitdelta-no-distill": (0.74, 0.8)}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_adapter_is_byte_identical_to_loaded(tmp_path, case, dtype):
    kwargs, calibrated = CASES[case]
    arch = "qwen2" if "qwen2" in case else "llama"
    base = make_model(arch, seed=3).to(dtype)
    ft = make_finetune(base, seed=3)
    b, f = save_pair(tmp_path, base, ft)
    calib = random_ids(base, 8, 24, seed=5) if calibrated else None
    cfg = DeltaCoMeConfig(**kwargs)
    reference = compress(loaded(b), loaded(f), cfg, calibration=calib, progress=False)
    streamed = compress(b, f, cfg, calibration=calib, progress=False)
    assert streamed.peft_config["default"].compression_info["streamed"] is True
    assert written(streamed, tmp_path / "streamed") == written(reference, tmp_path / "loaded")
    # the streamed adapter loads onto the base and runs like the loaded one
    ids = random_ids(base, 2, 12, seed=7)
    again = PeftModel.from_pretrained(loaded(b), tmp_path / "streamed").eval()
    torch.testing.assert_close(logits(again, ids), logits(reference, ids))
    # and it carries the fine-tune (byte identity alone would also hold for two empty adapters)
    bound, margin = BOUNDS[case]
    assert_beats_baselines(again.float(), loaded(f).float(), loaded(b).float(), ids, bound, margin=margin)


def test_streamed_run_only_holds_one_layer_at_a_time(tmp_path, monkeypatch):
    base = make_model("llama", seed=1, num_hidden_layers=4)
    b, f = save_pair(tmp_path, base, make_finetune(base, seed=1))
    held: list[set[str]] = []
    while_filling: list[set[str]] = []  # real decoder weights at the moment one linear is read to be compressed
    real = streaming.StreamedPair.hold

    def spy(self, names, *, base, finetuned):
        real_params = {n for n, p in self.finetuned.named_parameters() if not p.is_meta}
        if base is not None:
            real_params |= {n for n, p in base.named_parameters() if not p.is_meta and "modules_to_save" not in n}
        layer_params = {n for n in real_params if n.startswith("model.layers.")}
        held.append({n.split(".")[2] for n in layer_params})
        if len(names) == 1 and names[0].endswith("_proj"):
            while_filling.append(layer_params)
        return real(self, names, base=base, finetuned=finetuned)

    monkeypatch.setattr(streaming.StreamedPair, "hold", spy)
    model = compress(b, f, DeltaCoMeConfig(ratio="1/8"), calibration=random_ids(base, 4, 16), progress=False)
    assert len(held) > 4 and all(len(layers) <= 1 for layers in held)  # never two decoder layers in memory
    # and no whole layer of either model while a linear is compressed (only that linear's two weights are read)
    assert len(while_filling) == 4 * 7 and all(not params for params in while_filling), while_filling[:2]
    assert all(p.is_meta for n, p in model.base_model.model.named_parameters() if "base_layer" in n)


def test_hessians_are_collected_one_input_width_at_a_time(tmp_path, monkeypatch):
    """Past ONE_PASS_HESSIAN_BYTES the wide down_proj Hessian only exists once the narrower linears are done (its
    own pass); a small layer takes one pass for all. The adapter is the same either way (tests/test_golden.py pins
    the bytes of the one-pass walk)."""
    import hf_deltacome.compression.pipeline as pipeline_mod

    base = make_model("llama", seed=1, num_hidden_layers=2)
    b, f = save_pair(tmp_path, base, make_finetune(base, seed=1))
    events: list[tuple[str, ...]] = []
    real_init, real_fill = pipeline_mod.HessianCollector.__init__, pipeline_mod._Filler.fill

    def init(self, modules, **kwargs):
        events.append(("collect", *sorted(n.rsplit(".", 1)[-1] for n in modules)))
        real_init(self, modules, **kwargs)

    def fill(self, name, hessian, device):
        events.append(("fill", name.rsplit(".", 1)[-1]))
        real_fill(self, name, hessian, device)

    monkeypatch.setattr(pipeline_mod.HessianCollector, "__init__", init)
    monkeypatch.setattr(pipeline_mod._Filler, "fill", fill)
    ids = random_ids(base, 2, 16)
    narrow = ("collect", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    fills = [("fill", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")]
    states = []
    for limit, per_layer in [
        (0, [narrow, *fills, ("collect", "down_proj"), ("fill", "down_proj")]),
        (pipeline_mod.ONE_PASS_HESSIAN_BYTES, [(*narrow[:1], "down_proj", *narrow[1:]), *fills, ("fill", "down_proj")]),
    ]:
        monkeypatch.setattr(pipeline_mod, "ONE_PASS_HESSIAN_BYTES", limit)
        events.clear()
        model = compress(b, f, DeltaCoMeConfig(ratio="1/8"), calibration=ids, progress=False)
        assert events == per_layer * 2
        states.append({k: v.clone() for k, v in model.state_dict().items() if "deltacome" in k})
    assert states[0].keys() == states[1].keys() and len(states[0]) > 0
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_streamed_fallbacks_are_recorded_and_logged(tmp_path, caplog):
    base = make_model("llama", seed=2)
    b, f = save_pair(tmp_path, base, make_finetune(base, seed=2))
    with caplog.at_level(logging.INFO, logger="hf_deltacome"):
        model = compress(b, f, DeltaCoMeConfig(ratio="1/8"), num_samples=4, seq_len=32, progress=False)
        bands = compress(b, f, DeltaCoMeConfig(ratio="1/8", dare_modules=None), num_samples=4, seq_len=32,
                         progress=False)  # fmt: skip
    info = model.peft_config["default"].compression_info
    assert info["calibration"].startswith("built-in generic text") and info["num_samples"] == 4
    assert info["rank_share"]["chosen"] == 0.0 and "streamed" in info["rank_share"]["fallback"]
    # the MLP as DARE is found on the streamed skeleton too; with it no residual is weighed
    sparse = {n.rsplit(".", 1)[-1] for n, e in model.peft_config["default"].layout.items() if "sparse" in e}
    assert sparse == {"down_proj", "gate_proj", "up_proj"} and "residual" not in info
    info = bands.peft_config["default"].compression_info
    assert info["residual"]["chosen"] == "none" and "streamed" in info["residual"]["fallback"]
    assert all("sparse" not in e for e in bands.peft_config["default"].layout.values())
    assert info["distill"]["layerwise"] == 2  # streamed, the bands are distilled one layer at a time
    assert "built-in generic text" in caplog.text and "min_rank_share='auto'" in caplog.text
    for option in (dict(search="greedy"), dict(allocation="adaptive")):
        with pytest.raises(ConfigError, match="whole model; a streamed compression cannot"):
            compress(b, f, DeltaCoMeConfig(**option), progress=False)
    bitdelta = compress(b, f, DeltaCoMeConfig(method="bitdelta"), num_samples=2, seq_len=16, progress=False)
    assert bitdelta.peft_config["default"].compression_info["distill"]["layerwise"] == 2  # its sign scales
    rtn = compress(b, f, DeltaCoMeConfig(method="bitdelta", quantizer="rtn"), progress=False)  # no activations
    assert rtn.peft_config["default"].compression_info["distill"]["skipped"].startswith("streamed")


def test_streamed_runs_distil_each_layer_against_the_finetunes(tmp_path):
    """Without both whole models a streamed run distils the bands' scales layer by layer (the layer's output against
    the fine-tune's layer on the same inputs): kept only where the layer's error fell, and the whole model ends
    closer to the fine-tune than without it."""
    base = make_model("llama", seed=4)
    ft = make_finetune(base, seed=4)
    b, f = save_pair(tmp_path, base, ft)
    calib, x = random_ids(base, 16, 64, seed=5), random_ids(base, 8, 32, seed=9)  # x: held-out sequences
    errors, records = {}, {}
    for steps in (0, 50):
        model = compress(b, f, DeltaCoMeConfig(ratio="1/16", dare_modules=None, distill_steps=steps),
                         calibration=calib, progress=False)  # fmt: skip
        records[steps] = model.peft_config["default"].compression_info.get("distill")
        model.save_pretrained(tmp_path / str(steps))
        again = PeftModel.from_pretrained(loaded(b), tmp_path / str(steps)).eval()
        out, want, ref = logits(again, x), logits(loaded(f), x), logits(loaded(b), x)
        errors[steps] = float((out - want).norm() / (want - ref).norm())
    assert records[0] is None
    record = records[50]
    assert record["layerwise"] == 2 and record["kept"] >= 1 and record["error_after"] < record["error_before"]
    assert errors[50] < errors[0], errors
    # a fine-tune saved in another dtype than its base: its layer runs in its own dtype as the teacher
    b, f = save_pair(tmp_path / "mixed", base, ft.to(torch.bfloat16))
    model = compress(b, f, DeltaCoMeConfig(ratio="1/16", dare_modules=None), calibration=calib, progress=False)
    assert model.peft_config["default"].compression_info["distill"]["layerwise"] == 2


def test_streamed_calibration_needs_a_tokenizer_or_ids(tmp_path):
    base = make_model("llama", seed=2)
    b, f = save_pair(tmp_path, base, make_finetune(base, seed=2), tokenizer=False)
    with pytest.raises(CalibrationError, match="need a tokenizer"):
        compress(b, f, DeltaCoMeConfig(), progress=False)
    model = compress(b, f, DeltaCoMeConfig(), calibration=random_ids(base, 2, 16), progress=False)
    assert model.peft_config["default"].compression_info["calibration"] == "token tensor (2, 16)"


def test_streamed_resume_skips_finished_layers(tmp_path, monkeypatch):
    base = make_model("llama", seed=4)
    b, f = save_pair(tmp_path, base, make_finetune(base, seed=4))
    cfg, ids = DeltaCoMeConfig(ratio="1/8", min_rank_share=0.0), random_ids(base, 4, 16)
    reference = compress(b, f, cfg, calibration=ids, progress=False)
    real = streaming.StreamedPair.hold

    def dying(self, names, **kw):
        if any(n.startswith("model.layers.1") for n in names):
            raise KeyboardInterrupt
        return real(self, names, **kw)

    monkeypatch.setattr(streaming.StreamedPair, "hold", dying)
    with pytest.raises(KeyboardInterrupt):
        compress(b, f, cfg, calibration=ids, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "layer_0000.safetensors").exists()
    monkeypatch.setattr(streaming.StreamedPair, "hold", real)
    seen = []
    monkeypatch.setattr("hf_deltacome.compression.pipeline.compress_module",
                        lambda d, h, e, c, name="": seen.append(name) or real_compress(d, h, e, c, name=name))  # fmt: skip
    resumed = compress(b, f, cfg, calibration=ids, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert seen and all(n.startswith("model.layers.1.") for n in seen)  # layer 0 came from its checkpoint
    assert written(resumed, tmp_path / "resumed") == written(reference, tmp_path / "reference")


def real_compress(*args, **kwargs):
    from hf_deltacome.compression.modules import compress_module

    return compress_module(*args, **kwargs)


def test_streaming_refuses_what_it_cannot_read(tmp_path):
    base = make_model("llama")
    b, f = save_pair(tmp_path, base, make_finetune(base))
    with pytest.raises(ConfigError, match="both models loaded, or both as paths"):
        compress(b, loaded(f), DeltaCoMeConfig(quantizer="rtn"), progress=False)
    with pytest.raises(DeltaCoMeError, match="no such model directory"):
        compress(str(tmp_path / "nowhere"), f, DeltaCoMeConfig(quantizer="rtn"), progress=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((Path(b) / "config.json").read_text())
    torch.save({}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="no model.safetensors .*load the models instead"):
        compress(str(tmp_path / "bin"), f, DeltaCoMeConfig(quantizer="rtn"), progress=False)
    shard = next(Path(f).glob("model-0000*.safetensors"))
    shard.unlink()
    with pytest.raises(ConfigError, match=f"cannot read {shard.name}"):
        compress(b, f, DeltaCoMeConfig(quantizer="rtn"), progress=False)


def test_streamed_resume_with_another_finetune_is_refused(tmp_path):
    """The checkpoint records the streamed fine-tune's fingerprint (read from its files, the skeleton has no
    weights): a resume with another fine-tune is refused, one with the same goes on."""
    base = make_model("llama", seed=4)
    b, f = save_pair(tmp_path / "one", base, make_finetune(base, seed=4))
    _, other = save_pair(tmp_path / "two", base, make_finetune(base, seed=5))
    cfg = DeltaCoMeConfig(quantizer="rtn", ratio="1/8")
    compress(b, f, cfg, progress=False, checkpoint_dir=tmp_path / "ckpt")
    compress(b, f, cfg, progress=False, checkpoint_dir=tmp_path / "ckpt")  # the same inputs resume
    with pytest.raises(ConfigError, match=r"another fine-tuned model \(the weights differ"):
        compress(b, other, cfg, progress=False, checkpoint_dir=tmp_path / "ckpt")


def test_streamed_tied_embeddings(tmp_path):
    """A tied lm_head has no tensor of its own in the checkpoint (SmolLM2): the skeleton ties it to the embedding."""
    base = make_model("llama", seed=6, tie_word_embeddings=True)
    b, f = save_pair(tmp_path, base, make_finetune(base, seed=6, embedding_rows=3))
    assert "lm_head.weight" not in json.loads((Path(b) / "model.safetensors.index.json").read_text())["weight_map"]
    cfg = DeltaCoMeConfig(quantizer="rtn", ratio=1.0)  # room for the dense embedding
    reference = compress(loaded(b), loaded(f), cfg, progress=False)
    streamed = compress(b, f, cfg, progress=False)
    assert "model.embed_tokens" in streamed.peft_config["default"].modules_to_save
    assert written(streamed, tmp_path / "streamed") == written(reference, tmp_path / "loaded")


def test_a_quantized_checkpoint_is_loaded_not_streamed(tmp_path):
    """A base saved with a ``quantization_config`` (an AMLQ base) holds packed codes, not weights: the CLI loads it
    through its quantizer instead of streaming the raw tensors, and says why."""
    from hf_deltacome.compression.streaming import why_not_streamable

    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert why_not_streamable(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "amlq"}}))
    assert "quantized model (amlq)" in why_not_streamable(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", "num_experts": 60}))
    assert why_not_streamable(tmp_path) is None  # streamed one expert at a time (test_stream_experts.py)


def test_spilled_hessians_give_the_same_adapter(tmp_path, monkeypatch):
    """A Hessian's last user gets it from disk when it is large (there: a 7B down_proj's); with every Hessian
    counted as large the adapter is the same bytes, and Hessians shared by q/k/v or gate/up wait for their last user."""
    import hf_deltacome.compression.pipeline as pipeline_mod
    import hf_deltacome.quant.spill as spill

    base = make_model("llama", seed=1, num_hidden_layers=2)
    b, f = save_pair(tmp_path, base, make_finetune(base, seed=1))
    calib = random_ids(base, 2, 16)
    cfg = DeltaCoMeConfig(ratio="1/8")
    reference = written(compress(b, f, cfg, calibration=calib, progress=False), tmp_path / "in-memory")
    spilled: list[int | None] = []

    def spy(h, min_bytes=None):
        out = spill.maybe_spill(h, min_bytes=0)
        spilled.append(out.shape[0] if isinstance(out, spill.SpilledHessian) else None)
        return out

    monkeypatch.setattr(pipeline_mod, "maybe_spill", spy)
    assert written(compress(b, f, cfg, calibration=calib, progress=False), tmp_path / "spilled") == reference
    hidden, inter = base.config.hidden_size, base.config.intermediate_size
    # per layer: v_proj (last of q/k/v), o_proj, up_proj (last of gate/up) and down_proj, each Hessian once
    assert spilled == [hidden, hidden, hidden, inter] * 2
