"""The OpenAI-compatible server (hf_deltacome.serving.server), driven with the official ``openai`` client.

One server (tiny Llama base + adapters ``math`` and ``code``, API key required) runs on 127.0.0.1 in a background
thread for the whole module.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from serving_fixtures import greedy_alone, make_adapter, single_adapter_model, tiny_base
from tiny_models import CHAT_TEMPLATE, make_tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from hf_deltacome import ConfigError  # noqa: E402
from hf_deltacome.serving import Engine, create_app, load_deltas  # noqa: E402

KEY = "test-key"
BASE_NAME = "tiny-llama"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root / name, seed) for name, seed in (("math", 1), ("code", 2), ("extra", 3))}


@contextlib.contextmanager
def _serving(app):
    """``app`` served by uvicorn on a free port of 127.0.0.1 in a background thread; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def server(adapters):
    tok = make_tokenizer()
    model = load_deltas(tiny_base(), {"math": adapters["math"], "code": adapters["code"]})
    engine = Engine(model, tok, max_batch=4, max_model_len=128)
    app = create_app(engine, base_name=BASE_NAME, api_key=KEY, default_max_tokens=16)
    with _serving(app) as url:
        yield {"url": url, "engine": engine, "model": model, "tok": tok}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def references(adapters):
    return {
        "math": single_adapter_model(adapters["math"]),
        "code": single_adapter_model(adapters["code"]),
        BASE_NAME: tiny_base(),
        "base": tiny_base(),
    }


def _expected(references, tok, model_name, prompt_ids, max_tokens):
    ids, text = greedy_alone(references[model_name], tok, prompt_ids, max_tokens)
    reason = "stop" if ids and ids[-1] == tok.eos_token_id else "length"
    return text, reason, len(ids)


