"""Fine-tunes that added tokens: the vocabulary check, which rows are carried, and filling them into the adapter.

A fine-tune whose vocabulary extends the base's (the same first ``V`` tokens, rows appended by
``resize_token_embeddings``, e.g. for a chat template's special tokens) compresses like any other: the delta of the
first ``V`` rows of ``embed_tokens`` and ``lm_head`` is judged as usual (unchanged, or carried dense), and the new
rows ``V..V'`` of an otherwise unchanged vocabulary module are carried by PEFT's trainable tokens
(``trainable_token_indices``, the new rows' values only). The adapter records both sizes
(``DeltaCoMeConfig.base_vocab_size`` / ``vocab_size``); loading resizes the base's embeddings to ``V'`` before
PEFT injects the adapter (:meth:`hf_deltacome.model.DeltaCoMeModel._prepare_model`), and the base check looks at the
first ``V`` rows only, so ``PeftModel.from_pretrained(original_base, adapter)`` reproduces the fine-tune.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import DeltaCoMeConfig
from ..errors import ConfigError, IncompatibleModelsError

log = logging.getLogger("hf_deltacome")


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the input embedding (the model's vocabulary), else ``config.vocab_size``."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    return getattr(getattr(model, "config", None), "vocab_size", None)


def vocab_modules(model: nn.Module) -> list[str]:
    """Names of the modules indexed by token: the input embedding, and the output embedding when it exists."""
    wanted = [getattr(model, "get_input_embeddings", lambda: None)(), getattr(model, "get_output_embeddings", lambda: None)()]
    found = {id(m): n for n, m in model.named_modules(remove_duplicate=False) if m is not None}
    return [found[id(m)] for m in wanted if m is not None and id(m) in found]


def vocab_params(model: nn.Module) -> list[str]:
    """Parameters whose first dimension is the vocabulary (embedding weight, ``lm_head`` weight and bias)."""
    names = []
    for module in vocab_modules(model):
        for leaf in ("weight", "bias"):
            if getattr(model.get_submodule(module), leaf, None) is not None:
                names.append(f"{module}.{leaf}")
    return names


def tied(model: nn.Module) -> bool:
    """Whether ``lm_head`` shares the input embedding's weight."""
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return inp is not None and out is not None and getattr(out, "weight", None) is getattr(inp, "weight", None)


def check_added_tokens(base_tokenizer: Any, tokenizer: Any, base_vocab: int, vocab: int) -> None:
    """Refuse, before any work, a fine-tune whose first tokens are not the base's (naming the first that differs).

    Without both tokenizers the check cannot be made: a logged note says so (the embedding rows are still
    compared as usual)."""
    if vocab == base_vocab:
        return
    if base_tokenizer is None or tokenizer is None:
        log.info(
            "the fine-tune has %d tokens, the base %d: its first %d tokens are assumed to be the base's (no tokenizer "
            "of %s to check them)", vocab, base_vocab, base_vocab, "the base" if base_tokenizer is None else "the fine-tune",
        )  # fmt: skip
        return
    ours, theirs = _tokens(base_tokenizer), _tokens(tokenizer)
    for i in range(min(base_vocab, len(ours))):
        if ours.get(i) != theirs.get(i):
            raise IncompatibleModelsError(
                f"the fine-tune's vocabulary ({vocab} tokens) does not extend the base's ({base_vocab}): token {i} is "
                f"{ours.get(i)!r} in the base's tokenizer but {theirs.get(i)!r} in the fine-tune's. Added tokens must "
                "come after the base's own (resize_token_embeddings appends them)"
            )


def _tokens(tokenizer: Any) -> dict[int, str]:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return {int(i): str(t) for t, i in vocab.items()}


def token_indices(model: nn.Module, added_rows: Sequence[str], base_vocab: int, vocab: int) -> dict[str, list[int]]:
    """``trainable_token_indices`` for the vocabulary modules whose new rows are carried alone (a tied ``lm_head``
    follows the embedding, so only the embedding is named)."""
    emb = vocab_modules(model)[:1]
    names = [n for n in added_rows if not (tied(model) and emb and n != emb[0])]
    return {n: list(range(base_vocab, vocab)) for n in names}


def record(config: DeltaCoMeConfig, model: nn.Module, added_rows: Sequence[str], base_vocab: int, vocab: int) -> None:
    """Fill the config fields of a fine-tune that added tokens (nothing when it did not)."""
    if vocab == base_vocab:
        return
    config.base_vocab_size, config.vocab_size = int(base_vocab), int(vocab)
    indices = token_indices(model, added_rows, base_vocab, vocab)
    config.trainable_token_indices = indices or None
    log.info(
        "the fine-tune added %d token(s) (vocabulary %d -> %d): %s", vocab - base_vocab, base_vocab, vocab,
        ", ".join(f"{n} rows {base_vocab}..{vocab - 1} carried alone" for n in indices) or "carried in the dense copies",
    )  # fmt: skip


def added_row_bytes(model: nn.Module, config: DeltaCoMeConfig) -> dict[str, tuple[int, str, int]]:
    """Per saved trainable-tokens tensor (key without the ``base_model.model.`` prefix): bytes, dtype, dims."""
    out = {}
    for name, rows in (config.trainable_token_indices or {}).items():
        weight = model.get_submodule(name).weight
        out[f"{name}.token_adapter.trainable_tokens_delta"] = (
            len(rows) * weight.shape[1] * weight.element_size(), str(weight.dtype).removeprefix("torch."), 2,
        )  # fmt: skip
    return out


@torch.no_grad()
def fill_added_rows(inner: nn.Module, config: DeltaCoMeConfig, adapter_name: str, read: Any) -> None:
    """Copy the fine-tune's new rows into the trainable-tokens parameters of the wrapped model.

    ``read(name)`` gives the fine-tune's tensor of parameter ``name`` (the whole ``V' x d`` weight)."""
    for name, rows in (config.trainable_token_indices or {}).items():
        wrapper = inner.get_submodule(name)
        adapter = getattr(wrapper, "token_adapter", None)
        if adapter is None or adapter_name not in adapter.trainable_tokens_delta:
            raise ConfigError(f"trainable_token_indices entry {name!r} was not wrapped by PEFT")
        values = read(f"{name}.weight")[rows[0] : rows[-1] + 1]
        param = adapter.trainable_tokens_delta[adapter_name]
        device = param.device if param.device.type != "meta" else torch.device("cpu")
        adapter.trainable_tokens_delta[adapter_name] = nn.Parameter(
            values.to(device, param.dtype).clone(), requires_grad=False
        )
        original = adapter.trainable_tokens_original[adapter_name]
        if original.device.type == "meta":  # streamed: the base's new rows are zeros (see resize_vocab)
            adapter.trainable_tokens_original[adapter_name] = torch.zeros(original.shape, dtype=original.dtype)
