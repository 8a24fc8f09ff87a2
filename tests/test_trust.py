"""Trust: base fingerprint checks, safe (safetensors-only, validated) loading and atomic saving.

Helpers ``make_adapter``/``fresh_base``/``save_adapter`` are imported by ``test_hub.py``, ``test_fuzz.py``,
``test_atomic_save.py``, ``test_load_paths.py`` and ``test_cli_errors.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import logits, make_model, random_ids, target_linears

from hf_deltacome import AdapterFileError, BaseModelMismatchError, ConfigError, DeltaCoMeConfig, DeltaCoMeError
from hf_deltacome.errors import BaseModelMismatchWarning
from hf_deltacome.io.adapter_files import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    read_adapter,
    read_adapter_config,
    read_safetensors,
    validate_adapter_state_dict,
)
from hf_deltacome.io.atomic import atomic_write_bytes
from hf_deltacome.io.fingerprint import (
    base_check,
    check_fingerprint,
    compute_fingerprint,
    parse_fingerprint,
)
from hf_deltacome.layer import DeltaCoMeLinear
from hf_deltacome.quant.rtn import quantize_rtn

BANDS = ((8, 2), (3, 4), (2, 8))
GROUP = 32
KEY_PREFIX = "base_model.model.model.layers.0.self_attn.q_proj.deltacome_delta"


def test_plain_import_installs_the_guards_and_they_catch_a_bad_file(tmp_path):
    """A user's script does only ``import hf_deltacome``: that alone must install validated loading, atomic saves,
    our model card and the VLM pipeline support (a fresh interpreter, so no test module's import can mask it)."""
    save_adapter(tmp_path)
    weights = tmp_path / ADAPTER_WEIGHTS_NAME
    sd = load_file(weights)
    key = next(k for k in sd if ".bands.1." in k and k.endswith(".zeros"))  # a 3-bit band (BANDS)
    sd[key] = torch.full_like(sd[key], 255)  # out of range for 3-bit codes
    save_file(sd, weights)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import hf_deltacome
        from peft import PeftModel
        from tiny_models import make_model
        from hf_deltacome.integration import PATCHES, _installed
        assert _installed == [name for name, _, _ in PATCHES], _installed  # installed by the peft import alone
        assert PeftModel.load_adapter.__wrapped__ and PeftModel.save_pretrained.__wrapped__
        assert PeftModel.create_or_update_model_card.__wrapped__
        from hf_deltacome.multimodal import AutoDeltaCoMeModelForImageTextToText
        assert hf_deltacome.AutoDeltaCoMeModelForImageTextToText is AutoDeltaCoMeModelForImageTextToText
        try:
            PeftModel.from_pretrained(make_model("llama", seed=0), {str(tmp_path)!r})
        except hf_deltacome.AdapterFileError as e:
            print("refused:", e)
        """
    )
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "out of range" in done.stdout and key in done.stdout, done.stdout


def fresh_base(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    return make_model(arch, seed=seed, **overrides)


def make_layout(model: torch.nn.Module, bands=BANDS, group: int = GROUP) -> dict:
    layout = {}
    for name in target_linears(model):
        mod = model.get_submodule(name)
        layout[name] = {
            "shape": [mod.out_features, mod.in_features],
            "bands": [list(b) for b in bands],
            "group_size": group,
            "bias": False,
        }
    return layout


def make_adapter(
    base: torch.nn.Module, seed: int = 1, *, fingerprint: bool = True, scale: float = 0.05, bands=BANDS
) -> PeftModel:
    """A PeftModel over ``base`` (wrapped in place) with random packed deltas and a changed final norm."""
    layout = make_layout(base, bands)
    config = DeltaCoMeConfig(
        layout=layout,
        target_modules=list(layout),
        modules_to_save=["model.norm"],
        group_size=GROUP,
        quantizer="rtn",
        base_fingerprint=compute_fingerprint(base) if fingerprint else None,
        compression_info={"finetuned_model": "fake-user/tiny-finetune", "license": "apache-2.0"},
    )
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, DeltaCoMeLinear):
                pd = mod.deltacome_delta["default"]
                for k, band in enumerate(pd.bands):
                    v = torch.randn(band.rank, pd.in_features, generator=g)
                    u = torch.randn(pd.out_features, band.rank, generator=g)
                    s = torch.rand(band.rank, generator=g) * scale
                    pd.set_band(k, quantize_rtn(v, band.bits, GROUP), quantize_rtn(u, band.bits, GROUP), s)
        norm = model.base_model.model.model.norm.modules_to_save["default"]
        norm.weight.mul_(1.0 + 0.1 * torch.randn(norm.weight.shape, generator=g))
    return model.eval()


def save_adapter(path: Path, seed: int = 1, **kwargs) -> tuple[Path, torch.Tensor]:
    """Save a fresh adapter to ``path``; returns (path, its logits on ``IDS``)."""
    model = make_adapter(fresh_base(), seed=seed, **kwargs)
    model.save_pretrained(str(path))
    return path, logits(model, IDS)


IDS = random_ids(make_model("llama"), num_samples=2, seq_len=8, seed=3)


@pytest.fixture
def saved(tmp_path) -> tuple[Path, torch.Tensor]:
    return save_adapter(tmp_path / "adapter")


def rewrite_tensors(folder: Path, edit) -> None:
    """Load the adapter's tensors, let ``edit(dict)`` change them, and write them back (plain safetensors)."""
    path = folder / ADAPTER_WEIGHTS_NAME
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(folder: Path, edit) -> None:
    path = folder / ADAPTER_CONFIG_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def load(folder: Path, base: torch.nn.Module | None = None, **kwargs) -> PeftModel:
    return PeftModel.from_pretrained(base if base is not None else fresh_base(), str(folder), **kwargs).eval()


# ------------------------------------------------------------------------------------------------------------
# round trip
# ------------------------------------------------------------------------------------------------------------


def test_save_load_roundtrip_reproduces_logits(saved):
    folder, expected = saved
    loaded = load(folder)
    torch.testing.assert_close(logits(loaded, IDS), expected)
    base_logits = logits(fresh_base(), IDS)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter really changes the model
    config, state = read_adapter(folder)
    assert config.layout == make_layout(fresh_base())
    assert any(k.endswith("model.norm.weight") for k in state)


# ------------------------------------------------------------------------------------------------------------
# fingerprint
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fingerprint_matches_same_base_in_any_dtype(dtype):
    fp = compute_fingerprint(fresh_base())
    assert check_fingerprint(fp, fresh_base().to(dtype)) == []
    assert check_fingerprint(json.dumps(fp), fresh_base()) == []  # a JSON-string field works too


def test_fingerprint_ignores_peft_wrapping_and_offload():
    base = fresh_base()
    fp = compute_fingerprint(base)
    wrapped = make_adapter(fresh_base())
    assert compute_fingerprint(wrapped)["structure_hash"] == fp["structure_hash"]
    assert check_fingerprint(fp, wrapped) == []
    from accelerate import cpu_offload

    offloaded = cpu_offload(fresh_base(), execution_device=torch.device("cpu"))
    assert next(offloaded.parameters()).device.type == "meta"
    assert check_fingerprint(fp, offloaded) == []


def test_fingerprint_detects_small_weight_changes():
    fp = compute_fingerprint(fresh_base())
    ft = fresh_base()
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.005)  # a fine-tune-sized change, below bf16 precision of many
    with pytest.raises(BaseModelMismatchError, match="the weights differ"):
        check_fingerprint(fp, ft)


