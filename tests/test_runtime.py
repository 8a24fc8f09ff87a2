"""PEFT behaviour of the runtime layer on a tiny Llama (GQA) with random packed deltas."""

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, pipeline

import hf_deltacome
from hf_deltacome import AdapterFileError, ConfigError, DeltaCoMeConfig, DeltaCoMeLinear
from hf_deltacome.format.budget import solve_ranks
from hf_deltacome.quant.rtn import quantize_rtn

VOCAB = 61


def char_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 .,:?!")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def fill_random(model, adapter: str, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, DeltaCoMeLinear) and adapter in mod.deltacome_delta:
            pd = mod.deltacome_delta[adapter]
            for k, band in enumerate(pd.bands):
                v = torch.randn(band.rank, pd.in_features, generator=g)
                u = torch.randn(pd.out_features, band.rank, generator=g)
                s = torch.rand(band.rank, generator=g) * scale
                pd.set_band(k, quantize_rtn(v, band.bits, 32), quantize_rtn(u, band.bits, 32), s)
            if pd.bias is not None:
                pd.bias.copy_(torch.randn(pd.out_features, generator=g) * scale)


def make_layout(model, ratio=0.5, group=32):
    layout = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            m, n = mod.out_features, mod.in_features
            bands = solve_ranks(m, n, ratio, [[8, 2], [3, 8], [2, None]], group)
            layout[name] = {"shape": [m, n], "bands": [list(b) for b in bands], "group_size": group, "bias": False}
    return layout


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    path = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    """Two saved adapters ('a', 'b') with different random deltas, plus reference logits."""
    out = {}
    x = torch.randint(4, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    for name, seed in (("a", 10), ("b", 20)):
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        cfg = DeltaCoMeConfig(layout=make_layout(base), ratio=0.5, task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg).eval()
        fill_random(model, "default", seed)
        with torch.no_grad():
            logits = model(x).logits
        path = tmp_path_factory.mktemp(f"adapter_{name}")
        model.save_pretrained(path)
        out[name] = (path, logits)
    with torch.no_grad():
        out["base_logits"] = AutoModelForCausalLM.from_pretrained(base_dir).eval()(x).logits
    out["x"] = x
    return out


def load_base(base_dir, **kw):
    return AutoModelForCausalLM.from_pretrained(base_dir, **kw).eval()


def test_files_and_config(adapters):
    path, _ = adapters["a"]
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "DELTACOME"
    assert cfg["layout"]["model.layers.0.self_attn.k_proj"]["shape"] == [32, 64]
    tensors = load_file(path / "adapter_model.safetensors")
    assert any(t.dtype == torch.int32 for t in tensors.values())
    assert all(".default." not in k for k in tensors)


def test_reload_reproduces_logits_exactly(base_dir, adapters):
    path, logits = adapters["a"]
    model = PeftModel.from_pretrained(load_base(base_dir), path)
    with torch.no_grad():
        assert torch.equal(model(adapters["x"]).logits, logits)
    auto = AutoPeftModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.equal(auto(adapters["x"]).logits, logits)


def test_delta_changes_output_and_disable_restores_base(base_dir, adapters):
    path, logits = adapters["a"]
    model = PeftModel.from_pretrained(load_base(base_dir), path)
    assert (logits - adapters["base_logits"]).abs().max() > 1e-2
    with torch.no_grad(), model.disable_adapter():
        assert torch.allclose(model(adapters["x"]).logits, adapters["base_logits"], atol=1e-6)


def test_torch_compile_gives_the_same_logits_and_follows_set_adapter(base_dir, adapters):
    """``torch.compile`` of a loaded model (dynamo's eager backend: the tracing, not a C++ compiler) answers as the
    model does, with the decoded-factor cache run eagerly inside it (its stamp too: no graph break of its own),
    and a switch of adapter is seen."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = PeftModel.from_pretrained(load_base(base_dir), adapters["a"][0], adapter_name="a")
    model.load_adapter(adapters["b"][0], adapter_name="b")
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        for name in ("a", "b", "a"):
            model.set_adapter(name)
            assert torch.allclose(compiled(adapters["x"]).logits, adapters[name][1], atol=1e-5)
    breaks = list(counters["graph_break"])
    assert breaks and all("is_inference" not in reason for reason in breaks), breaks
    torch._dynamo.reset()


def test_multiple_adapters_set_and_delete(base_dir, adapters):
    model = PeftModel.from_pretrained(load_base(base_dir), adapters["a"][0], adapter_name="a")
    model.load_adapter(adapters["b"][0], adapter_name="b")
    x = adapters["x"]
    with torch.no_grad():
        assert torch.allclose(model(x).logits, adapters["a"][1], atol=1e-6)
        model.set_adapter("b")
        assert torch.allclose(model(x).logits, adapters["b"][1], atol=1e-6)
        model.delete_adapter("a")
        assert "a" not in model.peft_config
        assert torch.allclose(model(x).logits, adapters["b"][1], atol=1e-6)


def test_mixed_batch_matches_single_adapter_rows(base_dir, adapters):
    model = PeftModel.from_pretrained(load_base(base_dir), adapters["a"][0], adapter_name="a")
    model.load_adapter(adapters["b"][0], adapter_name="b")
    x = adapters["x"]
    with torch.no_grad():
        mixed = model(x, adapter_names=["b", "__base__", "a"]).logits
    assert torch.allclose(mixed[0], adapters["b"][1][0], atol=1e-5)
    assert torch.allclose(mixed[1], adapters["base_logits"][1], atol=1e-5)
    assert torch.allclose(mixed[2], adapters["a"][1][2], atol=1e-5)
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(x, adapter_names=["a", "zzz", "b"])


def _adapter_with_norms(base_dir, tmp_path, name, seed, layers, norms):
    """Save an adapter with deltas on the linears of ``layers`` only and changed ``norms`` (dense extras)."""
    base = load_base(base_dir)
    layout = {k: v for k, v in make_layout(base).items() if any(f".layers.{i}." in k for i in layers)}
    cfg = DeltaCoMeConfig(layout=layout, ratio=0.5, task_type="CAUSAL_LM", modules_to_save=list(norms))
    model = get_peft_model(base, cfg).eval()
    fill_random(model, "default", seed)
    g = torch.Generator().manual_seed(seed)
    for norm in norms:
        copy = model.base_model.model.get_submodule(norm).modules_to_save["default"]
        copy.weight.data += 0.3 * torch.randn(copy.weight.shape, generator=g)
    path = tmp_path / name
    model.save_pretrained(path)
    return path


def test_mixed_batch_with_changed_norms_matches_single_adapter_rows(base_dir, adapters, tmp_path):
    """Fine-tunes change norms (carried densely in modules_to_save), and two adapters may change different ones and
    cover different layers: per-row adapter_names must still equal each adapter run alone, in forward and generate."""
    pa = _adapter_with_norms(base_dir, tmp_path, "na", 31, [0, 1], ["model.norm", "model.layers.0.input_layernorm"])
    pb = _adapter_with_norms(base_dir, tmp_path, "nb", 32, [1], ["model.layers.1.post_attention_layernorm"])
    x = adapters["x"]
    model = PeftModel.from_pretrained(load_base(base_dir), pa, adapter_name="a")
    model.load_adapter(pb, adapter_name="b")
    with torch.no_grad():
        single = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            single[name] = model(x).logits
        with model.disable_adapter():
            single["__base__"] = model(x).logits
        assert (single["a"] - single["__base__"]).abs().max() > 1e-2
        order = ["b", "__base__", "a"]
        mixed = model(x, adapter_names=order).logits
    for i, name in enumerate(order):
        torch.testing.assert_close(mixed[i], single[name][i], atol=1e-5, rtol=1e-5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ids = x[:2]
    both = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=["a", "b"], **kw)
    for i, name in enumerate(["a", "b"]):
        model.set_adapter(name)
        alone = model.generate(input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), **kw)
        assert torch.equal(both[i], alone[0])
    # the wrappers are restored after a mixed call: a plain forward uses the active adapter again, and an
    # instance-level forward someone else installed (accelerate's hooks do that) is put back, not dropped
    model.set_adapter("a")
    wrapper = model.base_model.model.model.norm

    def instance_forward(*args, **kwargs):
        instance_forward.calls += 1
        return type(wrapper).forward(wrapper, *args, **kwargs)

    instance_forward.calls = 0
    wrapper.forward = instance_forward
    with torch.no_grad():
        model(x, adapter_names=order)
        assert wrapper.forward is instance_forward and instance_forward.calls == 0
        torch.testing.assert_close(model(x).logits, single["a"])
    assert instance_forward.calls == 1
    with torch.no_grad(), pytest.raises(ValueError, match="adapter_names has 2 entries but .* 3 batch rows"):
        model(x, adapter_names=["a", "b"])
    assert wrapper.forward is instance_forward  # put back after a failed call too


def test_generate_with_adapter_names_matches_single(base_dir, adapters):
    model = PeftModel.from_pretrained(load_base(base_dir), adapters["a"][0], adapter_name="a")
    model.load_adapter(adapters["b"][0], adapter_name="b")
    x = adapters["x"][:2]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    mixed = model.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=["a", "b"], **kw)
    model.set_adapter("a")
    only_a = model.generate(input_ids=x[:1], attention_mask=torch.ones_like(x[:1]), **kw)
    model.set_adapter("b")
    only_b = model.generate(input_ids=x[1:], attention_mask=torch.ones_like(x[1:]), **kw)
    assert torch.equal(mixed[0], only_a[0]) and torch.equal(mixed[1], only_b[0])


def test_merge_and_unload(base_dir, adapters):
    path, logits = adapters["a"]
    model = PeftModel.from_pretrained(load_base(base_dir), path)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, DeltaCoMeLinear) for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(merged(adapters["x"]).logits, logits, atol=1e-4)
    unloaded = PeftModel.from_pretrained(load_base(base_dir), path).unload()
    with torch.no_grad():
        assert torch.allclose(unloaded(adapters["x"]).logits, adapters["base_logits"], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_packed_dtypes(base_dir, adapters, dtype):
    path, logits = adapters["a"]
    model = PeftModel.from_pretrained(load_base(base_dir, dtype=dtype), path)
    from hf_deltacome.format.storage import PackedDelta

    def stored_dtypes():
        deltas = [m for m in model.modules() if isinstance(m, PackedDelta)]
        assert deltas and {b.dtype for d in deltas for b in d.buffers()} == {torch.uint8}  # one blob each
        band = deltas[0].bands[0]
        return {"qweight": band.v.qweight.dtype, "scales": band.u.scales.dtype, "zeros": band.v.zeros.dtype,
                "s": band.s.dtype}  # fmt: skip

    expected = {"qweight": torch.int32, "scales": torch.float16, "zeros": torch.uint8, "s": torch.float32}
    assert stored_dtypes() == expected
    model.to(torch.float32).to(dtype)  # casts must not touch the packed buffers
    assert stored_dtypes() == expected
    with torch.no_grad():
        out = model(adapters["x"]).logits
    assert out.dtype == dtype
    rel = (out.float() - logits).norm() / logits.norm()
    assert rel < 0.05


def test_pipeline_generates(base_dir, adapters):
    """The text-generation pipeline runs base + adapter: its text is the adapter's greedy continuation, not the
    base's."""
    tok = char_tokenizer()
    model = PeftModel.from_pretrained(load_base(base_dir), adapters["a"][0])
    text = pipeline("text-generation", model=model, tokenizer=tok)("abc", max_new_tokens=6, do_sample=False)
    ids = tok("abc", return_tensors="pt").input_ids
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours = model.generate(input_ids=ids, **kw)[0, ids.shape[1] :]
    assert text[0]["generated_text"] == "abc" + tok.decode(ours)
    base_text = pipeline("text-generation", model=load_base(base_dir), tokenizer=tok)(
        "abc", max_new_tokens=6, do_sample=False
    )
    assert base_text[0]["generated_text"] != text[0]["generated_text"]


def test_empty_layout_is_refused(base_dir):
    with pytest.raises(ConfigError, match="empty layout"):
        get_peft_model(load_base(base_dir), DeltaCoMeConfig())


def test_layout_for_other_base_is_refused(base_dir):
    base = load_base(base_dir)
    layout = make_layout(base)
    layout["model.layers.0.self_attn.q_proj"]["shape"] = [64, 65]
    with pytest.raises(ConfigError, match=r"q_proj.*shape \[64, 65\].*\[64, 64\]"):
        get_peft_model(base, DeltaCoMeConfig(layout=layout))
    layout = make_layout(base)
    layout["model.layers.7.mlp.up_proj"] = layout["model.layers.0.mlp.up_proj"]
    with pytest.raises(ConfigError, match="layers.7.mlp.up_proj"):
        get_peft_model(load_base(base_dir), DeltaCoMeConfig(layout=layout))


def test_missing_tensor_in_file_is_refused(base_dir, adapters, tmp_path):
    path, _ = adapters["a"]
    for f in ("adapter_config.json",):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    tensors = load_file(path / "adapter_model.safetensors")
    dropped = sorted(tensors)[3]
    del tensors[dropped]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="lacks 1 tensor"):
        PeftModel.from_pretrained(load_base(base_dir), tmp_path)


