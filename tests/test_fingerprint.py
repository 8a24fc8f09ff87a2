"""The base-model fingerprint (version 2): every weight is sketched, so any edit that survives the dtype's rounding
is caught (single rows of any matrix, single entries of any vector, rescales, swapped tensors), while the same weights
in float32, bfloat16 or float16 are accepted; version-1 fingerprints are still checked; the PEFT load path refuses a
modified base. ``test_trust.py`` holds the older, general checks (wrong architecture/vocabulary, strict=False, ...).
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from tiny_models import logits, make_finetune, make_model, random_ids

import hf_deltacome.io.fingerprint as fpm
import hf_deltacome.io.weight_sketch as sketch_mod
from hf_deltacome import BaseModelMismatchError, ConfigError, DeltaCoMeConfig, compress
from hf_deltacome.errors import WeakBaseCheckWarning
from hf_deltacome.io.fingerprint import (
    BaseModelMismatchWarning,
    check_fingerprint,
    compute_fingerprint,
    fingerprint_json,
    parse_fingerprint,
)

V1_FIXTURE = Path(__file__).with_name("fingerprint_v1.json")  # written by the version-1 code (commit 4c4a1d1)
MODELS = {
    "llama": lambda seed=0: make_model("llama", seed=seed),
    "qwen2": lambda seed=0: make_model("qwen2", seed=seed),  # q/k/v biases
    "tied": lambda seed=0: make_model("llama", seed=seed, tie_word_embeddings=True),
}
FPS = {name: compute_fingerprint(make()) for name, make in MODELS.items()}  # float32 fingerprints


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())  # tied weights appear once, under the embedding's name


def refused(fp: dict, model: torch.nn.Module, *names: str) -> str:
    """Assert that ``model`` is refused, naming ``names``; return the message."""
    with pytest.raises(BaseModelMismatchError, match="the weights differ") as err:
        check_fingerprint(fp, model)
    msg = str(err.value)
    for name in names:
        assert name in msg, msg
    return msg


def accepted(fp: dict, model: torch.nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no weak-check note either: this is the exact path
        assert check_fingerprint(fp, model) == []


# ------------------------------------------------------------------------------------------------------------
# what is detected
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(MODELS))
def test_every_single_row_edit_of_one_percent_is_detected(arch):
    """Each matrix in turn: one random row moved by exactly 1% of its norm in a random direction; each vector: one
    random entry moved by 1% of itself. Every edit is refused, naming the tensor and the rows around the edit."""
    model, fp = MODELS[arch](), FPS[arch]
    g = torch.Generator().manual_seed(11)
    for name, p in params(model).items():
        original = p.detach().clone()
        with torch.no_grad():
            if p.dim() == 2:  # any row but an all-zero one (the padding token's embedding), where 1% is nothing
                rows = p.norm(dim=1).nonzero().flatten()
                i = int(rows[torch.randint(len(rows), (1,), generator=g)])
                d = torch.randn(p.shape[1], generator=g)
                p[i] += d * (0.01 * p[i].norm() / d.norm())
            else:
                i = int(torch.randint(p.shape[0], (1,), generator=g))
                p[i] *= 1.01
        msg = refused(fp, model, name)
        lo, hi = map(int, re.search(re.escape(name) + r" rows (\d+)-(\d+)", msg).groups())
        assert lo <= i <= hi
        with torch.no_grad():
            p.copy_(original)
    accepted(fp, model)  # every edit undone: the same base again


@settings(max_examples=60, deadline=None, database=None)
@given(
    arch=st.sampled_from(list(MODELS)),
    which=st.integers(0, 10**6),
    row=st.integers(0, 10**6),
    kind=st.sampled_from(["dense", "one entry", "scale row", "swap rows"]),
    size=st.floats(0.01, 0.5),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_row_edits_property(arch, which, row, kind, size, seed, dtype):
    """Any matrix, any row, any kind of edit of relative size >= 1% of the row norm, loaded in any dtype: refused
    (a 1% change of a row survives any 16-bit rounding: each rounding moves the row by at most 2**-8 of its norm)."""
    model, fp = MODELS[arch](), FPS[arch]
    matrices = [(n, p) for n, p in params(model).items() if p.dim() == 2]
    name, p = matrices[which % len(matrices)]
    i = row % p.shape[0]
    assume(p[i].norm() > 0)  # 1% of the padding token's all-zero embedding is no change
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = p[i].clone()
        if kind == "dense":
            d = torch.randn(p.shape[1], generator=g)
            p[i] += d * (size * w.norm() / d.norm())
        elif kind == "one entry":
            j = int(torch.randint(p.shape[1], (1,), generator=g))
            p[i, j] += size * w.norm() * (1 if seed % 2 else -1)
        elif kind == "scale row":
            p[i] *= 1 + size
        else:  # another row's values, which differ from this row's by far more than 1%
            p[i] = p[(i + 1 + seed % (p.shape[0] - 1)) % p.shape[0]].clone()
    assert (p[i] - w).norm() >= 0.0099 * w.norm()
    refused(fp, model.to(dtype), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_uniform_rescale_and_swapped_tensors_are_detected(dtype):
    """x1.005 of any one tensor (below bf16's 2**-8 relative spacing for some values, above it for others) is refused
    in every load dtype; so is any tensor replaced by the same tensor of another checkpoint."""
    fp = FPS["qwen2"]
    other = params(MODELS["qwen2"](seed=7))
    for name in params(MODELS["qwen2"]()):
        scaled, swapped = MODELS["qwen2"](), MODELS["qwen2"]()
        with torch.no_grad():
            params(scaled)[name].mul_(1.005)
            params(swapped)[name].copy_(other[name])
        refused(fp, scaled.to(dtype), name)
        if not name.endswith("norm.weight"):  # norms are all ones at init, in every checkpoint
            refused(fp, swapped.to(dtype), name)


@pytest.mark.parametrize("arch", ["llama", "tied"])
def test_replaced_embedding_is_detected(arch):
    model = MODELS[arch]()
    donor = MODELS[arch](seed=3)
    model.set_input_embeddings(donor.get_input_embeddings())
    if arch == "tied":
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    refused(FPS[arch], model, "model.embed_tokens.weight")
    model = MODELS[arch]()
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = donor.model.embed_tokens.weight[5]  # one token's embedding
    refused(FPS[arch], model, "model.embed_tokens.weight rows 0-249")


def test_error_names_the_base_and_the_first_tensors():
    model = MODELS["llama"]()
    model.config._name_or_path = "someone/edited-base"
    names = sorted(n for n, p in params(model).items() if p.dim() == 2)[:5]
    with torch.no_grad():
        for n in names:
            params(model)[n][1] *= 1.02
    msg = refused(FPS["llama"], model, *names[:3])  # in name order
    assert "compressed against base tiny-random-llama (LlamaForCausalLM, vocab 250" in msg
    assert "loaded onto someone/edited-base" in msg and "5 of 21 tensors" in msg and "(2 more)" in msg


# ------------------------------------------------------------------------------------------------------------
# what is accepted
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_same_weights_in_other_dtypes_are_accepted_exactly(arch, dtype):
    """A float32 fingerprint accepts the float32 weights cast to any float dtype, with no weak-check note."""
    accepted(FPS[arch], MODELS[arch]().to(dtype))


@pytest.mark.parametrize("fingerprinted", [torch.bfloat16, torch.float16])
def test_16_bit_fingerprints_of_16_bit_checkpoints(fingerprinted):
    """A real checkpoint is stored in 16 bits; fingerprinted in either 16-bit dtype, its copies in every dtype are
    accepted exactly (for a float16 checkpoint the float16 rounding is stored besides the bfloat16 one)."""
    checkpoint = MODELS["qwen2"]().to(fingerprinted)
    fp = compute_fingerprint(checkpoint)
    if fingerprinted == torch.float16:
        assert set(fp["sketch"]["dtypes"]) == {"h", "H"}  # "H": a float16 rounding stored (not for the norms: ones)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        accepted(fp, copy.deepcopy(checkpoint).to(dtype))


def test_roundings_that_cannot_be_reproduced_are_checked_loosely_with_a_note():
    """float32 original, fingerprinted in float16, loaded in bfloat16: two roundings of an original the fingerprint
    never saw. Accepted with a note; a x1.01 rescale is still refused."""
    fp = compute_fingerprint(MODELS["llama"]().half())
    with pytest.warns(WeakBaseCheckWarning, match="fingerprinted in float16 and are loaded in bfloat16"):
        assert check_fingerprint(fp, MODELS["llama"]().bfloat16()) == []
    scaled = MODELS["llama"]()
    with torch.no_grad():
        scaled.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    msg = refused(fp, scaled.bfloat16(), "model.layers.0.mlp.up_proj.weight")
    assert "1 of 21 tensors" in msg and "Note: 15 weights were fingerprinted in float16" in msg


def test_low_precision_float32_matmuls_cost_time_not_a_false_refusal(monkeypatch):
    """On CPU the check multiplies in float32 first; were float32 matmuls rounded lower (oneDNN bf16 modes), each
    tensor is recomputed in float64 before a verdict: the right base passes, an edited one is still refused."""
    exact = sketch_mod._sketch

    def coarse(t, dtype, params, fast=False):
        z, scale = exact(t, dtype, params, fast)
        return (z * (1 + 2.0**-9) if fast else z), scale  # bf16-sized error in the fast path only

    monkeypatch.setattr(sketch_mod, "_sketch", coarse)
    accepted(FPS["qwen2"], MODELS["qwen2"]().bfloat16())
    model = MODELS["qwen2"]()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias[3] *= 1.01
    refused(FPS["qwen2"], model, "model.layers.0.self_attn.k_proj.bias rows 0-23")


def test_unreadable_weights_are_skipped_and_named():
    """Weights on the meta device without an offload map are compared by name and shape and reported."""
    model = MODELS["llama"]()
    model.model.layers[1].mlp.down_proj.to_empty(device="meta")
    with pytest.warns(WeakBaseCheckWarning, match="1 of 21 weights could not be read.*layers.1.mlp.down_proj.weight"):
        assert check_fingerprint(FPS["llama"], model) == []
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3] *= 1.05
    msg = refused(FPS["llama"], model, "model.layers.0.mlp.down_proj.weight")
    assert "could not be read" in msg and "layers.1.mlp.down_proj.weight" in msg


def test_offloaded_weights_are_read_from_the_offload_map(tmp_path):
    from accelerate import cpu_offload, disk_offload

    accepted(FPS["llama"], cpu_offload(MODELS["llama"](), execution_device=torch.device("cpu")))
    edited = MODELS["llama"]()
    with torch.no_grad():
        edited.model.layers[1].self_attn.o_proj.weight[7] *= 1.02
    offloaded = disk_offload(edited, str(tmp_path), execution_device=torch.device("cpu"))
    assert next(offloaded.parameters()).device.type == "meta"
    refused(FPS["llama"], offloaded, "model.layers.1.self_attn.o_proj.weight")


# ------------------------------------------------------------------------------------------------------------
# format, version 1, malformed fingerprints
# ------------------------------------------------------------------------------------------------------------


def test_stored_form_is_compact_and_round_trips_through_json():
    text = fingerprint_json(MODELS["llama"]())
    fp = json.loads(text)
    assert fp["version"] == 2 and "samples" not in fp and len(fp["sketch"]["dtypes"]) == fp["num_tensors"] == 21
    # 16 matrices of 1 bucket x 8 projections and 5 vectors of 1 x 1, float32, base64
    assert len(fp["sketch"]["bf16"]) == 4 * ((16 * 8 + 5) * 4 + 2) // 3
    assert check_fingerprint(text, MODELS["llama"]()) == []


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_version_1_fingerprints_are_still_checked_with_a_one_time_note(arch):
    v1 = json.loads(V1_FIXTURE.read_text())[arch]
    assert parse_fingerprint(v1)["version"] == 1
    fpm._V1_NOTED.discard(f"adapter 'old-{arch}'")
    with pytest.warns(WeakBaseCheckWarning, match="version-1 base fingerprint"):
        assert check_fingerprint(v1, MODELS[arch](), adapter=f"old-{arch}") == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the note is given once
        assert check_fingerprint(v1, MODELS[arch]().bfloat16(), adapter=f"old-{arch}") == []
        with pytest.raises(BaseModelMismatchError, match="sampled tensors"):
            check_fingerprint(v1, MODELS[arch](seed=7), adapter=f"old-{arch}")


def _mutations() -> st.SearchStrategy:
    json_values = st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=8) | st.floats()
    keys = ["version", "structure_hash", "num_tensors", "sketch", "samples", "extra"]
    sketch_keys = ["rows_per_bucket", "projections", "seed", "dtypes", "bf16", "fp16"]
    return st.one_of(
        st.tuples(st.just("top"), st.sampled_from(keys), json_values),
        st.tuples(st.just("sketch"), st.sampled_from(sketch_keys), json_values | st.integers(1, 9)),
        st.tuples(st.just("drop"), st.sampled_from(sketch_keys), st.none()),
        st.tuples(st.just("blob"), st.sampled_from(["bf16", "fp16"]), st.integers(0, 600)),
        st.tuples(st.just("dtypes"), st.integers(0, 20), st.sampled_from(list("fbhdoFBHDO-x"))),
    )


@settings(max_examples=60, deadline=None, database=None)
@given(mutation=_mutations())
def test_edited_fingerprints_fail_with_our_errors(mutation):
    """A hand-edited fingerprint is a ConfigError (or, when still well formed, a mismatch): never a raw traceback."""
    fp = json.loads(json.dumps(FPS["llama"]))
    where, key, value = mutation
    if where == "top":
        fp[key] = value
    elif where == "sketch":
        fp["sketch"][key] = value
    elif where == "drop":
        del fp["sketch"][key]
    elif where == "blob":
        fp["sketch"][key] = fp["sketch"][key][:value] if value % 2 else fp["sketch"]["bf16"][value % 7 :] + "AAAA"
    else:
        codes = list(fp["sketch"]["dtypes"])
        codes[key] = value
        fp["sketch"]["dtypes"] = "".join(codes)
    try:
        check_fingerprint(fp, MODELS["llama"](), adapter="edited")
    except ConfigError as e:
        assert "adapter 'edited'" in str(e) and "base_fingerprint" in str(e)
    except BaseModelMismatchError as e:
        assert "adapter 'edited'" in str(e)


# ------------------------------------------------------------------------------------------------------------
# the PEFT load path
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A tiny Llama pair compressed with RTN and saved; and the adapter's logits on the float32 base."""
    base = MODELS["llama"]()
    model = compress(base, make_finetune(base, seed=1), DeltaCoMeConfig(quantizer="rtn"), progress=False)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(folder))
    return folder, logits(model, random_ids(base, 2, 8, seed=3))


