"""Saving an adapter: never into a model's folder, and the folder is replaced as one unit.

A save builds the next version of the folder beside it and swaps the two in one step (``renameat2``
``RENAME_EXCHANGE``; two renames where there is none), so a SIGKILL at any instant leaves the previous or the new
adapter, and a reader running during saves never gets config and weights of two different saves.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from test_trust import BANDS, IDS, fresh_base, load, make_adapter
from tiny_models import logits, make_finetune
from transformers import AutoModelForCausalLM

import hf_deltacome
from hf_deltacome import AdapterFileError, DeltaCoMeConfig
from hf_deltacome.cli import main
from hf_deltacome.errors import OutputFolderError
from hf_deltacome.io.adapter_files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter
from hf_deltacome.io.atomic import (
    NEXT_SUFFIX,
    PREVIOUS_SUFFIX,
    TEMP_SUFFIX,
    atomic_folder,
    exchange_paths,
    read_through_swap,
    wait_for_swap,
)

OTHER_BANDS = ((8, 1), (3, 6), (2, 4))  # generation B: another layout, so a mix of A and B is never a valid adapter


@pytest.fixture
def model_dirs(tmp_path) -> tuple[Path, Path]:
    """A base and a fine-tune saved as model folders (config.json + model.safetensors)."""
    base, ft = fresh_base(), None
    ft = make_finetune(base, seed=3)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "finetune")
    return tmp_path / "base", tmp_path / "finetune"


# ------------------------------------------------------------------------------------------------------------
# never into a model's folder
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["base", "finetune", "inside-base", "inside-finetune"])
def test_cli_refuses_output_in_an_input_folder(model_dirs, tmp_path, capsys, where):
    base, ft = model_dirs
    out = {"base": base, "finetune": ft, "inside-base": base / "delta", "inside-finetune": ft / "x" / "delta"}[where]
    before = sorted(p.name for p in base.iterdir()), sorted(p.name for p in ft.iterdir())
    argv = ["compress", "--base", str(base), "--finetuned", str(ft), "--output", str(out), "--overwrite",
            "--quantizer", "rtn", "--device", "cpu", "--no-save-tokenizer"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err
    assert ("is inside the" if where.startswith("inside") else "is the") in err
    assert (sorted(p.name for p in base.iterdir()), sorted(p.name for p in ft.iterdir())) == before
    assert AutoModelForCausalLM.from_pretrained(base).__class__.__name__ == "LlamaForCausalLM"  # plain base, no delta


@pytest.mark.parametrize("marker", ["config.json", "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"])
def test_cli_refuses_a_folder_holding_a_model(model_dirs, tmp_path, capsys, marker):
    base, ft = model_dirs
    out = tmp_path / "other"
    out.mkdir()
    (out / marker).write_text("{}")
    argv = ["compress", "--base", str(base), "--finetuned", str(ft), "--output", str(out), "--overwrite"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert marker in err and str(out) in err and "holds a model" in err
    assert not (out / ADAPTER_CONFIG_NAME).exists()


def test_save_pretrained_refuses_model_folders(model_dirs, tmp_path):
    base_dir, ft_dir = model_dirs
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    finetuned = AutoModelForCausalLM.from_pretrained(ft_dir)
    model = hf_deltacome.compress(base, finetuned, DeltaCoMeConfig(quantizer="rtn"), progress=False)
    for bad, why in [(base_dir, "is the base"), (base_dir / "sub", "is inside the base"),
                     (ft_dir, "is the fine-tuned"), (ft_dir / "a" / "b", "is inside the fine-tuned")]:  # fmt: skip
        with pytest.raises(OutputFolderError, match=why):
            model.save_pretrained(str(bad))
    other = tmp_path / "checkpoint"
    other.mkdir()
    (other / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(OutputFolderError, match="holds a model"):
        model.save_pretrained(str(other))
    assert not (base_dir / ADAPTER_CONFIG_NAME).exists() and not (ft_dir / ADAPTER_CONFIG_NAME).exists()
    model.save_pretrained(str(tmp_path / "adapter"))  # a folder of its own is fine
    assert read_adapter(tmp_path / "adapter")[0].layout == model.peft_config["default"].layout


def test_a_transformers_model_holding_our_adapter_saves_it_the_same_way(model_dirs, tmp_path, monkeypatch):
    """``model.load_adapter`` then ``model.save_pretrained`` (transformers' own path, e.g. a Trainer's checkpoint):
    refused in the base model's folder, swapped in as one unit elsewhere (a failing write leaves the old adapter)."""
    base_dir, _ = model_dirs
    make_adapter(AutoModelForCausalLM.from_pretrained(base_dir)).save_pretrained(str(tmp_path / "a"))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.load_adapter(str(tmp_path / "a"))
    with pytest.raises(OutputFolderError, match="is the base"):
        model.save_pretrained(str(base_dir))
    assert not (base_dir / ADAPTER_CONFIG_NAME).exists()
    model.save_pretrained(str(tmp_path / "b"))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "b"))
    torch.testing.assert_close(logits(reloaded, IDS), logits(model.eval(), IDS))
    before = (tmp_path / "b" / ADAPTER_WEIGHTS_NAME).read_bytes()
    import transformers.modeling_utils as mu

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(mu, "safe_save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(str(tmp_path / "b"))
    assert (tmp_path / "b" / ADAPTER_WEIGHTS_NAME).read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a", "b", "base", "finetune"]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# the folder is replaced as one unit
# ------------------------------------------------------------------------------------------------------------


def test_save_keeps_other_files_and_leaves_nothing_beside(tmp_path):
    folder = tmp_path / "adapter"
    make_adapter(fresh_base(), seed=1).save_pretrained(str(folder))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("kept")
    stale = folder / f".{ADAPTER_WEIGHTS_NAME}.999999.0123456789ab{TEMP_SUFFIX}"  # left by an older version's kill
    stale.write_bytes(b"x")
    model = make_adapter(fresh_base(), seed=2, bands=OTHER_BANDS)
    model.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").read_text() == "{}" and (folder / "notes" / "a.txt").read_text() == "kept"
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no next/previous version left beside it
    torch.testing.assert_close(logits(load(folder), IDS), logits(model, IDS))


def test_save_into_the_working_directory(tmp_path, monkeypatch):
    """Saving into the folder the process works in: afterwards it works in the new version, not a deleted one."""
    folder = tmp_path / "adapter"
    make_adapter(fresh_base(), seed=1).save_pretrained(str(folder))
    monkeypatch.chdir(folder)
    make_adapter(fresh_base(), seed=2).save_pretrained(".")
    assert os.getcwd() == str(folder) and os.path.isfile(ADAPTER_CONFIG_NAME)
    read_adapter(".")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("b")
    assert exchange_paths(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


def test_atomic_folder_failure_leaves_the_folder(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "x").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(folder) as nxt:
        (Path(nxt) / "x").unlink()
        (Path(nxt) / "x").write_text("new")
        raise RuntimeError
    assert (folder / "x").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f"]


def test_digest_ties_weights_to_their_config(tmp_path):
    """Weights of one save next to the config of another (same layout) are refused by every reader."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_adapter(fresh_base(), seed=1).save_pretrained(str(a))
    make_adapter(fresh_base(), seed=2).save_pretrained(str(b))
    (a / ADAPTER_WEIGHTS_NAME).write_bytes((b / ADAPTER_WEIGHTS_NAME).read_bytes())
    for loader in (lambda: read_adapter(a), lambda: load(a), lambda: fresh_base().load_adapter(str(a))):
        with pytest.raises(AdapterFileError, match="weights_sha256"):
            loader()


def _fork_context() -> Any:
    """Writers are forked from a fork server that imported torch but never ran an OpenMP region: a plain fork of
    this process (which has) can deadlock in the child's first parallel op (seen in CI with 2 threads)."""
    if sys.platform == "win32":
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "peft", "transformers", "hf_deltacome"])
    return ctx


