"""Compile the kernels for a CUDA architecture without a GPU, and report registers, spills and shared memory.

    python -m hf_deltacome.kernels.compile_check [--arch 90] [--quick]

Every autotuning candidate is compiled (Triton to PTX, then ``ptxas`` from Triton's wheel for the register
report) for float16, bfloat16 and float32 activations, with a compile-time group size of 128 and with the
per-element group path, the DARE kernel (`triton_sparse`) at every value width and its launch tiles, and the
vector-code kernel (`triton_vq`) at its launch tiles. This catches compile errors the CPU interpreter cannot see and
shows which candidates spill. Needs ``TRITON_INTERPRET`` unset (it is removed here before Triton is used).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from functools import partial

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import triton_delta as TD  # noqa: E402
from . import triton_sparse as TS  # noqa: E402
from . import triton_vq as TV  # noqa: E402

_PTR = {tl.float16: "*fp16", tl.bfloat16: "*bf16", tl.float32: "*fp32"}
_SHRINK_SIG = dict(
    x_ptr=None,
    row_ad_ptr="*i64",
    t_ptr="*fp32",
    tab_ptr="*i64",
    tile_ptr="*i32",
    tile_cols="i32",
    T="i32",
    N="i32",
    tokens_per_row="i32",
    stride_xt="i32",
    stride_tt="i32",
    T_BUCKET="i32",
    split_k="i32",
    stride_ts="i32",
)
_EXPAND_SIG = dict(
    t_ptr="*fp32",
    row_ad_ptr="*i64",
    y_ptr=None,
    yp_ptr="*fp32",
    sem_ptr="*i32",
    tab_ptr="*i64",
    atab_ptr="*i64",
    n_adapters="i32",
    T="i32",
    M="i32",
    tokens_per_row="i32",
    stride_tt="i32",
    stride_yt="i32",
    split_k="i32",
    stride_ts="i32",
    split_r="i32",
    split_a="i32",
    stride_ps="i32",
    T_BUCKET="i32",
    accumulate="i32",
)
_SPARSE_SIG = dict(
    x_ptr=None,
    y_ptr=None,
    row_ad_ptr="*i32",
    bm_ptr="*i32",
    start_ptr="*i32",
    q_ptr="*i32",
    hi_ptr="*i32",
    sc_ptr="*fp16",
    z_ptr="*u8",
    T="i32",
    M="i32",
    N="i32",
    tokens_per_row="i32",
    slot="i32",
    stride_xt="i32",
    stride_yt="i32",
    bm_stride="i32",
    group="i32",
    seed="i32",
    cut="i32",
)
# the DARE kernel's tiles as `triton_sparse.sparse_add_into` launches them: one token, a decode block, prefill
_SPARSE_TILES = (dict(BT=1, BM=16, BK=256), dict(BT=16, BM=32, BK=128), dict(BT=32, BM=32, BK=128))


def _compile_part_kernel(fn, sig: dict, constexprs: dict, arch: int):
    """Compile one of the parts' kernels (four warps, as launched) for ``sm_<arch>``."""
    sig = dict(sig, **{name: "constexpr" for name in constexprs})
    return triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})


def compile_sparse(compute, bits: int, tile: dict, arch: int, hashed: bool = True, y_fp32: bool = False):
    """Compile the DARE kernel for ``sm_<arch>`` at ``bits``-bit values and one tile, its mask hashed in the kernel
    (format 5) or read as a bitmap; ``y_fp32``: into a float32 buffer (a sparse band's ``Vᵀ x``)."""
    sig = dict(_SPARSE_SIG, x_ptr=_PTR[compute], y_ptr="*fp32" if y_fp32 else _PTR[compute])
    constexprs = {"HASHED": hashed, "BITS": bits, "COMPUTE": compute, **tile}
    return _compile_part_kernel(TS._sparse_kernel, sig, constexprs, arch)


_SPARSE_T_SIG = dict(
    t_ptr="*fp32", y_ptr=None, row_ad_ptr="*i32", tile_start_ptr="*i32", q_ptr="*i32", hi_ptr="*i32", sc_ptr="*fp16",
    z_ptr="*u8", T="i32", R="i32", M="i32", tokens_per_row="i32", slot="i32", stride_tt="i32", stride_yt="i32",
    n_tiles="i32", group="i32", seed="i32", cut="i32",
)  # fmt: skip


def compile_sparse_band(compute, bits: int, bt: int, arch: int, with_v: bool = True):
    """Compile a sparse band's kernels for ``sm_<arch>`` at ``bt`` tokens a program: ``Vᵀ x`` (the DARE kernel,
    hashed, into float32; ``with_v``) and ``Uᵀ``'s transposed product, as `triton_sparse.sparse_band_add_into`
    launches them; returns the latter."""
    if with_v:
        bm, bk = TS._dare_tile(bt)
        compile_sparse(compute, bits, dict(BT=bt, BM=bm, BK=bk), arch, True, y_fp32=True)
    constexprs = {"BITS": bits, "COMPUTE": compute, "BT": bt, "BO": TS.BAND_TILE, "BK": 32}
    return _compile_part_kernel(TS._sparse_t_kernel, dict(_SPARSE_T_SIG, y_ptr=_PTR[compute]), constexprs, arch)