def _chat_ids(tok, messages):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def _raw(server, path, body=None, key=KEY, method="POST"):
    """``(status, JSON body)`` of one plain HTTP request (urllib: no client-side validation in the way)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    request = urllib.request.Request(server["url"] + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_base_and_every_adapter(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [BASE_NAME, "math", "code"]
    assert client.models.retrieve("math").id == "math"
    assert client.models.retrieve("math").model_extra["max_model_len"] == 128


def test_concurrent_streaming_and_plain_requests_equal_each_adapter_alone(client, server, references):
    tok = server["tok"]
    jobs = []
    for i, model_name in enumerate(["math", "code", BASE_NAME, "base", "math", "code", "math", "code"]):
        chat, stream = i % 2 == 0, i % 3 == 0
        max_tokens = 4 + 2 * i
        text = f"prompt number {i}: " + "abc"[: i % 3 + 1]
        jobs.append((model_name, chat, stream, max_tokens, text))

    def run(job):
        model_name, chat, stream, max_tokens, text = job
        kwargs = dict(model=model_name, max_tokens=max_tokens, temperature=0)
        if chat:
            messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
            prompt_ids = _chat_ids(tok, messages)
            if stream:
                chunks = list(
                    client.chat.completions.create(
                        messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
                    )
                )
                content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
                assert chunks[0].choices[0].delta.role == "assistant"
                usage = chunks[-1].usage
            else:
                r = client.chat.completions.create(messages=messages, **kwargs)
                content, reason, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
        else:
            prompt_ids = tok(text).input_ids
            if stream:
                chunks = list(client.completions.create(prompt=text, stream=True, **kwargs))
                content = "".join(c.choices[0].text for c in chunks)
                reason, usage = chunks[-1].choices[0].finish_reason, None
            else:
                r = client.completions.create(prompt=text, **kwargs)
                content, reason, usage = r.choices[0].text, r.choices[0].finish_reason, r.usage
        return prompt_ids, content, reason, usage

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for job, (prompt_ids, content, reason, usage) in zip(jobs, results, strict=True):
        expected, expected_reason, n = _expected(references, tok, job[0], prompt_ids, job[3])
        assert (content, reason) == (expected, expected_reason), job
        if usage is not None:
            assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), n)
            assert usage.total_tokens == len(prompt_ids) + n
    assert server["engine"].stats["max_rows"] > 1  # requests for different adapters shared batches


def test_stop_strings(client, server, references):
    tok = server["tok"]
    prompt = "Once upon a time"
    expected, _, _ = _expected(references, tok, "code", tok(prompt).input_ids, 20)
    stop = expected[6:8]
    r = client.completions.create(model="code", prompt=prompt, max_tokens=20, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].text == expected[: expected.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="code", prompt=prompt, max_tokens=20, temperature=0, stop=stop, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == expected[: expected.index(stop)]


def test_prompt_batches_and_n_choices(client, server, references):
    """Choice i * n + j is sample j of prompt i; greedy samples are the adapter's own continuation; a seeded call
    repeats, and its samples differ."""
    tok = server["tok"]
    prompts = ["Once upon", "x = 1"]
    r = client.completions.create(model="math", prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        assert c.text == _expected(references, tok, "math", tok(prompts[c.index // 2]).input_ids, 6)[0]
    assert r.usage.prompt_tokens == sum(len(tok(p).input_ids) for p in prompts)  # each prompt once
    assert r.usage.completion_tokens == sum(_expected(references, tok, "math", tok(prompts[i // 2]).input_ids, 6)[2]
                                            for i in range(4))  # fmt: skip
    sampled = [client.chat.completions.create(model="code", messages=[{"role": "user", "content": "hi"}], n=3,
                                              max_tokens=8, temperature=1.0, seed=5) for _ in range(2)]  # fmt: skip
    texts = [[c.message.content for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1


def test_logprobs_of_completions_and_chat(client, server, references):
    tok = server["tok"]
    prompt = "Once upon a time"
    ids = tok(prompt).input_ids
    expected, _, _ = _expected(references, tok, "math", ids, 10)
    r = client.completions.create(model="math", prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == expected and "".join(lp.tokens) == expected
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    ref = references["math"]
    with torch.no_grad():
        full = torch.log_softmax(ref(torch.tensor([ids + tok(expected, add_special_tokens=False).input_ids])).logits[0], -1)
    for i, (token, logprob, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)):
        assert abs(logprob - float(full[len(ids) - 1 + i].max())) < 1e-4  # greedy: the likeliest token
        assert token in top and len(top) <= 3 and max(top.values()) == top[token]
    chunks = list(client.completions.create(model="math", prompt=prompt, max_tokens=10, temperature=0, logprobs=2,
                                            stream=True))  # fmt: skip
    streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == lp.text_offset
    messages = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="code", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=2)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    plain = client.chat.completions.create(model="code", messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_an_alternative_token_reads_as_it_would_in_the_completion():
    """A sentencepiece token decoded alone loses its leading space (``▁London`` reads ``London``): an alternative is
    decoded after the tokens before it, as the chosen token's text is; a special token reads as itself."""
    import functools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_deltacome.serving.choices import logprobs_body
    from hf_deltacome.serving.requests import TokenLogprob, piece

    words = ["<s>", "</s>", "<unk>", "▁The", "▁capital", "▁is", "▁Paris", "▁London"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tok.decode([7]) == "London"  # alone
    assert piece(tok, [3, 4, 5], 7) == " London" and piece(tok, [], 7) == "London"
    assert piece(tok, [3], 1) == "" and piece(tok, [3], 1, special=True) == "</s>"
    entry = TokenLogprob(6, -0.1, ((6, -0.1), (7, -2.5), (1, -4.0)), offset=14, text=" Paris", context=(3, 4, 5))
    token_text = functools.lru_cache(maxsize=None)(lambda context, t: piece(tok, context, t, special=True))
    chat = logprobs_body([entry], token_text, chat=True)["content"][0]
    assert [t["token"] for t in chat["top_logprobs"]] == [" Paris", " London", "</s>"]
    assert chat["top_logprobs"][1]["bytes"] == list(b" London")
    completion = logprobs_body([entry], token_text, chat=False)
    assert completion["tokens"] == [" Paris"] and completion["top_logprobs"] == [{" Paris": -0.1, " London": -2.5, "</s>": -4.0}]  # fmt: skip


def test_echo_scores_the_prompt_under_the_adapter(client, server, references):
    """echo + logprobs + max_tokens=0 (how a harness scores a continuation through the API): each prompt token's
    log-probability under the adapter after the tokens before it; with max_tokens the completion follows."""
    tok = server["tok"]
    prompts = [[1, 40, 41, 42, 43, 44], [1, 50, 51]]
    r = client.completions.create(model="code", prompt=prompts, max_tokens=0, echo=True, logprobs=2)
    assert [c.finish_reason for c in r.choices] == ["length", "length"] and r.usage.completion_tokens == 0
    for choice, ids in zip(r.choices, prompts, strict=True):
        lp = choice.logprobs
        assert choice.text == tok.decode(ids, skip_special_tokens=True) == "".join(lp.tokens)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        with torch.no_grad():
            want = torch.log_softmax(references["code"](torch.tensor([ids])).logits[0], -1)
        for i in range(1, len(ids)):
            assert abs(lp.token_logprobs[i] - float(want[i - 1, ids[i]])) < 1e-4
            assert len(lp.top_logprobs[i]) <= 3 and lp.top_logprobs[i][lp.tokens[i]] == lp.token_logprobs[i]
    base = client.completions.create(model="base", prompt=prompts[:1], max_tokens=0, echo=True, logprobs=0)
    assert base.choices[0].logprobs.token_logprobs[1:] != r.choices[0].logprobs.token_logprobs[1:]  # its own model
    prompt = "Once upon"
    expected, _, _ = _expected(references, tok, "code", tok(prompt).input_ids, 5)
    r = client.completions.create(model="code", prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt + expected and "".join(lp.tokens) == prompt + expected
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(model="code", prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                            logprobs=1, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == prompt + expected
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_lm_eval_scores_through_the_server(server, references, tmp_path, monkeypatch):
    """lm-evaluation-harness's ``local-completions`` model (prompt lists of token ids, echo, logprobs, max_tokens 0)
    against the server: each continuation's log-likelihood is the adapter's own."""
    pytest.importorskip("tenacity")  # lm-eval's API models need it
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    docs = [("The cat sat on the", [" mat", " moon"]), ("One two", [" three", " four"]), ("Hello", [" world", " x"])]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": 0}) + "\n" for q, c in docs))
    (tmp_path / "tiny.yaml").write_text(
        f"task: deltacome_api_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    server["tok"].save_pretrained(tmp_path / "tok")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model=code,base_url={server['url']}/v1/completions,tokenizer={tmp_path / 'tok'},"
        "tokenized_requests=True,num_concurrent=1",
        tasks=["deltacome_api_tiny"], task_manager=TaskManager(include_path=str(tmp_path)), batch_size=2,
        log_samples=True,
    )  # fmt: skip
    tok, model = server["tok"], references["code"]
    assert len(out["samples"]["deltacome_api_tiny"]) == len(docs)
    for sample in out["samples"]["deltacome_api_tiny"]:
        for args, resp in zip(sample["arguments"], sample["resps"], strict=True):
            context, continuation = args[0], args[1]
            ctx, whole = tok.encode(context, add_special_tokens=False), tok.encode(context + continuation, add_special_tokens=False)  # fmt: skip
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0], -1)
            want = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
            assert float(resp[0][0]) == pytest.approx(want, abs=1e-3)


def test_adapters_loaded_and_unloaded_over_http(server, adapters, references, tmp_path):
    """With adapter updates allowed, POST /v1/load_lora_adapter serves a new adapter at once (its own outputs) and
    /v1/unload_lora_adapter removes it; bad requests name what is wrong; without the switch, 403."""
    tok = server["tok"]
    engine = Engine(load_deltas(tiny_base(), {"math": adapters["math"]}), tok, max_batch=4, max_model_len=128)
    with _serving(create_app(engine, base_name=BASE_NAME, allow_adapter_updates=True)) as url:
        on = {"url": url}
        status, body = _raw(on, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(adapters["extra"])})
        assert status == 200 and body["status"] == "loaded"
        status, models = _raw(on, "/v1/models", method="GET")
        assert [m["id"] for m in models["data"]] == [BASE_NAME, "math", "extra"]
        status, body = _raw(on, "/v1/completions", {"model": "extra", "prompt": "Once", "max_tokens": 6, "temperature": 0})
        expected, _ = greedy_alone(single_adapter_model(adapters["extra"]), tok, tok("Once").input_ids, 6)
        assert status == 200 and body["choices"][0]["text"] == tok.decode(expected, skip_special_tokens=True)
        status, body = _raw(on, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(adapters["extra"])})
        assert status == 400 and "extra" in body["error"]["message"]  # the name is taken
        status, body = _raw(on, "/v1/load_lora_adapter", {"lora_name": "x2", "lora_path": str(tmp_path / "nowhere")})
        assert status == 400 and "nowhere" in body["error"]["message"] and body["error"]["param"] == "lora_path"
        status, body = _raw(on, "/v1/load_lora_adapter", {"lora_name": "base", "lora_path": str(adapters["extra"])})
        assert status == 400 and body["error"]["param"] == "lora_name"
        status, body = _raw(on, "/v1/unload_lora_adapter", {"lora_name": "extra"})
        assert status == 200 and body["status"] == "unloaded" and engine.adapters == ["math"]
        status, body = _raw(on, "/v1/completions", {"model": "extra", "prompt": "Once", "max_tokens": 2})
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, body = _raw(on, "/v1/unload_lora_adapter", {"lora_name": "extra"})
        assert status == 404 and body["error"]["param"] == "lora_name"
    status, body = _raw(server, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(adapters["extra"])})
    assert status == 403 and body["error"]["code"] == "adapter_updates_off"
    assert server["engine"].adapters == ["math", "code"]


