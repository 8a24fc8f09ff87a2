"""A delta of low rank (a merged LoRA): found by its spectrum, stored as its singular triplets at 8 bits, whatever the
split, DARE or vector codes the method's options would have chosen (where its rank does not fit, as the split's
strongest directions rather than DARE or vector codes); a full fine-tune's long tail never is."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from test_streaming import loaded, save_pair, written
from tiny_models import logits, make_finetune, make_model, random_ids, target_linears

from hf_deltacome import DeltaCoMeConfig
from hf_deltacome.compression import low_rank
from hf_deltacome.compression.low_rank import (
    low_rank_bands,
    low_rank_of,
    rounding_energy,
    stores_at_least,
    strongest_directions,
)
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.format.budget import band_nbytes, budget_bytes

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread

RANK = 4


def merged_lora(base: torch.nn.Module, rank: int = RANK, seed: int = 0, dtype: torch.dtype | None = None):
    """``base`` with a rank-``rank`` delta added to every decoder linear (``B A``, a LoRA merged), the size of a
    fine-tune's (a quarter of the weight's norm); in ``dtype`` when given (rounded there, as a checkpoint saves it)."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in target_linears(ft):
            w = ft.get_submodule(name).weight
            m, n = w.shape
            d = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
            w.copy_((w.float() + d * (0.25 * w.float().norm() / d.norm())).to(w.dtype))
    return ft.to(dtype) if dtype is not None else ft