FORK = _fork_context()
needs_fork = pytest.mark.skipif(FORK is None, reason="SIGKILL of a forked writer: POSIX only")


def _writer(folder: str, saves: Any, no_exchange: bool) -> None:
    """Save adapters A and B into ``folder`` in turn, forever (run in a forked child, killed by the test)."""
    os.environ["DELTACOME_NO_EXCHANGE"] = "1" if no_exchange else ""
    models = [make_adapter(fresh_base(), seed=1), make_adapter(fresh_base(), seed=2, bands=OTHER_BANDS)]
    while True:
        models[saves.value % 2].save_pretrained(folder)
        saves.value += 1


def _kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)


def _generations(tmp_path: Path) -> dict:
    """layout -> (state dict, logits) of the two adapters the writer alternates between."""
    out = {}
    for name, seed, bands in (("a", 1, BANDS), ("b", 2, OTHER_BANDS)):
        model = make_adapter(fresh_base(), seed=seed, bands=bands)
        model.save_pretrained(str(tmp_path / name))
        config, state = read_adapter(tmp_path / name)
        out[str(sorted(config.layout.items()))] = state, logits(model, IDS)
    return out


def _same_generation(config: DeltaCoMeConfig, state: dict, generations: dict) -> bool:
    ref = generations.get(str(sorted(config.layout.items())), ({}, None))[0]
    return ref.keys() == state.keys() and bool(ref) and all(torch.equal(ref[k], state[k]) for k in ref)