def test_logit_bias_and_penalties_reach_the_engine(client, server):
    tok = server["tok"]
    q = str(tok.convert_tokens_to_ids("q"))
    r = client.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logit_bias={q: 100})  # fmt: skip
    assert r.choices[0].message.content == "qqqq"
    r = client.completions.create(model="math", prompt="abab", max_tokens=4, temperature=0, logit_bias={q: 100},
                                  frequency_penalty=2.0)  # fmt: skip
    assert r.choices[0].text == "qqqq"  # a bias of 100 outweighs a penalty of 2 per appearance


def test_vllm_sampling_options(client, server):
    """vLLM's sampling options as its OpenAI server takes them (``extra_body``): an end token forced by a bias ends
    the text at once, ``min_tokens`` holds it off, ``ignore_eos`` runs past it, ``stop_token_ids`` end it as an end
    token does; ``top_k=1`` and ``min_p=1`` sample the greedy choice; ``repetition_penalty`` is heard."""
    tok = server["tok"]
    eos, q = str(tok.eos_token_id), tok.convert_tokens_to_ids("q")

    def complete(**extra):
        return client.completions.create(model="math", prompt="abab", max_tokens=6, temperature=0, extra_body=extra)

    r = complete(logit_bias={eos: 100})
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
    r = complete(logit_bias={eos: 100}, min_tokens=3)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4 and len(r.choices[0].text) == 3
    r = complete(logit_bias={eos: 100}, ignore_eos=True)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 6)
    r = complete(logit_bias={str(q): 100}, stop_token_ids=[q])
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("", "stop")
    greedy = complete().choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.completions.create(model="math", prompt="abab", max_tokens=6, temperature=1.5, seed=3, extra_body=extra)
        assert r.choices[0].text == greedy, extra
    assert complete(repetition_penalty=5.0).choices[0].text != greedy
    assert complete(top_k=-1, min_p=0.0, repetition_penalty=1.0).choices[0].text == greedy  # vLLM's "off" values


