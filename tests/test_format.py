"""Packed format 2 (one blob per module, ``U`` stored per singular vector) and the ratio held by the whole file.

Format 1 files (one tensor per factor part, ``U`` grouped along the rank) keep loading: ``tests/data/v1_adapter`` was
written by the format-1 code, with the logits it gave.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import make_finetune, make_model, random_ids, relative_logits_error

from hf_deltacome import AdapterFileError, ConfigError, DeltaCoMeConfig, compress
from hf_deltacome.cli import main as cli_main
from hf_deltacome.format.budget import band_nbytes
from hf_deltacome.format.decoded import dequant_cache
from hf_deltacome.format.storage import FORMAT_VERSION, PackedDelta, layout_tensors
from hf_deltacome.io.adapter_files import ADAPTER_WEIGHTS_NAME, read_adapter
from hf_deltacome.io.summary import _plan_lines, summarize_adapter

DATA = Path(__file__).with_name("data")
WIDE = dict(hidden_size=128, intermediate_size=352, head_dim=32)


def test_format1_adapter_still_loads_and_gives_its_logits():
    ref = load_file(str(DATA / "v1_adapter_logits.safetensors"))
    with safe_open(str(DATA / "v1_adapter" / ADAPTER_WEIGHTS_NAME), "pt") as f:
        assert any(".bands.0.u.qweight" in k for k in f.keys())  # noqa: SIM118 - the format-1 layout
    model = PeftModel.from_pretrained(make_model("qwen2", seed=7), str(DATA / "v1_adapter"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ref["input_ids"]).logits, ref["logits"], rtol=0, atol=1e-5)
    assert summarize_adapter(DATA / "v1_adapter").formats == (1,)


def test_dare_adapter_of_generator_draws_still_loads_and_gives_its_logits():
    """``tests/data/v4_dare_adapter``: the default (the MLP as 2-bit DARE) at 1/8 on a tiny Llama, written before the
    DARE masks' draws were hashed (format 5): its parts still draw from the CPU generator and give the logits it gave
    (``make_model("llama", seed=11)``, ``make_finetune(base, seed=11)``, calibration ``random_ids(base, 8, 32, 12)``)."""
    ref = load_file(str(DATA / "v4_dare_adapter_logits.safetensors"))
    layout = json.loads((DATA / "v4_dare_adapter" / "adapter_config.json").read_text())["layout"]
    assert all("draws" not in e["sparse"] for e in layout.values() if e.get("sparse"))
    model = PeftModel.from_pretrained(make_model("llama", seed=11), str(DATA / "v4_dare_adapter"))
    parts = [m.deltacome_delta["default"].sparse for m in model.modules() if hasattr(m, "deltacome_delta")]
    assert {p.draws for p in parts if p is not None} == {"generator"}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ref["input_ids"]).logits, ref["logits"], rtol=0, atol=1e-5)
    assert summarize_adapter(DATA / "v4_dare_adapter").formats == (2,)


def test_impart_adapter_of_generator_draws_still_loads_and_gives_its_logits(monkeypatch):
    """``tests/data/v2_impart_adapter``: ``impart`` at 1/4 on a tiny Llama, written before sparse bands' masks were
    hashed (format 6): its bands still draw from the CPU generator and give the logits they gave, on the PyTorch
    path and beside the kernels (``make_model("llama", seed=11)``, ``make_finetune(base, seed=11)``, calibration
    ``random_ids(base, 8, 32, 12)``, ids ``random_ids(base, 2, 12, 13)``)."""
    ref = load_file(str(DATA / "v2_impart_adapter_logits.safetensors"))
    layout = json.loads((DATA / "v2_impart_adapter" / "adapter_config.json").read_text())["layout"]
    assert all("draws" not in b for e in layout.values() for b in e.get("sparse_bands", []))
    model = PeftModel.from_pretrained(make_model("llama", seed=11), str(DATA / "v2_impart_adapter"))
    bands = [b for m in model.modules() if hasattr(m, "deltacome_delta") for b in m.deltacome_delta["default"].sparse_bands]
    assert bands and {b.draws for b in bands} == {"generator"}
    backends = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
    for name in backends:
        monkeypatch.setenv("DELTACOME_BACKEND", name)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ref["input_ids"]).logits, ref["logits"], rtol=0, atol=1e-5)
    assert summarize_adapter(DATA / "v2_impart_adapter").formats == (2,)


@pytest.fixture(scope="module")
def wide_pair():
    base = make_model("llama", seed=3, **WIDE)
    return base, make_finetune(base, seed=3)


def _compress(pair, **cfg):
    base, ft = pair
    return compress(copy.deepcopy(base), ft, DeltaCoMeConfig(**cfg), calibration=random_ids(base, 8, 32, seed=4),
                    progress=False)  # fmt: skip


def test_one_tensor_per_module_and_exact_round_trip(wide_pair, tmp_path):
    base, ft = wide_pair
    model = _compress(wide_pair, ratio="1/8", dare_modules=None)  # bands in every module (DARE parts: test_dare_rates)
    model.save_pretrained(tmp_path)
    layout = model.peft_config["default"].layout
    with safe_open(str(tmp_path / ADAPTER_WEIGHTS_NAME), "pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    delta_keys = [k for k in keys if ".deltacome_delta." in k]
    assert len(delta_keys) == len(layout) and all(k.endswith(".deltacome_delta.blob") for k in delta_keys)
    assert all(e["format"] == FORMAT_VERSION for e in layout.values())
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = random_ids(base, 2, 16, seed=9)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert relative_logits_error(reloaded, ft, base, ids) < 0.3  # the base alone scores 1.0


def test_u_overhead_grows_with_rank_not_output_width():
    """A rank-2 8-bit band of a 576 x 576 layer: format 1 paid a scale and a zero for each of 576 output rows; format
    2 pays one per singular vector and group of 128 outputs."""
    m = n = 576
    v2 = band_nbytes(m, n, 8, 2, 128)
    u_codes = 2 * m  # 8-bit codes of U
    assert v2 == (2 * n + 2 * 5 * 3) + (u_codes + 2 * 5 * 3) + 2 * 4  # V + U (codes, fp16 scales, u8 zeros) + S
    v1_u = m * 1 * 4 + m * 1 * 3  # one int32 word and one scale/zero per row for rank 2
    assert v2 < 2 * n + 2 * 5 * 3 + v1_u  # the format-1 U alone costs more than format 2's whole band


@pytest.mark.parametrize("ratio", ["1/8", "1/16", "1/32", "1/64", "1/128"])
def test_the_file_fits_the_ratio(wide_pair, tmp_path, ratio):
    """The whole adapter_model.safetensors (header, dense extras, bias deltas, factors) fits ratio x the fp16 delta of
    the target linears, for the default method and the baselines."""
    base, _ = wide_pair
    target = sum(2 * m.out_features * m.in_features for n, m in base.named_modules() if ".layers." in n
                 and isinstance(m, torch.nn.Linear))  # fmt: skip
    budget = int(target / int(ratio.split("/")[1]))
    for method in ("deltacome", "dare", "lowrank", "svd-uniform"):
        folder = tmp_path / method
        _compress(wide_pair, ratio=ratio, method=method).save_pretrained(folder)
        s = summarize_adapter(folder)
        parts = f"header {s.header_bytes:,} + extras {sum(s.extras.values()):,} + factors {s.factor_bytes:,}"
        assert s.file_bytes == s.header_bytes + sum(s.extras.values()) + s.factor_bytes
        assert s.file_bytes <= budget, f"{method} at {ratio}: {parts} = {s.file_bytes:,} B > budget {budget:,} B"
        if method == "deltacome" and ratio in ("1/8", "1/16"):
            assert s.factor_bytes > 0.5 * budget, f"{method} at {ratio} leaves the budget unused: {parts}"


def test_extras_that_do_not_fit_are_refused_before_any_work(wide_pair):
    base, _ = wide_pair
    ft = make_finetune(base, seed=3, embedding_rows=3)  # the whole embedding (and lm_head) is carried dense
    with pytest.raises(ConfigError, match=r"model\.embed_tokens.*nothing is left for the compressed linears"):
        compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio="1/128", quantizer="rtn"), progress=False)


def test_corruption_inside_a_blob_is_named(wide_pair, tmp_path):
    model = _compress(wide_pair, ratio="1/8")
    model.save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS_NAME
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("q_proj.deltacome_delta.blob"))
    entry = model.peft_config["default"].layout[key.split("base_model.model.", 1)[1].split(".deltacome_delta")[0]]
    parts = layout_tensors(entry, parts=True)
    zeros, spec = next((p, spec) for p, spec in parts.items() if p.endswith("v.zeros") and spec.bits < 8)
    blob = tensors[key].clone()
    blob[spec.offset : spec.offset + math.prod(spec.shape)] = 200
    save_file({**tensors, key: blob}, str(path), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=rf"{zeros}.*zero point 200, out of range for {spec.bits}-bit codes"):
        read_adapter(tmp_path)
    s_part = next(p for p in parts if p.endswith(".s"))
    spec = parts[s_part]
    blob = tensors[key].clone()
    blob[spec.offset : spec.offset + 4].view(torch.float32)[0] = float("nan")
    save_file({**tensors, key: blob}, str(path), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=rf"{s_part}.*contains NaN"):
        PeftModel.from_pretrained(copy.deepcopy(wide_pair[0]), tmp_path)


def test_blob_views_survive_moves_and_dtype_casts():
    entry = {"shape": [40, 24], "bands": [[8, 2], [3, 5], [2, 9]], "group_size": 16, "bias": True, "format": 2}
    d = PackedDelta.from_layout(entry)
    with torch.no_grad():
        d.blob.copy_(torch.randint(0, 2, d.blob.shape, dtype=torch.uint8))
        for band in d.bands:
            band.s.fill_(0.5)
            band.u.scales.fill_(0.01)
            band.v.scales.fill_(0.01)
    before = d.delta_weight()
    d = d.to(torch.bfloat16)  # codes, scales and S keep their dtypes: only devices move
    assert d.blob.dtype == torch.uint8 and d.bands[0].s.dtype == torch.float32
    d.bands[0].s.mul_(2)  # a view: writes reach the blob
    assert not torch.equal(d.delta_weight(), before)
    assert set(d.state_dict()) == {"blob"} and d.nbytes() == d.blob.numel()


def test_info_shows_the_parts_against_the_budget(wide_pair, tmp_path, capsys):
    _compress(wide_pair, ratio="1/16").save_pretrained(tmp_path)
    assert cli_main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "format 2" in out and "safetensors header" in out and "is within" in out
    assert "planned for the whole file" in out
    unspent = json.loads((tmp_path / "adapter_config.json").read_text())["compression_info"]["unspent"]
    assert f"the modules' budgets sum to {unspent['offered_bytes']:,} B; {unspent['unspent_bytes']:,} B" in out
    taker = {"dare": "the DARE parts took", "vq": "the vq parts took", "bands": "the last bands took",
             "none": "anything took"}
    assert f"{unspent['unspent_before']:,} B before {taker[unspent['spent_on']]}" in out, out
    both = _plan_lines({"unspent": {**unspent, "spent_on": "sparse bands+bands"}})
    assert any("before the sparse bands and the last bands took what the modules left" in line for line in both)
    assert cli_main(["info", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["header_bytes"] + data["dense_extra_bytes"] + data["factor_bytes"] == data["file_bytes"]
    assert os.path.getsize(tmp_path / ADAPTER_WEIGHTS_NAME) == data["file_bytes"]


@pytest.mark.slow
def test_smollm2_file_fits_every_ratio_and_the_header_is_small(tmp_path):
    """SmolLM2-135M and its `dates` fine-tune (210 targets, 61 changed norms carried dense), round-to-nearest: at every
    ratio from 1/8 to 1/128 the whole file fits the ratio, and at 1/128 the safetensors header is under 5% of the file
    (format 1 wrote a 0.66 MB header: 4,471 names)."""
    import zoo

    from hf_deltacome.compression.svd import reuse_svd

    base, _ = zoo.load_smollm2()
    ft = type(base).from_pretrained(zoo.finetune("dates")).eval()
    with reuse_svd():
        for ratio in ("1/8", "1/16", "1/32", "1/64", "1/128"):
            folder = tmp_path / ratio.replace("/", "_")
            model = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=ratio, quantizer="rtn"), progress=False)
            model.save_pretrained(folder)
            s = summarize_adapter(folder)
            budget = int(s.target_fp16_bytes / int(ratio.split("/")[1]))
            parts = f"header {s.header_bytes:,} + extras {sum(s.extras.values()):,} + factors {s.factor_bytes:,}"
            assert s.file_bytes <= budget, f"{ratio}: {parts} = {s.file_bytes:,} B > {budget:,} B"
    assert s.header_bytes < 0.05 * s.file_bytes, f"1/128: {parts}"


@pytest.mark.parametrize("keep", [0.06, 0.5])
def test_dare_part_runs_sparse_at_low_keep_and_follows_writes(keep):
    """A DARE part's forward multiplies by a CSR matrix at low keep-rates (8 bytes a kept entry, no dense copy of the
    delta kept) and by the dense matrix above ``CSR_MAX_KEEP``; both equal the dense product, in the input's dtype,
    and a write to the stored values is seen by the next forward."""
    from hf_deltacome.format.baseline_parts import CSR_MAX_KEEP, SparsePart, sparse_mask
    from hf_deltacome.quant.rtn import quantize_rtn

    m, n, seed = 96, 80, 5
    nnz = int(sparse_mask(m, n, keep, seed).sum())
    part = SparsePart(m, n, nnz, keep, seed, 2, 128)
    part.values.set(quantize_rtn(torch.randn(1, nnz, generator=torch.Generator().manual_seed(0)), 2, 128))
    x = torch.randn(3, 4, n)
    torch.testing.assert_close(part.forward_delta(x), x @ part.delta_weight().t(), rtol=1e-5, atol=1e-5)
    assert part.forward_delta(x.bfloat16()).dtype == torch.bfloat16
    weight = part.forward_weight()
    assert (weight.layout == torch.sparse_csr) == (keep <= CSR_MAX_KEEP)
    if weight.layout == torch.sparse_csr:
        assert weight.values().numel() == nnz and weight.col_indices().dtype == torch.int32
    before = part.forward_delta(x)
    with torch.no_grad():
        part.values.scales.mul_(2)
    torch.testing.assert_close(part.forward_delta(x), 2 * before, rtol=1e-5, atol=1e-5)


def test_dare_part_input_gradient_is_torchs_own_through_a_stored_transpose():
    """Where its input needs a gradient (scale distillation's backward passes), a CSR DARE part multiplies the
    gradient by a stored CSR transpose: bit for bit the gradient of torch's own CSR product, kept zeros included;
    the transpose is built once, only then, and `forget` drops it."""
    from hf_deltacome.format.baseline_parts import SparsePart, sparse_mask
    from hf_deltacome.quant.rtn import quantize_rtn

    m, n, seed, keep = 96, 80, 5, 0.2
    nnz = int(sparse_mask(m, n, keep, seed).sum())
    part = SparsePart(m, n, nnz, keep, seed, 2, 128)
    values = torch.randn(1, nnz, generator=torch.Generator().manual_seed(0))
    values[0, ::7] = 0.0  # kept entries whose value is zero stay entries of both matrices
    part.values.set(quantize_rtn(values, 2, 128))
    x, grad = torch.randn(3, 4, n, requires_grad=True), torch.randn(3, 4, m)
    with torch.no_grad():
        part.forward_delta(x)
    assert not part._store._derived  # the forward matrix went to the capped cache, no transpose yet
    part.forward_delta(x).backward(grad)
    built = part._store._derived["csr_t"][1]
    weight, own = part.forward_weight(), x.detach().clone().requires_grad_(True)
    torch.sparse.mm(weight, own.reshape(-1, n).t()).t().reshape(3, 4, m).backward(grad)
    assert torch.equal(x.grad, own.grad)
    assert built._nnz() == weight._nnz() == nnz
    part.forward_delta(x).backward(grad)
    assert part._store._derived["csr_t"][1] is built
    part._store.forget("csr_t")
    assert "csr_t" not in (part._store._derived or {}) and dequant_cache.holds(part._store, "csr")
