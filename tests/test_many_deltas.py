"""Many adapters on one base (hf_deltacome.serving.deltas) and the continuous-batching engine (serving.engine)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from serving_fixtures import greedy_alone, make_adapter, single_adapter_model, tiny_base
from tiny_models import make_tokenizer

from hf_deltacome import ConfigError
from hf_deltacome.backend import dequant_cache
from hf_deltacome.io.summary import summarize_adapter
from hf_deltacome.serving import adapter_nbytes, add_delta, drop_delta, load_deltas
from hf_deltacome.serving.engine import Engine, GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root / name, seed) for name, seed in (("math", 1), ("code", 2), ("chat", 3))}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_mixed_batch_rows_equal_each_adapter_alone(adapters):
    model = load_deltas(tiny_base(), {"math": adapters["math"], "code": adapters["code"]})
    assert sorted(model.peft_config) == ["code", "math"]
    ids = torch.randint(4, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    names = ["math", "code", "__base__", "math"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        alone = {n: single_adapter_model(adapters[n])(input_ids=ids).logits for n in ("math", "code")}
        alone["__base__"] = tiny_base()(input_ids=ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=2e-5, rtol=1e-5)
    # the adapters really differ from each other and from the base, so the row check could fail
    assert (alone["math"] - alone["code"]).abs().max() > 1e-2
    assert (alone["math"] - alone["__base__"]).abs().max() > 1e-2


def test_mixed_generate_with_left_padding_equals_each_adapter_alone(adapters, tok):
    model = load_deltas(tiny_base(), {"math": adapters["math"], "code": adapters["code"]})
    prompts = [tok("Hello there").input_ids, tok("2+2=").input_ids, tok("a much longer prompt").input_ids]
    names = ["math", "code", "__base__"]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    references = {"math": single_adapter_model(adapters["math"]), "code": single_adapter_model(adapters["code"])}
    references["__base__"] = tiny_base()
    for i, (p, name) in enumerate(zip(prompts, names, strict=True)):
        expected, _ = greedy_alone(references[name], tok, p, 12)
        got = out[i, width:].tolist()[: len(expected)]
        assert got == expected, f"row {i} ({name})"


def test_adapters_stay_packed(adapters):
    model = load_deltas(tiny_base(), dict(adapters))
    for name, path in adapters.items():
        summary = summarize_adapter(path)
        stored = summary.factor_bytes + sum(summary.extras.values())  # tensor bytes of the file (no header)
        assert adapter_nbytes(model, name) == stored
        assert stored < summary.target_fp16_bytes / 4  # far below a dequantized (even fp16) delta


def test_add_and_drop_while_loaded(adapters):
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    model = load_deltas(tiny_base(), {"math": adapters["math"]})
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=["math", "math"]).logits
        add_delta(model, "code", adapters["code"])
        mixed = model(input_ids=ids, adapter_names=["math", "code"]).logits
        code_alone = single_adapter_model(adapters["code"])(input_ids=ids).logits
        torch.testing.assert_close(mixed[0], before[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(mixed[1], code_alone[1], atol=2e-5, rtol=1e-5)
        cached = dequant_cache.bytes  # the torch path cached both adapters' dequantized factors
        assert cached > 0
        drop_delta(model, "math")
        assert adapter_nbytes(model, "math") == 0
        assert dequant_cache.bytes < cached  # the dropped adapter's factors went with it
        assert not any(".math." in k for k in model.state_dict())
        after = model(input_ids=ids, adapter_names=["code", "code"]).logits
        torch.testing.assert_close(after[1], code_alone[1], atol=2e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="math"):
            model(input_ids=ids, adapter_names=["math", "code"])


def test_bad_names_and_sources_are_refused(adapters, tmp_path):
    with pytest.raises(ConfigError, match="'a.b'"):
        load_deltas(tiny_base(), {"a.b": adapters["math"]})
    with pytest.raises(ConfigError, match="reserved"):
        load_deltas(tiny_base(), {"__base__": adapters["math"]})
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        load_deltas(tiny_base(), {"x": tmp_path})
    with pytest.raises(ConfigError, match="not an adapter folder"):
        load_deltas(tiny_base(), {"x": str(tmp_path / "missing")})
    model = load_deltas(tiny_base(), {"math": adapters["math"]})
    with pytest.raises(ConfigError, match="already loaded"):
        add_delta(model, "math", adapters["code"])
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        drop_delta(model, "nope")


def test_failed_add_leaves_no_trace(adapters, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapters["code"] / "adapter_config.json").read_bytes())
    data = (adapters["code"] / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    model = load_deltas(tiny_base(), {"math": adapters["math"]})
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        add_delta(model, "code", broken)
    assert "code" not in model.peft_config
    assert set(model.state_dict()) == keys


def test_non_deltacome_adapter_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_base(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(ConfigError, match="LORA adapter"):
        load_deltas(tiny_base(), {"x": tmp_path / "lora"})


# ------------------------------------------------------------------------------------------------ engine


def _collect(engine: Engine, prompt: list[int], adapter: str, **params):
    events, done = [], threading.Event()

    def sink(event):
        events.append(event)
        if event.kind != "text":
            done.set()

    request = engine.submit(GenerationRequest(prompt, adapter, SamplingParams(**params), sink))
    return request, events, done


def test_engine_joins_rows_between_steps_and_matches_each_adapter_alone(adapters, tok):
    model = load_deltas(tiny_base(), {"math": adapters["math"], "code": adapters["code"]})
    jobs = [("math", "The first prompt, long", 40), ("code", "x=", 6), ("__base__", "Hi", 9), ("code", "def f(", 25)]
    refs = {"math": single_adapter_model(adapters["math"]), "code": single_adapter_model(adapters["code"])}
    refs["__base__"] = tiny_base()
    with Engine(model, tok, max_batch=3) as engine:
        started = []
        for adapter, text, n in jobs:
            started.append((_collect(engine, tok(text).input_ids, adapter, max_tokens=n, temperature=0), n))
            # let the first request decode alone for a while, so the later ones must join a running batch
            deadline = time.monotonic() + 60
            while engine.stats["steps"] < 3 and time.monotonic() < deadline:  # never hang if the engine stops early
                threading.Event().wait(0.01)
            assert engine.stats["steps"] >= 3, f"the engine stopped after {engine.stats['steps']} steps"
        for (request, events, done), n in started:
            assert done.wait(60)
            text = "".join(e.text for e in events if e.kind == "text")
            expected_ids, expected = greedy_alone(refs[request.adapter], tok, request.prompt_ids, n)
            assert text == expected
            assert request.completion_tokens == len(expected_ids)
            assert events[-1].finish_reason == ("stop" if expected_ids[-1] == tok.eos_token_id else "length")
        assert engine.stats["joins"] >= 2 and engine.stats["max_rows"] == 3  # max_batch respected, rows joined
        assert engine.running == 0


def test_engine_stop_strings_and_seeded_sampling(adapters, tok):
    model = load_deltas(tiny_base(), {"math": adapters["math"]})
    prompt = tok("Once upon a time").input_ids
    _, full = greedy_alone(single_adapter_model(adapters["math"]), tok, prompt, 20)
    stop = full[5:7]
    with Engine(model, tok) as engine:
        text, reason = engine.generate(prompt, "math", max_tokens=20, temperature=0, stop=(stop, "@@never@@"))
        assert (text, reason) == (full[: full.index(stop)], "stop")
        sampled = [engine.generate(prompt, "math", max_tokens=15, temperature=1.0, seed=7) for _ in range(2)]
        assert sampled[0] == sampled[1]
        other = engine.generate(prompt, "math", max_tokens=15, temperature=1.0, seed=8)
        assert other != sampled[0]


@torch.no_grad()
def test_engine_logprobs_are_the_models_and_follow_the_text(adapters, tok):
    """Each reported token's log-probability is the adapter's own (log-softmax of its logits at that step), with
    the likeliest alternatives; the tokens spell the text, their offsets say where."""
    model = load_deltas(tiny_base(), {"math": adapters["math"]})
    prompt = tok("Once upon a time").input_ids
    ref = single_adapter_model(adapters["math"])
    expected_ids, expected = greedy_alone(ref, tok, prompt, 12)
    with Engine(model, tok) as engine:
        request, events, done = _collect(engine, prompt, "math", max_tokens=12, temperature=0, logprobs=3)
        assert done.wait(60)
    entries = [e for event in events for e in event.logprobs]
    tokens = [e for e in expected_ids if e != tok.eos_token_id]
    assert [e.token for e in entries] == tokens
    logprobs = torch.log_softmax(ref(torch.tensor([prompt + expected_ids])).logits[0, len(prompt) - 1 : -1], -1)
    for i, entry in enumerate(entries):
        torch.testing.assert_close(entry.logprob, float(logprobs[i, entry.token]), atol=1e-4, rtol=0)
        assert [t for t, _ in entry.top] == logprobs[i].topk(3).indices.tolist() and entry.top[0][0] == entry.token
        assert entry.offset == len(tok.decode(tokens[:i], skip_special_tokens=True))
    assert "".join(tok.decode([e.token]) for e in entries) == expected


class _Pieces:
    """A tokenizer whose tokens are several characters long (id -> text; 0 ends a generation)."""

    pieces = {1: "Hel", 2: "lo", 3: " wo", 4: "rld", 5: "!", 0: ""}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def _feed(tokens, **params):
    from hf_deltacome.serving.requests import TokenLogprob, append_token

    request = GenerationRequest([9], "x", SamplingParams(logprobs=0, **params), lambda e: None)
    events = []
    for t in tokens:
        if request.finished:
            break
        request.logprobs.append(TokenLogprob(t, -float(t)))
        events += append_token(request, t, frozenset({0}), _Pieces(), 100)
    return events


def test_logprobs_go_with_the_text_they_complete():
    events = _feed([1, 2, 3, 4, 0])  # an end token: not reported
    assert [(e.kind, e.text, [x.token for x in e.logprobs]) for e in events] == [
        ("text", "Hel", [1]), ("text", "lo", [2]), ("text", " wo", [3]), ("text", "rld", [4]), ("done", "", [])]  # fmt: skip
    assert [(x.offset, x.text) for e in events for x in e.logprobs] == [(0, "Hel"), (3, "lo"), (5, " wo"), (8, "rld")]
    # a stop string held back, then found inside the third token: the second is reported (its text ends the
    # completion), the third is not (its text starts at the stop)
    events = _feed([1, 2, 3, 4], stop=("o w",))
    assert "".join(e.text for e in events) == "Hell" and events[-1].finish_reason == "stop"
    assert [x.token for e in events for x in e.logprobs] == [1, 2]
    events = _feed([1, 2, 3], max_tokens=3)  # the length limit: every token, the last with the end
    assert [x.token for e in events for x in e.logprobs] == [1, 2, 3] and events[-1].finish_reason == "length"


@torch.no_grad()
def test_penalties_and_logit_bias_shape_the_choice(adapters, tok):
    """OpenAI's penalties (per appearance and once per token generated) and logit_bias, on greedy decoding: the
    engine picks what a plain loop over the adapter's own logits, shaped the same way, picks."""
    from hf_deltacome.serving.requests import shaped_logits

    request = GenerationRequest([1], "x", SamplingParams(presence_penalty=0.5, frequency_penalty=1.0,
                                                         logit_bias=((3, 2.0),)), lambda e: None)  # fmt: skip
    request.generated = [4, 4, 5]
    out = shaped_logits(torch.zeros(8), request)
    assert out.tolist() == [0, 0, 0, 2.0, -2.5, -1.5, 0, 0]
    with pytest.raises(ConfigError, match="presence_penalty"):
        SamplingParams(presence_penalty=3)
    model = load_deltas(tiny_base(), {"math": adapters["math"]})
    ref = single_adapter_model(adapters["math"])
    prompt = tok("abab").input_ids
    with Engine(model, tok) as engine:
        forced, _ = engine.generate(prompt, "math", max_tokens=5, temperature=0, logit_bias=((tok.convert_tokens_to_ids("q"), 100.0),))  # fmt: skip
        assert forced == "qqqqq"
        text, _ = engine.generate(prompt, "math", max_tokens=12, temperature=0, frequency_penalty=2.0, presence_penalty=0.5)  # fmt: skip
    ids, plain = list(prompt), []
    for _ in range(12):
        logits = ref(torch.tensor([ids])).logits[0, -1]
        counts = torch.bincount(torch.tensor(plain, dtype=torch.long), minlength=logits.numel()).float()
        token = int((logits - 2.0 * counts - 0.5 * (counts > 0).float()).argmax())
        if token == tok.eos_token_id:
            break
        ids.append(token)
        plain.append(token)
    assert text == tok.decode(plain, skip_special_tokens=True)
    assert text != greedy_alone(ref, tok, prompt, 12)[1]  # the penalties changed the text


