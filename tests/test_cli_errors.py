"""The command line ends every bad input with one line naming the option or file (exit code 2), never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_trust import fresh_base, make_adapter

from hf_deltacome.cli import main
from hf_deltacome.io.adapter_files import ADAPTER_CONFIG_NAME


def _one_line_error(capsys, argv: list[str], *names: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"deltacome {argv[0]}: error: ")
    for name in names:
        assert name in err, err
    return err


@pytest.fixture
def adapter(tmp_path) -> Path:
    make_adapter(fresh_base()).save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


@pytest.mark.parametrize("device", ["banana", "cuda", "cuda:7", "meta"])
def test_bad_device(capsys, tmp_path, device):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    compress = ["compress", "--base", "b", "--finetuned", "f", "--output", str(tmp_path / "o"), "--device", device]
    _one_line_error(capsys, compress, "--device", repr(device))
    evaluate = ["eval", "--base", "b", "--adapter", str(tmp_path), "--text", "t.txt", "--device", device]
    _one_line_error(capsys, evaluate, "--device", repr(device))


@pytest.mark.parametrize("repo_id", ["bad id!", "a/b/c", "x--y/z", ""])
def test_push_with_an_invalid_repo_id(capsys, adapter, repo_id):
    _one_line_error(capsys, ["push", str(adapter), repo_id], "repo id", repr(repo_id))


@pytest.mark.parametrize("info", [[1, 2], "text", 3])
def test_info_with_compression_info_not_an_object(capsys, adapter, info):
    path = adapter / ADAPTER_CONFIG_NAME
    config = json.loads(path.read_text())
    config["compression_info"] = info
    path.write_text(json.dumps(config))
    _one_line_error(capsys, ["info", str(adapter)], str(path), "compression_info")


def test_info_with_odd_plan_records(capsys, adapter):
    """compression_info is free-form metadata: plan records of another shape are reported, not fatal."""
    path = adapter / ADAPTER_CONFIG_NAME
    config = json.loads(path.read_text())
    config["compression_info"] = {"search": {"types": [1]}, "rank_share": {"kl": [1]}, "allocation": {"multipliers": 3}}
    path.write_text(json.dumps(config))
    assert main(["info", str(adapter)]) == 0
    assert "not in the expected format" in capsys.readouterr().out
