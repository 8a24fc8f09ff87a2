"""benchmarks/quality.py caches every measurement under all its settings and the code revision that made it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).with_name("data")


def benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quality():
    return benchmark("quality")


def refused(parse, argv: list[str], capsys) -> str:
    """What argparse writes to stderr when ``parse(argv)`` refuses ``argv`` (it must exit)."""
    with pytest.raises(SystemExit):
        parse(argv)
    return capsys.readouterr().err


def make_args(quality, *argv: str):
    return quality.parse_args(["--methods", "lowrank", "--ratios", "1/16", *argv])


@pytest.fixture
def ctx(tmp_path):
    return {
        "out": tmp_path,
        "task": SimpleNamespace(name="facts"),
        "base_name": "base-model",
        "ft_name": "facts-0123",
        "revision": "abc123",
        "ft": "fine-tune",
        "base": "base",
        "tokenizer": None,
        "windows": torch.zeros(1, 4, dtype=torch.long),
    }


def test_every_setting_and_the_revision_key_a_cell(quality, ctx):
    args = make_args(quality)
    key = quality.settings_key(quality.cell_settings("lowrank", 1 / 16, args, ctx))
    changed = [
        make_args(quality, "--n-eval", "8"),
        make_args(quality, "--n-text", "3"),
        make_args(quality, "--num-samples", "4"),
        make_args(quality, "--seq-len", "64"),
        make_args(quality, "--quantizer", "rtn"),
        make_args(quality, "--calibration", "sampled"),
        make_args(quality, "--calibration", "generic"),
    ]
    keys = {quality.settings_key(quality.cell_settings("lowrank", 1 / 16, a, ctx)) for a in changed}
    keys |= {quality.settings_key(quality.cell_settings("lowrank", 1 / 32, args, ctx))}
    keys |= {quality.settings_key(quality.cell_settings("dare", 1 / 16, args, ctx))}
    keys |= {quality.settings_key(quality.cell_settings("lowrank", 1 / 16, args, {**ctx, "revision": "def456"}))}
    assert key not in keys and len(keys) == len(changed) + 3
    # the same settings give the same key (a rerun reuses the cell)
    assert quality.settings_key(quality.cell_settings("lowrank", 1 / 16, make_args(quality), dict(ctx))) == key


def test_reference_is_remeasured_when_its_settings_or_the_code_change(quality, ctx, monkeypatch):
    calls = []

    def fake_measure(model, tokenizer, c, n):
        calls.append((model, n))
        return {"perplexity": 2.0, "agreement": 0.5, "accuracy": 0.25 if model == "base" else 0.75, "n": n}

    monkeypatch.setattr(quality, "measure", fake_measure)
    monkeypatch.setattr(quality, "finetune_margins", lambda c, n: [0.5] * n)
    monkeypatch.setattr(quality, "text_scores", lambda model, windows, ft: (1.0, 1.0, torch.ones(1, 3)))
    first = quality.reference(ctx, make_args(quality, "--n-eval", "8"))
    assert first["finetuned"]["n"] == 8 and first["revision"] == "abc123" and len(calls) == 2
    assert first["finetuned"]["margin"] == [0.5] * 8  # the fine-tune's close calls, for the paired column
    assert quality.reference(ctx, make_args(quality, "--n-eval", "8"))["finetuned"]["n"] == 8
    assert len(calls) == 2  # cached: same settings, same code
    assert quality.reference(ctx, make_args(quality, "--n-eval", "16"))["finetuned"]["n"] == 16
    assert len(calls) == 4  # other questions: measured again, not the 8-question numbers
    quality.reference({**ctx, "revision": "def456"}, make_args(quality, "--n-eval", "8"))
    assert len(calls) == 6  # other code: measured again
    quality.reference(ctx, make_args(quality, "--n-eval", "8", "--force"))
    assert len(calls) == 8


def test_a_cached_reference_without_margins_gets_them_added_not_remeasured(quality, ctx, monkeypatch):
    monkeypatch.setattr(quality, "measure", lambda model, tokenizer, c, n: {"accuracy": 0.5})
    monkeypatch.setattr(quality, "finetune_margins", lambda c, n: [0.5] * n)
    monkeypatch.setattr(quality, "text_scores", lambda model, windows, ft: (1.0, 1.0, torch.ones(1, 3)))
    args = make_args(quality, "--n-eval", "4")
    quality.reference(ctx, args)
    (path,) = (ctx["out"] / "reference").glob("*.json")
    record = json.loads(path.read_text())
    del record["finetuned"]["margin"]  # a reference recorded before margins were kept
    path.write_text(json.dumps(record))
    monkeypatch.setattr(quality, "measure", lambda *a: pytest.fail("a cached reference was measured again"))
    assert quality.reference(ctx, args)["finetuned"]["margin"] == [0.5] * 4
    assert json.loads(path.read_text())["finetuned"]["margin"] == [0.5] * 4  # and kept in the file


def test_a_cached_cell_is_reused_only_for_its_own_settings(quality, ctx, monkeypatch):
    ran = []

    def fake_compress(*args, **kwargs):
        ran.append(kwargs)
        raise RuntimeError("compress called")

    monkeypatch.setattr(quality, "compress", fake_compress)
    args = make_args(quality, "--n-eval", "8")
    settings = quality.cell_settings("lowrank", 1 / 16, args, ctx)
    folder = ctx["out"] / "adapters" / f"lowrank-r16-gptq-{quality.settings_key(settings)}"
    folder.mkdir(parents=True)
    record = {"variant": "lowrank", "ratio": 1 / 16, "settings": settings, "revision": "abc123", "gain_kept": 1.0}
    (folder / "cell.json").write_text(quality.json.dumps(record))
    ctx["calib"] = None
    assert quality.run_cell("lowrank", 1 / 16, args, ctx) == record and not ran
    with pytest.raises(RuntimeError, match="compress called"):  # another --n-eval: not that cell
        quality.run_cell("lowrank", 1 / 16, make_args(quality, "--n-eval", "16"), ctx)
    with pytest.raises(RuntimeError, match="compress called"):  # other code
        quality.run_cell("lowrank", 1 / 16, args, {**ctx, "revision": "def456"})


def test_the_table_names_the_code_revision(quality):
    ref = {"base": {"perplexity": 2, "agreement": 0.5, "accuracy": 0}, "finetuned": {"perplexity": 3, "agreement": 1,
           "accuracy": 1}, "revision": "abc123"}  # fmt: skip
    cell = {"variant": "lowrank", "ratio": 1 / 16, "file_bytes": 10, "effective_ratio": 1 / 16,
            "compress_seconds": 1.0, "perplexity": 2.5, "agreement": 0.9, "accuracy": 0.9, "gain_kept": 0.9,
            "revision": "abc123"}  # fmt: skip
    text = quality.table([cell], ref, "facts")
    assert text.splitlines()[0] == "Code revision: `abc123`"
    mixed = quality.table([cell, {**cell, "revision": "def456"}], ref, "facts")
    assert "`abc123`, `def456` (MIXED" in mixed.splitlines()[0]


def test_paired_counts_each_side_and_gives_the_exact_mcnemar_p(quality):
    assert quality.paired("1100", "1010") == (1, 1, 1.0)
    plus, minus, p = quality.paired("1111110000", "0000000000")
    assert (plus, minus) == (6, 0) and p == pytest.approx(2 / 64)  # all six discordant questions one way
    plus, minus, p = quality.paired("1" * 3 + "0" * 7, "0" * 3 + "1" * 7)
    assert (plus, minus) == (3, 7) and p == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)
    assert quality.paired("0101", "0101") == (0, 0, 1.0)
    with pytest.raises(ValueError, match="different question sets"):
        quality.paired("01", "011")


def test_the_table_compares_each_method_with_the_default_question_by_question(quality):
    ref = {"base": {"perplexity": 2, "agreement": 0.5, "accuracy": 0}, "finetuned": {"perplexity": 3, "agreement": 1,
           "accuracy": 1}, "revision": "abc123"}  # fmt: skip
    cell = {"variant": "deltacome", "ratio": 1 / 16, "file_bytes": 10, "effective_ratio": 1 / 16,
            "compress_seconds": 1.0, "perplexity": 2.5, "agreement": 0.9, "accuracy": 0.5, "gain_kept": 0.5,
            "revision": "abc123", "correct": "1100"}  # fmt: skip
    rows = [cell, {**cell, "variant": "dare", "correct": "1111"}, {**cell, "variant": "lowrank", "correct": None},
            {**cell, "variant": "dare", "ratio": 1 / 32, "correct": "0000"}]  # fmt: skip
    lines = quality.table(rows, ref, "facts").splitlines()
    assert lines[2].endswith("| questions vs default |")
    assert lines[-4].endswith("| 50.0% | – | – |")  # the default itself (no fine-tune scores in this ref)
    assert lines[-3].endswith("| +2 / −0 (p 0.5) |")
    assert lines[-2].endswith("| – |") and lines[-1].endswith("| – |")  # no scores; no default at that ratio


def test_the_paired_column_counts_the_fine_tunes_close_calls_among_the_split_questions(quality):
    """With the fine-tune's margins in the reference, the column says how many of the questions two methods split
    the fine-tune itself answers within CLOSE_CALL of another answer (either sign)."""
    ref = {"base": {"perplexity": 2, "agreement": 0.5, "accuracy": 0}, "finetuned": {"perplexity": 3, "agreement": 1,
           "accuracy": 0.75, "margin": [0.2, 5.0, -0.5, -3.0]}, "revision": "abc123"}  # fmt: skip
    cell = {"variant": "deltacome", "ratio": 1 / 16, "file_bytes": 10, "effective_ratio": 1 / 16,
            "compress_seconds": 1.0, "perplexity": 2.5, "agreement": 0.9, "accuracy": 0.5, "gain_kept": 0.5,
            "revision": "abc123", "correct": "0100"}  # fmt: skip
    rows = [cell, {**cell, "variant": "dare", "correct": "1011"}, {**cell, "variant": "lowrank", "correct": "0100"}]
    lines = quality.table(rows, ref, "facts").splitlines()
    assert lines[-2].endswith("| +3 / −1 (p 0.62; 2 close) |")  # q0 (0.2) and q2 (-0.5) are close; q1, q3 are not
    assert lines[-1].endswith("| +0 / −0 (p 1) |")  # nothing split, nothing to count


def test_item_scores_refuses_a_folder_that_is_not_a_cell_of_this_task(quality, ctx, tmp_path):
    with pytest.raises(SystemExit, match="no cell.json"):
        quality.add_item_scores([tmp_path], ctx)
    (tmp_path / "cell.json").write_text('{"settings": {"task": "dates"}}')
    with pytest.raises(SystemExit, match="a cell of task 'dates', not 'facts'"):
        quality.add_item_scores([tmp_path], ctx)


def test_kl_refuses_a_folder_that_is_not_a_cell_of_this_task_before_any_work(quality, ctx, tmp_path):
    args = make_args(quality)
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "cell.json").write_text('{"settings": {"task": "facts"}}')
    with pytest.raises(SystemExit, match="no cell.json"):
        quality.stored_kls([cell, tmp_path / "missing"], ctx, args)  # the good folder first: nothing is loaded


def test_code_revision_is_the_commit_plus_a_hash_of_uncommitted_changes(quality):
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    rev = quality.code_revision()
    assert rev.startswith(head.stdout.strip())
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *quality.CODE_PATHS], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    assert ("+dirty." in rev) == bool(dirty)


def test_fingerprint_benchmark_sizes_7b_shapes():
    """benchmarks/fingerprint.py sizes the fingerprint of 7B/8B shapes on the meta device from the sketch module's
    own constants (it once read them from the wrong module and crashed after the timing table)."""
    module = benchmark("fingerprint")
    n, one, two = module.size_of_shape("Llama-2-7B")
    assert n == 291  # 32 layers x 9 weights + embeddings, final norm, head
    assert 100_000 < one < two < 2.5 * one  # a second rounding stores a second sketch of every weight


def test_dare_seeds_benchmark_redraws_every_seeded_mask_and_draw_0_is_the_usual_one():
    """benchmarks/dare_seeds.py compresses draw ``k`` with ``mask_draw=k, mask_draws=1``: draw 0 is the seed every
    other run uses, another draw moves every DARE and ImPart module's seeds, and the default chooses no draw itself."""
    import inspect

    from hf_deltacome import DeltaCoMeConfig
    from hf_deltacome.compression.modules import plan_entry

    module = benchmark("dare_seeds")
    assert "mask_draw=k, mask_draws=1" in inspect.getsource(module.main)
    name = "model.layers.3.mlp.up_proj"
    usual = {m: plan_entry(name, 128, 192, 1 / 8, DeltaCoMeConfig(ratio=1 / 8, method=m)) for m in ("dare", "impart")}
    seeds = {"dare": set(), "impart": set()}
    for k in range(4):
        for method in seeds:
            entry = plan_entry(name, 128, 192, 1 / 8, DeltaCoMeConfig(ratio=1 / 8, method=method, mask_draw=k))
            if k == 0:
                assert entry == usual[method]
            parts = [entry["sparse"]] if method == "dare" else entry["sparse_bands"]
            seeds[method].add(tuple(p["seed"] for p in parts))
    assert len(seeds["dare"]) == len(seeds["impart"]) == 4


