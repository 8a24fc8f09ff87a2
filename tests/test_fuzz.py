"""Fuzzing every reader: random and mutated weight files and configs must load cleanly or fail with our errors.

Readers: ``read_adapter``, ``PeftModel.from_pretrained``, transformers' ``model.load_adapter`` and ``deltacome
info`` (in-process, and in a subprocess for batches of folders). Every failure has to be a :class:`DeltaCoMeError`
whose message names the folder; no ``KeyError``/``TypeError``/``RecursionError``/``NotImplementedError``/
safetensors exception may escape, and nothing may crash the process. A clean load must give finite logits.
Mutated weights get a matching ``weights_sha256`` half of the time, so that they reach every check after it.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from test_trust import IDS, fresh_base, make_adapter
from tiny_models import logits

from hf_deltacome import DeltaCoMeError
from hf_deltacome.cli import main
from hf_deltacome.io.adapter_files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)
FAST = settings(max_examples=100, **_COMMON)
MODEL = settings(max_examples=30, **_COMMON)
BATCH = settings(max_examples=1, **_COMMON)  # one fresh interpreter: importing PEFT costs ~10 s of CPU

EXTRA = "base_model.model.model.norm.weight"


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


def _write(folder: Path, config: bytes, weights: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG_NAME).write_bytes(config)
    (folder / ADAPTER_WEIGHTS_NAME).write_bytes(weights)


def _load(folder: Path, loader: str, stored: dict[str, torch.Tensor] | None = None) -> None:
    """Load ``folder`` with ``loader``; given the file's tensors, what loads must hold exactly their values."""
    if loader == "read":
        loaded = read_adapter(folder)[1]
        if stored is not None:
            assert sorted(loaded) == sorted(stored)
            assert_same_values(loaded, stored)
        return
    if loader == "peft":
        model = PeftModel.from_pretrained(fresh_base(), str(folder))
        if stored is not None:
            state = model.state_dict()
            assert_same_values({k: state[model_key(k)] for k in stored}, stored)
    else:  # transformers' own PEFT integration
        model = fresh_base()
        model.load_adapter(str(folder))
    out = logits(model.eval(), IDS)
    assert torch.isfinite(out).all(), "a clean load must give finite logits"


def check(config: bytes, weights: bytes, loader: str = "read") -> None:
    """The property: ``loader`` loads the folder cleanly with the file's exact values, or raises a
    `DeltaCoMeError` naming it."""
    try:
        stored = load_bytes(weights)
    except Exception:
        stored = None  # safetensors itself cannot read it
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        folder = Path(tmp) / "adapter"
        _write(folder, config, weights)
        try:
            _load(folder, loader, stored)
        except DeltaCoMeError as e:
            assert str(folder) in str(e), f"error does not name the folder: {e}"
            return
    assert stored is not None, "accepted a file that safetensors cannot read"


# ------------------------------------------------------------------------------------------------------------
# weight file mutations
# ------------------------------------------------------------------------------------------------------------


def _split(weights: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + n]), weights[8 + n :]


def _join(header: dict | str, data: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data


json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=10
)
deep_json = st.integers(200, 200_000).map(lambda n: "[" * n + "]" * n)  # past json's and serde's nesting limits
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.int64,
          torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]  # fmt: skip
big_floats = st.sampled_from([1e30, -3e38, 1e7, 7e4, 1e6]) | st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def mutated_weights(draw, weights: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "truncate", "flip", "header", "deep", "tensor", "extra"]))
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
    if kind == "deep":
        text = json.dumps(header)
        return _join(text[:-1] + ', "__metadata__": ' + draw(deep_json) + "}", data)
    names = sorted(k for k in header if k != "__metadata__")
    name = EXTRA if kind == "extra" else draw(st.sampled_from(names))
    if kind == "header":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "metadata"]))
        if field == "dtype":
            header[name]["dtype"] = draw(
                st.sampled_from(["F32", "F16", "BF16", "I32", "U8", "I64", "F64", "BOOL", "F8_E4M3", "F8_E5M2", "X9"])
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
    edit = draw(st.sampled_from(["dtype", "shape", "nan", "inf", "drop", "add", "values", "big"]))
    t = tensors[name]
    if edit == "dtype":
        tensors[name] = t.to(draw(st.sampled_from(DTYPES)))
    elif edit == "shape":
        tensors[name] = torch.zeros(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3)), dtype=t.dtype)
    elif edit in ("nan", "inf") and t.is_floating_point() and t.numel():
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = float("nan") if edit == "nan" else float("-inf")
    elif edit == "drop":
        del tensors[name]
    elif edit == "add":
        tensors[draw(st.sampled_from([name + "x", "base_model.model.lm_head.weight", "junk"]))] = torch.zeros(2)
    elif edit == "big" and t.is_floating_point() and t.numel():
        tensors[name] = t.float()
        tensors[name].view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(big_floats)
        tensors[name] = tensors[name].to(draw(st.sampled_from([t.dtype, torch.float32, torch.float16])))
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
    """The unmutated adapter loads through every path, and the value check compares every tensor."""
    config, weights = good
    stored = load_bytes(weights)
    assert any(".deltacome_delta." in k for k in stored) and any(".deltacome_delta." not in k for k in stored)
    for loader in ("read", "peft", "transformers"):
        check(config, weights, loader)
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp), config, weights)
        state = PeftModel.from_pretrained(fresh_base(), tmp).state_dict()
    key = next(k for k in stored if ".deltacome_delta." in k and stored[k].numel())
    state[model_key(key)].view(-1)[0] += 1  # a loader that changed one value would be caught
    with pytest.raises(AssertionError, match=key.replace(".", r"\.")):
        assert_same_values({k: state[model_key(k)] for k in stored}, stored)


