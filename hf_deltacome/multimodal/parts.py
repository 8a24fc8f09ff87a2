"""The parts of a vision-language model (LLaVA-style ``*ForConditionalGeneration``): detection, the pair check and
the default targets.

A VLM is a vision tower, a multimodal projector and a language model. By default the targets are every
``nn.Linear`` in the language model's decoder layers and in the projector, plus the vision tower's linears *whose
weights changed* (a tower the fine-tune froze is left alone); explicit ``target_modules`` may select linears of any
of the three parts. Everything else that changed is carried densely, as for text models.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compression.targets import matches, show
from ..errors import ConfigError, IncompatibleModelsError

# Attribute names transformers uses for the module that maps vision features into the language model's space.
PROJECTOR_NAMES = (
    "multi_modal_projector",
    "multimodal_projector",
    "mm_projector",
    "merger",
    "connector",
    "projector",
    "visual_projection",
    "vision_projection",
    "embed_vision",
    "aligner",
    "vision_adapter",
)

# Config fields that change how image features reach the language model without changing any parameter shape.
_VLM_CONFIG_KEYS = (
    "image_token_id",
    "image_token_index",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "projector_hidden_act",
    "multimodal_projector_bias",
    "image_seq_length",
    "mm_tokens_per_image",
)
_VISION_CONFIG_KEYS = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "depth", "spatial_merge_size")

LANGUAGE, PROJECTOR, VISION, OTHER = "language", "projector", "vision", "other"


# ================================================================================ detection and parts


def is_vlm(model_or_config: Any) -> bool:
    """True for a vision-language model (or its config): a config with a ``vision_config`` and a separate LM."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "vision_config", None) is None:
        return False
    if isinstance(model_or_config, nn.Module):
        try:
            vlm_parts(model_or_config)
        except ConfigError:
            return False
    return True


@dataclass(frozen=True)
class VLMParts:
    """Module-name prefixes of the parts of a VLM, e.g. for ``LlavaForConditionalGeneration``:
    ``language="model.language_model"``, ``layers="model.language_model.layers"``, ``vision="model.vision_tower"``,
    ``projectors=("model.multi_modal_projector",)``."""

    language: str
    layers: str
    vision: str | None
    projectors: tuple[str, ...] = field(default_factory=tuple)

    def part_of(self, name: str) -> str:
        """``"projector"``, ``"language"`` (inside a decoder layer), ``"vision"`` or ``"other"`` for a module name."""
        if any(_under(name, p) for p in self.projectors):
            return PROJECTOR
        if re.match(re.escape(self.layers) + r"\.\d+(\.|$)", name):
            return LANGUAGE
        if self.vision is not None and _under(name, self.vision):
            return VISION
        return OTHER


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _name_of(model: nn.Module, module: Any) -> str | None:
    if module is None or module is model:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def vlm_parts(model: nn.Module) -> VLMParts:
    """Find the language model, its decoder layers, the vision tower and the projector(s) of ``model``.

    Uses transformers' ``get_decoder()`` / ``get_encoder(modality="image")`` lookups, so any VLM that follows the
    library's naming (``language_model``, ``vision_tower`` / ``visual`` / ``vision_model``, ``multi_modal_projector``
    / ``merger`` / ...) is understood. Raises `ConfigError` when ``model`` has no separate language model.
    """
    what = type(model).__name__
    get_decoder = getattr(model, "get_decoder", None)
    language = _name_of(model, get_decoder() if callable(get_decoder) else None)
    if language is None:
        raise ConfigError(f"{what} has no separate language model (get_decoder() returns the model itself)")
    get_encoder = getattr(model, "get_encoder", None)
    vision = None
    if callable(get_encoder):
        try:
            vision = _name_of(model, get_encoder(modality="image"))
        except (TypeError, ValueError):
            vision = None
    if vision is not None and (_under(language, vision) or _under(vision, language)):
        vision = None
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = getattr(text_config, "num_hidden_layers", None)
    lists = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and _under(n, language)
        and len(m) > 0
        and (n_layers is None or len(m) == n_layers)
    ]
    if not lists:
        raise ConfigError(f"cannot find the decoder layers of {what}'s language model {language!r}")
    preferred = [c for c in lists if re.search(r"(^|\.)(layers|h|blocks|layer)$", c[0])]
    layers = (preferred or lists)[0][0]
    projectors: list[str] = []
    for n, _ in model.named_modules():
        if n.rsplit(".", 1)[-1] in PROJECTOR_NAMES and not _under(n, language):
            if not any(_under(n, p) for p in projectors):
                projectors.append(n)
    return VLMParts(language=language, layers=layers, vision=vision, projectors=tuple(projectors))


# ================================================================================ checks and targets


