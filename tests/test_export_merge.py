"""``deltacome export --format lora`` and ``deltacome merge``: the results load in a process that never imports
hf_deltacome (plain transformers / PEFT) and reproduce the adapter's logits.

Importing transformers in a fresh process takes seconds, so the module fixture builds every export and merge first
and computes all their plain logits in one subprocess; the tests then check what it produced.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch
from serving_fixtures import make_adapter, plain_logits, save_base, single_adapter_model, tiny_base

from hf_deltacome import ConfigError
from hf_deltacome.cli import main
from hf_deltacome.serving import export_lora

RANKS = (8, 4, 2, 1)


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    w: dict = {"root": root}
    w["base"], w["qbase"] = save_base(root / "base"), save_base(root / "qbase", "qwen2")
    # ranks ~16 on the 64-wide model; the MLP as DARE (as the default stores it with calibration data): full rank
    w["adapter"] = make_adapter(root / "adapter", seed=1, ratio=0.5, dare_modules="mlp")
    w["qadapter"] = make_adapter(root / "qadapter", seed=2, arch="qwen2")  # qwen2: bias deltas
    w["ids"] = torch.randint(4, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    code, w["export_out"], _ = _cli("export", "--format", "lora", w["adapter"], root / "lora16", "--base", w["base"])
    assert code == 0
    w["f32"] = export_lora(w["adapter"], root / "lora32", dtype="float32")
    w["truncated"] = {r: export_lora(w["adapter"], root / f"r{r}", rank=r, dtype="float32") for r in RANKS}
    w["qfull"] = export_lora(w["qadapter"], root / "qfull", dtype="float32")
    w["qdrop"] = export_lora(w["qadapter"], root / "qdrop", dtype="float32", drop_extras=True, base=w["qbase"])
    merge = ["merge", "--base", w["base"], "--adapter", w["adapter"]]
    code, w["merge_out"], _ = _cli(*merge, "--output", root / "merged", "--max-shard-size", "100KB")
    assert code == 0
    # the same folder written twice: the second (one shard, --overwrite) must leave no stale shard behind
    assert _cli(*merge, "--output", root / "again", "--max-shard-size", "100KB")[0] == 0
    w["again_refused"] = _cli(*merge, "--output", root / "again")
    assert _cli(*merge, "--output", root / "again", "--overwrite")[0] == 0
    ids, qids = w["ids"], w["ids"][:, :12]
    w["plain"] = plain_logits(
        root,
        {
            "lora16": (w["base"], root / "lora16", ids),
            "lora32": (w["base"], root / "lora32", ids),
            "r2": (w["base"], root / "r2", ids),
            "qfull": (w["qbase"], root / "qfull", qids),
            "qdrop": (w["qbase"], root / "qdrop", qids),
            "merged": (root / "merged", None, ids),
            "again": (root / "again", None, ids),
        },
    )
    with torch.no_grad():
        w["ours"] = single_adapter_model(w["adapter"])(input_ids=ids).logits.float()
        w["base_logits"] = tiny_base()(input_ids=ids).logits.float()
        w["qours"] = single_adapter_model(w["qadapter"], "qwen2")(input_ids=qids).logits.float()
        w["qbase_logits"] = tiny_base("qwen2")(input_ids=qids).logits.float()
    return w


def _rel(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor) -> float:
    """``||a − b|| / ||b − base||``: the share of the adapter's effect on the logits that ``a`` misses."""
    return float((a - b).norm() / (b - base).norm())


