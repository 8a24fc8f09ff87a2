"""Evaluation harness (`deltacome eval`), its metrics, and the lm-evaluation-harness entry points."""

import copy
import importlib.util
import json
import sys
import types

import pytest
import torch
from peft import PeftModel
from tiny_models import make_finetune, make_model, make_tokenizer, random_ids

from hf_deltacome import ConfigError, DeltaCoMeConfig
from hf_deltacome.cli import main as cli_main
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.evaluation.lm_eval import lm_eval_model
from hf_deltacome.evaluation.metrics import EvalReport, evaluate_model, text_metrics, token_windows
from hf_deltacome.evaluation.tasks import TaskItem, extract_answer, normalize_answer, read_task_file, task_accuracy

TEXT = "the quick brown fox jumps over the lazy dog. " * 12


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pair():
    base = make_model("llama")
    ft = make_finetune(base, seed=3)
    return base, ft


@pytest.fixture(scope="module")
def adapter(pair):
    base, ft = pair
    cfg = DeltaCoMeConfig(ratio=1 / 4, group_size=32)
    model = compress(copy.deepcopy(base), ft, cfg, calibration=random_ids(base, 8, 32), progress=False)
    return model


@pytest.fixture(scope="module")
def saved(pair, adapter, tmp_path_factory):
    """Base, fine-tune and adapter folders on disk (with tokenizers), plus a text and a task file."""
    base, ft = pair
    root = tmp_path_factory.mktemp("eval")
    tok = make_tokenizer()
    for name, model in (("base", base), ("ft", ft)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    adapter.save_pretrained(root / "adapter")
    (root / "text.txt").write_text(TEXT)
    items = [{"prompt": "a", "answer": "x"}, {"prompt": "bb", "answer": "7", "regex": r"(\d)"}]
    (root / "task.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    return root


# ------------------------------------------------------------------------------------------------ task files


def test_read_task_file_and_errors_name_the_line(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text('{"prompt": "p", "answer": 42}\n\n{"prompt": "q", "answer": "b", "regex": "(b)"}\n')
    assert read_task_file(good) == [TaskItem("p", "42"), TaskItem("q", "b", "(b)")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "answer": "a"}\n{"prompt": "p"\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2: invalid JSON"):
        read_task_file(bad)
    bad.write_text('{"answer": "a"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl line 1: 'prompt'"):
        read_task_file(bad)
    bad.write_text('{"prompt": "p", "answer": "a", "regex": "(unclosed"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl line 1: bad regex"):
        read_task_file(bad)
    with pytest.raises(ConfigError, match="cannot read task file"):
        read_task_file(tmp_path / "missing.jsonl")


def test_answer_extraction_and_normalisation():
    assert extract_answer("The answer is 42.\nmore", r"answer is (\d+)") == "42"
    assert extract_answer("x = 7", r"\d") == "7"
    assert extract_answer("no digits", r"\d") is None
    assert extract_answer("\n  Paris.\nand more") == "Paris."
    assert normalize_answer("  Paris. ") == normalize_answer("paris")
    assert normalize_answer('"The  Cello"') == "the cello"


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM whose greedy output for each prompt is scripted (tests the generation plumbing)."""

    def __init__(self, tokenizer, replies):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.replies = tokenizer, replies

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[mask.bool()], skip_special_tokens=True)
            reply = self.tok(self.replies[prompt], add_special_tokens=False).input_ids[:max_new_tokens]
            rows.append(torch.cat([ids, torch.tensor(reply, dtype=ids.dtype)]))
        width = max(len(r) for r in rows)
        return torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])


def test_task_accuracy_with_left_padding_and_regex():
    tok = make_tokenizer()
    items = [
        TaskItem("what is 6*7?", "42", r"(\d+)"),
        TaskItem("capital of france", "Paris"),
        TaskItem("a longer prompt here", "blue"),
    ]
    replies = {"what is 6*7?": "it is 42!", "capital of france": " paris.\nok", "a longer prompt here": "red"}
    acc, results = task_accuracy(ScriptedLM(tok, replies), tok, items, batch_size=2, progress=False)
    assert acc == pytest.approx(2 / 3)
    assert [ok for _, _, ok in results] == [True, True, False]
    assert results[0][1] == "it is 42!"


# ------------------------------------------------------------------------------------------------ text metrics


def test_token_windows():
    tok = make_tokenizer()
    w = token_windows(tok, TEXT, seq_len=64, max_tokens=300)
    assert w.shape == (4, 64)
    assert token_windows(tok, "short", seq_len=64).shape == (1, 5)
    with pytest.raises(ConfigError):
        token_windows(tok, TEXT, seq_len=1)


def test_metrics_are_exact_against_an_equivalent_dense_model(pair, adapter):
    """Against a fine-tune that *is* base + the adapter (merged), errors vanish and agreement is total."""
    base, ft = pair
    merged = copy.deepcopy(adapter).merge_and_unload()
    windows = random_ids(base, 4, 24, seed=5)
    same = text_metrics(adapter, windows, finetuned=merged, module_errors=True, progress=False)
    assert same["agreement"] == 1.0
    assert max(same["module_errors"].values()) < 1e-8
    real = text_metrics(adapter, windows, finetuned=ft, module_errors=True, progress=False)
    assert len(real["module_errors"]) == 14  # every compressed linear of the 2-layer model
    assert 0 < max(real["module_errors"].values()) < 0.5
    with torch.no_grad():
        logits = adapter(input_ids=windows).logits
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, windows[:, 1:, None]).mean()
    assert real["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)


def test_evaluate_model_with_reference_rows(pair, adapter, saved):
    base, ft = pair
    tok = make_tokenizer()
    report = evaluate_model(
        adapter, tok, finetuned=ft, text=saved / "text.txt", task=saved / "task.jsonl", seq_len=32,
        max_new_tokens=4, compare=True, progress=False,
    )  # fmt: skip
    assert report.perplexity > 1 and report.tokens > 0 and report.task_items == 2
    assert set(report.reference) == {"base", "finetuned"}
    # the adapter is closer to the fine-tune than the base is
    assert report.agreement >= report.reference["base"]["agreement"]
    text = report.format()
    assert "perplexity" in text and "relative output error" in text
    json.dumps(report.to_dict())
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate_model(adapter, tok)


def test_gain_kept():
    r = EvalReport(accuracy=0.8, reference={"base": {"accuracy": 0.2}, "finetuned": {"accuracy": 0.9}})
    assert r.gain_kept == pytest.approx(0.6 / 0.7)
    assert EvalReport(accuracy=0.5).gain_kept is None


# ------------------------------------------------------------------------------------------------ command line


def test_cli_eval(saved, capsys):
    out = saved / "report.json"
    rc = cli_main(
        [
            "eval", "--base", str(saved / "base"), "--adapter", str(saved / "adapter"), "--finetuned",
            str(saved / "ft"), "--text", str(saved / "text.txt"), "--task", str(saved / "task.jsonl"),
            "--seq-len", "32", "--max-new-tokens", "4", "--json", str(out), "--no-progress", "--compare",
        ]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "agreement" in printed and "fine-tune" not in printed.split("\n")[0]
    report = json.loads(out.read_text())
    assert report["tokens"] > 0 and len(report["module_errors"]) == 14 and len(report["predictions"]) == 2
    assert report["reference"]["finetuned"]["agreement"] == 1.0


def test_cli_eval_errors_name_the_input(saved, capsys):
    rc = cli_main(["eval", "--base", str(saved / "base"), "--adapter", str(saved / "nope"), "--text", "x"])
    assert rc == 2 and "nope" in capsys.readouterr().err
    rc = cli_main(["eval", "--base", str(saved / "base"), "--adapter", str(saved / "adapter")])
    assert rc == 2 and "--text" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ lm-eval


def test_lm_eval_entry_with_the_harness_model_class_mocked(saved, monkeypatch):
    """The harness's HF model class loads adapters with ``PeftModel.from_pretrained``; mimic exactly that."""
    calls = {}

    class FakeHFLM:
        def __init__(self, pretrained, peft=None, **kwargs):
            from transformers import AutoModelForCausalLM

            calls["kwargs"] = kwargs
            self._model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained), peft)

    fake = types.ModuleType("lm_eval.models.huggingface")
    fake.HFLM = FakeHFLM
    monkeypatch.setitem(sys.modules, "lm_eval", types.ModuleType("lm_eval"))
    monkeypatch.setitem(sys.modules, "lm_eval.models", types.ModuleType("lm_eval.models"))
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", fake)
    lm = lm_eval_model(str(saved / "base"), str(saved / "adapter"), batch_size=2)
    assert calls["kwargs"] == {"batch_size": 2}
    assert type(lm._model.peft_config["default"]).__name__ == "DeltaCoMeConfig"


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")
def test_lm_eval_real_harness_on_a_local_task(saved, pair, adapter, tmp_path):
    """lm-evaluation-harness evaluates base + our adapter through its own HF model class on a local task."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "data.jsonl"
    rows = [
        {"question": "ab", "choices": ["cd", "ef"], "label": 0},
        {"question": "gh", "choices": ["ij", "kl"], "label": 1},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tiny.yaml").write_text(
        "task: deltacome_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    from hf_deltacome.io.fingerprint import base_check

    # The harness resizes the embeddings to the tokenizer's 100 entries before loading the adapter, which the base
    # fingerprint check rightly flags as another base; this tiny setup accepts that knowingly.
    with base_check(strict=False):
        lm = lm_eval_model(str(saved / "base"), str(saved / "adapter"), batch_size=2, device="cpu")
    assert isinstance(lm.model, PeftModel)
    res = lm_eval.simple_evaluate(
        model=lm, tasks=["deltacome_tiny"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False)
    )
    acc = res["results"]["deltacome_tiny"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    # the harness really ran base + adapter: its log-likelihoods are our model's
    tok = make_tokenizer()
    ids = tok("ab" + "cd", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = lm.model(ids).logits
        expected = adapter(ids).logits
    # the harness shrinks the vocabulary to the tokenizer's 100 entries before loading the adapter
    assert ours.shape[-1] == len(tok)
    assert torch.allclose(ours, expected[..., : len(tok)], atol=1e-5)
