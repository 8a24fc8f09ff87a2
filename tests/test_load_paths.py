"""Every way of loading an adapter runs the same base check and validation.

PEFT (``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``), transformers' own PEFT integration
(``model.load_adapter``, ``AutoModelForCausalLM.from_pretrained(adapter_dir)``, ``pipeline(model=adapter_dir)``,
which read the weights themselves) and lm-evaluation-harness's plain command line (``lm_eval --model hf
--model_args pretrained=B,peft=A``, without our wrapper: the ``hf_deltacome-peft.pth`` file installed with the
package registers the method).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from test_trust import make_adapter, rewrite_tensors
from tiny_models import logits, make_finetune, make_model, make_tokenizer, random_ids
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hf_deltacome import AdapterFileError, BaseModelMismatchError, ConfigError
from hf_deltacome.card import CARD_MARKER
from hf_deltacome.io.adapter_files import ADAPTER_CONFIG_NAME

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 100  # the offline tokenizer's size: lm-eval resizes the embeddings to the tokenizer, which the check sees
SCALES = "base_model.model.model.layers.1.self_attn.v_proj.deltacome_delta.bands.1.u.scales"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """``base``, ``finetune`` (model folders with a tokenizer); adapters made on the base: ``good``, ``wrong`` (its
    config names the fine-tune as the base) and ``nan`` (NaN in a scales tensor)."""
    root = tmp_path_factory.mktemp("paths")
    base = make_model("llama", vocab_size=VOCAB)
    for name, model in (("base", base), ("finetune", make_finetune(base, seed=3))):
        model.save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(root / "base"))
    adapter.save_pretrained(str(root / "good"))
    make_tokenizer().save_pretrained(root / "good")
    for name in ("wrong", "nan"):
        shutil.copytree(root / "good", root / name)
    config = json.loads((root / "wrong" / ADAPTER_CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == str(root / "base")
    config["base_model_name_or_path"] = str(root / "finetune")  # the adapter points at the fine-tune itself
    (root / "wrong" / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    rewrite_tensors(root / "nan", lambda t: t[SCALES].view(-1).__setitem__(0, float("nan")))
    return {"root": root, "base": root / "base", "finetune": root / "finetune", "good": root / "good",
            "wrong": root / "wrong", "nan": root / "nan"}  # fmt: skip


IDS = random_ids(make_model("llama", vocab_size=VOCAB), num_samples=2, seq_len=8, seed=4)


def _expected(folders: dict) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders["base"]), folders["good"]), IDS)


def test_transformers_load_adapter(folders):
    model = AutoModelForCausalLM.from_pretrained(folders["base"])
    model.load_adapter(str(folders["good"]))
    torch.testing.assert_close(logits(model.eval(), IDS), _expected(folders))
    with pytest.raises(BaseModelMismatchError, match="the weights differ") as err:
        AutoModelForCausalLM.from_pretrained(folders["finetune"]).load_adapter(str(folders["good"]))
    assert str(folders["good"]) in str(err.value)
    with pytest.raises(AdapterFileError, match=f"{SCALES}' contains NaN"):
        AutoModelForCausalLM.from_pretrained(folders["base"]).load_adapter(str(folders["nan"]))


def test_transformers_save_of_a_float64_model_reads_back_with_our_card(folders, tmp_path, monkeypatch):
    """transformers' own save of a model loaded in float64: its extras stored as float32 (what the reader accepts),
    our card written, and no Hub lookup of the base to guess a resized vocabulary (PEFT's "auto")."""
    import peft.utils.save_and_load as sl

    model = AutoModelForCausalLM.from_pretrained(folders["base"], dtype=torch.float64)
    model.load_adapter(str(folders["good"]))
    model.peft_config["default"].base_model_name_or_path = "some-user/the-base"  # a Hub id, as after a download
    monkeypatch.setattr(sl, "check_file_exists_on_hf_hub", lambda *a, **k: pytest.fail("looked the base up"))
    model.save_pretrained(str(tmp_path / "saved"))
    assert CARD_MARKER in (tmp_path / "saved" / "README.md").read_text()
    state = model.get_adapter_state_dict()
    assert state and all(t.dtype != torch.float64 for t in state.values())
    base = AutoModelForCausalLM.from_pretrained(folders["base"])
    reloaded = PeftModel.from_pretrained(base, tmp_path / "saved", strict=True)
    torch.testing.assert_close(logits(reloaded, IDS), _expected(folders))


def test_transformers_disable_then_enable_adapters(folders):
    """transformers' disable_adapters() turns off the changed norm too; enable_adapters() must turn it back on."""
    model = AutoModelForCausalLM.from_pretrained(folders["base"])
    model.load_adapter(str(folders["good"]))
    model.eval()
    model.disable_adapters()
    torch.testing.assert_close(logits(model, IDS), logits(AutoModelForCausalLM.from_pretrained(folders["base"]), IDS))
    model.enable_adapters()
    torch.testing.assert_close(logits(model, IDS), _expected(folders))


def test_unload_gives_back_the_base_and_merge_keeps_the_norm(folders):
    """unload() drops the changed norm (a part of the delta) with the deltas; merge_and_unload() keeps both."""
    plain = logits(AutoModelForCausalLM.from_pretrained(folders["base"]), IDS)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders["base"]), folders["good"])
    assert not torch.allclose(logits(model, IDS), plain, atol=1e-3)
    torch.testing.assert_close(logits(model.unload(), IDS), plain)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders["base"]), folders["good"])
    torch.testing.assert_close(logits(model.merge_and_unload(), IDS), _expected(folders), atol=1e-4, rtol=1e-4)


