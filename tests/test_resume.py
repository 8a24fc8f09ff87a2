"""Interrupted compression resumes from its per-layer checkpoints and gives the same adapter."""

import copy

import pytest
import torch
from tiny_models import make_finetune, make_model, random_ids

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