def test_lora_export_loads_with_plain_peft_and_reproduces_the_adapter(built):
    assert "x the Delta-CoMe adapter" in built["export_out"] and "logits error vs the adapter" in built["export_out"]
    assert "--max-lora-rank" in built["export_out"] and "512" in built["export_out"]
    config = json.loads((built["root"] / "lora16" / "adapter_config.json").read_text())
    ours_config = json.loads((built["adapter"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    assert config["modules_to_save"] == ours_config["modules_to_save"]  # the changed norms go along
    lora, ours, base = built["plain"]["lora16"], built["ours"], built["base_logits"]
    assert _rel(lora, ours, base) < 2e-3  # float16 factors
    assert (lora - base).abs().max() > 1e-2  # the LoRA does change the model
    lora_bytes = (built["root"] / "lora16" / "adapter_model.safetensors").stat().st_size
    assert lora_bytes > (built["adapter"] / "adapter_model.safetensors").stat().st_size  # larger, as reported


def test_float32_export_is_exact_and_truncation_costs_error(built):
    exact = built["f32"]
    assert exact.weight_error < 1e-6 and not exact.truncated and exact.ranks == exact.full_ranks
    assert max(exact.ranks.values()) > RANKS[0]
    assert _rel(built["plain"]["lora32"], built["ours"], built["base_logits"]) < 1e-5
    errors = [built["truncated"][r].weight_error for r in RANKS]
    assert all(max(built["truncated"][r].ranks.values()) == r for r in RANKS)
    assert errors == sorted(errors) and errors[0] > 10 * exact.weight_error  # lower rank, larger error
    r2 = _rel(built["plain"]["r2"], built["ours"], built["base_logits"])
    assert r2 > 100 * _rel(built["plain"]["lora32"], built["ours"], built["base_logits"])
    sizes = [(built["root"] / f"r{r}" / "adapter_model.safetensors").stat().st_size for r in RANKS]
    assert sizes == sorted(sizes, reverse=True)


def test_bias_deltas_go_along_and_dropping_extras_costs_accuracy(built):
    full, dropped = built["qfull"], built["qdrop"]
    assert full.lora_bias and json.loads((built["root"] / "qfull" / "adapter_config.json").read_text())["lora_bias"]
    assert _rel(built["plain"]["qfull"], built["qours"], built["qbase_logits"]) < 1e-5
    assert json.loads((built["root"] / "qdrop" / "adapter_config.json").read_text())["modules_to_save"] is None
    plain_drop = _rel(built["plain"]["qdrop"], built["qours"], built["qbase_logits"])
    assert plain_drop > 1e-2  # the norms the fine-tune changed are missing
    assert dropped.logits_error == pytest.approx(plain_drop, rel=0.3)  # measured on other tokens: same order


def test_full_rank_modules_export_through_the_svd_of_their_dense_delta(built, tmp_path):
    """Modules stored as DARE values (the default's MLP, in the exports above) or sign bits (``bitdelta``) have no
    low-rank form: they export at ``min(out, in)`` through the SVD of their dense delta, exact up to the dtype (the
    plain-PEFT checks above load them), and ``rank`` truncates them too."""
    layout = json.loads((built["adapter"] / "adapter_config.json").read_text())["layout"]
    dare = {n: min(e["shape"]) for n, e in layout.items() if e.get("sparse")}
    assert dare and all(built["f32"].ranks[n] == built["f32"].full_ranks[n] == r for n, r in dare.items())
    assert all(built["truncated"][1].ranks[n] == 1 for n in dare)
    bitdelta = make_adapter(tmp_path / "bitdelta", seed=1, method="bitdelta", distill_steps=0)
    exact = export_lora(bitdelta, tmp_path / "out", dtype="float32")
    signs = json.loads((bitdelta / "adapter_config.json").read_text())["layout"]
    assert exact.weight_error < 1e-6 and all(exact.ranks[n] == min(e["shape"]) for n, e in signs.items() if e.get("sign"))


def test_lora_export_refusals(built, tmp_path):
    with pytest.raises(ConfigError, match="inside the adapter folder"):
        export_lora(built["adapter"], built["adapter"] / "lora")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        export_lora(built["adapter"], tmp_path / "busy")
    with pytest.raises(ConfigError, match="--rank must be >= 1"):
        export_lora(built["adapter"], tmp_path / "r0", rank=0)
    assert not (built["adapter"] / "lora").exists()


def test_merge_writes_a_standalone_model_for_plain_transformers(built):
    out = built["root"] / "merged"
    assert "merged model written" in built["merge_out"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}  # as readable as a plain save
    card = (out / "README.md").read_text()
    assert str(built["base"]) in card and str(built["adapter"]) in card and "base_model:" in card
    assert _rel(built["plain"]["merged"], built["ours"], built["base_logits"]) < 1e-4


def test_merge_overwrite_replaces_every_file(built):
    code, _, err = built["again_refused"]
    assert code == 2 and "not empty; pass --overwrite" in err
    again = built["root"] / "again"
    assert sorted(p.name for p in again.glob("*.safetensors")) == ["model.safetensors"]
    assert not (again / "model.safetensors.index.json").exists()
    assert not [p for p in built["root"].iterdir() if p.name.endswith(".deltacome-tmp")]
    assert _rel(built["plain"]["again"], built["ours"], built["base_logits"]) < 1e-4


def test_merge_dtype_and_refused_outputs(built, tmp_path):
    from safetensors import safe_open

    merge = ["merge", "--base", built["base"], "--adapter", built["adapter"]]
    assert _cli(*merge, "--output", tmp_path / "bf16", "--dtype", "bfloat16")[0] == 0
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    for bad in (built["base"], built["adapter"], built["adapter"] / "sub"):
        code, _, err = _cli(*merge, "--output", bad)
        assert code == 2 and "choose a folder outside it" in err
    assert not (built["adapter"] / "sub").exists()