def test_choices_of_one_prompt_are_prefilled_once(adapters, tok):
    """Requests with the same prompt and adapter admitted together (a call's n choices) share one prefill row; each
    then decodes as if alone (greedy: the adapter's continuation; seeded samples: their own draws)."""
    model = load_deltas(tiny_base(), {"math": adapters["math"], "code": adapters["code"]})
    prompt = tok("Once upon a time").input_ids
    engine = Engine(model, tok, max_batch=8)
    jobs = [("math", dict(temperature=0)), ("math", dict(temperature=0)), ("code", dict(temperature=0)),
            ("math", dict(temperature=1.0, seed=1)), ("math", dict(temperature=1.0, seed=2))]  # fmt: skip
    started = [_collect(engine, prompt, adapter, max_tokens=10, **params) for adapter, params in jobs]
    with engine:  # every request was queued before the scheduler started: one prefill group
        for _, _, done in started:
            assert done.wait(60)
    texts = ["".join(e.text for e in events if e.kind == "text") for _, events, _ in started]
    assert engine.stats["prefills"] == 1 and engine.stats["shared_prefills"] == 3
    assert texts[0] == texts[1] == greedy_alone(single_adapter_model(adapters["math"]), tok, prompt, 10)[1]
    assert texts[2] == greedy_alone(single_adapter_model(adapters["code"]), tok, prompt, 10)[1]
    with Engine(load_deltas(tiny_base(), {"math": adapters["math"]}), tok) as alone:
        assert texts[3] == alone.generate(prompt, "math", max_tokens=10, temperature=1.0, seed=1)[0] != texts[4]