def lowrank_matrix(m: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank


def test_low_rank_of_finds_the_rank_of_a_merged_lora_and_not_of_a_long_tail():
    d = lowrank_matrix(96, 160, RANK)
    budget = budget_bytes(96, 160, 1 / 8)
    assert low_rank_of(d, budget, 128) == RANK
    assert low_rank_of(d, 2 * 96, 128) is None  # one rank fits at 3 bits: it does not hold the delta
    # a full fine-tune's delta: strong directions and a long tail over the full rank (tiny_models.make_finetune)
    base = make_model("llama")
    ft = make_finetune(base)
    for name in target_linears(base):
        delta = ft.get_submodule(name).weight - base.get_submodule(name).weight
        assert low_rank_of(delta, budget_bytes(*delta.shape, 1 / 8), 128) is None, name
    # the randomized probe (a rank asked under half the matrix's) finds what the exact singular values find
    wide = lowrank_matrix(128, 2048, 6, seed=1) + 1e-4 * torch.randn(128, 2048, generator=torch.Generator())
    small = budget_bytes(128, 2048, 1 / 64)  # 10 ranks at 3 bits: probed with 18 columns
    large = budget_bytes(128, 2048, 1 / 8)  # 64 and more: exact
    assert low_rank_of(wide, small, 128) == low_rank_of(wide, large, 128) == 6


def test_a_rank_beyond_the_budget_is_found_where_asked_and_the_split_trimmed_to_it():
    """``beyond_budget`` (a module the method stores whole): the rank is found though it does not fit at 3 bits, up to
    a quarter of the ranks; a long tail still is not of low rank; the split keeps its bits, trimmed to the rank."""
    d = lowrank_matrix(96, 160, RANK)
    assert low_rank_of(d, 2 * 96, 128) is None and low_rank_of(d, 2 * 96, 128, beyond_budget=True) == RANK
    assert low_rank_of(lowrank_matrix(96, 160, 30), 2 * 96, 128, beyond_budget=True) is None  # over a quarter of 96
    base = make_model("llama")
    ft = make_finetune(base)
    for name in target_linears(base):
        delta = ft.get_submodule(name).weight - base.get_submodule(name).weight
        assert low_rank_of(delta, budget_bytes(*delta.shape, 1 / 64), 128, beyond_budget=True) is None, name
    split = [[8, 2], [3, 5], [2, 9]]
    assert strongest_directions(split, 10) == [[8, 2], [3, 5], [2, 3]]
    assert strongest_directions(split, 1) == [[8, 1], [3, 0], [2, 0]]
    assert strongest_directions(split, 40) == split == [[8, 2], [3, 5], [2, 9]]


def test_rounding_of_a_bfloat16_checkpoint_is_not_taken_for_rank():
    """A LoRA merged into bfloat16 weights: its delta is the LoRA plus the rounding (full rank); the rounding's
    expected energy (from the weights' bfloat16 grid) is what the tail may hold."""
    g = torch.Generator().manual_seed(0)
    w = (0.05 * torch.randn(96, 160, generator=g)).to(torch.bfloat16)
    lora = 0.001 * lowrank_matrix(96, 160, RANK, seed=2)
    ft = (w.float() + lora).to(torch.bfloat16)
    delta = ft.float() - w.float()
    assert (delta - lora).square().sum() > 1e-4 * lora.square().sum()  # the rounding: beyond the 0.01% a tail may hold
    budget = budget_bytes(96, 160, 1 / 8)
    assert low_rank_of(delta, budget, 128) is None
    noise = rounding_energy(ft)
    assert noise == pytest.approx(rounding_energy(ft.float()))  # float32 values on the bfloat16 grid
    assert 0.3 < float((delta - lora).square().sum()) / noise < 3  # about the energy it predicts
    assert low_rank_of(delta, budget, 128, noise) == RANK
    assert rounding_energy(w.float() + lora) == 0.0  # float32 weights: no rounding to allow for
    # a delta about the size of its rounding (a short fine-tune saved in bfloat16) mostly rounds to zero: the
    # expected rounding energy says nothing of it, and is not allowed for
    small_ft = (w.float() + 0.05 * lora).to(torch.bfloat16)
    tiny = small_ft.float() - w.float()
    assert rounding_energy(small_ft) > 0.05 * float(tiny.square().sum())
    assert low_rank_of(tiny, budget, 128, rounding_energy(small_ft)) is None


def test_the_probe_sees_a_bfloat16_merged_loras_weak_directions_through_its_rounding(monkeypatch):
    """A LoRA whose 16 singular values fall to half, merged into bfloat16 weights (rounding 1% of its energy): at a
    budget that asks for few probe columns, one pass of the range finder sees part of the weak directions as tail
    (no rank at 1/32, 27 at 1/16); the power iteration finds the 16 there are."""
    g = torch.Generator().manual_seed(0)
    w = (0.05 * torch.randn(128, 1024, generator=g)).to(torch.bfloat16)
    u, v = torch.linalg.qr(torch.randn(128, 16, generator=g)).Q, torch.linalg.qr(torch.randn(1024, 16, generator=g)).Q
    ft = (w.float() + 0.1 * (u * torch.logspace(0, math.log10(0.5), 16)) @ v.T).to(torch.bfloat16)
    delta, noise = ft.float() - w.float(), rounding_energy(ft)
    small, large = budget_bytes(128, 1024, 1 / 32), budget_bytes(128, 1024, 1 / 16)
    assert low_rank_of(delta, small, 128, noise) == low_rank_of(delta, large, 128, noise) == 16
    monkeypatch.setattr(low_rank, "POWER_ITERATIONS", 0)
    assert low_rank_of(delta, small, 128, noise) is None and low_rank_of(delta, large, 128, noise) > 16


def test_the_bands_of_a_low_rank_delta_and_when_a_split_stores_it_already():
    n = budget_bytes(576, 576, 1 / 16)
    assert low_rank_bands(576, 576, n, 128, 16) == [[8, 16]]
    bands = low_rank_bands(576, 576, budget_bytes(576, 576, 1 / 64), 128, 16)  # 8 bits do not fit 16
    assert bands[0][0] == 8 and bands[1][0] == 4 and bands[0][1] + bands[1][1] == 16 and bands[0][1] > 0
    assert sum(band_nbytes(576, 576, b, r, 128) for b, r in bands) <= budget_bytes(576, 576, 1 / 64)
    assert stores_at_least({"bands": [[8, 6], [3, 10]]}, [[8, 6]])
    assert not stores_at_least({"bands": [[8, 2], [3, 32], [2, 40]]}, [[8, 4]])
    assert stores_at_least({"bands": [[8, 2], [4, 32]]}, [[8, 1], [4, 3]])
    assert not stores_at_least({"bands": [[8, 3]]}, [[8, 4]])  # fewer ranks than the delta has
    assert not stores_at_least({"bands": [], "sparse": {"nnz": 10}}, [[8, 1]])


@pytest.mark.parametrize("ratio", ["1/4", "1/8"])
def test_a_merged_lora_is_stored_as_its_rank_at_8_bits(ratio, tmp_path):
    """The default on a merged LoRA: every target one band of its rank at 8 bits (not the MLP's DARE, not the
    split's 3- and 2-bit tail), the bytes the delta does not need left unspent, the logits all but the fine-tune's,
    recorded in the adapter; a full fine-tune at the same ratio keeps the method's layout."""
    base = make_model("llama")
    ft = merged_lora(base)
    ids = random_ids(base, 8, 32, seed=1)
    model = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=ratio), calibration=ids, progress=False)
    config = model.peft_config["default"]
    assert {json.dumps(e["bands"]) for e in config.layout.values()} == {json.dumps([[8, RANK]])}
    assert not any(e.get("sparse") for e in config.layout.values())
    assert config.compression_info["low_rank"]["modules"] == len(config.layout)
    model.save_pretrained(tmp_path / "shown")
    from hf_deltacome.io.summary import summarize_adapter

    shown = summarize_adapter(tmp_path / "shown").format()
    assert f"{len(config.layout)} module(s) of low rank (a merged LoRA's, say) stored as their rank alone (4-4, at 8" \
        in shown  # fmt: skip
    held_out = random_ids(base, 4, 32, seed=2)
    want = logits(ft, held_out)
    error = (logits(model, held_out) - want).norm() / (logits(base, held_out) - want).norm()
    assert error < 0.02
    full_ft = make_finetune(base)
    other = compress(copy.deepcopy(base), full_ft, DeltaCoMeConfig(ratio=ratio), calibration=ids, progress=False)
    assert "low_rank" not in other.peft_config["default"].compression_info
    if ratio == "1/8":
        assert any(e.get("sparse") for e in other.peft_config["default"].layout.values())  # the MLP's DARE
    sizes = []
    for adapter, folder in ((model, "lora"), (other, "full")):
        adapter.save_pretrained(tmp_path / folder)
        sizes.append((tmp_path / folder / "adapter_model.safetensors").stat().st_size)
    assert sizes[0] < 0.6 * sizes[1]  # the full fine-tune's adapter spends the budget; the LoRA needs less