_VQ_SIG = dict(
    x_ptr=None,
    t_ptr="*fp32",
    row_ad_ptr="*i32",
    codes_ptr="*u8",
    book_ptr="*fp16",
    scale_ptr="*fp32",
    T="i32",
    R="i32",
    N="i32",
    DIM="i32",
    tokens_per_row="i32",
    slot="i32",
    stride_xt="i32",
    stride_tt="i32",
)
# the vector-code kernel's tiles as `triton_vq.vq_add_into` launches them: one token, a decode block, prefill
_VQ_TILES = (dict(BT=1, BM=32, BK=128), dict(BT=16, BM=32, BK=64), dict(BT=32, BM=32, BK=64))


def compile_vq(compute, tile: dict, arch: int):
    """Compile the vector-code kernel for ``sm_<arch>`` at one tile."""
    return _compile_part_kernel(TV._vq_kernel, dict(_VQ_SIG, x_ptr=_PTR[compute]), {"COMPUTE": compute, **tile}, arch)


def compile_one(kind: str, cfg: triton.Config, compute, consts: dict, arch: int):
    """Compile one kernel variant for ``sm_<arch>``; returns Triton's compiled kernel."""
    fn = TD._shrink_kernel if kind == "shrink" else TD._expand_kernel
    sig = dict(_SHRINK_SIG if kind == "shrink" else _EXPAND_SIG)
    sig["x_ptr" if kind == "shrink" else "y_ptr"] = _PTR[compute]
    deq = tl.float16 if compute == tl.float16 else tl.float32
    constexprs = {"COMPUTE": compute, "DEQ": deq, **consts, **cfg.kwargs}
    for name in constexprs:
        sig[name] = "constexpr"
    src = ASTSource(fn, sig, constexprs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )


def ptxas_report(kernel, arch: int) -> str:
    """Registers, spill bytes and shared memory of a compiled kernel (``ptxas -v`` on its PTX)."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next(
        (os.path.join(bindir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bindir, n))), None
    )
    if ptxas is None:
        return f"smem={kernel.metadata.shared} (no ptxas for a register report)"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        r = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.devnull], capture_output=True, text=True)
    text = r.stdout + r.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    if r.returncode != 0:
        return f"ptxas failed: {text.strip()[:200]}"
    return f"regs={regs[0] if regs else '?'} spill={spills[0] if spills else '?'} smem={kernel.metadata.shared}"


def _report(label: str, compile_fn, arch: int) -> int:
    """Compile one variant and print its line (its ptxas report or its error); returns 1 if it failed, else 0, so
    that every failing variant is reported before the run fails."""
    try:
        report, failed = ptxas_report(compile_fn(), arch), 0
    except Exception as e:
        report, failed = f"COMPILE ERROR {type(e).__name__}: {str(e)[:300]}", 1
    print(f"{label} :: {report}", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80 = A100, 90 = H100/H200)")
    ap.add_argument("--quick", action="store_true", help="first candidate of each list only")
    args = ap.parse_args(argv)
    if TD.INTERPRET:
        print("hf_deltacome.kernels was imported under TRITON_INTERPRET=1; run this module on its own", file=sys.stderr)
        return 2
    failures = 0
    for compute in (tl.float16, tl.bfloat16, tl.float32):
        configs = TD._CONFIGS_F32 if compute == tl.float32 else TD._CONFIGS
        for (kind, phase), cands in configs.items():
            cands = cands[:1] if args.quick else cands
            for group in (128, 0):
                for cfg in cands:
                    consts = {"GROUP": group}
                    if phase != "prefill":
                        consts["BT"] = 1 if phase == "gemv" else 16
                    label = f"{kind:6s} {phase:7s} {str(compute):8s} group={group:3d} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
                    failures += _report(label, partial(compile_one, kind, cfg, compute, consts, args.arch), args.arch)
        for bits in TS.SPARSE_BITS:
            for tile in _SPARSE_TILES if not args.quick else _SPARSE_TILES[:2]:
                for hashed in (True, False):
                    label = f"sparse  {str(compute):8s} bits={bits} {tile} {'hash' if hashed else 'bitmap'} w4"
                    build = partial(compile_sparse, compute, bits, tile, args.arch, hashed)
                    failures += _report(label, build, args.arch)
            if args.quick and bits != 3:  # the low plane and the high bits: every read the other widths make
                continue
            for bt in (1, 16) if args.quick else (1, 16, 32):
                with_v = not args.quick or bt == 1  # V is the DARE kernel (compiled above) into float32
                label = f"band    {str(compute):8s} bits={bits} BT={bt} ({'V: DARE kernel into float32, ' * with_v}U) w4"
                build = partial(compile_sparse_band, compute, bits, bt, args.arch, with_v)
                failures += _report(label, build, args.arch)
        for tile in _VQ_TILES if not args.quick else _VQ_TILES[:2]:
            label = f"vq      {str(compute):8s} {tile} w4"
            failures += _report(label, partial(compile_vq, compute, tile, args.arch), args.arch)
    print(f"{failures} variant(s) failed to compile")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