def test_malformed_fingerprint_is_a_config_error():
    fp = compute_fingerprint(fresh_base())
    for bad in ("{not json", {"version": 99}, {**fp, "samples": {"per_tensor": 16, "tensors": ["x"], "values": "AA"}}):
        with pytest.raises(ConfigError, match="base_fingerprint"):
            parse_fingerprint(bad, adapter="a")


def test_wrong_base_weights_refused_naming_both_bases(saved):
    folder, _ = saved
    other = fresh_base(seed=7)
    other.config._name_or_path = "someone/other-base"
    with pytest.raises(BaseModelMismatchError) as err:
        load(folder, other)
    msg = str(err.value)
    assert "tiny-random-llama (LlamaForCausalLM, vocab 250" in msg  # expected
    assert "someone/other-base (LlamaForCausalLM, vocab 250" in msg  # found
    assert "the weights differ" in msg and "strict=False" in msg and str(folder) in msg


def test_wrong_architecture_refused(saved):
    folder, _ = saved
    # same module names and shapes, other architecture: the layout fits but the base is not the one
    other = fresh_base("mistral", vocab_size=250, intermediate_size=160, num_key_value_heads=2)
    with pytest.raises(BaseModelMismatchError, match="architecture 'LlamaForCausalLM' expected, 'MistralForCausalLM'"):
        load(folder, other)


def test_wrong_vocabulary_refused(saved):
    folder, _ = saved
    with pytest.raises(BaseModelMismatchError, match="vocabulary size 250 expected, 256 found"):
        load(folder, fresh_base(vocab_size=256))