def check_vlm_compatible(base: nn.Module, finetuned: nn.Module) -> None:
    """Raise `IncompatibleModelsError` when the fine-tune's projector, vision tower or image wiring differ from the base.

    Parameter shapes of the projector are compared here with a message of their own (a different projector usually
    means a fine-tune of another base or vision tower); config fields such as ``vision_feature_layer`` or
    ``image_token_id`` change the model without changing any shape, so they are compared too.
    """
    problems: list[str] = []
    cb, cf = base.config, finetuned.config
    for key in _VLM_CONFIG_KEYS:
        vb, vf = getattr(cb, key, None), getattr(cf, key, None)
        if vb != vf:
            problems.append(f"config.{key}: base {vb!r}, fine-tuned {vf!r}")
    vcb, vcf = getattr(cb, "vision_config", None), getattr(cf, "vision_config", None)
    if (vcb is None) != (vcf is None):
        problems.append("config.vision_config: only one of the two models is a vision-language model")
    elif vcb is not None:
        for key in _VISION_CONFIG_KEYS:
            vb, vf = getattr(vcb, key, None), getattr(vcf, key, None)
            if vb != vf:
                problems.append(f"config.vision_config.{key}: base {vb!r}, fine-tuned {vf!r}")
    try:
        pb, pf = vlm_parts(base), vlm_parts(finetuned)
    except ConfigError as e:
        raise IncompatibleModelsError(
            f"cannot split the models into vision tower, projector and language model: {e}"
        ) from e
    if pb != pf:
        problems.append(f"model parts: base {pb}, fine-tuned {pf}")
    else:
        params_f = dict(finetuned.named_parameters())
        for name, p in base.named_parameters():
            if pb.part_of(name) == PROJECTOR and name in params_f and params_f[name].shape != p.shape:
                problems.append(
                    f"multimodal projector parameter {name!r}: base shape {tuple(p.shape)}, "
                    f"fine-tuned shape {tuple(params_f[name].shape)}"
                )
    if problems:
        raise IncompatibleModelsError(
            f"the base and fine-tuned vision-language models ({type(base).__name__}) do not match "
            f"({len(problems)} difference(s)); was the fine-tune made from this base?\n  " + "\n  ".join(problems)
        )


@torch.no_grad()
def _linear_changed(a: nn.Linear, b: nn.Linear) -> bool:
    if not torch.equal(a.weight.detach().cpu(), b.weight.detach().cpu()):
        return True
    if (a.bias is None) != (b.bias is None):
        return True
    return a.bias is not None and not torch.equal(a.bias.detach().cpu(), b.bias.detach().cpu())


def select_vlm_targets(base: nn.Module, finetuned: nn.Module, config: Any) -> tuple[str, list[str]]:
    """The decoder-layers prefix and the target linears of a VLM, in module order.

    Default (``config.target_modules is None``): the language model's decoder-layer linears, the projector's
    linears, and the vision tower's linears that changed. With ``target_modules``, the matching linears of those
    three parts (a pattern selecting e.g. ``lm_head`` raises: such modules are carried densely).
    ``config.exclude_modules`` is applied last.
    """
    parts = vlm_parts(base)
    ft_modules = dict(finetuned.named_modules())
    linears = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    part = {n: parts.part_of(n) for n in linears}
    if config.target_modules is None:
        targets = [n for n in linears if part[n] in (LANGUAGE, PROJECTOR)]
        targets += [
            n
            for n in linears
            if part[n] == VISION and n in ft_modules and _linear_changed(base.get_submodule(n), ft_modules[n])
        ]
    else:
        targets = [n for n in linears if matches(n, config.target_modules)]
        if not targets:
            available = sorted({n.rsplit(".", 1)[-1] for n in linears if part[n] != OTHER})
            raise ConfigError(
                f"target_modules={show(config.target_modules)} matches no nn.Linear of {type(base).__name__}; "
                f"its language-model, projector and vision-tower linears are named {available}"
            )
        outside = [n for n in targets if part[n] == OTHER]
        if outside:
            raise ConfigError(
                f"target_modules={show(config.target_modules)} selects {outside[:5]}, which are neither in the "
                f"language model's decoder layers ({parts.layers}.N), the projector ({', '.join(parts.projectors)}) "
                f"nor the vision tower ({parts.vision}); other changed modules are stored dense"
            )
    if config.exclude_modules is not None:
        targets = [n for n in targets if not matches(n, config.exclude_modules)]
    if not targets:
        raise ConfigError("no target linear left to compress after exclude_modules")
    order = {n: i for i, n in enumerate(linears)}
    return parts.layers, sorted(set(targets), key=order.__getitem__)


def outside_layer_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The targets that are not inside a decoder layer (projector and vision-tower linears), in order."""
    parts = vlm_parts(model)
    return [t for t in targets if parts.part_of(t) != LANGUAGE]
