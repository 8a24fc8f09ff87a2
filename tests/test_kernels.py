"""Triton kernels against the float32 PyTorch reference, with tolerances set by the activations' dtype.

On a CUDA machine the compiled kernels run (float16 / bfloat16 included); elsewhere the Triton interpreter runs them
on CPU. ``TRITON_INTERPRET`` set in the environment wins (``TRITON_INTERPRET=1`` interprets on a GPU machine too).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


def kernel_mode(environ: Mapping[str, str], cuda_available: bool) -> str:
    """How this file runs the kernels: ``"compiled"`` (CUDA), ``"interpreted"`` (CPU) or ``"skip"``."""
    forced = environ.get("TRITON_INTERPRET")
    if forced is not None and forced not in ("", "0"):
        return "interpreted"
    if cuda_available:
        return "compiled"
    return "skip" if forced is not None else "interpreted"  # TRITON_INTERPRET=0 without a GPU: nothing to run


MODE = kernel_mode(os.environ, torch.cuda.is_available())
if MODE == "interpreted":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton.jit kernels

import pytest  # noqa: E402

pytest.importorskip("triton")
if MODE == "skip":
    pytest.skip("TRITON_INTERPRET=0 and there is no GPU", allow_module_level=True)

from hf_deltacome.backend import dequant_cache, torch_delta_forward  # noqa: E402
from hf_deltacome.errors import DeltaCoMeError  # noqa: E402
from hf_deltacome.format.storage import PackedDelta  # noqa: E402
from hf_deltacome.quant.rtn import quantize_rtn  # noqa: E402

K = pytest.importorskip("hf_deltacome.kernels")
DEVICE = "cuda" if MODE == "compiled" else "cpu"


def test_kernels_run_compiled_on_cuda_and_interpreted_elsewhere():
    assert kernel_mode({}, cuda_available=True) == "compiled"
    assert kernel_mode({}, cuda_available=False) == "interpreted"
    assert kernel_mode({"TRITON_INTERPRET": "1"}, cuda_available=True) == "interpreted"
    assert kernel_mode({"TRITON_INTERPRET": "0"}, cuda_available=True) == "compiled"
    assert kernel_mode({"TRITON_INTERPRET": "0"}, cuda_available=False) == "skip"
    # and this run does what it says: the kernels module saw the same mode
    assert K.INTERPRET == (MODE == "interpreted")
    assert DEVICE == ("cuda" if torch.cuda.is_available() and MODE == "compiled" else "cpu")


def make_delta(m, n, bands, group_size, bias=False, seed=0) -> PackedDelta:
    """A `PackedDelta` holding RTN-quantized random factors (valid codes in every buffer)."""
    g = torch.Generator().manual_seed(seed)
    d = PackedDelta(m, n, bands, group_size, bias=bias)
    for k, band in enumerate(d.bands):
        r = band.rank
        v = torch.randn(r, n, generator=g) / n**0.5
        u = torch.randn(m, r, generator=g) / r**0.5
        s = torch.rand(r, generator=g) * 2 + 0.5
        d.set_band(k, quantize_rtn(v, band.bits, group_size), quantize_rtn(u.t(), band.bits, group_size), s)  # U_kᵀ
    if bias:
        d.bias.copy_(torch.randn(m, generator=g))
    return d.to(DEVICE)


def reference(x: torch.Tensor, delta: PackedDelta) -> torch.Tensor:
    """The PyTorch path computed in float32 (the interpreter computes in float32 too)."""
    return torch_delta_forward(x.float(), delta)


def rand_x(*shape, dtype=torch.float32, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    if DEVICE == "cuda":  # compiled kernels multiply in the activations' dtype, as the GPU reference does
        tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    y, ref = y.float().cpu(), ref.float().cpu()
    scale = ref.abs().max().item() + 1e-6
    err = (y - ref).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} * {scale:.3g}"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 24, 128])
def test_every_bit_width_and_group_size(bits, group_size):
    # odd sizes and rank: partial words, partial groups, partial tiles everywhere
    delta = make_delta(45, 77, [(bits, 21)], group_size, seed=bits * 1000 + group_size)
    x = rand_x(3, 77)
    assert_close(K.delta_forward(x, delta), reference(x, delta))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_single_token_every_bit_width(bits):
    # one token takes the matrix-vector path (no tensor-core tile)
    delta = make_delta(50, 96, [(bits, 37)], 32, bias=True, seed=bits)
    x = rand_x(1, 96)
    assert_close(K.delta_forward(x, delta), reference(x, delta))


@pytest.mark.parametrize("tokens", [1, 40, 70])  # one decode block, two decode blocks, prefill path (> 64)
def test_all_bands_of_mixed_bits_in_one_call(tokens):
    # bands of 8/3/2/4/1 bits plus a 16-bit band (applied densely) and a bias delta
    delta = make_delta(70, 90, [(8, 2), (3, 19), (2, 33), (4, 5), (1, 7), (16, 3)], 32, bias=True, seed=tokens)
    x = rand_x(tokens, 90)
    assert_close(K.delta_forward(x, delta), reference(x, delta))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations(dtype):
    delta = make_delta(48, 64, [(8, 2), (3, 9), (2, 20)], 32, bias=True, seed=3)
    x = rand_x(2, 5, 64, dtype=dtype)
    y = K.delta_forward(x, delta)
    assert y.dtype == dtype and y.shape == (2, 5, 48)
    assert_close(y, reference(x, delta), dtype)  # against float32, within the dtype's tolerance


def test_split_reduction_and_accumulate_into_out():
    delta = make_delta(40, 200, [(8, 2), (2, 30)], 32, seed=4)
    x = rand_x(4, 200)
    ref = reference(x, delta)
    for split in (2, 3):  # several programs per rank tile, their partial sums added by the expand
        assert_close(K.delta_forward(x, delta, split_k=split), ref)
    base = rand_x(4, 40, seed=9)
    out = base.clone()
    assert K.delta_forward(x, delta, out=out) is out
    assert_close(out, base + ref)
    # the expand split along the rank: partial outputs summed by the last program of each tile, into out or not;
    # the tile counters are back at zero after each launch, so repeated calls agree
    for split_r in (2, 5, 40):  # 40 > rank: most splits hold no rank at all
        for T in (1, 4):
            xt = x[:T]
            assert_close(K.delta_forward(xt, delta, split_r=split_r), ref[:T])
            out = base[:T].clone()
            K.delta_forward(xt, delta, out=out, split_k=2, split_r=split_r)
            assert_close(out, base[:T] + ref[:T])
            again = base[:T].clone()
            K.delta_forward(xt, delta, out=again, split_k=2, split_r=split_r)
            assert torch.equal(again, out)  # deterministic: partials added in split order


@pytest.mark.parametrize("tokens", [1, 8, 70])
def test_base_plus_delta_runs_the_shrink_beside_the_base(tokens):
    """``base() + delta(x)``, one adapter and mixed, written into the base output (on CUDA the shrink runs on a side
    stream while the base runs; elsewhere it is the plain sum)."""
    delta = make_delta(40, 64, [(8, 2), (3, 9), (2, 21), (16, 2)], 32, bias=True, seed=30)
    other = make_delta(40, 64, [(2, 17)], 32, seed=31)
    x = rand_x(tokens, 64)
    w = rand_x(40, 64, seed=32)
    y = K.base_plus_delta(x, lambda: x @ w.t(), [delta])
    assert_close(y, x @ w.t() + reference(x, delta))
    rows = torch.arange(tokens, device=DEVICE) % 3 - 1  # -1 (none), 0, 1
    y = K.base_plus_delta(x[:, None], lambda: (x @ w.t())[:, None], [delta, other], rows)
    ref = mixed_reference(x[:, None], [delta, other], rows)
    assert_close(y, (x @ w.t())[:, None].cpu() + ref)
    # a base output the kernels cannot write in place (a transposed view) still gets the delta
    y = K.base_plus_delta(x, lambda: (w @ x.t()).t(), [delta])
    assert_close(y, x @ w.t() + reference(x, delta))


def test_strided_input_and_empty_batch():
    delta = make_delta(33, 50, [(3, 17)], 16, seed=5)
    wide = rand_x(6, 100)
    x = wide[:, ::2]  # last-dim stride 2: copied to rows
    assert_close(K.delta_forward(x, delta), reference(x.contiguous(), delta))
    x = wide[::2, :50]  # row stride 100: read in place
    assert_close(K.delta_forward(x, delta), reference(x.contiguous(), delta))
    assert K.delta_forward(rand_x(0, 50), delta).shape == (0, 33)


def test_only_bias_or_only_dense_bands():
    delta = make_delta(20, 30, [(16, 4)], 16, bias=True, seed=6)
    x = rand_x(3, 30)
    assert_close(K.delta_forward(x, delta), reference(x, delta))


def mixed_reference(x, deltas, row_index):
    out = torch.zeros(*x.shape[:-1], deltas[0].out_features if deltas[0] is not None else deltas[1].out_features)
    for i in range(x.shape[0]):
        a = int(row_index[i])
        if 0 <= a < len(deltas) and deltas[a] is not None:
            out[i] = reference(x[i : i + 1], deltas[a])[0].cpu()
    return out


@pytest.mark.parametrize("seq", [1, 9])  # decode (one token per row) and prefill (72 > 64 tokens in all)
def test_mixed_adapter_batch(seq):
    deltas = [
        make_delta(36, 56, [(8, 2), (3, 11), (2, 23)], 16, bias=True, seed=10),
        None,  # a slot without a delta on this layer
        make_delta(36, 56, [(4, 13), (16, 2)], 24, seed=11),
        make_delta(36, 56, [(2, 37)], 128, seed=12),
    ]
    row_index = torch.tensor([3, 0, -1, 2, 0, 1, 7, 2], device=DEVICE)  # -1, None slot and 7: no delta
    x = rand_x(8, seq, 56)
    y = K.delta_forward_mixed(x, deltas, row_index)
    assert y.shape == (8, seq, 36)
    ref = mixed_reference(x, deltas, row_index)
    assert_close(y, ref)
    for i in (2, 5, 6):
        assert torch.count_nonzero(y[i]) == 0
    # in place, into a base output
    base = rand_x(8, seq, 36, seed=2)
    out = base.clone()
    K.delta_forward_mixed(x, deltas, row_index, out=out, split_k=2)
    assert_close(out, base + ref.to(DEVICE))
    out = base.clone()
    K.delta_forward_mixed(x, deltas, row_index, out=out, split_k=2, split_r=3)
    assert_close(out, base + ref.to(DEVICE))
    # the expand's programs split by adapter slot (what small batches get on a GPU): each slot writes its own rows,
    # slot 0's also the rows of no adapter; alone and with rank splits, into the output or not
    for split_r in (1, 3):
        y = K.delta_forward_mixed(x, deltas, row_index, split_a=len(deltas), split_r=split_r)
        assert_close(y, ref)
        for i in (2, 5, 6):
            assert torch.count_nonzero(y[i]) == 0  # written (zeros), not left as the empty buffer was
        out = base.clone()
        K.delta_forward_mixed(x, deltas, row_index, out=out, split_k=2, split_r=split_r, split_a=len(deltas))
        assert_close(out, base + ref.to(DEVICE))
        assert torch.equal(out[[2, 5, 6]], base[[2, 5, 6]])  # rows without a delta untouched
    with pytest.raises(DeltaCoMeError, match="split_a=2"):
        K.delta_forward_mixed(x, deltas, row_index, split_a=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_half_precision_matches_single_adapter_calls(dtype):
    deltas = [make_delta(40, 64, [(8, 2), (3, 9), (2, 21)], 32, seed=20 + i) for i in range(3)]
    x = rand_x(5, 64, dtype=dtype)
    row_index = torch.tensor([2, 2, 0, -1, 1], device=DEVICE)
    y = K.delta_forward_mixed(x, deltas, row_index)
    assert y.dtype == dtype
    for i, a in enumerate(row_index.tolist()):
        if a < 0:
            assert torch.count_nonzero(y[i]) == 0
            continue
        single = K.delta_forward(x[i : i + 1], deltas[a])[0]  # the same row through the single-adapter kernel
        assert_close(y[i], single, dtype)
        assert_close(y[i], reference(x[i : i + 1], deltas[a])[0], dtype)  # and both near the float32 reference
    assert not torch.equal(y[0], y[2])  # rows of different adapters differ


def test_plan_is_cached_and_follows_buffer_changes():
    delta = make_delta(24, 40, [(3, 10), (2, 12)], 16, seed=30)
    x = rand_x(2, 40)
    K.delta_forward(x, delta)
    plan = K.plan_for(delta, x.device)
    K.delta_forward(x, delta)
    assert K.plan_for(delta, x.device) is plan  # no rebuild per call
    # load_state_dict copies in place: same plan, new values
    other = make_delta(24, 40, [(3, 10), (2, 12)], 16, seed=31)
    delta.load_state_dict(other.state_dict())
    assert_close(K.delta_forward(x, delta), reference(x, other))
    assert K.plan_for(delta, x.device) is plan
    # replacing a buffer tensor invalidates the plan
    delta.bands[1].v.qweight = other.bands[1].v.qweight.clone()
    assert_close(K.delta_forward(x, delta), reference(x, delta))
    assert K.plan_for(delta, x.device) is not plan


def test_bad_inputs_are_named():
    delta = make_delta(24, 40, [(2, 10)], 16, seed=40)
    with pytest.raises(DeltaCoMeError, match=r"\(3, 41\)"):
        K.delta_forward(rand_x(3, 41), delta)
    with pytest.raises(DeltaCoMeError, match="int64"):
        K.delta_forward(rand_x(3, 40).to(torch.int64), delta)
    with pytest.raises(DeltaCoMeError, match="row_index"):
        K.delta_forward_mixed(rand_x(3, 2, 40), [delta], torch.tensor([0, 0], device=DEVICE))
    with pytest.raises(DeltaCoMeError, match="row_index"):  # the same checks beside the base layer
        K.base_plus_delta(rand_x(3, 2, 40), lambda: rand_x(3, 2, 24), [delta], torch.tensor([0, 0], device=DEVICE))
    with pytest.raises(DeltaCoMeError, match="int32 or int64"):
        K.base_plus_delta(rand_x(2, 40), lambda: rand_x(2, 24), [delta], torch.tensor([0.0, 0.0], device=DEVICE))
    with pytest.raises(DeltaCoMeError, match="24x40"):
        K.delta_forward_mixed(rand_x(2, 40), [delta, make_delta(24, 48, [(2, 3)], 16)], torch.tensor([0, 1]))


# -- a whole tiny model through PEFT --------------------------------------------------------------------------------


def _tiny_peft_model(
    adapters=("default",), ratio=0.25, group=32, bands=((8, 2), (3, 8), (2, None)), delta_scale=1.0, **config
):
    from peft import get_peft_model
    from tiny_models import make_model, target_linears

    import hf_deltacome  # noqa: F401  (registers the method with PEFT)
    from hf_deltacome.config import DeltaCoMeConfig
    from hf_deltacome.format.budget import solve_ranks

    base = make_model("llama", **{"num_hidden_layers": 1, **config})
    layout = {}
    for name in target_linears(base):
        lin = base.get_submodule(name)
        m, n = lin.weight.shape
        ranks = solve_ranks(m, n, ratio, [list(b) for b in bands], group)
        layout[name] = {"shape": [m, n], "bands": [list(b) for b in ranks], "group_size": group, "bias": False, "format": 2}
    model = get_peft_model(base, DeltaCoMeConfig(layout=layout, target_modules=list(layout)), adapter_name=adapters[0])
    for extra in adapters[1:]:
        model.add_adapter(extra, DeltaCoMeConfig(layout=layout, target_modules=list(layout)))
    # fill every adapter's buffers with valid random codes
    from hf_deltacome.layer import DeltaCoMeLinear

    seed = 0
    for module in model.modules():
        if isinstance(module, DeltaCoMeLinear):
            for d in module.deltacome_delta.values():
                seed += 1
                filled = make_delta(d.out_features, d.in_features, d.layout, d.group_size, seed=seed)
                for band in filled.bands:
                    band.s.mul_(delta_scale)
                d.load_state_dict(filled.cpu().state_dict())
    return model.eval().to(DEVICE)


@torch.no_grad()
def _logits_by_backend(model, ids, names, monkeypatch, step=False):
    """Logits of adapter "a" and of the mixed batch ``names`` on each backend (and of one token with ``step``), and
    the base model's."""
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("DELTACOME_BACKEND", backend)
        model.set_adapter("a")
        out[backend, "a"] = model(input_ids=ids).logits.float()
        out[backend, "mixed"] = model(input_ids=ids, adapter_names=names).logits.float()
        if step:  # one token: the matrix-vector path
            out[backend, "step"] = model(input_ids=ids[:, :1]).logits.float()
    with model.disable_adapter():
        base_logits = model(input_ids=ids).logits.float()
    return out, base_logits


