"""Fuzzing the adapter loader: random and mutated weight files and configs must load or fail with our errors.

Every failure has to be a :class:`DeltaCoMeError` whose message names the file (or folder) it came from; no
``KeyError``/``RuntimeError``/safetensors exception may escape, and nothing may crash the process.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from test_trust import fresh_base, make_adapter

from hf_deltacome import DeltaCoMeError
from hf_deltacome.io.adapter_files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[bytes, bytes]:
    """``(adapter_config.json bytes, adapter_model.safetensors bytes)`` of a valid adapter."""
    folder = tmp_path_factory.mktemp("good")
    make_adapter(fresh_base()).save_pretrained(str(folder))
    return (folder / ADAPTER_CONFIG_NAME).read_bytes(), (folder / ADAPTER_WEIGHTS_NAME).read_bytes()


def model_key(file_key: str) -> str:
    """The loaded PeftModel's state-dict key of an adapter file key (the adapter is named ``default``)."""
    if ".deltacome_delta." in file_key:
        return file_key.replace(".deltacome_delta.", ".deltacome_delta.default.", 1)
    module, _, leaf = file_key.rpartition(".")
    return f"{module}.modules_to_save.default.{leaf}"  # a dense extra


def assert_same_values(loaded: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> None:
    for key, want in stored.items():
        torch.testing.assert_close(loaded[key].cpu(), want, rtol=0, atol=0, equal_nan=True, msg=key)


def check(config: bytes, weights: bytes, load_with_peft: bool = False) -> None:
    """The file loads or fails with our error naming it; what loads holds exactly the file's values."""
    try:
        stored = load_bytes(weights)
    except Exception:
        stored = None  # safetensors itself cannot read it
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        folder = Path(tmp)
        (folder / ADAPTER_CONFIG_NAME).write_bytes(config)
        (folder / ADAPTER_WEIGHTS_NAME).write_bytes(weights)
        try:
            if load_with_peft:
                state = PeftModel.from_pretrained(fresh_base(), str(folder)).state_dict()
                loaded = {k: state[model_key(k)] for k in (stored or {})}
            else:
                loaded = read_adapter(folder)[1]
        except DeltaCoMeError as e:
            assert str(folder) in str(e), f"error does not name the file: {e}"
            return
    assert stored is not None, "accepted a file that safetensors cannot read"
    if not load_with_peft:
        assert sorted(loaded) == sorted(stored)
    assert_same_values(loaded, stored)


# ------------------------------------------------------------------------------------------------------------
# weight file mutations
# ------------------------------------------------------------------------------------------------------------


def _split(weights: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + n]), weights[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=10
)


@st.composite
def mutated_weights(draw, weights: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "truncate", "flip", "header", "tensor"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "truncate":
        return weights[: draw(st.integers(0, len(weights) - 1))]
    if kind == "flip":
        data = bytearray(weights)
        for _ in range(draw(st.integers(1, 6))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        return bytes(data)
    header, data = _split(weights)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    if kind == "header":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "metadata"]))
        if field == "dtype":
            header[name]["dtype"] = draw(
                st.sampled_from(["F32", "F16", "BF16", "I32", "U8", "I64", "F64", "BOOL", "X9"])
            )
        elif field == "shape":
            header[name]["shape"] = draw(st.lists(st.integers(-2, 70), max_size=3) | json_values)
        elif field == "data_offsets":
            header[name]["data_offsets"] = draw(
                st.lists(st.integers(-5, len(data) + 5), min_size=2, max_size=2) | json_values
            )
        elif field == "entry":
            header[name] = draw(json_values)
        else:
            header["__metadata__"] = draw(json_values)
        return _join(header, data)
    # tensor-level edits through safetensors itself, so the file is well formed and the validator must catch it
    tensors = load_bytes(weights)
    edit = draw(st.sampled_from(["dtype", "shape", "nan", "inf", "drop", "add", "values"]))
    t = tensors[name]
    if edit == "dtype":
        tensors[name] = t.to(
            draw(st.sampled_from([torch.float32, torch.float16, torch.int32, torch.uint8, torch.int64]))
        )
    elif edit == "shape":
        tensors[name] = torch.zeros(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3)), dtype=t.dtype)
    elif edit in ("nan", "inf") and t.is_floating_point() and t.numel():
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = float("nan") if edit == "nan" else float("-inf")
    elif edit == "drop":
        del tensors[name]
    elif edit == "add":
        tensors[draw(st.sampled_from([name + "x", "base_model.model.lm_head.weight", "junk"]))] = torch.zeros(2)
    elif t.numel():
        flat = t.view(-1)
        idx = draw(st.integers(0, t.numel() - 1))
        if t.is_floating_point():
            flat[idx] = draw(st.floats(width=16, allow_nan=True, allow_infinity=True))
        elif t.dtype == torch.uint8:
            flat[idx] = draw(st.integers(0, 255))
        else:
            flat[idx] = draw(st.integers(-(2**31), 2**31 - 1))
    return save_bytes(tensors, metadata={"format": "pt"})