def test_sampling_helpers_follow_vllm():
    """``top_k`` keeps the k likeliest, ``min_p`` those at least that share of the likeliest (seeded draws never
    leave them); ``repetition_penalty`` divides a seen token's positive logit and multiplies a negative one."""
    from hf_deltacome.serving.requests import GenerationRequest, SamplingParams, sample_token, shaped_logits

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    for params, allowed in ((SamplingParams(top_k=2), {0, 1}), (SamplingParams(min_p=0.3), {0, 1})):
        request = GenerationRequest([4], "__base__", params, lambda e: None)
        request._generator = torch.Generator().manual_seed(0)
        assert {sample_token(logits, request) for _ in range(200)} == allowed
    request = GenerationRequest([0, 3], "__base__", SamplingParams(repetition_penalty=2.0), lambda e: None)
    torch.testing.assert_close(shaped_logits(logits, request), torch.tensor([1.0, 1.0, 0.5, -2.0, 0.0]))
    request = GenerationRequest([0], "__base__", SamplingParams(min_tokens=1, stop_token_ids=(2,)), lambda e: None)
    assert shaped_logits(logits, request, frozenset({1})).isinf().tolist() == [False, True, True, False, False]
    with pytest.raises(ConfigError, match="min_tokens must be in"):
        SamplingParams(max_tokens=2, min_tokens=3)


