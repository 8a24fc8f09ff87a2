"""Streamed ``deltacome merge``: the base read one tensor at a time gives the loaded path's merged model, bit for bit.

The module fixture merges every case twice (streamed, and ``in_memory=True``: whole base in float32, PEFT's
``merge_and_unload``) and computes the streamed outputs' logits in one subprocess that never imports hf_deltacome.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from serving_fixtures import plain_logits
from test_vocab import with_added_tokens
from tiny_models import make_finetune, make_model, make_tokenizer, random_ids
from transformers import AutoModelForCausalLM

import hf_deltacome.compression.streaming as streaming
import hf_deltacome.io.shards as shards
from hf_deltacome import DeltaCoMeConfig, compress
from hf_deltacome.errors import BaseModelMismatchError
from hf_deltacome.serving.merge import merge_adapter
from hf_deltacome.serving.merge_stream import streamable_base

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread

# case: (base kwargs, fine-tune maker, compression config, output dtype)
CASES = {
    "llama-gqa": (dict(), lambda b: make_finetune(b, seed=1), dict(ratio="1/2"), "auto"),
    "llama-gqa-bf16": (dict(), lambda b: make_finetune(b, seed=1), dict(ratio="1/2"), "bfloat16"),
    "llama-gqa-fp16": (dict(), lambda b: make_finetune(b, seed=1), dict(ratio="1/2"), "float16"),
    "qwen2-bias": (dict(arch="qwen2"), lambda b: make_finetune(b, seed=2), dict(ratio="1/4"), "auto"),
    "tied": (dict(tie_word_embeddings=True), lambda b: make_finetune(b, seed=3), dict(ratio="1/2"), "auto"),
    "tied-embedding-changed": (
        dict(tie_word_embeddings=True),
        lambda b: make_finetune(b, seed=4, scale=0.0, noise=0.0, change_norms=False, embedding_rows=6),
        dict(ratio=1.0),  # room for the two dense copies
        "auto",
    ),
    "added-tokens": (
        dict(),
        lambda b: with_added_tokens(make_finetune(b, seed=5), seed=5, change_rows=True),
        dict(ratio="1/2"),
        "auto",
    ),
    "added-tokens-tied": (
        dict(tie_word_embeddings=True),
        lambda b: with_added_tokens(make_finetune(b, seed=6), seed=6),
        dict(ratio="1/2"),
        "auto",
    ),
    "bf16-base": (dict(dtype=torch.bfloat16), lambda b: make_finetune(b, seed=7), dict(ratio="1/2"), "auto"),
}


def base_model(arch: str = "llama", dtype: torch.dtype = torch.float32, **kwargs):
    return make_model(arch, **kwargs).to(dtype)


def save_base(folder: Path, model, shard: str = "40KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    make_tokenizer().save_pretrained(folder)
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open is not a dict
    return out


def index(folder: Path) -> dict | None:
    path = folder / "model.safetensors.index.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("smerge")
    cases: dict = {}
    adapters: dict = {}
    for case, (kwargs, finetune, cfg, dtype) in CASES.items():
        key = (tuple(sorted(kwargs.items())), finetune.__code__.co_firstlineno)
        w = cases[case] = {"dtype": dtype, "kwargs": kwargs}
        if key not in adapters:
            folder = root / f"{case}-src"
            save_base(folder / "base", base_model(**kwargs))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = compress(base_model(**kwargs), finetune(base_model(**kwargs)),
                                 DeltaCoMeConfig(quantizer="rtn", **cfg), progress=False)  # fmt: skip
            model.save_pretrained(folder / "adapter")
            adapters[key] = (folder / "base", folder / "adapter", model.peft_config["default"])
        w["base"], w["adapter"], w["config"] = adapters[key]
        for mode in ("streamed", "loaded"):
            w[mode] = merge_adapter(w["base"], w["adapter"], root / case / mode, dtype=dtype,
                                    max_shard_size="100KB", in_memory=mode == "loaded")  # fmt: skip
        vocab = w["config"].vocab_size or base_model(**kwargs).config.vocab_size
        w["ids"] = random_ids(make_model(), 3, 16, seed=11) % vocab
        w["ids"][:, ::4] = vocab - 1  # the last token: an added one where the fine-tune added tokens
    float_cases = {c: w for c, w in cases.items() if w["dtype"] == "auto"}
    plain = plain_logits(root, {c: (w["streamed"], None, w["ids"]) for c, w in float_cases.items()})
    for case, w in float_cases.items():
        w["plain"] = plain[case]
    return cases


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_merge_is_bit_identical_to_the_loaded_merge(merged, case):
    w = merged[case]
    streamed, loaded = tensors(w["streamed"]), tensors(w["loaded"])
    assert list(streamed) and sorted(streamed) == sorted(loaded)
    for name, t in streamed.items():
        assert t.dtype == loaded[name].dtype and torch.equal(t, loaded[name]), name
    want = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[w["dtype"]]
    if want is None:  # auto: the base checkpoint's dtype
        want = w["kwargs"].get("dtype", torch.float32)
    assert {t.dtype for t in streamed.values()} == {want}
    for name in ("config.json", "generation_config.json"):
        assert json.loads((w["streamed"] / name).read_text()) == json.loads((w["loaded"] / name).read_text()), name
    a, b = index(w["streamed"]), index(w["loaded"])
    assert a is not None and b is not None and set(a["weight_map"]) == set(b["weight_map"])
    assert a["metadata"]["total_parameters"] == b["metadata"]["total_parameters"]
    assert a["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in streamed.values())
    assert sorted(p.name for p in w["streamed"].iterdir() if not p.name.startswith("model")) == sorted(
        p.name for p in w["loaded"].iterdir() if not p.name.startswith("model")
    )  # config, generation config, tokenizer files, model card


@pytest.mark.parametrize("case", sorted(c for c, (_, _, _, d) in CASES.items() if d == "auto"))
def test_plain_transformers_reproduces_the_adapter(merged, case):
    w = merged[case]
    base_dtype = w["kwargs"].get("dtype", torch.float32)
    base = AutoModelForCausalLM.from_pretrained(w["base"], dtype=torch.float32)
    with torch.no_grad():
        ours = PeftModel.from_pretrained(base, w["adapter"]).eval()(input_ids=w["ids"]).logits.float()
    tol = 1e-4 if base_dtype == torch.float32 else 5e-2  # a bf16 output rounds the merged weights once
    torch.testing.assert_close(w["plain"], ours, atol=tol, rtol=tol)


def test_tied_and_added_token_layouts(merged):
    tied = tensors(merged["tied"]["streamed"])
    assert "lm_head.weight" not in tied  # still tied: saved once, as save_pretrained does
    untied = merged["tied-embedding-changed"]
    assert set(untied["config"].modules_to_save) >= {"lm_head", "model.embed_tokens"}
    assert "lm_head.weight" in tensors(untied["streamed"])  # PEFT's dense copies are two tensors
    assert json.loads((untied["streamed"] / "config.json").read_text())["tie_word_embeddings"] is False
    for case in ("added-tokens", "added-tokens-tied"):
        w = merged[case]
        assert w["config"].trainable_token_indices, case
        assert tensors(w["streamed"])["model.embed_tokens.weight"].shape[0] == w["config"].vocab_size == 258
        assert json.loads((w["streamed"] / "config.json").read_text())["vocab_size"] == 258


def test_a_streamed_merge_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    base = make_model("llama", num_hidden_layers=4)
    save_base(tmp_path / "base", base)
    adapter = compress(make_model("llama", num_hidden_layers=4), make_finetune(base, seed=1),
                       DeltaCoMeConfig(quantizer="rtn", ratio="1/2"), progress=False)  # fmt: skip
    adapter.save_pretrained(tmp_path / "adapter")
    extras = adapter.peft_config["default"].modules_to_save
    alive: list[weakref.ref] = []
    most, counts = [0], {"read": 0, "write": 0}
    real_read, real_write = streaming.Checkpoint.read, shards.ShardWriter.write

    def held() -> int:
        return sum(r() is not None for r in alive)

    def read(self, key, device="cpu"):
        most[0] = max(most[0], held())
        t = real_read(self, key, device)
        alive.append(weakref.ref(t))
        counts["read"] += 1
        return t

    def write(self, name, tensor):
        most[0] = max(most[0], held())
        if name.rpartition(".")[0] not in extras:  # a dense extra is the adapter's own tensor: it stays
            alive.append(weakref.ref(tensor))
        counts["write"] += 1
        return real_write(self, name, tensor)

    monkeypatch.setattr(streaming.Checkpoint, "read", read)
    monkeypatch.setattr(shards.ShardWriter, "write", write)
    out = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", max_shard_size="100KB")
    count = len(tensors(out))
    assert counts["write"] == count and len(extras) == 9  # the norms come from the adapter
    assert counts["read"] == 2 * count - len(extras)  # the base check reads every weight, the merge the others
    assert most[0] <= 1  # at most the tensor just written is still referenced when the next is read


def test_a_wrong_base_is_refused_by_name(merged, tmp_path):
    other = save_base(tmp_path / "other-base", make_model("llama", seed=5))
    adapter = merged["llama-gqa"]["adapter"]
    with pytest.raises(BaseModelMismatchError, match=r"compressed against base .* loaded onto .*other-base"):
        merge_adapter(other, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="other-base"):
        merge_adapter(other, adapter, tmp_path / "forced", strict=False)  # the loaded path's --no-strict
    assert (tmp_path / "forced" / "config.json").is_file()


def test_a_failed_write_leaves_no_half_written_folder(merged, tmp_path, monkeypatch):
    w = merged["llama-gqa"]
    real, calls = shards.ShardWriter.write, [0]

    def dying(self, name, tensor):
        calls[0] += 1
        if calls[0] == 7:
            raise OSError("disk full")
        return real(self, name, tensor)

    monkeypatch.setattr(shards.ShardWriter, "write", dying)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(w["base"], w["adapter"], tmp_path / "new", max_shard_size="100KB")
    assert not (tmp_path / "new").exists()
    old = merge_adapter(w["base"], w["adapter"], tmp_path / "old", dtype="bfloat16", in_memory=True)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    calls[0] = 0
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(w["base"], w["adapter"], old, overwrite=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # the previous model, whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_fallbacks_are_logged_and_give_the_same_model(merged, tmp_path, caplog):
    w = merged["llama-gqa"]
    bin_base = tmp_path / "bin-base"
    bin_base.mkdir()
    for p in Path(w["base"]).iterdir():
        if not p.name.startswith("model"):
            (bin_base / p.name).write_bytes(p.read_bytes())
    model = AutoModelForCausalLM.from_pretrained(w["base"], dtype=torch.float32)
    torch.save(model.state_dict(), bin_base / "pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="hf_deltacome"):
        out = merge_adapter(bin_base, w["adapter"], tmp_path / "out", max_shard_size="100KB")
    assert "merging with the whole base in memory" in caplog.text and "has no model.safetensors" in caplog.text
    got, want = tensors(out), tensors(w["streamed"])
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert streamable_base(w["base"]) == (Path(w["base"]), None)
    missing = "deltacome-no-such-org/no-such-model-" + os.urandom(4).hex()
    assert "not in the Hugging Face cache" in streamable_base(missing)[1]
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    (vlm / "model.safetensors").write_bytes(b"")
    (vlm / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": {}}))
    assert "vision-language" in streamable_base(vlm)[1]


def test_cli_in_memory_flag(merged, tmp_path, caplog):
    from hf_deltacome.cli import main

    w = merged["llama-gqa"]
    with caplog.at_level(logging.INFO, logger="hf_deltacome"):
        code = main(["merge", "--base", str(w["base"]), "--adapter", str(w["adapter"]), "--output",
                     str(tmp_path / "out"), "--in-memory"])  # fmt: skip
    assert code == 0 and "whole base in memory: --in-memory" in caplog.text
    assert "merging streamed" not in caplog.text
