"""The same inputs give the same adapter bytes: compressed tiny pairs against hashes checked in beside this file.

``golden_adapters.json`` is written by ``python tests/test_golden.py --write``: a refactor must not change one byte
of what ``compress`` + ``save_pretrained`` write (the package reorganisation was checked this way). A deliberate
format or algorithm change rewrites the file and says so in its commit (last: packed format 2 and the whole-file
budget; then DARE's values on a clipped grid; then DARE parts spending what every module leaves unspent; then the
default's MLP as DARE, whose earlier bytes the bands cases keep; then that DARE at uniform rates; then DARE masks drawn by a hash, format 5). Hashes cover ``adapter_model.safetensors`` whole and the ``layout`` of
``adapter_config.json`` (the rest of the config records timings and versions).

Each case holds a list of hash sets, one per kind of CPU it was recorded on: LAPACK's SVD and the BLAS kernels
round differently on different CPUs (an AMD EPYC and the machine that first wrote the file agree on DARE, which
takes no SVD, and differ on every SVD case), so the written bytes must equal one of the recorded sets.
A case whose native bytes are not recorded is built once more in a fresh interpreter in a portable mode
(``PORTABLE_ENV``: MKL's conditional numerical reproducibility, ATen's non-vectorised kernels, one thread), whose
bytes do not depend on the CPU: on an AVX2-only EPYC they were the same with MKL held to AVX2 and to SSE4.2, where
the native bytes of all twelve cases differ between the two. It passes when those bytes are recorded, so a new kind
of CPU still checks every byte (three cases' native bytes differed on that AVX2 machine, the first seen of its kind).
``--write`` adds this machine's native and portable sets to each case (``--write --fresh`` drops the others: a
deliberate change).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import make_finetune, make_model, random_ids  # noqa: E402

import hf_deltacome  # noqa: E402

GOLDEN = Path(__file__).with_name("golden_adapters.json")

# name -> (arch, config kwargs, uses calibration)
CASES: dict[str, tuple[str, dict, bool]] = {
    # the default: the MLP as DARE alone (dare_modules="auto", uniform rates), the attention as bands
    "llama-gptq-default": ("llama", {}, True),
    # every target as bands (the default before dare_modules="auto"; the band cases below pin it too)
    "llama-gptq-bands": ("llama", {"dare_modules": None}, True),
    "llama-rtn": ("llama", {"quantizer": "rtn", "dare_modules": None}, False),
    "qwen2-gptq-bias-1/8": ("qwen2", {"ratio": "1/8", "dare_modules": None}, True),
    "mistral-gptq-share0.7-act-order": ("mistral", {"min_rank_share": 0.7, "act_order": True, "dare_modules": None},
                                        True),  # fmt: skip
    "llama-lowrank": ("llama", {"method": "lowrank"}, True),
    "llama-svd-uniform-3": ("llama", {"method": "svd-uniform", "uniform_bits": 3}, True),
    "llama-bitdelta-1/16": ("llama", {"method": "bitdelta", "ratio": "1/16", "distill_steps": 3}, True),
    "llama-dare": ("llama", {"method": "dare", "uniform_bits": 4}, True),
    # what residual="auto" stores when it keeps a residual: 3-bit bands on a quarter, a 2-bit DARE of the rest
    "llama-residual-0.25": ("llama", {"method": "deltacome-dare", "bands": [[3, None]], "band_share": 0.25,
                                      "uniform_bits": 2, "dare_rates": "uniform"}, True),  # fmt: skip
    # DARE with importance rates (format 3): rate codes and threshold beside the values; data-free, no SVD
    "llama-dare-importance": ("llama", {"method": "dare", "dare_rates": "importance", "uniform_bits": 2,
                                        "quantizer": "rtn"}, False),  # fmt: skip
    "llama-greedy-adaptive": ("llama", {"search": "greedy", "allocation": "adaptive", "ratio": "1/8",
                                        "dare_modules": None}, True),  # fmt: skip
    "llava-gptq-image-text": ("llava", {"ratio": "1/4", "group_size": 16}, True),  # the default above 1/8: bands
}


def build(name: str, folder: Path) -> dict[str, str]:
    """Compress the case ``name`` into ``folder`` and return the hashes of what was written."""
    arch, kwargs, calibrated = CASES[name]
    torch.manual_seed(0)
    cfg = hf_deltacome.DeltaCoMeConfig(**kwargs)
    if arch == "llava":
        from tiny_vlm import make_llava, make_processor, make_vlm_finetune, random_pairs

        base = make_llava(seed=0)
        ft = make_vlm_finetune(base, seed=1)
        model = hf_deltacome.compress(
            base, ft, cfg, calibration=random_pairs(8, seed=3), processor=make_processor(), num_samples=8,
            seq_len=16, progress=False,
        )  # fmt: skip
    else:
        base = make_model(arch, seed=3)
        ft = make_finetune(base, seed=3)
        calib = random_ids(ft, num_samples=8, seq_len=24, seed=5) if calibrated else None
        model = hf_deltacome.compress(base, ft, cfg, calibration=calib, progress=False)
    model.save_pretrained(folder)
    weights = (folder / "adapter_model.safetensors").read_bytes()
    layout = json.loads((folder / "adapter_config.json").read_text())["layout"]
    return {
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "layout_sha256": hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest(),
        "weights_bytes": str(len(weights)),
    }


# Set before torch loads (so in a fresh interpreter): the same floating-point results on every x86 CPU.
PORTABLE_ENV = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def build_all() -> dict[str, dict[str, str]]:
    """Every case's hashes, built in this interpreter, one case at a time in its own folder."""
    import tempfile

    out = {}
    for case in sorted(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            out[case] = build(case, Path(tmp))
    return out


def build_portable() -> dict[str, dict[str, str]]:
    """Every case's hashes, built in a fresh interpreter under ``PORTABLE_ENV``."""
    r = subprocess.run(
        [sys.executable, __file__, "--print"], env={**os.environ, **PORTABLE_ENV}, capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"the portable build failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


@functools.cache
def portable_sets() -> dict[str, dict[str, str]]:
    """`build_portable`, run once per test session and only when a case's native bytes are not recorded."""
    return build_portable()


@pytest.mark.usefixtures("one_thread")  # one summation order, whatever the machine's core count
@pytest.mark.parametrize("name", sorted(CASES))
def test_same_bytes_as_recorded(name: str, tmp_path: Path) -> None:
    expected = json.loads(GOLDEN.read_text())[name]
    got = build(name, tmp_path)
    if got in expected:
        return
    portable = portable_sets()[name]
    assert portable in expected, (
        f"{name}: the adapter written differs from every set in {GOLDEN.name} (native {got}, portable {portable}, "
        f"recorded {expected})"
    )


if __name__ == "__main__":  # pragma: no cover - writes the reference file
    torch.set_num_threads(1)
    if "--print" in sys.argv:  # the portable build's child: hashes as one JSON line
        print(json.dumps(build_all()))
        sys.exit(0)
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/test_golden.py --write [--fresh]")
    out = {} if "--fresh" in sys.argv or not GOLDEN.is_file() else json.loads(GOLDEN.read_text())
    for sets in (build_all(), build_portable()):
        for case, got in sets.items():
            out[case] = [h for h in out.get(case, []) if h != got] + [got]
            print(case, got)
    GOLDEN.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
