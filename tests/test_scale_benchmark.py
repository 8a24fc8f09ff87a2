"""benchmarks/scale.py: its pairs, one real streamed run, and the depth table's ratios."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def scale(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("scale_benchmark", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("HF_DELTACOME_CACHE", str(tmp_path))
    monkeypatch.setitem(module.SHAPES, "tiny", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                    num_key_value_heads=2, vocab_size=300))  # fmt: skip
    monkeypatch.setitem(module.FULL_LAYERS, "tiny", 3)
    return module


def test_a_streamed_run_of_a_linked_pair(scale):
    folder = scale.pair("tiny", 2)  # writes the 3-layer pair, links 2 of its layers
    index = json.loads((folder / "finetuned" / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k.split(".")[2] for k in index if k.startswith("model.layers.")} == {"0", "1"}
    assert scale.model_bytes(folder / "base") < scale.model_bytes(scale.pair("tiny", 3) / "base")
    result = scale.run("tiny", 2, "rtn", "streamed")
    assert result["mode"] == "streamed" and len(result["layer_seconds"]) == 2
    assert result["peak_rss"] > 0 and result["adapter_bytes"] > 0


def test_the_depth_table_sets_streamed_beside_loaded(scale):
    gib = 1 << 30
    rows = [dict(pair="p", quantizer="rtn", layers=n, mode=m, peak_rss=int(peak * gib))
            for n, m, peak in ((2, "streamed", 1.0), (2, "loaded", 2.0), (8, "streamed", 1.1), (8, "loaded", 5.0))]  # fmt: skip
    table = scale.depth_table(rows).splitlines()
    assert table[2] == "| p | rtn | 2 | 1.00 | 2.00 | 0.50 | 1.00 | 1.00 |"
    assert table[3] == "| p | rtn | 8 | 1.10 | 5.00 | 0.22 | 1.10 | 2.50 |"


def test_bad_runs_are_refused_by_name(scale, capsys):
    with pytest.raises(SystemExit):
        scale.main(["--runs", "tiny:2:rtn:sideways"])
    assert "--runs 'tiny:2:rtn:sideways'" in capsys.readouterr().err
