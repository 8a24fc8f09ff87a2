"""Vector-quantized deltas (format/vq_part.py, quant/vq.py): the rotated delta's vectors as 4-bit codes."""

import copy
import math

import pytest
import torch
from peft import PeftModel
from tiny_models import logits, make_finetune, make_model, random_ids

from hf_deltacome import ConfigError, DeltaCoMeConfig, DeltaCoMeError
from hf_deltacome.compression.baselines import vq_plan
from hf_deltacome.compression.modules import compress_module, entry_nbytes, plan_entry
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.format.budget import budget_bytes
from hf_deltacome.format.packing import pack_nibbles, unpack_nibbles
from hf_deltacome.format.storage import VQ_FORMAT, PackedDelta, VectorPart
from hf_deltacome.format.vq_part import rotate, rotate_matrix, rotation, vq_part_nbytes
from hf_deltacome.quant.vq import output_fitted_codes, vq_fit


def spread_delta(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A full-rank delta with unequal rows and columns (what a knowledge fine-tune's MLP delta looks like)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.exp(torch.randn(m, 1, generator=g)), torch.exp(torch.randn(1, n, generator=g) * 0.5)
    return torch.randn(m, n, generator=g) * rows * cols * 1e-3


def test_codes_pack_and_unpack_exactly():
    idx = torch.randint(0, 16, (1001,), generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(idx)
    assert packed.dtype == torch.uint8 and packed.numel() == 501
    assert torch.equal(unpack_nibbles(packed, 1001), idx)


@pytest.mark.parametrize("n", [576, 1536, 97, 64])
def test_rotations_are_orthogonal_seeded_and_invertible(n):
    q = rotation(n, 7, 1)
    x = torch.randn(5, n)
    y = rotate(x, q)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))
    torch.testing.assert_close(rotate(y, q, inverse=True), x, atol=1e-5, rtol=1e-5)
    rotation.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(q, rotation(n, 7, 1)))  # regenerated bit for bit from the seed
    assert not torch.equal(rotate(x, rotation(n, 8, 1)), y)
    w = torch.randn(24, n)
    torch.testing.assert_close(rotate_matrix(rotate_matrix(w, 3), 3, inverse=True), w, atol=1e-5, rtol=1e-5)


def test_part_stores_what_was_fitted_and_its_forward_is_its_weight():
    d = spread_delta(48, 64)
    rows, dim = 40, 8
    idx, table, scale = vq_fit(d, rows, dim, 16, seed=5)
    part = VectorPart(48, 64, rows, dim, 16, 5)
    part.set(idx, table, scale)
    want = table.half().float()[idx].reshape(-1)[: rows * 64].reshape(rows, 64) * scale
    torch.testing.assert_close(part.rotated_rows(), want)
    w = part.delta_weight()
    full = torch.zeros(48, 64)
    full[:rows] = want
    torch.testing.assert_close(w, rotate_matrix(full, 5, inverse=True))
    x = torch.randn(3, 7, 64)
    torch.testing.assert_close(part.forward_delta(x), x @ w.t(), atol=1e-6, rtol=1e-4)


def test_error_falls_as_vectors_get_shorter_and_the_delta_is_not_shrunk():
    d = spread_delta(256, 384)  # thousands of vectors: no room for the codebook to fit them one by one
    errors = []
    for dim in (16, 8, 4, 2):
        idx, table, scale = vq_fit(d, 256, dim, 16, seed=1)
        part = VectorPart(256, 384, 256, dim, 16, 1)
        part.set(idx, table, scale)
        w = part.delta_weight()
        errors.append(float((w - d).norm() / d.norm()))
        # stretched so that its projection on the delta is the delta (k-means alone keeps 1 - D of it)
        assert abs(float((w * d).sum() / (d * d).sum()) - 1.0) < 2e-3, dim
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0], errors