def test_hand_edited_layout_is_refused(adapters, tmp_path):
    path, _ = adapters["a"]
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["layout"]["model.layers.0.mlp.up_proj"]["bands"][0][0] = 5
    with pytest.raises(ConfigError, match=r"up_proj.*unknown bit width 5"):
        DeltaCoMeConfig(**{k: v for k, v in cfg.items() if k not in ("peft_type",)})


def test_package_registers_peft_type():
    from peft.utils import PeftType

    assert PeftType("DELTACOME") is PeftType.DELTACOME
    assert hf_deltacome.DeltaCoMeConfig().peft_type == PeftType.DELTACOME


def test_device_map_auto_base_offloaded_to_disk(base_dir, adapters, tmp_path):
    """``device_map="auto"`` with room for the embeddings only: the decoder layers, the final norm and ``lm_head`` go
    to disk (meta weights that accelerate's hooks load at each forward). The adapter loads onto that base, keeps its
    packed factors real, and gives the same logits."""
    path, logits = adapters["a"]
    kw = dict(max_memory={"cpu": 200_000}, offload_folder=str(tmp_path / "offload"))
    base = load_base(base_dir, device_map="auto", **kw)
    assert base.hf_device_map["model.embed_tokens"] == "cpu" and base.hf_device_map["model.layers"] == "disk"
    model = PeftModel.from_pretrained(base, path, **kw)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, DeltaCoMeLinear) and q.get_base_layer().weight.device.type == "meta"
    assert {b.device.type for b in q.deltacome_delta.buffers()} == {"cpu"}
    with torch.no_grad():
        assert torch.allclose(model(adapters["x"]).logits, logits, atol=1e-6)


