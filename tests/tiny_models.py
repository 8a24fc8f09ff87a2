"""Tiny random causal LMs and synthetic fine-tunes for fast CPU tests.

API (import from other tests: ``from tiny_models import make_model, make_finetune``):

* ``make_model(arch, seed=0, **config_overrides)`` -> a random ``*ForCausalLM`` in eval mode, float32.
  ``arch`` is one of ``ARCHS``: ``"llama"`` (GQA: 4 heads, 2 KV heads, intermediate 160 — not a multiple of the
  default group size 128), ``"mistral"`` (1 KV head, intermediate 176), ``"qwen2"`` (q/k/v biases, hidden 48,
  head_dim 12). Vocab sizes are odd (250/251/253). ``tie_word_embeddings=True`` gives a tied model.
* ``make_finetune(base, seed=0, ...)`` -> a deep copy of ``base`` perturbed like a real fine-tune (see its doc).
* ``target_linears(model)`` -> names of the ``nn.Linear`` modules inside the decoder layers.
* ``random_ids(model, num_samples, seq_len, seed)`` -> token ids for calibration / evaluation.
* ``make_tokenizer()`` -> an offline character-level ``PreTrainedTokenizerFast`` (100 tokens: ``<pad>`` 0, ``<s>``
  1, ``</s>`` 2, ``<unk>`` 3, printable ASCII, newline) with a small chat template; its ids fit every tiny model.
* ``logits(model, ids)`` and ``relative_logits_error(model, finetune, base, ids)`` -> how much of the fine-tune's
  effect on the logits ``model`` misses: ``||L_model − L_ft|| / ||L_ft − L_base||`` (0 = exact, 1 = base).
* ``swapped_deltas(model, "zero" | "random")`` -> a context in which every packed delta of a ``PeftModel`` acts as
  zero, or as itself with its output rows shuffled (same bytes, spectrum and norm; unrelated directions).
* ``baseline_errors(model, finetune, base, ids)`` and ``assert_beats_baselines(...)`` -> what those two score, and
  an error bound checked to sit well below both (a bound the base alone, or any adapter of that size, cannot meet).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

import hf_deltacome  # noqa: F401  (before transformers: see the note in conftest.py)

# isort: split
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHS = ("llama", "mistral", "qwen2")

_SPECS = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            vocab_size=250,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
    ),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        dict(
            vocab_size=251,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=None,
        ),
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            vocab_size=253,
            hidden_size=48,
            intermediate_size=136,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=False,
        ),
    ),
}

_COMMON = dict(
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    attn_implementation="eager",
)


def make_model(arch: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    """A tiny random causal LM of ``arch`` (float32, eval mode); ``overrides`` go into its config."""
    if arch not in _SPECS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    config_cls, model_cls, spec = _SPECS[arch]
    kwargs = {**_COMMON, **spec, **overrides}
    attn = kwargs.pop("attn_implementation")
    config = config_cls(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    if arch == "qwen2":  # HF initialises biases to zero; a real model's are not, and the fine-tune changes them
        g = torch.Generator().manual_seed(seed + 1)
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data = 0.02 * torch.randn(module.bias.shape, generator=g)
    model.name_or_path = f"tiny-random-{arch}"
    model.config._name_or_path = model.name_or_path
    return model


def target_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules inside the decoder layers (the default compression targets)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(r"\.layers\.\d+\.", n)]


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g))
    return q


@torch.no_grad()
def make_finetune(
    base: nn.Module,
    seed: int = 0,
    *,
    scale: float = 0.3,
    rank: int = 4,
    decay: float = 0.8,
    noise: float = 0.02,
    change_norms: bool = True,
    change_biases: bool = True,
    embedding_rows: int = 0,
    targets: list[str] | None = None,
) -> nn.Module:
    """A deep copy of ``base`` perturbed like a full fine-tune.

    Each target linear (default: every decoder linear) gets ``Δ = U diag(σ) Vᵀ + noise``: ``rank`` strong
    directions, then a long tail ``σ_i ∝ (i + 1)^-decay`` over the full rank (what fine-tune deltas look like), with
    ``||Δ||_F = scale · ||W||_F`` and i.i.d. noise of relative size ``noise``. Optionally every RMSNorm weight is
    rescaled by ``1 + 0.1·ε`` (``change_norms``), linear biases shift by ``0.05·ε`` (``change_biases``) and
    ``embedding_rows`` rows of the input embedding change (the rows of a tied lm_head change with them).
    """
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1000 + seed)
    names = set(targets if targets is not None else target_linears(ft))
    for name, module in ft.named_modules():
        if name in names and isinstance(module, nn.Linear):
            W = module.weight
            m, n = W.shape
            k = min(m, n)
            sigma = (torch.arange(k, dtype=torch.float32) + 1.0) ** -decay
            sigma[:rank] *= 4.0
            d = _orthonormal(m, k, g) @ torch.diag(sigma) @ _orthonormal(n, k, g).t()
            d = d * (scale * W.norm() / d.norm())
            d += torch.randn(m, n, generator=g) * (noise * W.norm() / (m * n) ** 0.5)
            W.add_(d.to(W.dtype))
            if change_biases and module.bias is not None:
                module.bias.add_(0.05 * torch.randn(module.bias.shape, generator=g).to(module.bias.dtype))
        elif change_norms and "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            module.weight.mul_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=g).to(module.weight.dtype))
    if embedding_rows:
        emb = ft.get_input_embeddings().weight
        rows = torch.randperm(emb.shape[0], generator=g)[:embedding_rows]
        emb[rows] += 0.5 * emb.std() * torch.randn(len(rows), emb.shape[1], generator=g).to(emb.dtype)
    return ft.eval()


def random_ids(model: nn.Module, num_samples: int = 8, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    """Random token ids (never the pad id 0) for ``model``'s vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (num_samples, seq_len), generator=g)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer():
    """An offline character-level tokenizer (BOS prepended, ids 0-99) with ``CHAT_TEMPLATE``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def save_with_tokenizer(folder, **models: nn.Module) -> None:
    """Save each model under ``folder / name`` with :func:`make_tokenizer` beside it (a pair the CLI can read)."""
    for name, model in models.items():
        model.save_pretrained(folder / name)
        make_tokenizer().save_pretrained(folder / name)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor | Mapping) -> torch.Tensor:
    """float32 logits for token ids, or for a tokenizer's batch (ids with their attention mask)."""
    inputs = dict(ids) if isinstance(ids, Mapping) else {"input_ids": ids}
    return model(**inputs).logits.float()


