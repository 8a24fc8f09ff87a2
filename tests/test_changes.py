"""What counts as changed (beyond the rounding of the lower dtype), and degenerate inputs refused or warned about."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from test_streaming import save_pair
from tiny_models import make_finetune, make_model, random_ids

from hf_deltacome import DeltaCoMeConfig
from hf_deltacome.cli import main
from hf_deltacome.compression.changes import compare_tensors
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.errors import CalibrationError, DegenerateAdapterWarning, EmptyDeltaError

WIDE = dict(hidden_size=128, intermediate_size=352, head_dim=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def test_compare_tensors_at_the_lower_precision():
    x = torch.randn(64, 64)
    assert compare_tensors(x, x.clone()) == "same"
    assert compare_tensors(x, x.bfloat16()) == "rounding" == compare_tensors(x.half(), x)
    assert compare_tensors(x.half(), x.bfloat16()) == "rounding"  # two roundings of one original
    y = x.clone()
    y[3, 5] *= 1.05  # a real change, larger than a bfloat16 step
    assert compare_tensors(x, y.bfloat16()) == "changed" == compare_tensors(x.half(), y.bfloat16())
    assert compare_tensors(x, x + 1e-7) == "changed"  # same dtype: bit-exact


def bf16_finetune(base):
    """A fine-tune saved in bfloat16 beside a float32 base: its embeddings, lm_head and norms moved by rounding."""
    return make_finetune(base, seed=1, change_norms=False).to(torch.bfloat16)


def test_a_bf16_finetune_of_a_fp32_base_carries_no_falsely_dense_extras(tmp_path):
    ref = make_model("llama", **WIDE)
    ft = bf16_finetune(ref)
    model = compress(make_model("llama", **WIDE), ft, DeltaCoMeConfig(quantizer="rtn"), progress=False)
    cfg = model.peft_config["default"]
    assert cfg.modules_to_save is None  # before: embed_tokens and lm_head dense, and refused at 1/16
    rounded = cfg.compression_info["unchanged_within_rounding"]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(rounded)
    # the same pair streamed from its files (float32 base, bfloat16 fine-tune on disk) judges the same
    b, f = save_pair(tmp_path, ref, ft)
    streamed = compress(b, f, DeltaCoMeConfig(quantizer="rtn"), progress=False)
    assert streamed.peft_config["default"].modules_to_save is None
    assert streamed.peft_config["default"].layout == cfg.layout


def test_a_target_equal_within_rounding_is_unchanged():
    ref = make_model("llama")
    ft = make_finetune(ref, change_norms=False, targets=["model.layers.0.self_attn.q_proj"]).to(torch.bfloat16)
    model = compress(make_model("llama"), ft, DeltaCoMeConfig(quantizer="rtn", ratio="1/2"), progress=False)
    layout = model.peft_config["default"].layout
    assert sum(r for _, r in layout["model.layers.0.self_attn.q_proj"]["bands"]) > 0
    assert all(r == 0 for name, e in layout.items() if not name.endswith("0.self_attn.q_proj") for _, r in e["bands"])


def test_a_zero_delta_is_refused():
    base = make_model("llama")
    with pytest.raises(EmptyDeltaError, match=r"fine-tuned model 'tiny-random-llama' equals the base .* nothing to"):
        compress(make_model("llama"), copy.deepcopy(base), DeltaCoMeConfig(quantizer="rtn"), progress=False)
    with pytest.raises(EmptyDeltaError, match="some only within the rounding of the lower of their dtypes"):
        compress(make_model("llama"), copy.deepcopy(base).to(torch.bfloat16), DeltaCoMeConfig(quantizer="rtn"),
                 progress=False)  # fmt: skip


def test_an_all_rank_zero_layout_and_extras_only_warn_before_any_work():
    ref = make_model("llama", **WIDE)
    with pytest.warns(DegenerateAdapterWarning, match=r"at ratio 1/256 every changed target linear \(14\) gets rank 0"):
        compress(make_model("llama", **WIDE), make_finetune(ref, change_norms=False),
                 DeltaCoMeConfig(ratio="1/256", quantizer="rtn"), progress=False)  # fmt: skip
    norms_only = make_finetune(ref, scale=0.0, noise=0.0)
    with pytest.warns(DegenerateAdapterWarning, match=r"no target linear changed: only model.layers.0.input_layernorm"):
        model = compress(make_model("llama", **WIDE), norms_only, DeltaCoMeConfig(quantizer="rtn"), progress=False)
    assert len(model.peft_config["default"].modules_to_save) == 5


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--num-samples", "0", "argument --num-samples: expected an integer >= 1, got '0'"),
        ("--seq-len", "1", "argument --seq-len: expected an integer >= 2, got '1'"),
        ("--group-size", "-8", "argument --group-size: expected an integer >= 1, got '-8'"),
        ("--distill-steps", "many", "argument --distill-steps: expected an integer >= 0, got 'many'"),
    ],
)
def test_nonsense_command_line_values_are_refused_by_name(tmp_path, capsys, option, value, message):
    args = ["compress", "--base", "b", "--finetuned", "f", "--output", str(tmp_path / "o"), option, value]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_nonsense_api_values_are_refused_by_name():
    ref = make_model("llama")
    for kwargs, message in ((dict(num_samples=0), "num_samples must be a positive integer, got 0"),
                            (dict(seq_len=1), "seq_len must be an integer >= 2, got 1")):  # fmt: skip
        with pytest.raises(CalibrationError, match=message):  # also with rtn, which reads no calibration
            compress(make_model("llama"), make_finetune(ref), DeltaCoMeConfig(quantizer="rtn"), progress=False, **kwargs)


def test_cli_loads_a_small_pair_whole_and_streams_a_large_one(tmp_path, capsys, monkeypatch, caplog):
    """No flag: a pair that fits in a quarter of the available memory is loaded whole (the default's whole-model
    checks run); a larger one, or ``--stream``, is streamed and says so; contradicting flags are refused by name."""
    import hf_deltacome.compression.streaming as streaming

    ref = make_model("llama", **WIDE)
    b, f = save_pair(tmp_path, ref, bf16_finetune(ref))
    out = tmp_path / "adapter"
    args = ["compress", "--base", b, "--finetuned", f, "--output", str(out), "--overwrite"]
    with caplog.at_level(logging.INFO, logger="hf_deltacome"):
        assert main([*args, "--num-samples", "2", "--seq-len", "16"]) == 0  # gptq: calibration sampled from the ft
    info = json.loads((out / "adapter_config.json").read_text())["compression_info"]
    assert info["streamed"] is False and "fallback" not in info["rank_share"] and "kl" in info["rank_share"]
    assert "fit in memory" in caplog.text
    size = sum(streaming.checkpoint_bytes(Path(p)) for p in (b, f))
    caplog.clear()
    monkeypatch.setattr(streaming, "available_memory", lambda: 4 * size - 1)  # just over a quarter: streamed
    with caplog.at_level(logging.INFO, logger="hf_deltacome"):
        assert main([*args, "--num-samples", "2", "--seq-len", "16"]) == 0
    info = json.loads((out / "adapter_config.json").read_text())["compression_info"]
    assert info["streamed"] is True and "lm_head.weight" in info["unchanged_within_rounding"]
    assert info["rank_share"]["chosen"] == 0.0 and "streamed" in info["rank_share"]["fallback"]
    assert "more than 25% of the available memory" in caplog.text
    assert "count as unchanged" in capsys.readouterr().err
    rtn = [*args, "--quantizer", "rtn"]
    monkeypatch.setattr(streaming, "available_memory", lambda: 4 * size)  # exactly a quarter: whole, unless --stream
    assert main([*rtn, "--stream"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["compression_info"]["streamed"] is True
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"some calibration text number {i}" for i in range(40)))
    assert main([*args, "--calibration", str(calib), "--num-samples", "2", "--seq-len", "16"]) == 0
    info = json.loads((out / "adapter_config.json").read_text())["compression_info"]
    assert info["streamed"] is False and info["num_samples"] == 2
    capsys.readouterr()
    assert main([*rtn, "--stream", "--in-memory"]) == 2
    assert "--in-memory and --stream contradict" in capsys.readouterr().err
    assert main([*rtn, "--stream", "--search", "greedy"]) == 2
    assert "--stream cannot be combined with --search" in capsys.readouterr().err
    for name in Path(b).glob("model*.safetensors*"):  # the base without safetensors: loaded whole, never streamed
        name.unlink()
    assert main([*rtn, "--stream"]) == 2
    assert f"--stream: --base cannot be streamed: {b} has no model.safetensors" in capsys.readouterr().err
    assert random_ids(ref, 1, 2).shape == (1, 2)


@pytest.mark.parametrize("streamed", [True, False])
def test_cli_keeps_the_checkpoints_dtype_by_default(tmp_path, streamed):
    """``--dtype`` defaults to what the checkpoints hold: a bfloat16 pair's dense extras are stored in bfloat16 (the
    old float32 default loaded a float32 copy of both models and stored float32 extras, twice the bytes)."""
    from safetensors import safe_open

    ref = make_model("llama", **WIDE).to(torch.bfloat16)
    b, f = save_pair(tmp_path, ref, make_finetune(ref, seed=2))  # norms changed: carried dense
    out = tmp_path / "adapter"
    args = ["compress", "--base", b, "--finetuned", f, "--output", str(out), "--quantizer", "rtn", "--ratio", "1/4"]
    assert main(args + (["--stream"] if streamed else ["--in-memory"])) == 0
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as handle:
        dtypes = {k: handle.get_slice(k).get_dtype() for k in handle.keys() if "norm" in k}
    assert dtypes and set(dtypes.values()) == {"BF16"}, dtypes
    info = json.loads((out / "adapter_config.json").read_text())["compression_info"]
    assert info["streamed"] is streamed