def test_whole_tiny_model_same_logits_with_triton_backend(monkeypatch):
    pytest.importorskip("hf_deltacome.model")
    model = _tiny_peft_model(adapters=("a", "b"))
    ids = torch.randint(1, 250, (3, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    names = ["a", "__base__", "b"]

    calls = {"single": 0, "mixed": 0}
    single, mixed = K.delta_forward, K.delta_forward_mixed

    def count_single(*a, **kw):
        calls["single"] += 1
        return single(*a, **kw)

    def count_mixed(*a, **kw):
        calls["mixed"] += 1
        return mixed(*a, **kw)

    beside = K.base_plus_delta

    def count_beside(x, base, deltas, row_index=None):  # on CUDA the layers run the shrink beside the base linear
        calls["single" if row_index is None else "mixed"] += 1
        return beside(x, base, deltas, row_index)

    monkeypatch.setattr(K, "delta_forward", count_single)
    monkeypatch.setattr(K, "delta_forward_mixed", count_mixed)
    monkeypatch.setattr(K, "base_plus_delta", count_beside)
    out, base_logits = _logits_by_backend(model, ids, names, monkeypatch)
    assert calls["single"] == 7 and calls["mixed"] == 7  # every linear of the layer went through the kernels
    for kind in ("a", "mixed"):
        ref = out["torch", kind]
        assert_close(out["triton", kind], ref)
        assert (ref - base_logits).abs().max() > 1e-2  # the deltas do change the logits
    # the "__base__" row is the base model's, the "a" row equals the single-adapter run
    assert_close(out["triton", "mixed"][1], base_logits[1])
    assert_close(out["triton", "mixed"][0], out["triton", "a"][0])


@pytest.mark.skipif(DEVICE != "cuda", reason="SmolLM2-sized: minutes under the interpreter; the tiny model covers CPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_smollm2_shaped_model_same_logits_on_the_kernels(monkeypatch, dtype):
    """SmolLM2-135M's shapes (30 layers, 576 wide, GQA 9/3 heads, in-features 576 = 4.5 groups of 128) at 1/16 with
    the 8/3/2-bit bands, random weights: the kernels give the PyTorch path's logits, single adapter and mixed."""
    smollm2 = dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
    )
    bands = ((8, 2), (3, 32), (2, None))
    # deltas a few times smaller than the base weights (as a fine-tune's are), so 30 layers stay finite in float16
    model = _tiny_peft_model(("a", "b"), 1 / 16, 128, bands, delta_scale=0.05, **smollm2).to(dtype)
    ids = torch.randint(1, 49152, (3, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    names = ["a", "__base__", "b"]
    out, base_logits = _logits_by_backend(model, ids, names, monkeypatch, step=True)
    for kind in ("a", "mixed", "step"):
        ref = out["torch", kind]
        assert torch.isfinite(out["triton", kind]).all()
        assert_close(out["triton", kind], ref, dtype)
    assert (out["torch", "a"] - base_logits).abs().max() > 1e-2  # the deltas do change the logits


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    """Every kernel variant compiles to PTX for sm_90 (what the interpreter cannot check); a few minutes."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-m", "hf_deltacome.kernels.compile_check", "--arch", "90", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 variant(s) failed to compile" in r.stdout


def test_format1_deltas_take_the_pytorch_path(monkeypatch):
    """The kernels read format 2 (U_kᵀ packed along the outputs); a format-1 file still runs, on the PyTorch path."""
    from hf_deltacome import backend

    g = torch.Generator().manual_seed(5)
    d = PackedDelta(24, 40, [(3, 6), (2, 8)], 16, format=1)
    for k, band in enumerate(d.bands):
        v, u = torch.randn(band.rank, 40, generator=g), torch.randn(24, band.rank, generator=g)
        d.set_band(k, quantize_rtn(v, band.bits, 16), quantize_rtn(u, band.bits, 16), torch.rand(band.rank, generator=g))
    d = d.to(DEVICE)
    monkeypatch.setenv("DELTACOME_BACKEND", "triton")
    monkeypatch.setattr(K, "delta_forward", lambda *a, **k: pytest.fail("a format-1 delta reached the kernels"))
    x = rand_x(3, 40)
    assert_close(backend.delta_forward(x, d), reference(x, d))


def test_bad_switch_values_are_named(monkeypatch):
    """The kernels' environment switches refuse values they do not know, naming the variable."""
    import subprocess
    import sys

    from hf_deltacome import backend
    from hf_deltacome.errors import ConfigError

    monkeypatch.setenv("DELTACOME_OVERLAP", "yes")
    with pytest.raises(ConfigError, match="DELTACOME_OVERLAP='yes'"):
        backend.overlap_enabled()
    monkeypatch.setenv("DELTACOME_BACKEND", "cuda")
    with pytest.raises(ConfigError, match="DELTACOME_BACKEND='cuda'"):
        backend.backend_name()
    env = {**os.environ, "DELTACOME_KERNEL_TUNING": "fast", "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", "import hf_deltacome.kernels"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "DELTACOME_KERNEL_TUNING='fast'" in r.stderr


def test_an_interpreter_asked_for_after_the_kernels_were_defined_is_named(monkeypatch):
    """Triton fixes interpretation when the kernels are defined: on CPU, ``DELTACOME_BACKEND=triton`` with
    ``TRITON_INTERPRET=1`` set only after that import says so, instead of failing inside Triton's driver lookup;
    without it the PyTorch path runs, as before."""
    from hf_deltacome import backend
    from hf_deltacome.errors import ConfigError

    monkeypatch.setenv("DELTACOME_BACKEND", "triton")
    monkeypatch.setattr(K, "INTERPRET", False)  # as if imported without TRITON_INTERPRET=1
    x = torch.zeros(2, 8)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1 was set after hf_deltacome.kernels was imported"):
        backend._use_triton(x)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert backend._use_triton(x) is False
    monkeypatch.setattr(K, "INTERPRET", True)
    assert backend._use_triton(x) is True


def _kernel_calls(monkeypatch) -> list[str]:
    """Selects the Triton backend and records each call of the kernels' entry points (none: the PyTorch path ran)."""
    monkeypatch.setenv("DELTACOME_BACKEND", "triton")
    calls: list[str] = []
    for name in ("delta_forward", "delta_forward_mixed"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


def _delta_with_parts(m, n, bands, seed, sign_rows=None):
    """A delta of dense bands, a bias and a DARE part (uniform keep 0.3, hashed draws, 2-bit values); with
    ``sign_rows`` a BitDelta sign part on that many rows too."""
    from hf_deltacome.format.baseline_parts import sparse_mask

    keep, mask_seed = 0.3, 100 + seed
    nnz = int(sparse_mask(m, n, keep, mask_seed, draws="hash").sum())
    sparse = {"nnz": nnz, "keep": keep, "seed": mask_seed, "bits": 2, "group_size": 16, "draws": "hash"}
    sign = {"rows": sign_rows, "scale": "row"} if sign_rows else None
    g = torch.Generator().manual_seed(seed)
    d = PackedDelta(m, n, bands, 16, bias=True, sparse=sparse, sign=sign)
    for k, band in enumerate(d.bands):
        v, u = torch.randn(band.rank, n, generator=g) / n**0.5, torch.randn(band.rank, m, generator=g)
        d.set_band(k, quantize_rtn(v, band.bits, 16), quantize_rtn(u, band.bits, 16), torch.rand(band.rank, generator=g))
    d.bias.copy_(torch.randn(m, generator=g))
    d.sparse.values.set(quantize_rtn(torch.randn(1, nnz, generator=g), 2, 16))
    if sign_rows:
        rows = torch.randperm(m, generator=g)[:sign_rows].sort().values
        d.sign.set(torch.rand(sign_rows, n, generator=g) > 0.5, torch.rand(sign_rows, generator=g) * 0.1, rows)
    return d.to(DEVICE)


def test_deltas_with_dare_or_sign_parts_run_their_bands_on_the_kernels(monkeypatch):
    """The default's DARE residual (and BitDelta's sign bits) no longer send a delta to the PyTorch path whole: the
    kernels compute its bands and bias, PyTorch adds the parts beside them — single, mixed, into a base output."""
    from hf_deltacome import backend

    dare = _delta_with_parts(30, 48, [(8, 2), (3, 5), (2, 9)], seed=1)
    both = _delta_with_parts(30, 48, [(2, 6)], seed=2, sign_rows=7)
    plain = make_delta(30, 48, [(3, 4)], 16, seed=3)
    assert backend._kernel_ready(dare) and backend._kernel_ready(both)
    calls = _kernel_calls(monkeypatch)
    x = rand_x(5, 48)
    for d in (dare, both):
        ref = reference(x, d)
        assert (ref - reference(x, make_delta(30, 48, [], 16))).abs().max() > 0  # the parts are there
        assert_close(backend.delta_forward(x, d), ref)
        base = rand_x(5, 30, seed=4)
        assert_close(backend.add_delta_into(base.clone(), x, [d]), base + ref.to(DEVICE))
        assert_close(backend.base_and_delta(x, lambda b=base: b.clone(), [d]), base + ref.to(DEVICE))
    deltas = [dare, None, both, plain]
    rows = torch.tensor([2, 0, -1, 3, 0], device=DEVICE)
    ref = mixed_reference(x[:, None], deltas, rows)
    assert_close(backend.delta_forward_mixed(x[:, None], deltas, rows), ref)
    base = rand_x(5, 1, 30, seed=5)
    assert_close(backend.add_delta_into(base.clone(), x[:, None], deltas, rows), base + ref.to(DEVICE))
    assert calls.count("delta_forward") == 6 and calls.count("delta_forward_mixed") == 2  # none took the torch path
    assert set(dare._derived) == {"dare_mask"} and dequant_cache.holds(dare, "csr")  # both paths' forms, side by side
    rows_kept = both.sign.row_index()
    assert both.sign.row_index() is rows_kept  # cached: a forward pass does not sync with the host to find them
    both.sign.set(torch.ones(7, 48, dtype=torch.bool), torch.ones(7), torch.arange(7))
    assert torch.equal(both.sign.row_index().cpu(), torch.arange(7))  # a new mask is read again
    # what needs its gradient gets the parts out of place
    w = torch.zeros(30, 48, device=DEVICE, requires_grad=True)
    y = backend.base_and_delta(x, lambda: x @ w.t(), [dare])
    y.sum().backward()
    assert_close(y.detach(), reference(x, dare))


def _delta_with_sparse_bands(m, n, seed, draws="hash", bits=(3, 2), group_size=16):
    """An ``impart``-shaped delta: a dense 4-bit band, then two sparse bands (keep 0.6 and 0.35, seeded masks;
    hashed draws are format 6's, the generator's older files')."""
    from hf_deltacome.format.sparse_bands import sparse_band_masks

    sparse_bands = []
    for k, (b, rank, keep) in enumerate(zip(bits, (4, 37), (0.6, 0.35))):
        mv, mu = sparse_band_masks(m, n, rank, keep, 40 + seed + 2 * k, draws)
        sparse_bands.append({"bits": b, "rank": rank, "keep": keep, "seed": 40 + seed + 2 * k,
                             "nnz": [int(mv.sum()), int(mu.sum())], "draws": draws})  # fmt: skip
    entry = {"shape": [m, n], "bands": [[4, 3]], "group_size": group_size, "bias": False,
             "format": 6 if draws == "hash" else 2, "sparse_bands": sparse_bands}  # fmt: skip
    d = PackedDelta.from_layout(entry)
    g = torch.Generator().manual_seed(seed)
    band = d.bands[0]
    v, u = torch.randn(band.rank, n, generator=g) / n**0.5, torch.randn(band.rank, m, generator=g)
    d.set_band(0, quantize_rtn(v, 4, group_size), quantize_rtn(u, 4, group_size), torch.rand(band.rank, generator=g))
    for sb in d.sparse_bands:
        sb.v.set(quantize_rtn(torch.randn(1, sb.nnz[0], generator=g) / 4, sb.bits, group_size))
        sb.u.set(quantize_rtn(torch.randn(1, sb.nnz[1], generator=g), sb.bits, group_size))
        sb.s.copy_(torch.rand(sb.rank, generator=g) + 0.5)
    return d.to(DEVICE)


@pytest.mark.parametrize("bits,group_size", [((2, 3), 16), ((4, 8), 32), ((3, 2), 128)])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_sparse_band_kernels_read_packed_values_and_replay_the_masks(bits, group_size, tokens):
    """A hashed sparse band (format 6) through its kernels: ``Vᵀ x`` by the DARE kernel, ``Uᵀ``'s product by the
    transposed one, counting kept values from per-tile starts; the same as the band's decoded factors, on shapes
    that fill no tile (70 outputs: two tiles of 64, the second six wide; rank 37: two rank tiles of 32)."""
    d = _delta_with_sparse_bands(70, 50, seed=tokens, bits=bits, group_size=group_size)
    x = rand_x(tokens, 50, seed=tokens)
    for band in d.sparse_bands:
        assert K.sparse_band_ready(band)
        ref = band.forward_delta(x.float())
        y = K.sparse_band_add_into(torch.zeros(tokens, 70, device=DEVICE), x, band)
        assert_close(y, ref)
        base = rand_x(tokens, 70, seed=3)
        assert_close(K.sparse_band_add_into(base.clone(), x, band), base + ref)
    v_starts, tile_starts = K.triton_sparse.band_mask_state(d.sparse_bands[1], torch.device(DEVICE))
    assert v_starts.dtype == tile_starts.dtype == torch.int32 and tuple(tile_starts.shape) == (37, 2)
    mv, mu = d.sparse_bands[1].masks()
    assert int(tile_starts[5, 1]) == int(mu[:5].sum() + mu[5, :64].sum())  # row 5's first value in tile 1


def test_a_delta_with_sparse_bands_runs_them_on_the_kernels(monkeypatch):
    """ImPart's sparse bands (and the sparse tail) run on their own kernels beside the dense bands' (format 6: masks
    hashed in the kernel, no decoded copy), or, drawn by an older file's CPU generator, in PyTorch from decoded
    factors kept in the capped cache: a delta that has them, or a mixed batch holding one, no longer takes the
    PyTorch path whole."""
    from hf_deltacome import backend

    hashed = _delta_with_sparse_bands(30, 48, seed=1)
    older = _delta_with_sparse_bands(30, 48, seed=5, draws="generator")
    assert backend._kernel_ready(hashed) and backend._kernel_ready(older) and len(backend._parts(hashed)) == 2
    assert all(K.sparse_band_ready(b) for b in hashed.sparse_bands)
    assert not any(K.sparse_band_ready(b) for b in older.sparse_bands)
    calls = _kernel_calls(monkeypatch)
    x = rand_x(5, 48)
    for d in (hashed, older):
        ref = reference(x, d)
        band = d.bands[0]
        dense_only = x.float() @ (band.ut_dense().t() * band.s @ band.vt_dense()).t()
        assert (ref - dense_only.to(ref.device)).abs().max() > 1e-2  # the sparse bands are there
        assert_close(backend.delta_forward(x, d), ref)
        base = rand_x(5, 30, seed=4)
        assert_close(backend.add_delta_into(base.clone(), x, [d]), base + ref.to(DEVICE))
    assert not any(dequant_cache.holds(hashed, f"sparse_bands.{k}.factors") for k in (0, 1))  # read packed
    assert all(dequant_cache.holds(older, f"sparse_bands.{k}.factors") for k in (0, 1))
    deltas = [hashed, None, _delta_with_parts(30, 48, [(3, 5)], seed=2), older]
    rows = torch.tensor([2, 0, -1, 3, 0], device=DEVICE)
    for seq in (1, 3):  # decode, and prefill (several tokens a row)
        xs = rand_x(5, seq, 48, seed=seq)
        assert_close(backend.delta_forward_mixed(xs, deltas, rows), mixed_reference(xs, deltas, rows))
    assert calls.count("delta_forward") == 4 and calls.count("delta_forward_mixed") == 2  # none took the torch path
    for d in (hashed, older):
        d.sparse_bands[1].s.mul_(3.0)  # new bytes: what was built from the old ones is built again
        assert_close(backend.delta_forward(x, d), reference(x, d))


def test_a_dare_part_runs_under_inference_mode_and_its_cache_follows_new_values(monkeypatch):
    """A server's forward runs under ``torch.inference_mode``, where the parts it views are inference tensors without
    a version counter: the DARE part's cached sparse matrix still serves them (it raised before), and new values
    written outside that mode are read again."""
    from hf_deltacome import backend

    monkeypatch.setenv("DELTACOME_BACKEND", "torch")
    d = _delta_with_parts(30, 48, [(2, 3)], seed=6)
    x = rand_x(4, 48)
    ref = reference(x, d)
    with torch.inference_mode():
        first, again = backend.delta_forward(x, d), backend.delta_forward(x, d)
    assert_close(first, ref)
    assert_close(again, ref)
    assert dequant_cache.holds(d, "csr")
    g = torch.Generator().manual_seed(9)
    d.sparse.values.set(quantize_rtn(torch.randn(1, d.sparse.values.cols, generator=g), 2, 16))
    changed = reference(x, d)
    assert (changed - ref).abs().max() > 1e-3
    with torch.inference_mode():
        assert_close(backend.delta_forward(x, d), changed)


def test_compressed_adapters_with_dare_or_sparse_bands_give_the_same_logits_on_the_kernels(monkeypatch):
    """End to end: a tiny fine-tune compressed with bands plus a DARE residual (``deltacome-dare``, half the budget
    each), with DARE alone and with ImPart's sparse bands, run through PEFT on the kernels (the parts added beside
    them) and on the PyTorch path: the same logits."""
    import copy

    from tiny_models import make_finetune, make_model, random_ids

    from hf_deltacome import DeltaCoMeConfig, backend
    from hf_deltacome.compression.pipeline import compress

    base = make_model("llama", hidden_size=64, intermediate_size=128, head_dim=16)
    ft = make_finetune(base, rank=0, decay=0.05)
    calib, ids = random_ids(base, 4, 32, seed=1), random_ids(base, 2, 9, seed=2)
    for cfg, part in ((DeltaCoMeConfig(ratio=1 / 8, method="deltacome-dare", band_share=0.5), "sparse"),
                      (DeltaCoMeConfig(ratio=1 / 8, method="dare"), "sparse"),
                      (DeltaCoMeConfig(ratio=1 / 8, method="impart"), "sparse_bands")):  # fmt: skip
        model = compress(copy.deepcopy(base), ft, cfg, calibration=calib, progress=False).to(DEVICE)
        layout = model.peft_config["default"].layout
        held = [bool(entry.get(part)) for entry in layout.values()]
        assert all(held) if part == "sparse" else sum(held) >= 4  # every linear a DARE part; sparse bands where paid
        logits = {}
        for name in ("torch", "triton"):
            monkeypatch.setenv("DELTACOME_BACKEND", name)
            with torch.no_grad():
                logits[name] = model(ids.to(DEVICE)).logits.float()
        assert_close(logits["triton"], logits["torch"])
        assert all(backend._kernel_ready(m) for m in model.modules() if isinstance(m, PackedDelta))
        with torch.no_grad(), model.disable_adapter():
            assert (model(ids.to(DEVICE)).logits.float() - logits["torch"]).abs().max() > 1e-3  # the delta acts


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU scripts/gpu_check.sh runs the benchmark at full size")
def test_kernel_benchmark_runs_and_its_outputs_match_the_pytorch_path(tmp_path):
    """benchmarks/kernel_speed.py on a tiny shape under the interpreter (its timings mean nothing): it still runs
    against the current format and API, and every row it writes — one adapter, 8 mixed, a DARE residual (its mask
    hashed, then as a bitmap), vector codes, ImPart's sparse bands — matches the PyTorch path."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    md = tmp_path / "k.md"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "kernel_speed.py"), "--shapes", "64x64", "--tokens", "8",
         "--skip-decode", "--plot", "", "--markdown", str(md)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in md.read_text().splitlines() if line.startswith("| 64x64")]
    assert len(rows) == 5  # the layer table's row, the residual table's two, the vector codes' and ImPart's
    layer, hashed, bitmap, vq, impart = rows
    assert layer[2].strip() == "8" and "n/a" not in (layer[14], layer[15])  # 8 adapters mixed, split and looped
    for row in rows:
        assert float(row[-1]) < 1e-4  # max relative error against the PyTorch path (float32 here)
    assert "hashed" in hashed[1] and "bitmap" in bitmap[1] and "-dim x" in vq[1]
    assert float(hashed[7]) < float(bitmap[7])  # the kernel's mask state: row starts alone, then with the bitmap
    assert int(impart[1].split("+")[1].split()[0]) > 0 and float(impart[6]) > 0  # sparse bands, their mask state


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU scripts/gpu_check.sh runs the benchmark at full size")
def test_kernel_benchmark_decodes_with_the_defaults_layout(tmp_path):
    """``--decode-layout default``: the decode benchmark's adapters as ``deltacome compress`` lays them out (the MLP
    as 2-bit DARE), run through the kernels under the interpreter without a failed row."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    md = tmp_path / "k.md"
    r = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "kernel_speed.py"), "--shapes", "64x64", "--tokens", "1",
         "--skip-residual", "--skip-vq", "--decode-layout", "default", "--layers", "1", "--steps", "1", "--plot", "",
         "--markdown", str(md)],
        capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = md.read_text()
    assert "the MLP as a 2-bit DARE part" in text and "failed" not in text
    assert [line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| eager")] == ["0", "1", "8"]


def _dare_delta(m, n, bits, group_size, seed, rated=False, draws="hash"):
    """A delta holding only a DARE part (uniform keep 0.2, or importance-rated; ``draws``: hashed, as written since
    format 5, or the CPU generator's of older files), random values, on DEVICE."""
    from hf_deltacome.format.baseline_parts import pack_rates, rate_factors, sparse_mask

    g = torch.Generator().manual_seed(seed)
    rates = None
    if rated:
        rates = pack_rates(torch.randint(0, 16, (m,), generator=g), torch.randint(0, 16, (n,), generator=g))
    kept = int(sparse_mask(m, n, 0.2, seed, rate_factors(rates, m, n) if rated else None, draws).sum())
    nnz = kept + 5 if rated else kept  # a rated part may keep fewer values than it stores
    entry = {"nnz": nnz, "keep": 0.2, "seed": seed, "bits": bits, "group_size": group_size, "draws": draws}
    d = PackedDelta(m, n, [], group_size, sparse={**entry, "rates": "row-col"} if rated else entry)
    d.sparse.values.set(quantize_rtn(torch.randn(1, nnz, generator=g), bits, group_size))
    if rated:
        d.sparse.set_rates(rates, 0.2)
    return d.to(DEVICE)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 24, 128])
@pytest.mark.parametrize("draws", ["hash", "generator"])
def test_dare_kernel_reads_packed_values_and_replays_the_mask(bits, group_size, draws):
    """`sparse_add_into`: a DARE part's product from its packed values, its mask hashed in the kernel (format 5) or
    read as a bitmap (the CPU generator's draws of older files), equal to the PyTorch path's (CSR) product and added
    into the output; odd shapes (150 columns: a partial bitmap word and a partial column tile), every value width
    and group size, 1 / 12 / 70 tokens."""
    part = _dare_delta(37, 150, bits, group_size, seed=bits * 100 + group_size, draws=draws).sparse
    for shape in ((1, 150), (3, 4, 150), (70, 150)):
        x = rand_x(*shape, seed=len(shape))
        y0 = rand_x(*shape[:-1], 37, seed=9)
        y = y0.clone()
        assert K.sparse_add_into(y, x, part) is y
        assert_close(y - y0, part.forward_delta(x))
    from hf_deltacome.kernels.triton_sparse import mask_state

    words, starts = mask_state(part, torch.device(DEVICE))
    assert (words is None) == (draws == "hash")  # a hashed mask: nothing kept but each row's first value index
    per_row = part.mask().sum(1)
    assert torch.equal(starts.cpu().long(), torch.cumsum(per_row, 0) - per_row)


def test_dare_kernel_replays_a_seed_past_2_31():
    """A hashed seed above int32 (the format allows any under 2^32): the kernel takes its low 32 bits as the CPU does."""
    part = _dare_delta(29, 70, 2, 16, seed=2**32 - 7).sparse
    x = rand_x(3, 70)
    y = torch.zeros(3, 29, device=DEVICE)
    assert_close(K.sparse_add_into(y, x, part), part.forward_delta(x))


@pytest.mark.parametrize("rated", [True, False])
def test_dare_kernel_with_importance_rates_and_a_mixed_batch(rated):
    """A rated part (fewer kept values than stored; its mask read as a bitmap) and a hashed uniform one in a mixed
    batch: only the rows of the part's slot change."""
    part = _dare_delta(40, 96, 2, 16, seed=3, rated=rated).sparse
    _check_mixed_batch_and_bad_inputs(K.sparse_add_into, part, "DARE")


def _check_mixed_batch_and_bad_inputs(add_into, part, what: str) -> None:
    """A 40x96 part's kernel (``add_into(y, x, part, row_index, slot)``) in a mixed batch changes only the rows of its
    slot, as the PyTorch path computes them; a wrong width, a bad row index and a strided output are named."""
    x = rand_x(4, 3, 96)
    rows = torch.tensor([1, 0, -1, 1], device=DEVICE)
    y = torch.zeros(4, 3, 40, device=DEVICE)
    add_into(y, x, part, rows, slot=1)
    assert_close(y, part.forward_delta(x) * (rows == 1).to(x.dtype).view(-1, 1, 1))
    assert torch.count_nonzero(y[[1, 2]]) == 0
    with pytest.raises(DeltaCoMeError, match=rf"40x96 {what} part got input \(4, 3, 95\)"):
        add_into(y, rand_x(4, 3, 95), part)
    with pytest.raises(DeltaCoMeError, match="row_index"):
        add_into(y, x, part, rows[:3], slot=1)
    with pytest.raises(DeltaCoMeError, match="contiguous"):
        add_into(y.transpose(0, 1), x.transpose(0, 1), part)


def _vq_delta(m: int, n: int, rows: int, dim: int, seed: int) -> PackedDelta:
    """A delta holding a vector-quantized part of random codes, codebook and scale."""
    from hf_deltacome.format.vq_part import vq_nvectors

    g = torch.Generator().manual_seed(seed)
    d = PackedDelta(m, n, [], 16, vq={"rows": rows, "dim": dim, "codes": 16, "seed": seed})
    codes = torch.randint(0, 16, (vq_nvectors(rows, n, dim),), generator=g)
    d.vq.set(codes, torch.randn(16, dim, generator=g), 0.37)
    return d.to(DEVICE)


@pytest.mark.parametrize("dim,rows", [(8, 41), (6, 41), (5, 29)])
def test_vq_kernel_reads_the_codes_in_place(dim, rows):
    """`vq_add_into`: a vector-quantized part's product from its 4-bit codes and codebook, equal to the PyTorch
    path's (the decoded rows, rotated) and added into the output: vectors that straddle rows (8 and 5 on 66
    columns) or not (6), fewer stored rows than outputs, 1 / 12 / 70 tokens; the kernel keeps no decoded copy."""
    part = _vq_delta(41, 66, rows, dim, seed=dim).vq
    added = []
    for shape in ((1, 66), (3, 4, 66), (70, 66)):
        x = rand_x(*shape, seed=len(shape))
        y0 = rand_x(*shape[:-1], 41, seed=9)
        y = y0.clone()
        assert K.vq_add_into(y, x, part) is y
        added.append((x, y - y0))
    assert not dequant_cache.holds(part._store, "vq")
    for x, got in added:
        assert_close(got, part.forward_delta(x))
        assert got.abs().max() > 0


def test_vq_kernel_in_a_mixed_batch_and_bad_inputs():
    """Only the rows of the part's slot change; a wrong width, a bad row index and a strided output are named."""
    _check_mixed_batch_and_bad_inputs(K.vq_add_into, _vq_delta(40, 96, 40, 8, seed=3).vq, "vector-quantized")


def test_an_adapter_of_vector_codes_gives_the_same_logits_on_the_kernels(monkeypatch):
    """End to end: a tiny fine-tune compressed as vector codes (``method="vq"``, every linear) and with the
    default's whole modules as vector codes (``full_rank="vq"``), run through PEFT on the kernels (codes read in
    place, no decoded copy kept) and on the PyTorch path: the same logits."""
    import copy

    from tiny_models import make_finetune, make_model, random_ids

    from hf_deltacome import DeltaCoMeConfig
    from hf_deltacome.compression.pipeline import compress

    base = make_model("llama", hidden_size=64, intermediate_size=128, head_dim=16)
    ft = make_finetune(base, rank=0, decay=0.05)
    calib, ids = random_ids(base, 4, 32, seed=1), random_ids(base, 2, 9, seed=2)
    for cfg in (DeltaCoMeConfig(ratio=1 / 16, method="vq"), DeltaCoMeConfig(ratio=1 / 16, full_rank="vq")):
        model = compress(copy.deepcopy(base), ft, cfg, calibration=calib, progress=False).to(DEVICE)
        layout = model.peft_config["default"].layout
        assert any(entry.get("vq") for entry in layout.values())
        parts = [m.vq for m in model.modules() if isinstance(m, PackedDelta) and m.vq is not None]
        for p in parts:
            p._store.forget("vq")  # decoded by the forward passes of compression (the scales' distillation)
        logits = {}
        for name in ("triton", "torch"):
            monkeypatch.setenv("DELTACOME_BACKEND", name)
            with torch.no_grad():
                logits[name] = model(ids.to(DEVICE)).logits.float()
            decoded = [dequant_cache.holds(p._store, "vq") for p in parts]
            assert all(decoded) if name == "torch" else not any(decoded)
        assert_close(logits["triton"], logits["torch"])