def test_engine_failure_stays_with_its_request(adapters, tok):
    """A row that makes the forward raise (here: any position >= 30) fails alone; the batch it ran in goes on."""
    model = load_deltas(tiny_base(), {"math": adapters["math"], "code": adapters["code"]})
    decoder = model.get_base_model().model

    def poison(module, args, kwargs):
        positions = kwargs.get("position_ids")
        if positions is not None and int(positions.max()) >= 30:
            raise RuntimeError("poisoned position")

    handle = decoder.register_forward_pre_hook(poison, with_kwargs=True)
    refs = {"math": single_adapter_model(adapters["math"]), "code": single_adapter_model(adapters["code"])}
    try:
        with Engine(model, tok, max_batch=4) as engine:
            bad = _collect(engine, tok("y" * 25).input_ids, "math", max_tokens=20, temperature=0)  # fails in decode
            good = [_collect(engine, tok(t).input_ids, a, max_tokens=12, temperature=0) for a, t in [("code", "ab"), ("math", "cd")]]  # fmt: skip
            too_long = _collect(
                engine, tok("z" * 40).input_ids, "code", max_tokens=3, temperature=0
            )  # fails in prefill
            for _, _, done in [bad, *good, too_long]:
                assert done.wait(60)
            assert bad[1][-1].kind == "error" and "poisoned" in str(bad[1][-1].error)
            assert any(e.kind == "text" for e in bad[1])  # it ran (and streamed) until its position reached 30
            assert too_long[1][-1].kind == "error"
            for request, events, _ in good:
                _, expected = greedy_alone(refs[request.adapter], tok, request.prompt_ids, 12)
                assert events[-1].kind == "done"
                assert "".join(e.text for e in events if e.kind == "text") == expected
            assert engine.stats["failed"] == 2
            # and it keeps serving
            assert engine.generate(tok("ok").input_ids, "code", max_tokens=3, temperature=0)[1] in ("stop", "length")
    finally:
        handle.remove()


