"""Calibration data: reading lists / .txt / .jsonl, tokenizing into fixed-length batches, self-sampling."""

from __future__ import annotations

import json

import pytest
import torch

from hf_deltacome.compression.calibration import (
    CalibrationData,
    get_calibration,
    read_records,
    read_texts,
    tokenize_records,
    tokenize_texts,
)
from hf_deltacome.compression.sampling import sample_from_model
from hf_deltacome.errors import CalibrationError

TEXTS = [f"Sample number {i}: the quick brown fox jumps over the lazy dog." for i in range(40)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def write(tmp_path, name: str, content: str | bytes):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------------ reading


def test_list_of_strings():
    assert read_texts(["a", "  ", "b"]) == ["a", "b"]
    with pytest.raises(CalibrationError, match="no non-empty text"):
        read_texts(["", "   "])
    with pytest.raises(CalibrationError, match="item 1 is a int"):
        read_texts(["a", 3])


def test_txt_one_text_per_line(tmp_path):
    p = write(tmp_path, "calib.txt", "first line\n\n  \nsecond line\nthird\n")
    assert read_texts(p) == ["first line", "second line", "third"]
    assert read_texts(str(p)) == ["first line", "second line", "third"]


def test_txt_errors_name_the_file_and_line(tmp_path):
    empty = write(tmp_path, "empty.txt", "\n \n")
    with pytest.raises(CalibrationError, match=r"empty\.txt.*holds no text"):
        read_texts(empty)
    with pytest.raises(CalibrationError, match=r"missing\.txt.*does not exist"):
        read_texts(tmp_path / "missing.txt")
    bad = write(tmp_path, "bad.txt", b"ok\nfine\n\xff\xfe broken\n")
    with pytest.raises(CalibrationError, match=r"bad\.txt.*line 3.*UTF-8"):
        read_texts(bad)
    with pytest.raises(CalibrationError, match="is a directory"):
        read_texts(tmp_path)
    with pytest.raises(CalibrationError, match=r"data\.csv.*unsupported extension"):
        read_texts(write(tmp_path, "data.csv", "a,b\n"))


def test_jsonl_fields(tmp_path, tokenizer):
    rows = [
        {"text": "plain text"},
        {"prompt": "What is 2+2?", "answer": "4"},
        {"prompt": "Complete: ", "completion": "done"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    p = write(tmp_path, "calib.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    texts = read_texts(p, tokenizer)
    assert texts[0] == "plain text"
    assert texts[1] == "What is 2+2?\n4"
    assert texts[2] == "Complete: done"
    assert texts[3] == "<|user|>hi\n<|assistant|>hello\n"  # the tokenizer's chat template
    # without a chat template, messages become "role: content" lines
    assert read_texts(p)[3] == "user: hi\nassistant: hello"


def test_records_keep_the_response_apart(tmp_path, tokenizer):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [{"text": "plain"}, {"prompt": "What is 2+2?", "answer": "4"}, chat,
            {"messages": [{"role": "user", "content": "only a question"}]}]  # fmt: skip
    p = write(tmp_path, "calib.jsonl", "\n".join(json.dumps(r) for r in rows))
    records = read_records(p, tokenizer)
    assert records[:3] == ["plain", ("What is 2+2?\n", "4"), ("<|user|>hi\n<|assistant|>", "hello\n")]
    assert records[3] == "<|user|>only a question\n"  # no answer: all prompt, nothing scored
    assert read_records(p)[2] == ("user: hi\nassistant: ", "hello")  # no chat template
    # a Python list takes the same records (e.g. the rows of a datasets split) beside plain strings
    assert read_records(["x", {"prompt": "Q ", "completion": "A"}], tokenizer) == ["x", ("Q ", "A")]
    with pytest.raises(CalibrationError, match=r"calibration list item 1: no usable field.*'question'"):
        read_records(["x", {"question": "Q"}])
    with pytest.raises(CalibrationError, match=r"calibration list item 0 is a int, expected a string or a record"):
        read_records([3])


def test_response_mask_marks_exactly_the_answers_tokens(tokenizer):
    records = [{"prompt": f"Question {i}? ", "completion": f"answer {i}"} for i in range(30)] + ["plain text " * 3]
    ids, mask = tokenize_records(read_records(records), tokenizer, num_samples=4, seq_len=40, seed=0)
    # the token stream is the joined texts', as without records
    assert torch.equal(ids, tokenize_texts(read_texts(records), tokenizer, num_samples=4, seq_len=40, seed=0))
    assert mask.shape == ids.shape and mask.dtype == torch.bool
    flat_ids, flat_mask = tokenize_records(read_records(records), tokenizer, num_samples=1, seq_len=4000)
    text = tokenizer.decode(flat_ids[0][flat_mask[0]])
    assert text == "".join(f"answer {i}</s>" for i in range(30))  # each answer and the EOS after it
    assert tokenize_records(["no", "records"], tokenizer, num_samples=1, seq_len=3)[1] is None
    # compress calibrates on the same token ids, records or not
    assert torch.equal(get_calibration(records, None, tokenizer, num_samples=4, seq_len=40).input_ids, ids)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"line 2: invalid JSON"),
        ("[1, 2]", r"line 2: expected a JSON object"),
        ('{"title": "x"}', r"line 2: no usable field.*'title'"),
        ('{"text": 5}', r"line 2: field 'text' must be a string"),
        ('{"messages": "hi"}', r"line 2: 'messages' must be a list"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    p = write(tmp_path, "data.jsonl", '{"text": "good"}\n' + line + "\n")
    with pytest.raises(CalibrationError, match=r"data\.jsonl.*" + message):
        read_texts(p)


def test_empty_jsonl(tmp_path):
    with pytest.raises(CalibrationError, match=r"empty\.jsonl.*holds no text"):
        read_texts(write(tmp_path, "empty.jsonl", '{"text": "  "}\n'))


# ------------------------------------------------------------------------------------------------ tokenizing


def test_tokenize_into_fixed_length_batch(tokenizer):
    ids = tokenize_texts(TEXTS, tokenizer, num_samples=6, seq_len=50, seed=0)
    assert ids.shape == (6, 50) and ids.dtype == torch.long
    assert torch.equal(ids, tokenize_texts(TEXTS, tokenizer, num_samples=6, seq_len=50, seed=0))
    assert not torch.equal(ids, tokenize_texts(TEXTS, tokenizer, num_samples=6, seq_len=50, seed=1))
    # texts are separated by EOS in the stream
    with pytest.warns(UserWarning, match="asked for 1000"):
        stream = tokenize_texts(TEXTS, tokenizer, num_samples=1000, seq_len=50).flatten().tolist()
    assert tokenizer.eos_token_id in stream


def test_too_little_text_gives_fewer_or_shorter_samples(tokenizer):
    with pytest.warns(UserWarning, match="only 2 sequences"):
        ids = tokenize_texts(TEXTS[:2], tokenizer, num_samples=8, seq_len=60)
    assert ids.shape == (2, 60)
    with pytest.warns(UserWarning, match="one sequence"):
        ids = tokenize_texts(["short"], tokenizer, num_samples=8, seq_len=60)
    assert ids.shape == (1, 7)  # BOS + 5 characters + EOS
    with pytest.warns(UserWarning, match="one sequence of 7 tokens instead of 1 x 60"):  # shorter, if not fewer
        assert tokenize_texts(["short"], tokenizer, num_samples=1, seq_len=60).shape == (1, 7)


def test_tokenize_needs_a_tokenizer_and_sane_sizes(tokenizer):
    with pytest.raises(CalibrationError, match="need a tokenizer"):
        tokenize_texts(TEXTS, None)
    with pytest.raises(CalibrationError, match="num_samples"):
        tokenize_texts(TEXTS, tokenizer, num_samples=0)
    with pytest.raises(CalibrationError, match="seq_len"):
        tokenize_texts(TEXTS, tokenizer, seq_len=1)


# ------------------------------------------------------------------------------------------------ self-sampling


def test_sample_from_model_with_chat_template(tiny_llama, tokenizer):
    kw = dict(num_samples=3, seq_len=120, batch_size=2)  # the character-level chat prompts are 40-80 tokens
    ids = sample_from_model(tiny_llama, tokenizer, seed=0, **kw)
    assert ids.shape == (3, 120) and ids.dtype == torch.long
    assert int(ids.max()) < tiny_llama.config.vocab_size
    text = tokenizer.decode(ids[0].tolist())
    assert text.startswith("<|user|>") and "<|assistant|>" in text  # a chat-templated generic prompt ...
    assert ids[0, -40:].float().std() > 0  # ... that the model continued
    assert not torch.equal(ids[0, :20], ids[1, :20])  # rows cycle through the prompts, also within a batch
    # prompts longer than half a sequence are skipped: short sequences start from BOS
    short = sample_from_model(tiny_llama, tokenizer, num_samples=2, seq_len=24, seed=0)
    assert (short[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(short, sample_from_model(tiny_llama, tokenizer, num_samples=2, seq_len=24, seed=0))  # seeded
    assert not torch.equal(short, sample_from_model(tiny_llama, tokenizer, num_samples=2, seq_len=24, seed=1))


def test_sample_from_model_without_tokenizer_starts_from_bos(tiny_qwen2):
    state = torch.random.get_rng_state()
    ids = sample_from_model(tiny_qwen2, None, num_samples=3, seq_len=16, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    assert ids.shape == (3, 16)
    assert (ids[:, 0] == tiny_qwen2.config.bos_token_id).all()
    assert tiny_qwen2.training is False


# ------------------------------------------------------------------------------------------------ entry point


def test_get_calibration_sources(tmp_path, tiny_llama, tokenizer):
    data = get_calibration(TEXTS, tiny_llama, tokenizer, num_samples=4, seq_len=32)
    assert isinstance(data, CalibrationData) and data.num_samples == 4 and data.seq_len == 32
    assert data.source == "list of 40 texts"
    p = write(tmp_path, "c.txt", "\n".join(TEXTS))
    assert get_calibration(p, tiny_llama, tokenizer, num_samples=4, seq_len=32).source == f"file {p}"
    ids = torch.randint(0, 200, (3, 20))
    data = get_calibration(ids, tiny_llama)
    assert torch.equal(data.input_ids, ids) and data.source == "token tensor (3, 20)"
    sampled = get_calibration(None, tiny_llama, tokenizer, num_samples=2, seq_len=24)
    assert sampled.input_ids.shape == (2, 24) and "sampled" in sampled.source


def test_get_calibration_rejects_bad_tensors(tiny_llama):
    with pytest.raises(CalibrationError, match=r"vocabulary has 250 entries"):
        get_calibration(torch.full((2, 8), 300), tiny_llama)
    with pytest.raises(CalibrationError, match=r"token ids, got torch.float32"):
        get_calibration(torch.zeros(2, 8), tiny_llama)


@pytest.mark.parametrize("candidates", [4, 8192])  # 4: the nucleus is wider than the ranked candidates
def test_nucleus_sampling_draws_the_top_p_set_in_proportion(monkeypatch, candidates):
    """What generate's top-p sampler would draw: the smallest most-probable set reaching top_p, in proportion to its
    probabilities, never a token outside it; seeded, and the only finite score is the drawn token."""
    from hf_deltacome.compression import sampling

    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", candidates)
    probs = torch.tensor([0.30, 0.05, 0.20, 0.15, 0.10, 0.08, 0.07, 0.05])  # top-p 0.8: the 5 most probable
    scores = probs.log().repeat(20000, 1) + 3.0  # logits up to a constant
    sampler = sampling.NucleusSampling(0.8, 1.0, seed=0)
    out = sampler(None, scores)
    assert torch.isfinite(out).sum(-1).eq(1).all()
    drawn = torch.bincount(out.argmax(-1), minlength=8).float() / 20000
    nucleus = torch.tensor([0.30, 0, 0.20, 0.15, 0.10, 0.08, 0, 0])  # mass before 0.07 is 0.83 >= 0.8: out
    torch.testing.assert_close(drawn, nucleus / nucleus.sum(), atol=0.012, rtol=0)
    again = sampling.NucleusSampling(0.8, 1.0, seed=0)(None, scores)
    assert torch.equal(out, again)
    with pytest.raises(CalibrationError, match="top_p"):
        sampling.NucleusSampling(0.0, 1.0, seed=0)


def test_nucleus_sampling_keeps_the_set_transformers_top_p_warper_keeps():
    from transformers import TopPLogitsWarper

    from hf_deltacome.compression.sampling import NucleusSampling

    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(5)) * 1.5
    kept = set(torch.isfinite(TopPLogitsWarper(0.9)(None, logits.clone())).nonzero()[:, 1].tolist())
    drawn = NucleusSampling(0.9, 1.0, seed=1)(None, logits.repeat(20000, 1)).argmax(-1)
    assert set(drawn.tolist()) == kept and 1 < len(kept) < 40  # every token of the nucleus, nothing else
