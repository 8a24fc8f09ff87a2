"""Evaluation harness (`deltacome eval`), its metrics, and the lm-evaluation-harness entry points."""

import copy
import importlib.util
import json
import sys
import types

import pytest
import torch
from peft import PeftModel
from tiny_models import make_finetune, make_model, make_tokenizer, random_ids, swapped_deltas

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
    # the adapter agrees with the fine-tune's next tokens far more often than the base, or the adapter with its
    # packed deltas zeroed or shuffled (same size), does: at most 30% of their disagreement
    others = {"base": report.reference["base"]["agreement"]}
    for kind in ("zero", "random"):
        with swapped_deltas(adapter, kind):
            others[kind] = evaluate_model(adapter, tok, finetuned=ft, text=saved / "text.txt", seq_len=32,
                                          progress=False).agreement  # fmt: skip
    assert 1 - report.agreement <= 0.3 * (1 - max(others.values())), (report.agreement, others)  # measured 0.15
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
    # the adapter's next tokens are the fine-tune's far more often than the base's are (measured 93% vs 48%)
    assert 1 - report["agreement"] <= 0.3 * (1 - report["reference"]["base"]["agreement"]), report["reference"]


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


def _disagreeing_items(base, ft, tok, n: int = 8, candidates: int = 64) -> list[dict]:
    """Two-way multiple-choice items (a short context, two one-character choices) on which the fine-tune and the
    base choose differently, the fine-tune by a clear margin; ``label`` is the fine-tune's choice.

    The harness scores ``context`` + " " + choice; the choices differ only in their last token, scored at the same
    position, so the choice is the larger of two logits there (the harness's vocabulary resize changes nothing)."""
    g = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    symbols = "0123456789" + letters
    rows = []
    for _ in range(candidates):
        context = "".join(letters[int(i)] for i in torch.randint(0, 26, (3,), generator=g))
        a, b = (symbols[int(i)] for i in torch.randperm(len(symbols), generator=g)[:2])
        ids = tok(context + " ", return_tensors="pt").input_ids
        pick = [tok.convert_tokens_to_ids(a), tok.convert_tokens_to_ids(b)]
        with torch.no_grad():
            margin = {name: m(input_ids=ids).logits[0, -1, pick] for name, m in (("ft", ft), ("base", base))}
        ft_diff, base_diff = float(margin["ft"][0] - margin["ft"][1]), float(margin["base"][0] - margin["base"][1])
        if ft_diff * base_diff < 0:
            rows.append(({"question": context, "choices": [a, b], "label": 0 if ft_diff > 0 else 1}, abs(ft_diff)))
    rows.sort(key=lambda r: -r[1])
    return [r for r, _ in rows[:n]]


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed (it is in the dev extras)"
)
def test_lm_eval_real_harness_scores_the_adapter_like_the_finetune(saved, pair, adapter, tmp_path):
    """lm-evaluation-harness evaluates base + our adapter through its own HF model class on a local task whose
    answers are the fine-tune's choices where the base chooses otherwise: the fine-tune scores 1, the base 0, and
    the adapter must score like the fine-tune."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    base, ft = pair
    tok = make_tokenizer()
    rows = _disagreeing_items(base, ft, tok)
    assert len(rows) >= 6, rows
    data = tmp_path / "data.jsonl"
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
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)

    def accuracy(lm) -> float:
        res = lm_eval.simple_evaluate(model=lm, tasks=["deltacome_tiny"], task_manager=tasks)
        return res["results"]["deltacome_tiny"]["acc,none"]

    from hf_deltacome.io.fingerprint import base_check

    # The harness resizes the embeddings to the tokenizer's 100 entries before loading the adapter, which the base
    # fingerprint check rightly flags as another base; this tiny setup accepts that knowingly.
    with base_check(strict=False):
        lm = lm_eval_model(str(saved / "base"), str(saved / "adapter"), batch_size=4, device="cpu")
    assert isinstance(lm.model, PeftModel)
    scores = {"adapter": accuracy(lm)}
    for name in ("ft", "base"):
        scores[name] = accuracy(HFLM(pretrained=str(saved / name), batch_size=4, device="cpu"))
    assert scores["ft"] == 1.0 and scores["base"] == 0.0, scores  # the task separates them
    assert scores["adapter"] >= 0.8, scores
    # the harness really ran base + adapter: its logits are our model's (on the tokenizer's 100 entries)
    ids = tok("ab" + "cd", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = lm.model(ids).logits
        expected = adapter(ids).logits
    assert ours.shape[-1] == len(tok)
    assert torch.allclose(ours, expected[..., : len(tok)], atol=1e-5)