def _rehash(config: bytes, weights: bytes) -> bytes:
    """The config with ``weights_sha256`` of these weights: mutated weights then pass the digest check."""
    data = json.loads(config)
    data["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    return json.dumps(data).encode()


@st.composite
def weights_case(draw, good: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    config, weights = good
    mutated = draw(mutated_weights(weights))
    return (_rehash(config, mutated) if draw(st.booleans()) else config), mutated


# ------------------------------------------------------------------------------------------------------------
# config mutations
# ------------------------------------------------------------------------------------------------------------

PEFT_TYPES = st.sampled_from(["deltacome", "DeltaCoMe", "LORA_", "", None, 42, ["DELTACOME"], {"a": 1}])


@st.composite
def mutated_config(draw, config: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "top", "layout", "band", "drop", "text", "deep", "peft_type"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return json.dumps(draw(json_values)).encode()
    data = json.loads(config)
    if kind == "deep":
        key = draw(st.sampled_from(sorted(data) + ["new_field"]))
        return (json.dumps({**data, key: None})[:-1] + f', "{key}": ' + draw(deep_json) + "}").encode()
    if kind == "peft_type":
        value = draw(PEFT_TYPES)
        if value is None and draw(st.booleans()):
            del data["peft_type"]
        else:
            data["peft_type"] = value
    elif kind == "top":
        key = draw(st.sampled_from(sorted(data) + ["new_field"]))
        data[key] = draw(json_values)
    elif kind == "drop":
        del data[draw(st.sampled_from(sorted(data)))]
    else:
        module = draw(st.sampled_from(sorted(data["layout"])))
        entry = data["layout"][module]
        if kind == "layout":
            field = draw(st.sampled_from(["shape", "bands", "group_size", "bias", "extra"]))
            if draw(st.booleans()):
                entry.pop(field, None)
            else:
                entry[field] = draw(json_values | st.lists(st.integers(-3, 200), max_size=3) | st.integers(-3, 300))
        else:
            k = draw(st.integers(0, len(entry["bands"]) - 1))
            entry["bands"][k] = draw(
                st.lists(st.integers(-2, 40), min_size=2, max_size=2)
                | st.tuples(json_values, json_values)
                | json_values
            )
    return json.dumps(data).encode()


@st.composite
def any_case(draw, good: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    if draw(st.booleans()):
        return draw(mutated_config(good[0])), good[1]
    return draw(weights_case(good))


# ------------------------------------------------------------------------------------------------------------
# the properties
# ------------------------------------------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_fuzz_weight_files(good, data):
    check(*data.draw(weights_case(good)))


@FAST
@given(data=st.data())
def test_fuzz_configs(good, data):
    check(data.draw(mutated_config(good[0])), good[1])


@MODEL
@given(data=st.data(), loader=st.sampled_from(["peft", "transformers"]))
def test_fuzz_peft_and_transformers_loading(good, data, loader):
    check(*data.draw(any_case(good)), loader=loader)


@FAST
@given(data=st.data())
def test_fuzz_cli_info(good, data):
    """``deltacome info``: exit 0, or exit 2 with one line naming the folder."""
    config, weights = data.draw(any_case(good))
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        folder = Path(tmp) / "adapter"
        _write(folder, config, weights)
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(["info", str(folder)])
        assert rc in (0, 2)
        if rc == 2:
            assert len(err.getvalue().strip().splitlines()) == 1 and str(folder) in err.getvalue()


_INFO_BATCH = """
import sys
from hf_deltacome.cli import main
for folder in sys.argv[1:]:
    print(folder, main(["info", folder]), flush=True)
"""


@BATCH
@given(data=st.data())
def test_fuzz_cli_info_subprocess(good, data):
    """``deltacome info`` in a fresh interpreter over a batch of mutated folders: no crash, no traceback."""
    cases = data.draw(st.lists(any_case(good), min_size=16, max_size=16))
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        folders = [Path(tmp) / f"a{i}" for i in range(len(cases))]
        for folder, (config, weights) in zip(folders, cases):
            _write(folder, config, weights)
        done = subprocess.run([sys.executable, "-c", _INFO_BATCH, *map(str, folders)], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
        results = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines() if line.startswith(tmp))
        assert sorted(results) == sorted(map(str, folders)) and set(results.values()) <= {"0", "2"}
        errors = [line for line in done.stderr.splitlines() if line.startswith("deltacome info: error: ")]
        assert len(errors) == list(results.values()).count("2")


# ------------------------------------------------------------------------------------------------------------
# the cases that escaped before, by name, through every reader
# ------------------------------------------------------------------------------------------------------------


def _edit_config(edit):
    def apply(config: bytes, weights: bytes) -> tuple[bytes, bytes]:
        data = json.loads(config)
        edit(data)
        return json.dumps(data).encode(), weights

    return apply


def _edit_extra(edit):
    def apply(config: bytes, weights: bytes) -> tuple[bytes, bytes]:
        tensors = load_bytes(weights)
        tensors[EXTRA] = edit(tensors[EXTRA])
        return config, save_bytes(tensors, metadata={"format": "pt"})

    return apply


def _deep_header(config: bytes, weights: bytes) -> tuple[bytes, bytes]:
    header, data = _split(weights)
    return config, _join(json.dumps(header)[:-1] + ', "__metadata__": ' + "[" * 50_000 + "]" * 50_000 + "}", data)


NAMED = {  # case -> (edit, message parts; None = loads cleanly)
    "layout entry without group_size": (
        _edit_config(lambda d: [e.pop("group_size") for e in d["layout"].values()]), None),
    "target_modules: 42": (_edit_config(lambda d: d.update(target_modules=42)), ["target_modules"]),
    "damp: 'x'": (_edit_config(lambda d: d.update(damp="x")), ["damp"]),
    "bad task_type": (_edit_config(lambda d: d.update(task_type="BAD")), ["task_type"]),
    "no peft_type": (_edit_config(lambda d: d.pop("peft_type")), ["peft_type"]),
    "lower-case peft_type": (_edit_config(lambda d: d.update(peft_type="deltacome")), ["case-sensitively"]),
    "deeply nested config": (lambda c, w: (c[:-1] + b', "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", w),
                             ["adapter_config.json", "JSON"]),
    "compression_info not an object": (_edit_config(lambda d: d.update(compression_info=[1])), ["compression_info"]),
    "deeply nested safetensors header": (_deep_header, ["adapter_model.safetensors", "header"]),
    "dense extra in F8_E4M3": (_edit_extra(lambda t: t.to(torch.float8_e4m3fn)), [EXTRA, "float8_e4m3fn"]),
    "dense extra in I32": (_edit_extra(lambda t: t.to(torch.int32)), [EXTRA, "int32"]),
    "dense extra in F64": (_edit_extra(lambda t: t.double()), [EXTRA, "float64"]),
    "dense extra holding 1e30": (_edit_extra(lambda t: t * 1e30), [EXTRA, "above 1e+06"]),
}  # fmt: skip


@pytest.mark.parametrize("loader", ["read", "peft", "transformers", "info"])
@pytest.mark.parametrize("case", sorted(NAMED))
def test_named_cases(good, tmp_path, case, loader):
    edit, parts = NAMED[case]
    folder = tmp_path / "adapter"
    _write(folder, *edit(*good))
    if loader == "info":  # it reads the config and the safetensors header, not the tensors
        assert main(["info", str(folder)]) == (0 if parts is None or case.startswith("dense extra") else 2)
        return
    if parts is None:
        _load(folder, loader)
        return
    with pytest.raises(DeltaCoMeError) as err:
        _load(folder, loader)
    for part in [str(folder), *parts]:
        assert part in str(err.value), str(err.value)


def test_extra_beyond_the_base_dtype_is_refused(good, tmp_path):
    """A float32 extra of 1e5 is finite, but the float16 base it replaces would hold inf."""
    folder = tmp_path / "adapter"
    config, weights = _edit_extra(lambda t: t * 0 + 1e5)(*good)
    _write(folder, _rehash(config, weights), weights)
    base = fresh_base().half()
    with pytest.raises(DeltaCoMeError, match=f"{EXTRA}' holds values beyond the range of the base model's torch.float16"):
        PeftModel.from_pretrained(base, str(folder))
    PeftModel.from_pretrained(fresh_base(), str(folder))  # a float32 base holds it
