"""`deltacome` exits: a non-empty --output, an interrupt (130) and --resume, push, and a crash that is not ours."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from test_trust import IDS, fresh_base, make_adapter, rewrite_tensors
from tiny_models import assert_beats_baselines, logits, make_finetune, make_model, make_tokenizer

import hf_deltacome.compression.modules as modules_mod
from hf_deltacome import DeltaCoMeConfig
from hf_deltacome.cli import CHECKPOINT_DIR, main
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.io.adapter_files import ADAPTER_WEIGHTS_NAME

pytest_plugins = ["hub_server"]

RTN = ["--quantizer", "rtn", "--ratio", "1/8", "--group-size", "32", "--no-save-tokenizer"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Base and fine-tune folders (with the offline tokenizer), and the two models."""
    root = tmp_path_factory.mktemp("cli")
    base = make_model("llama", seed=0)
    ft = make_finetune(base, seed=1)
    for name, model in (("base", base), ("ft", ft)):
        model.save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    return root, base, ft


def compress_args(root, out) -> list[str]:
    return ["compress", "--base", str(root / "base"), "--finetuned", str(root / "ft"), "--output", str(out), *RTN]


def err_lines(capsys) -> list[str]:
    """The lines written to stderr (progress-bar redraws split off)."""
    return [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]


def test_non_empty_output_needs_overwrite(models, tmp_path, capsys):
    root, _, _ = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(compress_args(root, out)) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("deltacome compress: error: --output")
    assert "is not empty; pass --overwrite" in lines[0] and "--resume" not in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written
    assert main([*compress_args(root, out), "--overwrite"]) == 0
    assert (out / ADAPTER_WEIGHTS_NAME).is_file() and not (out / CHECKPOINT_DIR).exists()


def test_interrupt_exits_130_and_resume_finishes_the_same_adapter(models, tmp_path, capsys, monkeypatch):
    root, base, ft = models
    out = tmp_path / "out"
    real = modules_mod.compress_module
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 7:  # layer 0 (7 linears) is checkpointed, then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("hf_deltacome.compression.pipeline.compress_module", dying)
    assert main(compress_args(root, out)) == 130
    assert "deltacome compress: interrupted" in err_lines(capsys)
    assert (out / CHECKPOINT_DIR / "layer_0000.safetensors").is_file()
    assert not (out / CHECKPOINT_DIR / "layer_0001.safetensors").exists() and not (out / ADAPTER_WEIGHTS_NAME).exists()
    # a plain rerun refuses the non-empty folder and points at --resume
    assert main(compress_args(root, out)) == 2
    assert "pass --resume to continue the interrupted run" in err_lines(capsys)[-1]
    calls["n"] = 0
    monkeypatch.setattr("hf_deltacome.compression.pipeline.compress_module", lambda *a, **k: dying(*a, **k))
    assert main([*compress_args(root, out), "--resume"]) == 0
    assert calls["n"] == 7  # only layer 1 was compressed again
    assert not (out / CHECKPOINT_DIR).exists()  # done: checkpoints removed
    cfg = DeltaCoMeConfig(ratio=1 / 8, group_size=32, quantizer="rtn")
    monkeypatch.setattr("hf_deltacome.compression.pipeline.compress_module", real)
    reference = compress(copy.deepcopy(base), ft, cfg, progress=False)
    resumed = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert torch.equal(logits(resumed, IDS), logits(reference, IDS))
    assert_beats_baselines(resumed, ft, base, IDS, 0.45)  # an adapter of the fine-tune: measured 0.33
    # --resume without a checkpoint says so and starts from the first layer
    assert main([*compress_args(root, tmp_path / "fresh"), "--resume"]) == 0
    assert any("no checkpoint in" in line and "starting from the first layer" in line for line in err_lines(capsys))