def test_options_the_sampler_cannot_honour_are_refused(server):
    for option, value in (("response_format", {"type": "json_object"}), ("tool_choice", "required"),
                          ("modalities", ["text", "audio"])):  # fmt: skip
        status, body = _raw(server, "/v1/chat/completions", {"model": "math", "messages": [{"role": "user", "content": "hi"}], option: value})  # fmt: skip
        assert status == 400 and body["error"]["param"] == option, (option, body)
    status, _ = _raw(server, "/v1/chat/completions", {"model": "math", "messages": [{"role": "user", "content": "hi"}],
                                                      "response_format": {"type": "text"}, "max_tokens": 2})  # fmt: skip
    assert status == 200
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": "x", "stop_token_ids": [99999]})
    assert status == 400 and body["error"]["param"] == "stop_token_ids"
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": "x", "max_tokens": 2, "min_tokens": 3})
    assert status == 400 and "min_tokens" in body["error"]["message"]
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": "x", "top_k": -2})
    assert status == 422 and body["error"]["param"] == "top_k"


def _metrics(server) -> dict[str, float]:
    with urllib.request.urlopen(server["url"] + "/metrics", timeout=30) as response:  # no key: like /health
        assert response.headers["Content-Type"].startswith("text/plain")
        lines = response.read().decode().splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))}


def test_metrics_count_each_models_requests_and_tokens(client, server):
    before = _metrics(server)
    r = client.completions.create(model="code", prompt=["ab", "cde"], n=2, max_tokens=3, temperature=0)
    list(client.completions.create(model="code", prompt="x", max_tokens=2, temperature=0, stream=True))
    after = _metrics(server)
    key = 'deltacome_{}_total{{model="code"}}'
    assert after[key.format("requests")] - before.get(key.format("requests"), 0) == 2
    assert after[key.format("prompt_tokens")] - before.get(key.format("prompt_tokens"), 0) == r.usage.prompt_tokens + 2
    grown = after[key.format("completion_tokens")] - before.get(key.format("completion_tokens"), 0)
    assert r.usage.completion_tokens + 1 <= grown <= r.usage.completion_tokens + 2
    assert after["deltacome_tokens_total"] > before["deltacome_tokens_total"] and after["deltacome_adapters"] == 2
    assert after["deltacome_shared_prefills_total"] >= before["deltacome_shared_prefills_total"]
    assert {"deltacome_running", "deltacome_waiting", "deltacome_prefills_total"} <= set(after)