def test_transformers_from_pretrained_of_the_adapter_folder(folders):
    model = AutoModelForCausalLM.from_pretrained(folders["good"])  # loads the base named in the adapter, then it
    torch.testing.assert_close(logits(model.eval(), IDS), _expected(folders))
    with pytest.raises(BaseModelMismatchError, match="the weights differ"):
        AutoModelForCausalLM.from_pretrained(folders["wrong"])
    with pytest.raises(AdapterFileError, match="contains NaN"):
        AutoModelForCausalLM.from_pretrained(folders["nan"])


def test_pipeline_of_the_adapter_folder(folders):
    generate = pipeline("text-generation", model=str(folders["good"]), device="cpu")
    out = generate("abc", max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders["base"]), folders["good"]).eval()
    tok = AutoTokenizer.from_pretrained(folders["good"])
    ids = tok("abc", return_tensors="pt").input_ids
    expected = peft.generate(input_ids=ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1] :]
    assert out == tok.decode(expected, skip_special_tokens=True)
    with pytest.raises(BaseModelMismatchError):
        pipeline("text-generation", model=str(folders["wrong"]), device="cpu")
    with pytest.raises(AdapterFileError, match="contains NaN"):
        pipeline("text-generation", model=str(folders["nan"]), device="cpu")


def test_auto_peft_model(folders):
    model = AutoPeftModelForCausalLM.from_pretrained(str(folders["good"]))
    torch.testing.assert_close(logits(model.eval(), IDS), _expected(folders))
    with pytest.raises(BaseModelMismatchError):
        AutoPeftModelForCausalLM.from_pretrained(str(folders["wrong"]))
    with pytest.raises(AdapterFileError, match="contains NaN"):
        AutoPeftModelForCausalLM.from_pretrained(str(folders["nan"]))
    bad = folders["root"] / "bad-damp"
    shutil.copytree(folders["good"], bad)
    config = json.loads((bad / ADAPTER_CONFIG_NAME).read_text())
    (bad / ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, "damp": "x"}))
    with pytest.raises(ConfigError, match=f"{bad / ADAPTER_CONFIG_NAME}: damp must be a number"):
        AutoPeftModelForCausalLM.from_pretrained(str(bad))