def test_dare_seeds_benchmark_refuses_bad_draws_by_name():
    module = benchmark("dare_seeds")
    with pytest.raises(SystemExit, match="--seeds comma-separated integers.*'0,x'"):
        module.main(["--seeds", "0,x"])
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        module.main(["--method", "nope"])


def test_delta_scale_benchmark_refuses_bad_scales_by_name():
    module = benchmark("delta_scale")
    with pytest.raises(SystemExit, match="--scales: comma-separated numbers, got '0.9,big'"):
        module.main(["--scales", "0.9,big"])
    with pytest.raises(SystemExit, match=r"--methods: unknown method\(s\) \['nope'\]"):
        module.main(["--methods", "dare-2,nope"])
    with pytest.raises(SystemExit, match="--ratio is a fraction such as 1/32, got 'tiny'"):
        module.main(["--methods", "dare-2", "--ratio", "tiny"])


def test_delta_scale_projection_reads_a_shrunk_delta_as_its_scale():
    """`--methods`' column: a stored delta that is the exact one times 0.8 plus noise orthogonal to it projects to
    α̂ = 0.8, and its relative error is 0.04 plus the noise's share, per module type."""
    module = benchmark("delta_scale")
    gen = torch.Generator().manual_seed(0)
    exact = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(8, 6, generator=gen) for i in range(2)}
    exact["model.layers.0.mlp.up_proj.weight"] = torch.randn(4, 8, generator=gen)
    stored = {}
    for name, d in exact.items():
        noise = torch.randn(d.shape, generator=gen)
        noise -= (noise * d).sum() / (d * d).sum() * d  # orthogonal to the delta
        noise *= 0.5 * d.norm() / noise.norm()  # a quarter of its squared norm
        stored[name] = 0.8 * d + (noise if "up_proj" in name else 0)
    out = module.projection(stored, exact)
    assert list(out) == ["q_proj", "up_proj"]
    assert out["q_proj"] == pytest.approx((0.8, 0.04), abs=1e-6)
    assert out["up_proj"] == pytest.approx((0.8, 0.04 + 0.25), abs=1e-6)