def test_strict_false_warns_and_loads(saved):
    folder, _ = saved
    with pytest.warns(BaseModelMismatchWarning, match="the weights differ"):
        model = load(folder, fresh_base(seed=7), strict=False)
    assert isinstance(model, PeftModel)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        with base_check(strict=True), pytest.raises(BaseModelMismatchError):
            load(folder, fresh_base(seed=7))
    with base_check(strict=False), pytest.warns(BaseModelMismatchWarning):
        load(folder, fresh_base(seed=7))


def test_env_var_turns_check_into_warning(saved, monkeypatch):
    folder, _ = saved
    monkeypatch.setenv("DELTACOME_STRICT_BASE", "0")
    with pytest.warns(BaseModelMismatchWarning):
        load(folder, fresh_base(seed=7))


def test_bf16_base_loads(saved):
    folder, expected = saved
    model = load(folder, fresh_base().to(torch.bfloat16))
    assert isinstance(model, PeftModel)
    # the adapter acts on the bfloat16 base as on the float32 one: within bf16 rounding of the adapter's effect
    effect = (expected - logits(fresh_base(), IDS)).norm()
    assert (logits(model, IDS) - expected).norm() < 0.05 * effect  # measured 0.017


def test_adapter_without_fingerprint_warns(tmp_path):
    folder, expected = save_adapter(tmp_path / "nofp", fingerprint=False)
    with pytest.warns(BaseModelMismatchWarning, match="no base-model fingerprint"):
        model = load(folder)
    torch.testing.assert_close(logits(model, IDS), expected)


# ------------------------------------------------------------------------------------------------------------
# bad files
# ------------------------------------------------------------------------------------------------------------


def _expect_file_error(folder: Path, match: str, *names: str) -> str:
    with pytest.raises(AdapterFileError, match=match) as err:
        load(folder)
    msg = str(err.value)
    assert str(folder / ADAPTER_WEIGHTS_NAME) in msg or str(folder) in msg
    for name in names:
        assert name in msg
    # the folder-level reader gives the same verdict without a model
    with pytest.raises(AdapterFileError, match=match):
        read_adapter(folder)
    return msg


def test_truncated_file(saved):
    folder, _ = saved
    path = folder / ADAPTER_WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    _expect_file_error(folder, "truncated")


def test_file_cut_inside_header(saved):
    folder, _ = saved
    path = folder / ADAPTER_WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:50])
    _expect_file_error(folder, "bad safetensors header")


def test_bad_header(saved):
    folder, _ = saved
    path = folder / ADAPTER_WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[8:9] = b"#"  # the JSON header no longer parses
    path.write_bytes(bytes(data))
    _expect_file_error(folder, "bad safetensors header: not valid JSON")


def test_wrong_dtype(saved):
    folder, _ = saved
    key = f"{KEY_PREFIX}.bands.0.v.scales"
    rewrite_tensors(folder, lambda t: t.__setitem__(key, t[key].float()))
    _expect_file_error(folder, "has dtype torch.float32, adapter_config.json's layout needs torch.float16", key)


def test_wrong_shape(saved):
    folder, _ = saved
    key = f"{KEY_PREFIX}.bands.1.u.qweight"
    rewrite_tensors(folder, lambda t: t.__setitem__(key, torch.cat([t[key], t[key][:1]])))
    _expect_file_error(folder, r"has shape \[65, 1\]", key)


def test_config_disagrees_with_tensors(saved):
    folder, _ = saved
    module = "model.layers.1.mlp.down_proj"
    edit_config(folder, lambda d: d["layout"][module].__setitem__("bands", [[8, 2], [3, 3], [2, 8]]))
    _expect_file_error(folder, "config and weights disagree", module)


def test_missing_tensor(saved):
    folder, _ = saved
    key = f"{KEY_PREFIX}.bands.2.s"
    rewrite_tensors(folder, lambda t: t.pop(key))
    _expect_file_error(folder, "lacks 1 tensor", key)


def test_unexpected_tensor(saved):
    folder, _ = saved
    rewrite_tensors(folder, lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(250, 64)))
    _expect_file_error(folder, "unexpected tensor", "lm_head.weight")


def test_unknown_bit_width(saved):
    folder, _ = saved
    module = "model.layers.0.mlp.up_proj"
    edit_config(folder, lambda d: d["layout"][module].__setitem__("bands", [[8, 2], [5, 4], [2, 8]]))
    with pytest.raises(ConfigError, match=f"{ADAPTER_CONFIG_NAME}: .*layout of module '{module}': unknown bit width 5"):
        load(folder)
    with pytest.raises(ConfigError, match=f"{ADAPTER_CONFIG_NAME}.*unknown bit width 5"):
        read_adapter_config(folder)


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_nan_inf(saved, value, kind):
    folder, _ = saved
    key = f"{KEY_PREFIX}.bands.1.s"

    def edit(t):
        t[key][1] = value

    rewrite_tensors(folder, edit)
    _expect_file_error(folder, f"contains {kind}", key)