def test_push_uploads_the_adapter_and_refuses_a_broken_one(hub, tmp_path, capsys):
    model = make_adapter(fresh_base())
    folder = tmp_path / "a"
    model.save_pretrained(str(folder))
    assert main(["push", str(folder), "fake-user/cli-adapter", "--message", "from the cli"]) == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith(hub.url) and "fake-user/cli-adapter" in url
    assert [c.title for c in hub.api().list_repo_commits("fake-user/cli-adapter")][0] == "from the cli"
    loaded = PeftModel.from_pretrained(fresh_base(), "fake-user/cli-adapter").eval()
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS))
    key = "base_model.model.model.layers.0.mlp.up_proj.deltacome_delta.bands.0.s"
    rewrite_tensors(folder, lambda t: t[key].fill_(float("nan")))
    assert main(["push", str(folder), "fake-user/cli-broken"]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("deltacome push: error:") and "NaN" in lines[0]


def test_a_crash_that_is_not_ours_is_one_line_with_a_bug_hint(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "a"
    make_adapter(fresh_base()).save_pretrained(str(folder))

    def broken(path):
        raise RuntimeError("boom\nsecond line of the message")

    monkeypatch.setattr("hf_deltacome.io.summary.summarize_adapter", broken)
    monkeypatch.delenv("DELTACOME_DEBUG", raising=False)
    assert main(["info", str(folder)]) == 1
    lines = err_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("deltacome info: unexpected RuntimeError: boom second line of the message")
    assert "this is a bug" in lines[0] and "DELTACOME_DEBUG=1" in lines[0]
    monkeypatch.setenv("DELTACOME_DEBUG", "1")
    assert main(["info", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "in broken" in err
    assert err.strip().splitlines()[-1].startswith("deltacome info: unexpected RuntimeError: boom")


def test_cli_log_follows_a_redirected_stderr(monkeypatch):
    """Commands run one after another in one process (tests, a notebook) each under their own redirected stderr: the
    library's messages reach the stderr of the moment, not the stream the first command ran under."""
    import io
    import logging

    from hf_deltacome.progress import log_to_stderr

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(logging.getLogger("hf_deltacome"), "handlers", [])  # as a fresh process starts
    monkeypatch.setattr("sys.stderr", first)
    log_to_stderr()
    logging.getLogger("hf_deltacome.compression").info("first message")
    monkeypatch.setattr("sys.stderr", second)
    log_to_stderr()  # once: no second handler
    logging.getLogger("hf_deltacome.compression").info("second message")
    assert first.getvalue() == "deltacome: first message\n"
    assert second.getvalue() == "deltacome: second message\n"


def lora_folder(base, folder, seed: int = 0, **config) -> PeftModel:
    """A LoRA of ``base`` (every linear, random nonzero factors) saved to ``folder``; returns the merged fine-tune."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                                          **config))  # fmt: skip
    lora.save_pretrained(folder)
    return lora.merge_and_unload().eval()


def test_compress_takes_a_lora_folder_as_the_finetune(models, tmp_path, capsys):
    """`deltacome compress --finetuned LORA_FOLDER` compresses the fine-tune the adapter makes (merged into its own
    copy of the base in memory); streaming it, passing the folder to the streamed API, a PEFT model as the fine-tune,
    and an adapter of another base are refused by name."""
    root, base, _ = models
    ft = lora_folder(base, tmp_path / "lora", use_rslora=True)
    out = tmp_path / "out"
    assert main(["compress", "--base", str(root / "base"), "--finetuned", str(tmp_path / "lora"), "--output", str(out),
                 *RTN, "--ratio", "1/4"]) == 0  # fmt: skip
    assert "is a PEFT adapter: merged into a copy of the base in memory" in capsys.readouterr().err
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    same = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(quantizer="rtn", ratio=1 / 4, group_size=32), progress=False)
    assert torch.equal(logits(loaded, IDS), logits(same, IDS))  # the adapter of the merged fine-tune
    assert main(["compress", "--base", str(root / "base"), "--finetuned", str(tmp_path / "lora"), "--output",
                 str(tmp_path / "o2"), "--stream", *RTN]) == 2  # fmt: skip
    assert "--finetuned" in capsys.readouterr().err
    from hf_deltacome.errors import ConfigError, IncompatibleModelsError

    with pytest.raises(ConfigError, match=r"lora is a PEFT adapter, not a model.*merge_and_unload"):
        compress(str(root / "base"), str(tmp_path / "lora"), DeltaCoMeConfig(quantizer="rtn"), progress=False)
    with pytest.raises(IncompatibleModelsError, match=r"fine-tuned model is a PEFT model.*merge_and_unload"):
        compress(copy.deepcopy(base), PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora"), progress=False)
    other = make_model("llama", seed=0, intermediate_size=96)
    other.save_pretrained(tmp_path / "other")
    assert main(["compress", "--base", str(tmp_path / "other"), "--finetuned", str(tmp_path / "lora"), "--output",
                 str(tmp_path / "o3"), *RTN]) == 2  # fmt: skip
    assert "is a PEFT adapter and does not merge into --base" in capsys.readouterr().err