def test_chat_template_is_the_base_tokenizers(server):
    assert server["tok"].chat_template == CHAT_TEMPLATE
    status, body = _raw(
        server,
        "/v1/chat/completions",
        {
            "model": "math",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        },  # fmt: skip
    )
    assert status == 200
    assert body["usage"]["prompt_tokens"] == len(_chat_ids(server["tok"], [{"role": "user", "content": "hi"}]))


def _error(exc_info):
    body = exc_info.value.body
    return body.get("error", body) if isinstance(body, dict) else body


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert _error(e)["code"] == "model_not_found" and _error(e)["param"] == "model"
    assert "'nope'" in _error(e)["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], stream=True)


def test_oversize_prompt_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="math", prompt="x" * 200, max_tokens=2)
    assert _error(e)["code"] == "context_length_exceeded" and "128" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:  # fits alone, not with the completion asked for
        client.completions.create(model="math", prompt="x" * 100, max_tokens=100)
    assert _error(e)["param"] == "prompt"


def test_bad_json_and_bad_fields(server):
    status, body = _raw(server, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": "x", "temperature": "hot"})
    assert status == 422 and body["error"]["param"] == "temperature"
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": "x", "max_tokens": -1})
    assert status == 422 and body["error"]["param"] == "max_tokens"
    status, body = _raw(server, "/v1/chat/completions", {"model": "math"})
    assert status == 422 and body["error"]["param"] == "messages"
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": "x", "best_of": 3})
    assert status == 400 and body["error"]["param"] == "best_of"
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": "x", "best_of": 3, "echo": True,
                                                     "max_tokens": 0})  # fmt: skip
    assert status == 400 and body["error"]["param"] == "best_of"  # refused on the path that samples nothing too
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": "x", "logit_bias": {"99999": 5}})
    assert status == 400 and body["error"]["param"] == "logit_bias" and "'99999'" in body["error"]["message"]
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": "x", "logit_bias": {"5": 101}})
    assert status == 400 and body["error"]["param"] == "logit_bias"
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": "x", "presence_penalty": 2.5})
    assert status == 422 and body["error"]["param"] == "presence_penalty"
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": "x", "max_tokens": 0})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = _raw(server, "/v1/chat/completions", {"model": "math", "messages": [{"role": "user", "content": "x"}],
                                                          "echo": True})  # fmt: skip
    assert status == 400 and body["error"]["param"] == "echo"
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": ["x"] * 9, "n": 30})
    assert status == 400 and body["error"]["param"] == "n" and "256" in body["error"]["message"]
    status, body = _raw(server, "/v1/completions", {"model": "math", "prompt": [[5, 6], [5, 9999]]})
    assert status == 400 and body["error"]["message"].startswith("prompt.1: ")
    status, body = _raw(server, "/v1/chat/completions", {"model": "math", "messages": [{"role": "user", "content": "x"}],
                                                          "top_logprobs": 2})  # fmt: skip
    assert status == 400 and body["error"]["param"] == "top_logprobs"
    status, body = _raw(server, "/v1/nothing-here", {}, method="GET")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_bad_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert _error(e)["code"] == "invalid_api_key"
    status, body = _raw(server, "/v1/completions", b"{not json", key=None)  # the key is checked first
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert _raw(server, "/health", key=None, method="GET")[0] == 200  # no key needed outside /v1