def _peft_load_is_one_generation(folder: Path, generations: dict) -> bool:
    """PEFT reads config and weights at different times: the load is one generation, or refused as such. Without
    an atomic exchange the folder is briefly absent between the two renames: PEFT's lookup of the config waits that
    out as ``read_adapter`` does (a CI run once met a folder gone between PEFT's check and its open)."""
    try:
        model = load(folder)
    except AdapterFileError as e:
        return "weights_sha256" in str(e) and "load again" in str(e)
    _, expected = generations[str(sorted(model.peft_config["default"].layout.items()))]
    return torch.equal(logits(model, IDS), expected)


def test_weights_pinned_with_the_config_are_read_while_the_folder_is_set_aside(tmp_path):
    """Between the two renames of a fallback swap the folder is absent for an instant: weights pinned with the
    config are read through their handle (the folder's path only names them), never looked up as a Hub repo id."""
    from hf_deltacome.io.adapter_source import load_checked_weights
    from hf_deltacome.io.atomic import PinnedFiles

    folder = tmp_path / "adapter"
    model = make_adapter(fresh_base(), seed=1)
    model.save_pretrained(str(folder))
    config, state = read_adapter(folder)
    with PinnedFiles(folder, [ADAPTER_WEIGHTS_NAME]) as pin:
        os.rename(folder, tmp_path / "set-aside")
        got = load_checked_weights(config, fresh_base(), folder, source=pin.path(ADAPTER_WEIGHTS_NAME))
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


@needs_fork
@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
def test_random_sigkills_and_a_concurrent_reader(tmp_path, fallback):
    """A writer process saves adapters A and B in turn; the test reads the folder meanwhile (every read_adapter is
    all A or all B, never an error; a PEFT load is one of them or refused as mixed), then SIGKILLs the writer at a
    random instant (the folder holds A or B); 5 times."""
    generations = _generations(tmp_path)
    folder = tmp_path / "adapter"
    rng = random.Random(os.getpid())
    reads = 0
    for _ in range(5):
        saves = FORK.Value("i", 0, lock=False)
        proc = FORK.Process(target=_writer, args=(str(folder), saves, fallback), daemon=True)
        proc.start()
        try:
            started = time.time()
            while saves.value == 0:
                assert proc.is_alive(), "the writer died"
                assert time.time() < started + 180, "the writer never finished a save"
                time.sleep(0.01)
            deadline, start = time.time() + rng.uniform(0.3, 1.5), reads
            while time.time() < deadline or reads < start + 2:
                config, state = read_adapter(folder)
                assert _same_generation(config, state, generations)
                assert _peft_load_is_one_generation(folder, generations)
                reads += 1
            time.sleep(rng.uniform(0, 0.1))  # the kill lands anywhere in a save
        finally:
            _kill(proc)
        assert saves.value >= 2
        config, state = read_adapter(folder)  # puts back a version set aside by a kill between the two renames
        assert _same_generation(config, state, generations)
    assert reads >= 10
    assert isinstance(load(folder), PeftModel)
    make_adapter(fresh_base(), seed=1).save_pretrained(str(folder))  # the next save removes what the kills left
    assert sorted(os.listdir(tmp_path)) == ["a", "adapter", "b"]


