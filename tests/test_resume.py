"""Interrupted compression resumes from its per-layer checkpoints and gives the same adapter."""

import copy

import pytest
import torch
from tiny_models import assert_beats_baselines, make_finetune, make_model, random_ids

import hf_deltacome.compression.modules as methods_mod
from hf_deltacome import ConfigError, DeltaCoMeConfig, compress


def _pair():
    base = make_model("llama", seed=0)
    return base, make_finetune(base, seed=1)


def test_interrupted_compression_resumes_to_the_same_result(tmp_path, monkeypatch):
    base, ft = _pair()
    ids = random_ids(base, num_samples=4, seq_len=16)
    cfg = DeltaCoMeConfig(ratio=1 / 8, group_size=32)
    ckpt = tmp_path / "ckpt"

    reference = compress(copy.deepcopy(base), ft, cfg, calibration=ids, progress=False)

    real = methods_mod.compress_module
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 7:  # layer 0 (7 linears) finishes, layer 1 dies
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("hf_deltacome.compression.pipeline.compress_module", dying)
    with pytest.raises(KeyboardInterrupt):
        compress(copy.deepcopy(base), ft, cfg, calibration=ids, progress=False, checkpoint_dir=ckpt)
    assert (ckpt / "layer_0000.safetensors").exists() and not (ckpt / "layer_0001.safetensors").exists()

    monkeypatch.setattr("hf_deltacome.compression.pipeline.compress_module", real)
    seen = {"n": 0}

    def counting(*args, **kwargs):
        seen["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr("hf_deltacome.compression.pipeline.compress_module", counting)
    resumed = compress(copy.deepcopy(base), ft, cfg, calibration=ids, progress=False, checkpoint_dir=ckpt)
    assert seen["n"] == 7  # only layer 1 was compressed again
    x = random_ids(base, num_samples=2, seq_len=12, seed=5)
    with torch.no_grad():
        assert torch.equal(resumed(x).logits, reference(x).logits)
    assert_beats_baselines(resumed, ft, base, x, 0.5)  # and it is an adapter of the fine-tune: measured 0.39


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    base, ft = _pair()
    ids = random_ids(base, num_samples=2, seq_len=8)
    compress(
        copy.deepcopy(base),
        ft,
        DeltaCoMeConfig(ratio=1 / 8, group_size=32, quantizer="rtn"),
        calibration=ids,
        progress=False,
        checkpoint_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match="other settings"):
        compress(
            copy.deepcopy(base),
            ft,
            DeltaCoMeConfig(ratio=1 / 4, group_size=32, quantizer="rtn"),
            calibration=ids,
            progress=False,
            checkpoint_dir=tmp_path,
        )


def _compress_into(ckpt, ft, calibration, quantizer="gptq", tokenizer=None):
    base = make_model("llama", seed=0)
    cfg = DeltaCoMeConfig(ratio=1 / 8, group_size=32, quantizer=quantizer)
    return compress(base, ft, cfg, calibration=calibration, tokenizer=tokenizer, progress=False, checkpoint_dir=ckpt)


def test_checkpoint_of_another_finetune_is_refused_naming_it(tmp_path):
    base, ft = _pair()
    _compress_into(tmp_path, ft, None, quantizer="rtn")
    _compress_into(tmp_path, ft, None, quantizer="rtn")  # the same inputs resume
    other = make_finetune(base, seed=2)
    with pytest.raises(ConfigError, match=r"another fine-tuned model \(the weights differ") as err:
        _compress_into(tmp_path, other, None, quantizer="rtn")
    assert str(tmp_path) in str(err.value)
    assert "settings" not in str(err.value) and "calibration" not in str(err.value)
    assert "base" not in str(err.value).split("another fine-tuned model")[0]


def test_checkpoint_of_other_calibration_is_refused_naming_it(tmp_path, tokenizer):
    """A stored calibration must not silently replace the caller's: other token ids, or another file (or the same
    file edited), are refused, and the message shows both."""
    base, ft = _pair()
    ids = random_ids(base, num_samples=2, seq_len=8)
    _compress_into(tmp_path / "a", ft, ids)
    other_ids = random_ids(base, num_samples=2, seq_len=8, seed=7)
    with pytest.raises(ConfigError, match=r"other calibration data \(checkpoint: token tensor \(2, 8\)") as err:
        _compress_into(tmp_path / "a", ft, other_ids)
    assert "fine-tuned" not in str(err.value) and "settings" not in str(err.value)
    text = tmp_path / "calib.txt"
    text.write_text("the first calibration text, long enough for a few windows of tokens\n" * 4)
    _compress_into(tmp_path / "b", ft, text, tokenizer=tokenizer)
    _compress_into(tmp_path / "b", ft, text, tokenizer=tokenizer)  # unchanged: resumes
    text.write_text("another calibration text entirely, also long enough for windows\n" * 4)
    with pytest.raises(ConfigError, match=rf"other calibration data \(checkpoint: file {text}"):
        _compress_into(tmp_path / "b", ft, text, tokenizer=tokenizer)


def test_checkpoint_names_the_setting_that_differs(tmp_path):
    base, ft = _pair()
    cfg = DeltaCoMeConfig(ratio=1 / 8, group_size=32, quantizer="rtn", method="svd-uniform", uniform_bits=4)
    compress(copy.deepcopy(base), ft, cfg, progress=False, checkpoint_dir=tmp_path)
    cfg.uniform_bits = 2
    with pytest.raises(ConfigError, match=r"other settings \(uniform_bits: 4 in the checkpoint, 2 now\)"):
        compress(copy.deepcopy(base), ft, cfg, progress=False, checkpoint_dir=tmp_path)


def test_checkpoint_of_other_dare_modules_is_refused(tmp_path):
    """Which targets are stored as DARE alone (``dare_modules``, resolved: the default's MLP) is a setting of the
    checkpoint: a resume that would store them otherwise is refused by name, not finished with mixed layers."""
    base, ft = _pair()
    calib = random_ids(base, 4, 16, seed=1)
    cfg = DeltaCoMeConfig(ratio=1 / 8, group_size=32, distill_bands=False)
    compress(copy.deepcopy(base), ft, cfg, calibration=calib, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"other settings \(dare_modules: \['down_proj', 'gate_proj', 'up_proj'\] in"):
        compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=1 / 8, group_size=32, distill_bands=False,
                                                           dare_modules=None),
                 calibration=calib, progress=False, checkpoint_dir=tmp_path)  # fmt: skip