@torch.no_grad()
def relative_logits_error(model: nn.Module, finetune: nn.Module, base: nn.Module, ids: torch.Tensor) -> float:
    """``||L_model − L_ft|| / ||L_ft − L_base||``: the share of the fine-tune's effect that ``model`` misses."""
    lf = logits(finetune, ids)
    return float((logits(model, ids) - lf).norm() / (lf - logits(base, ids)).norm())


@contextlib.contextmanager
def swapped_deltas(model: nn.Module, kind: str, seed: int = 0) -> Iterator[nn.Module]:
    """Within the block every packed delta of ``model``'s active adapters acts as zero (``kind="zero"``), or as the
    same delta with its output rows randomly permuted (``"random"``: an adapter of the same size, spectrum and
    norm whose directions have nothing to do with the fine-tune). Dense extras (``modules_to_save``) stay."""
    from hf_deltacome.layer import DeltaCoMeLinear

    if kind not in ("zero", "random"):
        raise ValueError(f"kind must be 'zero' or 'random', got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    handles = []
    for module in model.modules():
        if not isinstance(module, DeltaCoMeLinear):
            continue
        for name in module.active_adapters:
            packed = module.deltacome_delta[name]
            dense, bias = packed.delta_weight(), packed.bias
            perm = torch.randperm(dense.shape[0], generator=g)

            def hook(mod, args, out, dense=dense, bias=bias, perm=perm):
                d = torch.nn.functional.linear(args[0].to(dense.dtype), dense, bias)
                new = torch.zeros_like(d) if kind == "zero" else d[..., perm]
                return out + (new - d).to(out.dtype)

            handles.append(module.register_forward_hook(hook))
    if not handles:
        raise ValueError("the model has no Delta-CoMe layer")
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def baseline_errors(model: nn.Module, finetune: nn.Module, base: nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """``relative_logits_error`` of ``model`` with its packed deltas zeroed and shuffled (see ``swapped_deltas``)."""
    out = {}
    for kind in ("zero", "random"):
        with swapped_deltas(model, kind):
            out[kind] = relative_logits_error(model, finetune, base, ids)
    return out


MARGIN = 0.6  # a bound must sit at most this share of what a zero and a random delta score


def assert_beats_baselines(
    model: nn.Module, finetune: nn.Module, base: nn.Module, ids: torch.Tensor, bound: float, margin: float = MARGIN
) -> float:
    """Assert ``relative_logits_error(model) < bound`` and that ``bound`` is at most ``margin`` times what a zero
    delta and a random adapter of the same size score on ``ids`` (so the bound cannot be met without the delta).
    Returns the error."""
    err = relative_logits_error(model, finetune, base, ids)
    ref = baseline_errors(model, finetune, base, ids)
    assert bound <= margin * min(ref.values()), f"bound {bound} is not well below the baselines {ref}"
    assert err < bound, f"relative error {err:.3f} >= {bound} (baselines {ref})"
    return err


def long_tail_delta(m: int, n: int, seed: int = 0, decay: float = 0.7) -> torch.Tensor:
    """A delta with a few strong directions and a long tail of small singular values, like real fine-tunes."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = (torch.arange(k, dtype=torch.float32) + 1) ** -decay
    s[:3] *= 3
    return 0.01 * (u * s) @ v.t()