def test_dequant_cache_gives_the_same_output_and_follows_the_packed_bytes():
    """The torch path's cache of dequantized factors changes nothing but speed: same output as dequantizing every
    band; a new load into the same buffers (in place) is seen at once; a cap of 0 turns it off."""
    from hf_deltacome.backend import DequantCache, dequant_cache, torch_delta_forward
    from hf_deltacome.format.storage import PackedDelta

    entry = {"shape": [40, 24], "bands": [[8, 2], [3, 5], [2, 9]], "group_size": 16, "bias": True, "format": 2}
    g = torch.Generator().manual_seed(0)
    a, b = PackedDelta.from_layout(entry), PackedDelta.from_layout(entry)
    for d in (a, b):
        with torch.no_grad():
            for band in d.bands:
                band.s.copy_(torch.rand(band.rank, generator=g))
                band.v.scales.fill_(0.02)
                band.u.scales.fill_(0.02)
                band.v.qweight.copy_(torch.randint(0, 2**30, band.v.qweight.shape, generator=g))
                band.u.qweight.copy_(torch.randint(0, 2**30, band.u.qweight.shape, generator=g))
    x = torch.randn(3, 24, generator=g)
    saved = dequant_cache.max_bytes
    try:
        dequant_cache.configure(0)
        plain = torch_delta_forward(x, a)
        dequant_cache.configure(1 << 20)
        torch.testing.assert_close(torch_delta_forward(x, a), plain)
        assert dequant_cache.bytes > 0
        a.load_state_dict(b.state_dict())  # copied in place: same tensors, new values
        dequant_cache.configure(0)
        want = torch_delta_forward(x, b)
        dequant_cache.configure(1 << 20)
        torch.testing.assert_close(torch_delta_forward(x, a), want)
    finally:
        dequant_cache.configure(saved)
    small = DequantCache(100)  # smaller than one entry: nothing is kept
    small.factors(a, torch.float32, torch.device("cpu"))
    assert small.bytes == 0