def _save_and_hang(folder: str, mode: str, hanging: Any) -> None:
    """Save an adapter into ``folder`` but stop for good at one step of the save (a forked child)."""
    import safetensors.torch

    from hf_deltacome.io import atomic

    real_save, real_rename = safetensors.torch.save_file, os.rename

    def hang(*args: Any, **kwargs: Any) -> None:
        hanging.set()
        time.sleep(600)

    def half_then_hang(tensors: dict, filename: str, metadata: Any = None) -> None:
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        hang()

    def rename_then_hang(src: str, dst: str) -> None:  # the second rename of the fallback: the old one is aside
        if src.endswith(atomic.NEXT_SUFFIX):
            if mode != "slow-renames":
                hang()
            hanging.set()  # a slow save: the folder stays absent for a second, then the new one comes
            time.sleep(1.0)
        real_rename(src, dst)

    if mode == "weights":
        safetensors.torch.save_file = half_then_hang
    elif mode == "swap":
        atomic.exchange_paths = hang
    else:  # between-renames, slow-renames
        os.environ["DELTACOME_NO_EXCHANGE"] = "1"
        os.rename = rename_then_hang
    make_adapter(fresh_base(), seed=2, bands=OTHER_BANDS).save_pretrained(folder)


@needs_fork
@pytest.mark.parametrize("mode", ["weights", "swap", "between-renames"])
def test_kill_at_each_step_of_a_save(tmp_path, mode):
    """SIGKILL while the weights are half written, with everything written but not swapped in, and between the
    two renames of the fallback: the previous adapter stays (or comes back) whole."""
    folder = tmp_path / "adapter"
    previous = make_adapter(fresh_base(), seed=1)
    previous.save_pretrained(str(folder))
    expected = logits(previous, IDS)
    hanging = FORK.Event()
    proc = FORK.Process(target=_save_and_hang, args=(str(folder), mode, hanging), daemon=True)
    proc.start()
    try:
        assert hanging.wait(120), "the save never reached the step"
    finally:
        _kill(proc)
    left = sorted(os.listdir(tmp_path))
    if mode == "between-renames":
        assert "adapter" not in left and any(n.endswith(PREVIOUS_SUFFIX) for n in left)
    else:
        assert any(n.endswith(NEXT_SUFFIX) for n in left)  # the half-built next version, beside the folder
    torch.testing.assert_close(logits(load(folder), IDS), expected)  # every reader puts a set-aside one back
    read_adapter(folder)
    model = make_adapter(fresh_base(), seed=2)
    model.save_pretrained(str(folder))  # the next save cleans up
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    torch.testing.assert_close(logits(load(folder), IDS), logits(model, IDS))


@needs_fork
@pytest.mark.parametrize("reader", ["peft", "read_adapter"])
def test_a_read_waits_out_a_running_save_between_the_two_renames(tmp_path, reader):
    """A save still running with the folder set aside between the two renames (no atomic exchange): a reader waits
    for the new folder instead of failing on a missing adapter_config.json."""
    folder = tmp_path / "adapter"
    make_adapter(fresh_base(), seed=1).save_pretrained(str(folder))
    hanging = FORK.Event()
    proc = FORK.Process(target=_save_and_hang, args=(str(folder), "slow-renames", hanging), daemon=True)
    proc.start()
    try:
        assert hanging.wait(120), "the save never reached the step"
        assert not folder.exists()
        if reader == "peft":
            got = logits(load(folder), IDS)
        else:
            config, state = read_adapter(folder)
        proc.join(60)
        assert proc.exitcode == 0, "the save did not finish"
    finally:
        if proc.exitcode is None:
            _kill(proc)
    new = make_adapter(fresh_base(), seed=2, bands=OTHER_BANDS)
    if reader == "peft":
        torch.testing.assert_close(got, logits(new, IDS))
    else:
        assert config.layout == new.peft_config["default"].layout and state.keys() == read_adapter(folder)[1].keys()
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_read_through_swap_reads_again_only_what_a_swap_hid(tmp_path):
    """A file found missing (PEFT checks, then opens: a swap can fall in between) is read again once it is there;
    a file that is really missing is reported at once."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    calls = []

    def read() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", str(folder / "adapter_config.json"))
        return (folder / "adapter_config.json").read_text()

    assert read_through_swap(folder, read, probe=folder / "adapter_config.json") == "{}" and len(calls) == 2
    calls.clear()
    with pytest.raises(FileNotFoundError):
        read_through_swap(folder, lambda: read() and open(folder / "gone.json").read(), probe=folder / "gone.json")
    assert len(calls) == 1
    started = time.monotonic()
    assert not wait_for_swap(tmp_path / "never-saved") and time.monotonic() - started < 1  # no save: no wait