def test_peft_load_adapter_of_a_second_adapter(folders):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders["base"]), folders["good"])
    with pytest.raises(AdapterFileError, match="contains NaN"):
        model.load_adapter(str(folders["nan"]), adapter_name="second")
    model.load_adapter(str(folders["good"]), adapter_name="second")
    model.set_adapter("second")
    torch.testing.assert_close(logits(model.eval(), IDS), _expected(folders))
    # LoRA's weighted combination is refused by name (not an AttributeError from the wrapped transformers model)
    with pytest.raises(NotImplementedError, match=r"add_weighted_adapter\(\['default', 'second'\] -> 'mix'\)"):
        model.add_weighted_adapter(["default", "second"], [0.5, 0.5], "mix")


# ------------------------------------------------------------------------------------------------------------
# plain lm-eval, through the installed package's .pth file
# ------------------------------------------------------------------------------------------------------------

PACKAGE_FILES = ("pyproject.toml", "scripts", "README.md", "hf_deltacome", "kernels", "model_cards")


def _source_copy(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in PACKAGE_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def test_wheels_ship_the_pth_file(tmp_path):
    """A wheel and an editable wheel both carry ``hf_deltacome-peft.pth`` at their root (-> site-packages)."""
    src = _source_copy(tmp_path / "src")
    script = "from setuptools import build_meta as b; print(b.build_wheel('dist')); print(b.build_editable('dist'))"
    done = subprocess.run([sys.executable, "-c", script], cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wheels = sorted(glob.glob(str(src / "dist" / "*.whl")))
    assert len(wheels) == 2
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            line = z.read("hf_deltacome-peft.pth").decode()
        assert line.startswith("import ") and "__import__('hf_deltacome')" in line and line.count("\n") == 1


TASK = textwrap.dedent(
    """\
    task: deltacome_tiny
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {data}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{{{question}}}}"
    doc_to_choice: "{{{{choices}}}}"
    doc_to_target: "{{{{label}}}}"
    metric_list:
      - metric: acc
    """
)
DOCS = [("The cat sat on the", [" mat", " moon"]), ("One two", [" three", " four"]), ("Hello", [" world", " there"])]


def _loglikelihood(model: torch.nn.Module, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) as the harness encodes it (the tokenizer's own special tokens)."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


@pytest.mark.skipif(sys.platform == "win32", reason="venv layout")
def test_plain_lm_eval_loads_the_adapter(folders, tmp_path):
    """``python -m lm_eval --model hf --model_args pretrained=B,peft=A`` in an environment where the package is
    installed (a venv over this one, ``pip install -e`` of this source): no ``KeyError: 'DELTACOME'``, and the
    harness scores with base + delta (its log-likelihoods are the adapter's)."""
    pytest.importorskip("lm_eval")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
               "--no-build-isolation", "--no-index", "-e", str(_source_copy(tmp_path / "src"))]  # fmt: skip
    done = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (Path(glob.glob(str(venv / "lib" / "python*" / "site-packages"))[0]) / "hf_deltacome-peft.pth").is_file()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": 0}) + "\n" for q, c in DOCS))
    (tasks / "tiny.yaml").write_text(TASK.format(data=data))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    args = [str(python), "-m", "lm_eval", "--model", "hf", "--model_args",
            f"pretrained={folders['base']},peft={folders['good']},dtype=float32", "--device", "cpu",
            "--batch_size", "2", "--tasks", "deltacome_tiny", "--include_path", str(tasks),
            "--output_path", str(tmp_path / "out"), "--log_samples"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    samples = [json.loads(line) for f in glob.glob(str(tmp_path / "out" / "*" / "samples_*.jsonl")) for line in open(f)]
    assert len(samples) == len(DOCS)
    tok = AutoTokenizer.from_pretrained(folders["base"])
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders["base"]), folders["good"]).eval()
    base = AutoModelForCausalLM.from_pretrained(folders["base"]).eval()
    for sample in samples:
        for args_k, resp in zip(sample["arguments"].values(), sample["resps"]):
            got = float(resp[0][0])
            context, continuation = args_k["arg_0"], args_k["arg_1"]
            assert got == pytest.approx(_loglikelihood(adapter, tok, context, continuation), abs=1e-3)
            assert abs(got - _loglikelihood(base, tok, context, continuation)) > 1e-3  # the delta was applied