def test_a_failing_request_gets_500_and_the_others_finish(client, server, references):
    """A hook makes any forward whose positions reach 60 raise: that request fails, the concurrent ones do not."""
    tok = server["tok"]
    decoder = server["model"].get_base_model().model

    def poison(module, args, kwargs):
        positions = kwargs.get("position_ids")
        if positions is not None and int(positions.max()) >= 60:
            raise RuntimeError("poisoned position")

    handle = decoder.register_forward_pre_hook(poison, with_kwargs=True)
    try:

        def bad(stream):
            return client.completions.create(model="math", prompt="q" * 55, max_tokens=20, temperature=0, stream=stream)

        def good(i):
            r = client.completions.create(model="code", prompt=f"fine {i}", max_tokens=12, temperature=0)
            return r.choices[0].text

        with ThreadPoolExecutor(4) as pool:
            fails = pool.submit(bad, False)
            oks = [pool.submit(good, i) for i in range(3)]
            with pytest.raises(openai.InternalServerError) as e:
                fails.result()
            assert "poisoned" in _error(e)["message"] and _error(e)["type"] == "server_error"
            for i, ok in enumerate(oks):
                assert ok.result() == _expected(references, tok, "code", tok(f"fine {i}").input_ids, 12)[0]
        with pytest.raises(openai.APIError, match="poisoned"):  # streamed: an error event ends the stream
            list(bad(True))
    finally:
        handle.remove()
    assert client.completions.create(model="math", prompt="still here", max_tokens=3).choices[0].text is not None


@pytest.mark.parametrize("n", [1, 3])
def test_client_disconnect_cancels_the_generation(client, server, n):
    engine = server["engine"]
    slow = server["model"].get_base_model().model.register_forward_hook(lambda *a: time.sleep(0.02))
    try:
        before = engine.stats["tokens"]
        stream = client.completions.create(model="math", prompt="go", max_tokens=120, temperature=0, stream=True, n=n)
        next(iter(stream))
        stream.close()
        deadline = time.time() + 30
        while engine.running or engine.waiting:
            assert time.time() < deadline, "the disconnected request kept running"
            time.sleep(0.02)
    finally:
        slow.remove()
    assert engine.stats["tokens"] - before < 60 * n  # every choice stopped long before its 120 tokens


def test_adapters_added_and_dropped_while_serving(client, server, adapters, references):
    engine, tok = server["engine"], server["tok"]
    engine.add_adapter("extra", str(adapters["extra"]))
    assert [m.id for m in client.models.list().data] == [BASE_NAME, "math", "code", "extra"]
    expected, _, _ = _expected(
        {"extra": single_adapter_model(adapters["extra"])}, tok, "extra", tok("hey").input_ids, 5
    )
    assert (
        client.completions.create(model="extra", prompt="hey", max_tokens=5, temperature=0).choices[0].text == expected
    )
    engine.drop_adapter("extra")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt="hey", max_tokens=5)
    assert "extra" not in server["model"].peft_config


def test_deltacome_serve_command(adapters, tmp_path):
    """The command itself: base folder + --adapter NAME=PATH, the key from the environment, 127.0.0.1 only."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from serving_fixtures import save_base

    base = save_base(tmp_path / "tiny-base")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "DELTACOME_API_KEY": KEY}
    cmd = [sys.executable, "-m", "hf_deltacome.cli", "serve", "--base", str(base), "--adapter", f"math={adapters['math']}",
           "--port", str(port), "--max-model-len", "128", "--log-level", "warning", "--allow-adapter-updates"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "no start"
                time.sleep(0.5)
        status, body = _raw({"url": url}, "/v1/models", key=None, method="GET")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, body = _raw({"url": url}, "/v1/models", method="GET")
        assert status == 200 and [m["id"] for m in body["data"]] == ["tiny-base", "math"]
        status, body = _raw({"url": url}, "/v1/completions", {"model": "math", "prompt": "ab", "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
        status, body = _raw({"url": url}, "/v1/load_lora_adapter", {"lora_name": "code", "lora_path": str(adapters["code"])})
        assert status == 200, body
        status, body = _raw({"url": url}, "/v1/models", method="GET")
        assert [m["id"] for m in body["data"]] == ["tiny-base", "math", "code"]
    finally:
        proc.terminate()
        proc.wait(30)
