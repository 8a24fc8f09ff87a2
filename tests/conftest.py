"""Shared fixtures: tiny random models, synthetic fine-tunes and an offline tokenizer (see ``tiny_models.py``)."""

from __future__ import annotations

import os
import sys

import pytest

# hf_deltacome first: with the repo root on sys.path, transformers would otherwise import the repo's top-level
# ``kernels/`` folder as the optional Hub ``kernels`` package in the middle of its own import and fail.
import hf_deltacome  # noqa: F401,E402

# Triton picks its interpreter when the kernels are defined (their first import), so on a machine without CUDA every
# test process interprets them, whichever test imports them first (TRITON_INTERPRET set in the environment wins)
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))
# the demo zoo (SmolLM2 from GGUF, built-in fine-tune tasks) lives in examples/zoo, outside the package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from tiny_models import make_finetune, make_model, make_tokenizer  # noqa: E402

ZERO_DELTA_SWITCH = "DELTACOME_TEST_ZERO_DELTA"


def _zero_every_compressed_delta() -> None:
    """Check run only (``DELTACOME_TEST_ZERO_DELTA=1``): make compression store a zero delta everywhere.

    Every floating-point buffer of each packed delta it fills (scales, singular values, 16-bit values, the bias
    delta) is zeroed right after filling, and again after BitDelta's scale distillation; codes and masks stay valid,
    so the adapter saves and loads as usual but adds nothing. Dense extras (``modules_to_save``) are untouched. A
    test that still passes under this switch does not check that the compressed delta carries the fine-tune; the
    list of such tests and why each is fine is kept in the notes (zero_delta_survivors.md).
    """
    import torch

    from hf_deltacome.compression import pipeline
    from hf_deltacome.compression.modules import ModuleFactors
    from hf_deltacome.layer import DeltaCoMeLayer

    def zero(packed: torch.nn.Module) -> None:
        with torch.no_grad():
            for buf in packed.buffers():
                if buf.is_floating_point():
                    buf.zero_()

    fill_module, fill_factors, distill = pipeline._Filler.fill, ModuleFactors.fill, pipeline.distill_scales

    def filler_fill(self, name, hessian, device):
        fill_module(self, name, hessian, device)
        zero(self.inner.get_submodule(name).deltacome_delta[self.adapter_name])
        ZEROED["fills"] += 1

    def factors_fill(self, packed):
        fill_factors(self, packed)
        zero(packed)
        ZEROED["fills"] += 1

    def distill_then_zero(peft_model, *args, **kwargs):
        out = distill(peft_model, *args, **kwargs)
        for module in peft_model.modules():
            if isinstance(module, DeltaCoMeLayer):
                for packed in module.deltacome_delta.values():
                    zero(packed)
        return out

    pipeline._Filler.fill = filler_fill
    ModuleFactors.fill = factors_fill
    pipeline.distill_scales = distill_then_zero


ZEROED = {"fills": 0, "tests": {}}  # check run: packed deltas zeroed so far, and per test id how many


if os.environ.get(ZERO_DELTA_SWITCH) == "1":
    _zero_every_compressed_delta()

    @pytest.fixture(autouse=True)
    def _count_zeroed_deltas(request):
        before = ZEROED["fills"]
        yield
        ZEROED["tests"][request.node.nodeid] = ZEROED["fills"] - before

    def pytest_sessionfinish(session):
        """With ``DELTACOME_TEST_ZERO_DELTA_REPORT=path``: how many zeroed deltas each test compressed, as JSON."""
        path = os.environ.get(ZERO_DELTA_SWITCH + "_REPORT")
        if path:
            import json

            with open(path, "w") as f:
                json.dump(ZEROED["tests"], f, indent=1, sort_keys=True)


@pytest.fixture(autouse=True)
def _threads_unchanged():
    """Every test leaves torch's thread count as it found it: one that sets it and does not put it back slows every
    later test (the golden tests once left one thread behind: the suite took 28 min instead of 20 on a 2-core host)."""
    import torch

    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"the test left torch at {after} threads (it found {before}); use the one_thread fixture")


@pytest.fixture
def one_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``): on tiny models thread
    start-up and spinning cost more than they save (much more on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_llama():
    """A fresh tiny Llama (GQA) base model."""
    return make_model("llama")


@pytest.fixture
def tiny_mistral():
    return make_model("mistral")


@pytest.fixture
def tiny_qwen2():
    return make_model("qwen2")


@pytest.fixture
def tiny_pair():
    """Factory: ``tiny_pair(arch="llama", seed=0, **finetune_kwargs) -> (base, finetuned)``."""

    def make(arch: str = "llama", seed: int = 0, model_kwargs: dict | None = None, **finetune_kwargs):
        base = make_model(arch, seed=seed, **(model_kwargs or {}))
        return base, make_finetune(base, seed=seed, **finetune_kwargs)

    return make


@pytest.fixture(scope="session")
def tokenizer():
    """Offline character-level tokenizer with a chat template (ids < 100)."""
    return make_tokenizer()