def test_nan_in_dense_extra(saved):
    folder, _ = saved
    key = "base_model.model.model.norm.weight"
    rewrite_tensors(folder, lambda t: t[key].__setitem__(0, float("nan")))
    _expect_file_error(folder, "contains NaN", key)


def test_zero_point_out_of_range(saved):
    folder, _ = saved
    key = f"{KEY_PREFIX}.bands.2.v.zeros"  # 2-bit band: zero points must be <= 3
    rewrite_tensors(folder, lambda t: t[key].fill_(200))
    _expect_file_error(folder, "zero point 200, out of range for 2-bit codes", key)


def test_corrupted_packing_padding(saved):
    folder, _ = saved
    key = f"{KEY_PREFIX}.bands.1.u.qweight_hi"  # 3-bit band, rank 4: 28 unused bits per row
    rewrite_tensors(folder, lambda t: t[key].fill_(-1))
    _expect_file_error(folder, "non-zero padding bits", key)


def test_pickle_is_never_loaded(tmp_path, saved):
    folder, _ = saved
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / ADAPTER_WEIGHTS_NAME).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(AdapterFileError, match="pickles are never loaded"):
        load(folder)
    with pytest.raises(AdapterFileError, match="refusing to read a pickle"):
        read_safetensors(folder / "adapter_model.bin")
    assert not marker.exists()


def test_validate_state_dict_directly(saved):
    folder, _ = saved
    config = read_adapter_config(folder)
    state = read_safetensors(folder / ADAPTER_WEIGHTS_NAME)
    validate_adapter_state_dict(config, state, "x.safetensors")
    state[f"{KEY_PREFIX}.bands.0.s"] = state[f"{KEY_PREFIX}.bands.0.s"].double()
    with pytest.raises(AdapterFileError, match=r"x\.safetensors: tensor .*bands\.0\.s' has dtype torch\.float64"):
        validate_adapter_state_dict(config, state, "x.safetensors")


def test_hand_edited_config_errors_name_the_file(saved):
    folder, _ = saved
    path = folder / ADAPTER_CONFIG_NAME
    path.write_text("{ not json")
    with pytest.raises(ConfigError, match="adapter_config.json: not valid JSON"):
        read_adapter(folder)
    path.write_text(json.dumps({"peft_type": "DELTACOME", "layout": {"m": {"shape": [4], "bands": []}}}))
    with pytest.raises(ConfigError, match=r"adapter_config.json: .*'shape' must be"):
        read_adapter(folder)
    path.write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ConfigError, match="not 'DELTACOME'"):
        read_adapter(folder)


# ------------------------------------------------------------------------------------------------------------
# atomic saving
# ------------------------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_save_writes_no_temp_files_and_keeps_permissions(saved):
    folder, _ = saved
    names = sorted(os.listdir(folder))
    assert names == ["README.md", ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    mode = os.stat(folder / ADAPTER_CONFIG_NAME).st_mode & 0o777  # temp files honour the umask like open()
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_failed_save_leaves_previous_adapter_intact(saved, monkeypatch):
    folder, expected = saved
    before = _snapshot(folder)
    import safetensors.torch

    real = safetensors.torch.save_file

    def broken(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        make_adapter(fresh_base(), seed=2).save_pretrained(str(folder))
    assert _snapshot(folder) == before  # no temp files left, nothing replaced
    torch.testing.assert_close(logits(load(folder), IDS), expected)


def test_pickle_save_refused(tmp_path):
    with pytest.raises(ConfigError, match="only as safetensors"):
        make_adapter(fresh_base()).save_pretrained(str(tmp_path / "x"), safe_serialization=False)


def test_other_peft_methods_unchanged(tmp_path):
    model = get_peft_model(fresh_base(), LoraConfig(target_modules=["q_proj"], r=2))
    model.save_pretrained(str(tmp_path / "lora"))
    assert sorted(os.listdir(tmp_path / "lora")) == ["README.md", ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    assert "deltacome" not in (tmp_path / "lora" / "README.md").read_text()
    model.save_pretrained(str(tmp_path / "lora_bin"), safe_serialization=False)
    assert "adapter_model.bin" in os.listdir(tmp_path / "lora_bin")
    loaded = PeftModel.from_pretrained(fresh_base(), str(tmp_path / "lora"))
    assert "default" in loaded.peft_config


def test_atomic_write_bytes_replaces(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]


# killed saves and concurrent readers: tests/test_atomic_save.py


def test_errors_are_deltacome_errors():
    assert issubclass(AdapterFileError, DeltaCoMeError) and issubclass(BaseModelMismatchError, DeltaCoMeError)