def test_a_streamed_merged_lora_in_bfloat16_writes_the_loaded_bytes(tmp_path):
    """A LoRA merged into a bfloat16 checkpoint, streamed: the plan reads each delta from the files to see its rank
    (the rounding allowed for), and writes what the loaded run writes."""
    base = make_model("llama", seed=3).to(torch.bfloat16)
    ft = merged_lora(base.float(), dtype=torch.bfloat16)
    b, f = save_pair(tmp_path, base, ft)
    cfg = DeltaCoMeConfig(quantizer="rtn", ratio="1/8")
    reference = compress(loaded(b), loaded(f), cfg, progress=False)
    streamed = compress(b, f, cfg, progress=False)
    assert streamed.peft_config["default"].compression_info["low_rank"]["ranks"] == [RANK]
    assert written(streamed, tmp_path / "streamed") == written(reference, tmp_path / "loaded")


def test_a_low_rank_delta_too_large_for_its_budget_keeps_its_strongest_directions_not_dare(monkeypatch, tmp_path):
    """A merged LoRA of rank 10 at 1/32: the MLP's 160 x 64 deltas buy 6 ranks at 3 bits, so their rank does not
    fit; the default would store them whole as 2-bit DARE (a few percent of the entries at random, about that share
    of a low rank's energy). They keep the split's strongest directions instead, never more than the rank, and the
    adapter's logits are closer to the fine-tune's than with DARE there."""
    rank = 10
    base = make_model("llama")
    ft = merged_lora(base, rank=rank)
    ids = random_ids(base, 8, 32, seed=1)
    cfg = DeltaCoMeConfig(ratio="1/32")
    model = compress(copy.deepcopy(base), ft, cfg, calibration=ids, progress=False)
    layout, info = model.peft_config["default"].layout, model.peft_config["default"].compression_info
    mlp = [nm for nm in layout if ".mlp." in nm]
    assert mlp and info["low_rank"]["strongest_directions"] >= len(mlp)
    for nm in mlp:
        entry = layout[nm]
        assert not entry.get("sparse") and 0 < sum(r for _, r in entry["bands"]) <= rank, (nm, entry)
    model.save_pretrained(tmp_path)
    from hf_deltacome.io.summary import summarize_adapter

    shown = summarize_adapter(tmp_path).format()
    assert f"({info['low_rank']['strongest_directions']} of them, whose rank does not fit at 3 bits, keep the " \
        "split's strongest directions" in shown  # fmt: skip
    from hf_deltacome.compression import plan

    def no_beyond(*args, **kwargs):
        return low_rank_of(*args, **{**kwargs, "beyond_budget": False})

    monkeypatch.setattr(plan, "low_rank_of", no_beyond)  # what the default stored before: the MLP as DARE
    before = compress(copy.deepcopy(base), ft, cfg, calibration=ids, progress=False)
    assert all(before.peft_config["default"].layout[nm].get("sparse") for nm in mlp)
    held_out = random_ids(base, 4, 32, seed=2)
    want = logits(ft, held_out)
    errors = [float((logits(m, held_out) - want).norm()) for m in (model, before)]
    assert errors[0] < 0.8 * errors[1], errors  # 0.73 (the attention, of rank 10 too, keeps its split both times)
    assert low_rank_of(ft.get_submodule(mlp[0]).weight - base.get_submodule(mlp[0]).weight,
                       budget_bytes(160, 64, 1 / 32), 128) is None  # fmt: skip


def test_a_streamed_run_keeps_the_same_strongest_directions(tmp_path):
    """Streamed, the plan reads each delta from the files for the wider probe: the MLP asked as DARE
    (``dare_modules="mlp"``) of a rank-10 LoRA at 1/32 keeps the same strongest directions, byte for byte."""
    base = make_model("llama", seed=3)
    ft = merged_lora(base, rank=10)
    b, f = save_pair(tmp_path, base, ft)
    cfg = DeltaCoMeConfig(quantizer="rtn", ratio="1/32", dare_modules="mlp")
    reference = compress(loaded(b), loaded(f), cfg, progress=False)
    streamed = compress(b, f, cfg, progress=False)
    info = streamed.peft_config["default"].compression_info["low_rank"]
    assert info["strongest_directions"] == 6 == reference.peft_config["default"].compression_info["low_rank"][
        "strongest_directions"]  # fmt: skip
    assert not any(e.get("sparse") for e in streamed.peft_config["default"].layout.values())
    assert written(streamed, tmp_path / "streamed") == written(reference, tmp_path / "loaded")