def test_peft_refuses_a_modified_base_and_loads_onto_16_bit_copies(compressed):
    folder, expected = compressed
    stored = json.loads((folder / "adapter_config.json").read_text())["base_fingerprint"]
    assert json.loads(stored)["version"] == 2
    modified = MODELS["llama"]()
    with torch.no_grad():
        modified.model.layers[1].mlp.gate_proj.weight[17] *= 1.01
    with pytest.raises(BaseModelMismatchError) as err:
        PeftModel.from_pretrained(modified, str(folder))
    msg = str(err.value)
    assert "model.layers.1.mlp.gate_proj.weight rows 0-159" in msg and str(folder) in msg
    assert "tiny-random-llama (LlamaForCausalLM" in msg
    modified = MODELS["llama"]()
    with torch.no_grad():
        modified.model.embed_tokens.weight[17] *= 1.01
    with pytest.warns(BaseModelMismatchWarning, match="model.embed_tokens.weight rows 0-249"):
        assert isinstance(PeftModel.from_pretrained(modified, str(folder), strict=False), PeftModel)
    for dtype in (torch.bfloat16, torch.float16):
        with warnings.catch_warnings():
            warnings.simplefilter("error", BaseModelMismatchWarning)
            warnings.simplefilter("error", WeakBaseCheckWarning)
            model = PeftModel.from_pretrained(MODELS["llama"]().to(dtype), str(folder)).eval()
        assert isinstance(model, PeftModel)
    loaded = PeftModel.from_pretrained(MODELS["llama"](), str(folder)).eval()
    torch.testing.assert_close(logits(loaded, random_ids(loaded, 2, 8, seed=3)), expected)


@pytest.mark.slow
def test_smollm2_every_weight_covered():
    """SmolLM2-135M (a real checkpoint: tied embeddings, 49152 x 576): an exact match in float32/bfloat16/float16,
    one embedding row moved by 1% refused."""
    from zoo import load_smollm2

    model, _ = load_smollm2()
    fp = compute_fingerprint(model)
    assert len(fp["sketch"]["dtypes"]) == fp["num_tensors"] == 273 and "-" not in fp["sketch"]["dtypes"]
    for dtype in (torch.bfloat16, torch.float16):
        accepted(fp, copy.deepcopy(model).to(dtype))
    with torch.no_grad():
        row = model.model.embed_tokens.weight[31337]
        row += 0.01 * row.norm() * torch.nn.functional.normalize(torch.randn_like(row), dim=0)
    refused(fp, model, "model.embed_tokens.weight rows 31232-31743")