def test_dequant_cache_keeps_hitting_when_a_step_cycles_over_more_than_it_holds():
    """A mixed batch over more adapters than the cap holds visits every entry once per step, in the same order:
    plain LRU would evict each just before its next use (no hit ever). The entries that fit keep hitting, and
    entries nobody asks for any more age out for the ones now in use."""
    from hf_deltacome.backend import DequantCache
    from hf_deltacome.format.storage import PackedDelta

    entry = {"shape": [40, 24], "bands": [[2, 6]], "group_size": 16, "format": 2}
    deltas = [PackedDelta.from_layout(entry) for _ in range(6)]
    cpu = torch.device("cpu")
    one = sum(t.numel() * t.element_size() for t in DequantCache(1 << 20).factors(deltas[0], torch.float32, cpu))
    cache = DequantCache(int(3.5 * one))  # holds 3 of the 6
    seen: dict[int, torch.Tensor] = {}  # held, so that no freed tensor's id is reused for a new one
    hits = 0
    for _ in range(4):  # four steps, each over all six deltas in the same order
        for i, d in enumerate(deltas):
            a, _ = cache.factors(d, torch.float32, cpu)
            hits += seen.get(i) is a
            seen[i] = a
    assert hits == 3 * 3  # the three kept entries hit in every step after the first
    assert cache.bytes <= cache.max_bytes
    kept_before = {i for i, d in enumerate(deltas) if any(k[0] == id(d) for k in cache._entries)}
    for _ in range(10):  # now only the deltas that were not kept are asked for
        for i in sorted(set(range(6)) - kept_before):
            cache.factors(deltas[i], torch.float32, cpu)
    kept_after = {i for i, d in enumerate(deltas) if any(k[0] == id(d) for k in cache._entries)}
    assert kept_after == set(range(6)) - kept_before