def test_engine_adds_and_drops_adapters_while_serving(adapters, tok):
    model = load_deltas(tiny_base(), {"math": adapters["math"]})
    with Engine(model, tok) as engine:
        long = _collect(engine, tok("keep going").input_ids, "math", max_tokens=60, temperature=0)
        engine.add_adapter("code", str(adapters["code"]))
        assert engine.adapters == ["math", "code"]
        prompt = tok("def").input_ids
        _, expected = greedy_alone(single_adapter_model(adapters["code"]), tok, prompt, 8)
        assert engine.generate(prompt, "code", max_tokens=8, temperature=0)[0] == expected
        engine.drop_adapter("math")  # waits for the running request of 'math' to finish
        assert long[2].is_set() and long[1][-1].kind == "done"
        assert engine.adapters == ["code"] and "math" not in model.peft_config
        with pytest.raises(ValueError, match="not loaded"):
            engine.submit(GenerationRequest(prompt, "math", SamplingParams(), lambda e: None))
        with pytest.raises(ValueError, match="adapter_config.json"):
            engine.add_adapter("bad", str(adapters["code"].parent))
        assert engine.adapters == ["code"]


def test_engine_serves_a_plain_base_then_a_first_adapter(adapters, tok):
    prompt = tok("plain base").input_ids
    with Engine(tiny_base(), tok) as engine:
        assert engine.adapters == []
        assert engine.generate(prompt, max_tokens=8, temperature=0)[0] == greedy_alone(tiny_base(), tok, prompt, 8)[1]
        engine.add_adapter("math", str(adapters["math"]))
        assert engine.adapters == ["math"]
        _, expected = greedy_alone(single_adapter_model(adapters["math"]), tok, prompt, 8)
        assert engine.generate(prompt, "math", max_tokens=8, temperature=0)[0] == expected


