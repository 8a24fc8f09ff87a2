"""Tiny bases and Delta-CoMe adapters on disk for the serving tests (``test_many_deltas``, ``test_serve``,
``test_export_merge``).

``VOCAB = 100`` makes the tiny models' vocabulary the offline character tokenizer's, so every generated id decodes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import hf_deltacome  # noqa: F401  (registers DELTACOME before transformers/peft are used)
from hf_deltacome import DeltaCoMeConfig, compress

# isort: split
from tiny_models import make_finetune, make_model, make_tokenizer

VOCAB = 100


def tiny_base(arch: str = "llama"):
    """The tiny base every adapter of these tests is made against (seed 0, vocabulary of the char tokenizer)."""
    return make_model(arch, vocab_size=VOCAB)


def make_adapter(folder: Path, seed: int, arch: str = "llama", **config) -> Path:
    """Compress ``make_finetune(base, seed)`` (RTN, data-free) and save it to ``folder``."""
    base = tiny_base(arch)
    model = compress(base, make_finetune(base, seed=seed), DeltaCoMeConfig(quantizer="rtn", **config), progress=False)
    model.save_pretrained(str(folder))
    return folder


def save_base(folder: Path, arch: str = "llama") -> Path:
    """The tiny base and the char tokenizer as an ordinary model folder."""
    tiny_base(arch).save_pretrained(str(folder))
    make_tokenizer().save_pretrained(str(folder))
    return folder


def single_adapter_model(path: Path, arch: str = "llama"):
    """A fresh base with one adapter: the 'adapter alone' reference."""
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_base(arch), str(path)).eval()


@torch.no_grad()
def greedy_alone(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
    """Greedy continuation of one unpadded prompt with ``model.generate`` (stops at EOS, which it keeps)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=tokenizer.eos_token_id,
    )
    tokens = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True)


PLAIN_LOGITS_SCRIPT = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
jobs_file, ids_file, out_file = sys.argv[1:4]
ids = load_file(ids_file)
logits = {}
for key, job in json.load(open(jobs_file)).items():
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    if job["lora"]:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, job["lora"]).eval()
    with torch.no_grad():
        logits[key] = model(input_ids=ids[key]).logits.float().contiguous()
save_file(logits, out_file)
assert "hf_deltacome" not in sys.modules, "hf_deltacome was imported"
print("plain-ok")
"""


def plain_logits(tmp: Path, jobs: dict[str, tuple[Path, Path | None, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Logits of every ``{key: (model folder, LoRA folder or None, input ids)}`` computed in ONE subprocess with
    plain transformers / PEFT that never imports hf_deltacome (asserted there; PYTHONPATH is dropped and the working
    directory is ``tmp``; the start-up hook of an install is switched off). One process for all jobs: importing transformers takes seconds."""
    import json

    from safetensors.torch import load_file, save_file

    jobs_file, ids_file, out_file = tmp / "jobs.json", tmp / "ids.safetensors", tmp / "logits.safetensors"
    jobs_file.write_text(
        json.dumps({k: {"model": str(m), "lora": str(lo) if lo else None} for k, (m, lo, _) in jobs.items()})
    )
    save_file({k: ids.clone().contiguous() for k, (_, _, ids) in jobs.items()}, str(ids_file))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["OMP_NUM_THREADS"] = "1"
    env["DELTACOME_NO_AUTOLOAD"] = "1"  # an installed hf_deltacome-peft.pth would import us at start-up otherwise
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_LOGITS_SCRIPT, str(jobs_file), str(ids_file), str(out_file)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and "plain-ok" in done.stdout, done.stderr[-3000:]
    return load_file(str(out_file))
