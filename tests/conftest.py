"""Shared fixtures: tiny random models, synthetic fine-tunes and an offline tokenizer (see ``tiny_models.py``)."""

from __future__ import annotations

import os
import sys

import pytest

# hf_deltacome first: with the repo root on sys.path, transformers would otherwise import the repo's top-level
# ``kernels/`` folder as the optional Hub ``kernels`` package in the middle of its own import and fail.
import hf_deltacome  # noqa: F401,E402

sys.path.insert(0, os.path.dirname(__file__))
# the demo zoo (SmolLM2 from GGUF, built-in fine-tune tasks) lives in examples/zoo, outside the package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from tiny_models import make_finetune, make_model, make_tokenizer  # noqa: E402


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