def test_mixed_batch_setup_does_not_walk_every_loaded_adapter(adapters):
    """The per-forward hook setup visits the base's modules and wrappers only, however many adapters are loaded."""
    from hf_deltacome.model import _adapter_hosts

    one = load_deltas(tiny_base(), {"math": adapters["math"]})
    visited_one = sum(1 for _ in _adapter_hosts(one.base_model))
    three = load_deltas(tiny_base(), dict(adapters))
    assert sum(1 for _ in _adapter_hosts(three.base_model)) == visited_one
    assert sum(1 for _ in three.base_model.modules()) > 2 * visited_one  # what a plain walk would visit


def _is_fake(t: torch.Tensor) -> bool:
    """A tensor of torch.compile's tracing (kept alive by its caches when a test before compiled a model)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _live_objects() -> tuple[int, int, int]:
    """(modules, tensors, bytes of their distinct storages) alive in this process."""
    import gc

    gc.collect()
    modules = tensors = 0
    storages: dict[int, int] = {}
    for o in gc.get_objects():
        if isinstance(o, torch.nn.Module):
            modules += 1
        elif isinstance(o, torch.Tensor) and o.device.type != "meta" and not _is_fake(o):
            tensors += 1
            storages[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
    return modules, tensors, sum(storages.values())


def test_each_adapter_costs_its_file_bytes_and_about_one_object_per_file_tensor(adapters):
    """Issue 16: resident memory per adapter is its packed bytes, not Python/PyTorch objects per band and factor.

    A loaded adapter may keep one tensor per tensor of its file (one blob per target linear in format 2, one copy
    per dense extra) and one module per such tensor (a `PackedDelta` per target, a copy per dense extra); the parts
    inside a blob are views made when read. Before, a SmolLM2 adapter held 11 modules and 47 tensor objects per
    target linear, 2.2x its file bytes in all. The tensor bytes added are the file's bytes (no second copy).
    """
    from safetensors import safe_open

    path = adapters["math"]
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        file_tensor_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
    assert any(k.endswith(".deltacome_delta.blob") for k in keys)  # format 2
    model = load_deltas(tiny_base(), {"a0": path})
    before = _live_objects()
    extra = 7
    for k in range(1, 1 + extra):
        add_delta(model, f"a{k}", path)
    after = _live_objects()
    modules, tensors, nbytes = ((b - a) / extra for a, b in zip(before, after, strict=True))
    assert modules <= len(keys), f"{modules:.0f} modules per adapter for {len(keys)} file tensors"
    assert tensors <= len(keys), f"{tensors:.0f} tensors per adapter for {len(keys)} file tensors"
    assert abs(nbytes - file_tensor_bytes) <= 0.01 * file_tensor_bytes, (nbytes, file_tensor_bytes)
    assert adapter_nbytes(model, "a7") == file_tensor_bytes


def test_loading_one_more_adapter_does_not_walk_the_loaded_ones(adapters, monkeypatch):
    """PEFT walks the whole model about 20 times per load; the loaded adapters are out of view meanwhile, so the
    modules a load visits (and its time) do not grow with the number of adapters loaded (issue 16)."""
    walked = [0]
    plain = torch.nn.Module.named_modules

    def counting(self, memo=None, prefix="", remove_duplicate=True):
        outer = memo is None and not prefix  # the recursion passes memo and prefix
        for item in plain(self, memo, prefix, remove_duplicate):
            walked[0] += outer
            yield item

    model = load_deltas(tiny_base(), {"a0": adapters["math"]})
    monkeypatch.setattr(torch.nn.Module, "named_modules", counting)
    visits = []
    for k, name in enumerate(["code", "chat", "math", "code", "chat"], start=1):
        walked[0] = 0
        add_delta(model, f"a{k}", adapters[name])
        visits.append(walked[0])
    monkeypatch.undo()
    assert visits[0] > 0 and visits[-1] == visits[0], visits
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # every adapter is back in place, in its order, and runs as alone
        assert list(model.peft_config) == [f"a{k}" for k in range(6)]
        mixed = model(input_ids=ids, adapter_names=["a0", "a5"]).logits
        torch.testing.assert_close(mixed[0], single_adapter_model(adapters["math"])(input_ids=ids).logits[0])
        torch.testing.assert_close(mixed[1], single_adapter_model(adapters["chat"])(input_ids=ids).logits[1])