def test_the_good_adapter_loads_with_its_values(good):
    """The unmutated adapter loads through both paths, and the value check compares every tensor."""
    config, weights = good
    stored = load_bytes(weights)
    assert any(".deltacome_delta." in k for k in stored) and any(".deltacome_delta." not in k for k in stored)
    check(config, weights)
    check(config, weights, load_with_peft=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / ADAPTER_CONFIG_NAME).write_bytes(config)
        (Path(tmp) / ADAPTER_WEIGHTS_NAME).write_bytes(weights)
        state = PeftModel.from_pretrained(fresh_base(), tmp).state_dict()
    key = next(k for k in stored if k.endswith(".s"))
    state[model_key(key)].add_(1.0)  # a loader that changed one value would be caught
    with pytest.raises(AssertionError, match=key.replace(".", r"\.")):
        assert_same_values({k: state[model_key(k)] for k in stored}, stored)


@FAST
@given(data=st.data())
def test_fuzz_weight_files(good, data):
    config, weights = good
    check(config, data.draw(mutated_weights(weights)))


# ------------------------------------------------------------------------------------------------------------
# config mutations
# ------------------------------------------------------------------------------------------------------------


@st.composite
def mutated_config(draw, config: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "top", "layout", "band", "drop", "text"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return json.dumps(draw(json_values)).encode()
    data = json.loads(config)
    if kind == "top":
        key = draw(st.sampled_from(sorted(data) + ["new_field"]))
        data[key] = draw(json_values)
    elif kind == "drop":
        del data[draw(st.sampled_from(sorted(data)))]
    else:
        module = draw(st.sampled_from(sorted(data["layout"])))
        entry = data["layout"][module]
        if kind == "layout":
            field = draw(st.sampled_from(["shape", "bands", "group_size", "bias", "extra"]))
            entry[field] = draw(json_values | st.lists(st.integers(-3, 200), max_size=3) | st.integers(-3, 300))
        else:
            k = draw(st.integers(0, len(entry["bands"]) - 1))
            entry["bands"][k] = draw(
                st.lists(st.integers(-2, 40), min_size=2, max_size=2)
                | st.tuples(json_values, json_values)
                | json_values
            )
    return json.dumps(data).encode()


@FAST
@given(data=st.data())
def test_fuzz_configs(good, data):
    config, weights = good
    check(data.draw(mutated_config(config)), weights)


# ------------------------------------------------------------------------------------------------------------
# the whole PEFT path
# ------------------------------------------------------------------------------------------------------------


@SLOW
@given(data=st.data())
def test_fuzz_peft_from_pretrained(good, data):
    config, weights = good
    check(config, data.draw(mutated_weights(weights)), load_with_peft=True)