def test_one_cap_holds_the_dare_and_vector_code_forms_too():
    """The default's MLP (DARE) and `full_rank="vq"` decode to forms that grow with the delta (a CSR matrix, 8 bytes
    a kept value; float32 rows): they sit in the same capped cache as the bands' factors, counted to the byte, so
    ``DELTACOME_DEQUANT_CACHE_MB`` bounds them; past the cap they are decoded again, with the same output; new
    values are seen; a deleted delta's entries go with `prune`."""
    import gc
    import warnings

    from hf_deltacome import DecodeCacheFullWarning
    from hf_deltacome.backend import dequant_cache, torch_delta_forward
    from hf_deltacome.format.baseline_parts import sparse_mask
    from hf_deltacome.format.decoded import decoded_nbytes
    from hf_deltacome.format.storage import PackedDelta
    from hf_deltacome.format.vq_part import vq_nvectors
    from hf_deltacome.quant.rtn import quantize_rtn

    g = torch.Generator().manual_seed(3)
    m, n = 48, 96
    nnz = int(sparse_mask(m, n, 0.2, 5).sum())
    dare = PackedDelta(m, n, [], 16, sparse={"nnz": nnz, "keep": 0.2, "seed": 5, "bits": 2, "group_size": 16})
    dare.sparse.values.set(quantize_rtn(torch.randn(1, nnz, generator=g), 2, 16))
    vq = PackedDelta(m, n, [], 16, vq={"rows": m, "dim": 8, "codes": 16, "seed": 5})
    vq.vq.set(torch.randint(0, 16, (vq_nvectors(m, n, 8),), generator=g), torch.randn(16, 8, generator=g), 0.5)
    x = torch.randn(5, n, generator=g)
    saved = dequant_cache.max_bytes
    try:
        dequant_cache.configure(0)
        plain = [torch_delta_forward(x, d) for d in (dare, vq)]
        assert dequant_cache.bytes == 0 and not dequant_cache.holds(dare, "csr")
        csr, rows = dare.sparse._build_forward_weight(), vq.vq.rotated_rows()
        assert decoded_nbytes(csr) == nnz * 8 + (m + 1) * 4 and decoded_nbytes(rows) == m * n * 4
        dequant_cache.configure(decoded_nbytes(csr) + decoded_nbytes(rows))  # room for both, to the byte
        for d, want in zip((dare, vq), plain):
            torch.testing.assert_close(torch_delta_forward(x, d), want)
        assert dequant_cache.holds(dare, "csr") and dequant_cache.holds(vq, "vq")
        assert dequant_cache.bytes == decoded_nbytes(csr) + decoded_nbytes(rows)
        dequant_cache.configure(decoded_nbytes(csr))  # below the vq rows' size: they no longer fit
        assert dequant_cache.bytes <= dequant_cache.max_bytes
        dequant_cache._warned = False  # (another test may have filled the process's cache before)
        with pytest.warns(DecodeCacheFullWarning, match=r"'vq' entry of 18 KiB did not fit.*DELTACOME_DEQUANT") as said:
            torch.testing.assert_close(torch_delta_forward(x, vq), plain[1])  # decoded again, not kept
        assert "hf_deltacome" in said[0].filename, said[0].filename  # not torch.compiler.disable's wrapper
        with warnings.catch_warnings():
            warnings.simplefilter("error", DecodeCacheFullWarning)  # said once
            torch_delta_forward(x, vq)
        assert not dequant_cache.holds(vq, "vq") and dequant_cache.bytes <= dequant_cache.max_bytes
        dare.sparse.values.set(quantize_rtn(torch.randn(1, nnz, generator=g), 2, 16))  # new values: seen at once
        dequant_cache.configure(1 << 20)
        changed = torch_delta_forward(x, dare)
        assert (changed - plain[0]).abs().max() > 1e-3
        dequant_cache.configure(0)
        torch.testing.assert_close(torch_delta_forward(x, dare), changed)
        dequant_cache.configure(1 << 20)
        torch_delta_forward(x, dare)
        held = dequant_cache.bytes
        del dare
        gc.collect()
        dequant_cache.prune()
        assert dequant_cache.bytes == held - decoded_nbytes(csr)
    finally:
        dequant_cache.configure(saved)