def test_perturbed_prompts_keep_answers_and_special_tokens(quality):
    """`--kl-perturb`: the share of the prompts' ordinary tokens replaced grows with the share asked for, and the
    answers' tokens, the special tokens and every sequence's first token never change; seeded."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 400, (4, 64), generator=gen)
    ids[:, ::9] = 1  # a special token (the chat template's)
    response = torch.zeros_like(ids)
    response[:, 40:52] = 1
    keep = (response == 1) | (ids == 1)
    keep[:, 0] = True
    changed = []
    for share in (0.0, 0.2, 0.6):
        out = quality.perturb_prompts(ids, response, share, [1, 2])
        assert torch.equal(out[keep], ids[keep]) and torch.equal(out, quality.perturb_prompts(ids, response, share, [1, 2]))
        assert set(out[~keep].tolist()) <= set(ids[~keep].tolist())  # drawn from the prompts' own tokens
        changed.append(float((out != ids)[~keep].float().mean()))
    assert changed[0] == 0 and 0.1 < changed[1] < 0.3 and 0.45 < changed[2] < 0.75, changed
    assert torch.equal(quality.perturb_prompts(ids, torch.ones_like(ids), 0.5, [1]), ids)  # all answers


def test_kl_perturb_is_refused_by_name_before_any_model_loads(quality, capsys):
    bad = {
        ("--kl", "cell", "--kl-perturb", "1.5"): "--kl-perturb: a share of the prompts' tokens in [0, 1], got 1.5",
        ("--kl-perturb", "0.3"): "--kl-perturb adds a column to --kl",
    }
    for argv, message in bad.items():
        assert message in refused(quality.parse_args, list(argv), capsys)
    assert quality.parse_args(["--kl", "cell", "--kl-perturb", "0.3"]).kl_perturb == 0.3


def test_compress_time_child_times_the_default_of_the_checkout_on_its_path(tmp_path):
    """benchmarks/compress_time.py's child compresses with the default config of the ``hf_deltacome`` its
    ``PYTHONPATH`` names and prints the time and the bytes written; one imported from elsewhere is refused, so a
    revision is never timed with another's code."""
    import os
    import sys

    from tiny_models import make_finetune, make_model, save_with_tokenizer

    base = make_model("llama")
    save_with_tokenizer(tmp_path, base=base, ft=make_finetune(base, seed=3))
    calib = tmp_path / "calibration.json"
    calib.write_text(json.dumps([{"prompt": "a b c", "completion": " d e"}] * 4))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compress_time.py"), "--child", "--base", str(tmp_path / "base"),
           "--ft", str(tmp_path / "ft"), "--calib", str(calib), "--ratio", "1/8", "--threads", "1",
           "--num-samples", "4", "--seq-len", "16"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["seconds"] > 0 and row["bytes"] > 0 and row["dare_modules"] == ["down_proj", "gate_proj", "up_proj"]
    r = subprocess.run(cmd, env={**env, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and f"not from {tmp_path}" in r.stderr


def test_compress_time_refuses_bad_flags_by_name_before_any_model_loads():
    module = benchmark("compress_time")
    for argv, message in ((["--ratio", "big"], "--ratio: "), (["--repeats", "0"], "--repeats must be >= 1, got 0"),
                          (["--revisions", " , "], "--revisions: comma-separated revisions"),
                          (["--revisions", "c41bc35,nosuchrev"], "--revisions: 'nosuchrev' is not a commit")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            module.main(argv)


def test_decoded_memory_refuses_bad_flags_by_name_before_any_model_loads(tmp_path):
    module = benchmark("decoded_memory")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text("{}")
    for argv, message in ((["--source", str(tmp_path / "none")], r"--source .*none: not a saved adapter folder"),
                          (["--source", str(tmp_path), "--counts", "1,x"], "--counts: comma-separated whole numbers"),
                          (["--source", str(tmp_path), "--counts", "0,4"], "--counts must be >= 1"),
                          (["--source", str(tmp_path), "--cap-mb", "-1"], "--cap-mb must be >= 0")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            module.main(argv)


def test_the_table_splits_right_answers_into_the_fine_tunes_kept_and_those_beyond(quality):
    """A method can match the fine-tune's count by losing one of its right answers and turning one of its wrong
    ones right; the column tells the two apart (gain kept cannot)."""
    ref = {"base": {"perplexity": 2, "agreement": 0.5, "accuracy": 0, "correct": "0000"},
           "finetuned": {"perplexity": 3, "agreement": 1, "accuracy": 0.75, "correct": "1110"},
           "revision": "abc123"}  # fmt: skip
    cell = {"variant": "deltacome", "ratio": 1 / 16, "file_bytes": 10, "effective_ratio": 1 / 16,
            "compress_seconds": 1.0, "perplexity": 2.5, "agreement": 0.9, "accuracy": 0.75, "gain_kept": 1.0,
            "revision": "abc123", "correct": "1110"}  # fmt: skip
    rows = [cell, {**cell, "variant": "dare", "correct": "0111"}, {**cell, "variant": "lowrank", "correct": None}]
    lines = quality.table(rows, ref, "facts").splitlines()
    assert "| the fine-tune's right kept + beyond |" in lines[2]
    assert lines[4].endswith("| 0 + 0 | – |") and lines[5].endswith("| 3 + 0 | – |")  # base, fine-tune
    assert lines[-3].endswith("| 3 + 0 | – |")
    assert lines[-2].endswith("| 2 + 1 | +1 / −1 (p 1) |")  # as many right as the fine-tune, one of them beyond it
    assert lines[-1].endswith("| – | – |")


def test_every_quality_variant_is_a_valid_config_and_the_defaults_variants_keep_its_layout(quality):
    """A variant measures what its name says: each builds a config, and those that are the default with one option
    changed keep ``dare_modules="auto"`` (the loop that gives the bands' variants ``None`` once turned
    ``deltacome-unbiased`` into the bands everywhere, benchmarks/RESULTS.md reading at 5c7d799)."""
    for name in quality.VARIANTS:
        quality.variant_config(name, 1 / 32)  # a bad setting raises ConfigError naming it
    for name in ("deltacome", "deltacome-unbiased"):
        assert quality.variant_config(name, 1 / 32).dare_modules == "auto", name
    assert quality.variant_config("deltacome-unbiased", 1 / 32).dare_fit == "unbiased"
    for name in ("deltacome-previous", "deltacome-previous-unbiased", "deltacome-published"):
        assert quality.variant_config(name, 1 / 32).dare_modules is None, name
    assert quality.variant_config("deltacome-down-dare-uniform", 1 / 32).dare_modules == ["down_proj"]


def test_kernel_state_counts_what_the_dare_kernel_builds_beside_the_file(tmp_path, capsys):
    """The bytes the Triton path holds beside a default adapter's file: one index per row of every DARE part and no
    bitmap (format 5: the kernel hashes the mask), none for the bands; importance-rated parts, whose mask the kernel
    does not replay, add one bitmap word per 32 weights (the kernels' own builders); sparse bands (impart) their
    masks' starts (format 6), or an older file's their decoded float16 factors; a bad folder is named."""
    import copy

    from tiny_models import make_finetune, make_model, random_ids

    from hf_deltacome import DeltaCoMeConfig, compress

    module = benchmark("kernel_state")
    base = make_model("llama")
    model = compress(copy.deepcopy(base), make_finetune(base), DeltaCoMeConfig(ratio=1 / 8),
                     calibration=random_ids(base, 8, 32, 0), progress=False)  # fmt: skip
    model.save_pretrained(tmp_path / "a")
    dare = [e["shape"] for e in model.peft_config["default"].layout.values() if e.get("sparse")]
    assert dare  # the default stores the MLP as DARE
    held = module.held_bytes(tmp_path / "a")
    assert held["bitmap"] == 0 and held["starts"] == sum(m * 4 for m, _ in dare) and held["vq_rot"] == 0
    assert held["file"] == (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    module.main([str(tmp_path / "a")])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| a | 1/8 | {len(dare)} (") and row.endswith(
        f"| {(held['file'] + held['starts']) / held['file']:.2f}x |")
    rated = compress(copy.deepcopy(base), make_finetune(base),
                     DeltaCoMeConfig(ratio=1 / 8, method="dare", dare_rates="importance"), progress=False)  # fmt: skip
    rated.save_pretrained(tmp_path / "r")
    shapes = [e["shape"] for e in rated.peft_config["default"].layout.values() if e.get("sparse")]
    assert module.held_bytes(tmp_path / "r")["bitmap"] == sum(m * -(-n // 32) * 4 for m, n in shapes) > 0
    impart = compress(copy.deepcopy(base), make_finetune(base), DeltaCoMeConfig(ratio=1 / 4, method="impart"),
                      progress=False)  # fmt: skip
    impart.save_pretrained(tmp_path / "i")
    starts = [4 * b["rank"] * (1 + -(-m // 64)) for e in impart.peft_config["default"].layout.values()
              for m, _ in [e["shape"]] for b in e.get("sparse_bands", [])]  # fmt: skip
    assert module.held_bytes(tmp_path / "i")["sparse_bands"] == sum(starts) > 0  # V's row starts, U's tile starts
    older = module.held_bytes(DATA / "v2_impart_adapter")  # generator draws: decoded float16 factors
    factors = [2 * b["rank"] * (m + n) for e in json.loads((DATA / "v2_impart_adapter" / "adapter_config.json")
               .read_text())["layout"].values() for m, n in [e["shape"]] for b in e.get("sparse_bands", [])]  # fmt: skip
    assert older["sparse_bands"] == sum(factors) > 0
    with pytest.raises(SystemExit, match=r"nowhere: not a saved adapter folder"):
        module.main([str(tmp_path / "nowhere")])


def test_sampling_speed_refuses_bad_flags_before_any_model_loads():
    module = benchmark("sampling_speed")
    for argv in (["--num-samples", "0"], ["--seq-len", "1"], ["--repeats", "0"]):
        with pytest.raises(SystemExit, match="--num-samples and --repeats must be >= 1, --seq-len >= 2"):
            module.main(argv)
    with pytest.raises(SystemExit, match=r"--model .*nowhere: not a saved model folder"):
        module.main(["--model", "/nowhere"])


def test_every_name_the_scripts_take_from_the_zoo_exists():
    """``zoo.X`` in a benchmark or example script names something the zoo package exports (a script is run rarely:
    a renamed export would otherwise surface only as an AttributeError hours into a run)."""
    import ast
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import zoo
    finally:
        sys.path.remove(str(ROOT / "examples"))
    missing = []
    for script in sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "examples").glob("*.py")]):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "zoo":
                if not hasattr(zoo, node.attr):
                    missing.append(f"{script.name}: zoo.{node.attr}")
    assert not missing, missing


def test_amlq_benchmark_refuses_bad_flags_by_name_before_any_model_loads(capsys):
    amlq = benchmark("amlq")
    assert "--stack runs the facts fine-tune of SmolLM2 itself: not with --base smollm2-moe" in refused(
        amlq.parse_args, ["--base", "smollm2-moe", "--stack", "amlq:3.0"], capsys)  # fmt: skip
    assert "--threads must be at least 1, got 0" in refused(amlq.parse_args, ["--threads", "0"], capsys)
    assert "invalid choice: 'llama'" in refused(amlq.parse_args, ["--base", "llama"], capsys)
    args = amlq.parse_args(["--base", "smollm2-moe"])
    assert args.stack == "" and args.plot.endswith("amlq_moe.png")
    assert amlq.parse_args([]).stack == "amlq:3.0,amlq:4.0"


def test_low_rank_benchmark_flags_and_its_rule_switch(capsys, monkeypatch):
    """benchmarks/low_rank.py refuses a negative rank, a thread count below 1 and an unknown variant by name (rank 0:
    the full fine-tune); its "rank rule off" variant (both tails at -inf) does switch the rule off: an exact rank-3
    matrix is then not of low rank; "beyond-off" probes only for a rank that fits."""
    import torch

    import hf_deltacome.compression.low_rank as low_rank

    low = benchmark("low_rank")
    assert "--rank must be >= 0 and --threads >= 1" in refused(low.parse_args, ["--rank", "-1"], capsys)
    assert "unknown ['one-pas']" in refused(low.parse_args, ["--variants", "default,one-pas"], capsys)
    args = low.parse_args(["--ratios", "1/16,1/64"])
    assert args.ratios == [1 / 16, 1 / 64] and args.rank == 16 and args.lr is None
    assert [low.VARIANTS[v] for v in args.variants] == ["default", "default, rank rule off", "lowrank"]
    assert low.parse_args(["--rank", "0", "--variants", "one-pass"]).variants == ["one-pass"]
    assert args.dtype == torch.float32 and low.parse_args(["--float16"]).dtype == torch.float16
    assert "not allowed with argument --float16" in refused(low.parse_args, ["--float16", "--bfloat16"], capsys)
    d = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) @ torch.randn(3, 96)
    assert low_rank.low_rank_of(d, 4096, 128) == 3
    monkeypatch.setattr(low_rank, "LOW_RANK_TAIL", -float("inf"))
    monkeypatch.setattr(low_rank, "ROUNDING_TAIL", -float("inf"))
    assert low_rank.low_rank_of(d, 4096, 128) is None
    monkeypatch.undo()
    # "whole where the rank does not fit": the probe asks for a rank within the budget only, whatever the plan asks
    small = low_rank.band_nbytes(64, 96, 3, 2, 128)  # two ranks fit at 3 bits, not three
    assert low_rank.low_rank_of(d, small, 128) is None and low_rank.low_rank_of(d, small, 128, beyond_budget=True) == 3
    assert low.within_budget(d, small, 128, 0.0, beyond_budget=True) is None