def correlated_hessian(n: int, seed: int = 0) -> torch.Tensor:
    """``XᵀX / N`` of inputs with a few strong, correlated directions (as a transformer's activations have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g) + 6 * torch.randn(4 * n, 3, generator=g) @ torch.randn(3, n, generator=g)
    return x.t() @ x / x.shape[0]


def rotated_error(d: torch.Tensor, rows: int, dim: int, seed: int, fit, h: torch.Tensor) -> float:
    """``tr(E H Eᵀ) / tr(Δ H Δᵀ)`` of the part ``vq_fit`` stores for ``d`` (its first ``rows`` rotated rows)."""
    m, n = d.shape
    part = VectorPart(m, n, rows, dim, 16, seed)
    part.set(*fit)
    e = (part.delta_weight() - d).double()
    return float(((e @ h.double()) * e).sum() / ((d.double() @ h.double()) * d.double()).sum())


@pytest.mark.parametrize("dim", [4, 8, 16])
def test_output_fitted_codes_lower_the_output_error(dim):
    d, h = spread_delta(96, 128), correlated_hessian(128)
    plain = vq_fit(d, 90, dim, 16, seed=3)
    fitted = vq_fit(d, 90, dim, 16, seed=3, hessian=h)
    torch.testing.assert_close(fitted[1], plain[1])  # the same codebook: the codes and their stretch differ
    assert not torch.equal(fitted[0], plain[0])
    before, after = rotated_error(d, 90, dim, 3, plain, h), rotated_error(d, 90, dim, 3, fitted, h)
    assert after < 0.7 * before, (before, after)
    part = VectorPart(96, 128, 90, dim, 16, 3)
    part.set(*fitted)
    y = rotate_matrix(d, 3)[:90]  # the stored rows' output along the delta's is the delta's: not shrunk
    yh = (y @ rotate(rotate(h, rotation(128, 3, 1)).t(), rotation(128, 3, 1)).t()).double()
    assert abs(float((yh * part.rotated_rows()).sum() / (yh * y).sum()) - 1.0) < 1e-4


def test_output_fitted_codes_in_windows_are_the_block_by_block_codes():
    """The errors of a window of blocks reach the columns past it in one product (GPTQ's lazy batch): the same
    sums as pushing each block's error on at once, so the same codes (a rounding-level tie aside) whatever the
    window, one not a multiple of the dim and one past the width included."""
    g = torch.Generator().manual_seed(5)
    y, h, table = torch.randn(70, 160, generator=g), correlated_hessian(160), torch.randn(16, 8, generator=g)
    one = output_fitted_codes(y, h, table, 1.0, window=8)  # one block at a time: every error pushed on at once
    for window in (16, 44, 128, 1000):
        codes = output_fitted_codes(y, h, table, 1.0, window=window)
        assert (codes != one).sum() <= 1, window


def test_output_fitted_codes_under_an_isotropic_hessian_are_the_nearest_stored_entries():
    d = spread_delta(64, 96)
    _, table, scale = vq_fit(d, 64, 8, 16, seed=2)
    idx = vq_fit(d, 64, 8, 16, seed=2, hessian=torch.eye(96) * 3.0)[0]  # no column weighs more than another
    vectors = rotate_matrix(d, 2).reshape(-1, 8)
    assert torch.equal(idx, torch.cdist(vectors, table.half().float() * scale).argmin(1))  # nothing pushed on


def test_vectors_that_straddle_rows_keep_their_nearest_codes():
    d = spread_delta(40, 70)  # 70 is no multiple of 8: a vector spans two rows, no column block is whole
    plain = vq_fit(d, 40, 8, 16, seed=4)
    assert torch.equal(vq_fit(d, 40, 8, 16, seed=4, hessian=correlated_hessian(70))[0], plain[0])


def test_a_hessian_of_the_wrong_width_is_refused_naming_the_module():
    with pytest.raises(DeltaCoMeError, match=r"'a\.mlp\.up_proj'.*\(70, 70\).*\(64, 64\)"):
        vq_fit(spread_delta(160, 64), 160, 8, 16, seed=1, hessian=correlated_hessian(70), name="a.mlp.up_proj")


def test_compress_module_fits_the_codes_to_calibration_activations_with_gptq():
    d, h = spread_delta(160, 64), correlated_hessian(64)
    errors = {}
    for quantizer in ("rtn", "gptq"):
        cfg = DeltaCoMeConfig(method="vq", ratio=1 / 16, quantizer=quantizer)
        entry = plan_entry("a.mlp.up_proj", 160, 64, 1 / 16, cfg)
        factors = compress_module(d, h, entry, cfg, name="a.mlp.up_proj")
        e = (factors.dense(160, 64, vq_entry=entry["vq"]) - d).double()
        errors[quantizer] = float(((e @ h.double()) * e).sum())
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


@pytest.mark.parametrize("ratio", [1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128])
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (160, 64), (50, 70)])
def test_plan_fills_the_budget_and_the_buffers_are_what_was_budgeted(ratio, shape):
    m, n = shape
    entry = plan_entry("layers.0.mlp.up_proj", m, n, ratio, DeltaCoMeConfig(method="vq", ratio=ratio))
    budget = budget_bytes(m, n, ratio)
    target = 4 * m * n / (8 * budget)  # the weights a 4-bit code the budget pays for, to the nearest divisor of n
    dim = min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(math.log(d / target)))
    vq = entry.get("vq")
    if vq is None:  # the budget does not pay for the codebook and one row
        assert vq_part_nbytes(n, 1, dim) > budget
        return
    assert entry["format"] == VQ_FORMAT and vq["dim"] == dim and n % dim == 0  # no vector straddles two rows
    assert entry_nbytes(entry) <= budget
    assert PackedDelta.from_layout(entry).nbytes() == entry_nbytes(entry)
    if vq["rows"] < m:  # one more row would not fit
        assert vq_part_nbytes(n, vq["rows"] + 1, vq["dim"]) > budget
    if shape == (1536, 576) and ratio == 1 / 32:
        assert vq["dim"] == 8 and vq["rows"] >= 1528  # all but 0.5% of the rows beside a 260-byte codebook


@pytest.mark.parametrize(
    "vq, message",
    [
        ({"dim": 8, "codes": 16, "rows": 0, "seed": 1}, "'vq' must be"),
        ({"dim": 8, "codes": 16, "rows": 65, "seed": 1}, "'vq' must be"),
        ({"dim": 8, "codes": 256, "rows": 4, "seed": 1}, "'vq' must be"),
        ({"dim": 8, "codes": 16, "rows": 4}, "'vq' must be"),
    ],
)
def test_a_bad_vq_entry_is_refused_naming_the_module(vq, message):
    entry = {"shape": [64, 32], "bands": [], "format": 4, "vq": vq}
    with pytest.raises(ConfigError, match=rf"layers\.3\.mlp\.up_proj.*{message}"):
        DeltaCoMeConfig(layout={"model.layers.3.mlp.up_proj": entry}).validate_layout()


def test_a_vq_part_in_an_older_format_is_refused():
    entry = {"shape": [64, 32], "bands": [], "format": 3, "vq": {"dim": 8, "codes": 16, "rows": 4, "seed": 1}}
    with pytest.raises(ConfigError, match="needs format 4"):
        DeltaCoMeConfig(layout={"m.down_proj": entry}).validate_layout()


def test_compress_module_fills_a_packed_delta_that_reproduces_its_factors():
    d = spread_delta(160, 64)
    cfg = DeltaCoMeConfig(method="vq", ratio=1 / 8)
    entry = plan_entry("a.mlp.gate_proj", 160, 64, 1 / 8, cfg)
    factors = compress_module(d, None, entry, cfg, name="a.mlp.gate_proj")
    packed = PackedDelta.from_layout(entry)
    factors.fill(packed)
    torch.testing.assert_close(packed.delta_weight(), factors.dense(160, 64, vq_entry=entry["vq"]))
    assert packed.full_rank and packed.has_extra_parts


def test_full_rank_vq_stores_the_mlp_as_vector_codes_and_loads_back_to_the_same_logits(tmp_path):
    base = make_model("llama")
    ft = make_finetune(base)
    ids = random_ids(base)
    errors = {}
    for full_rank in ("vq", "dare"):
        model = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(ratio=1 / 8, full_rank=full_rank),
                         calibration=ids, progress=False)  # fmt: skip
        assert DeltaCoMeConfig().full_rank == "dare"  # the default: vq is an option (benchmarks/RESULTS.md)
        layout = model.peft_config["default"].layout
        mlp = [e for name, e in layout.items() if name.endswith(("gate_proj", "up_proj", "down_proj"))]
        assert mlp and all(("vq" in e) == (full_rank == "vq") and ("sparse" in e) != (full_rank == "vq") for e in mlp)
        printed = repr(model)  # the printed model shows what the MLP stores, not an empty list of bands
        assert printed.count("VectorPart(" if full_rank == "vq" else "SparsePart(") == len(mlp), printed
        want = logits(model, ids)
        model.save_pretrained(tmp_path / full_rank)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / full_rank)
        assert torch.equal(logits(loaded, ids), want)
        torch.testing.assert_close(logits(loaded.merge_and_unload(), ids), want, atol=1e-4, rtol=1e-4)
        fl, bl = logits(ft, ids), logits(base, ids)
        errors[full_rank] = float((want - fl).norm() / (bl - fl).norm())
    assert errors["vq"] < errors["dare"], errors  # DARE's random drop is noisier at the same bytes


def test_vq_output_error_falls_as_the_budget_grows():
    base = make_model("llama")
    ft = make_finetune(base)
    ids = random_ids(base)
    fl, bl = logits(ft, ids), logits(base, ids)
    errors = []
    for ratio in (1 / 16, 1 / 8, 1 / 4):
        model = compress(copy.deepcopy(base), ft, DeltaCoMeConfig(method="vq", ratio=ratio), calibration=ids,
                         progress=False)  # fmt: skip
        errors.append(float((logits(model, ids) - fl).norm() / (bl - fl).norm()))
    assert errors == sorted(errors, reverse=True), errors


def test_vq_plan_refuses_a_budget_without_room_for_the_codebook():
    assert vq_plan("a", 16, 16, 1 / 128) is None


def test_a_bad_full_rank_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"full_rank must be one of \('dare', 'vq'\), got 'svd'"):
        DeltaCoMeConfig(full_rank="svd")
