"""How :func:`hf_deltacome.compress` treats vision-language models: the VLM :class:`~hf_deltacome.compression.targets.ModelKind`.

The projector and the vision tower run outside the decoder layers. With image + text calibration their linears are
quantized with GPTQ against input Hessians collected from one forward pass of the *fine-tuned* model (stopped at its
first decoder layer; not sequential, unlike the decoder layers); with text-only calibration they get no activations
and are rounded to nearest (data-free), which ``compression_info["fallbacks"]`` lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..compression.layerwalk import to_device
from ..compression.targets import ModelKind, check_compatible
from ..config import DeltaCoMeConfig
from ..quant.hessian import HessianCollector, StopForward
from .calibration import get_vlm_calibration
from .parts import LANGUAGE, check_vlm_compatible, is_vlm, select_vlm_targets, vlm_parts

FORWARD_BATCH_SIZE = 8  # image + text records per forward pass


class VisionLanguageKind(ModelKind):
    """LLaVA-style ``*ForConditionalGeneration`` models (see :mod:`hf_deltacome.multimodal`)."""

    name = "vision-language"
    resumable_calibration = False  # image + text batches are not checkpointed; they are cheap to rebuild

    def matches(self, model: nn.Module) -> bool:
        return is_vlm(model)

    def check_pair(self, base: nn.Module, finetuned: nn.Module) -> None:
        check_vlm_compatible(base, finetuned)  # projector / image-wiring mismatches get their own message
        check_compatible(base, finetuned)

    def select_targets(self, base: nn.Module, finetuned: nn.Module, config: DeltaCoMeConfig) -> tuple[str, list[str]]:
        return select_vlm_targets(base, finetuned, config)

    def calibration(self, source: Any, finetuned: nn.Module, *, tokenizer: Any, processor: Any, num_samples: int,
                    seq_len: int, seed: int, progress: bool) -> Any:  # fmt: skip
        return get_vlm_calibration(source, finetuned, tokenizer, processor, num_samples, seq_len, seed,
                                   FORWARD_BATCH_SIZE)  # fmt: skip

    def layer_inputs(self, calib: Any) -> Any:
        return calib.batches

    def outside_targets(self, model: nn.Module, targets: Sequence[str]) -> list[str]:
        parts = vlm_parts(model)
        return [t for t in targets if parts.part_of(t) != LANGUAGE]

    def outside_hessians(self, finetuned: nn.Module, names: Sequence[str], calib: Any,
                         device: torch.device | None) -> tuple[dict[str, torch.Tensor], str]:  # fmt: skip
        if not getattr(calib, "has_images", False):
            return {}, "no image in the calibration data"
        return collect_outside_hessians(finetuned, names, calib.batches, device), "no activations"

    def record(self, calib: Any) -> dict[str, Any]:
        return {"calibration_kind": calib.kind if calib is not None else "none (data-free)"}


@torch.no_grad()
def collect_outside_hessians(
    finetuned: nn.Module,
    names: Sequence[str],
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Input Hessians of the projector / vision-tower ``names``, from the fine-tuned model's forward on each image +
    text batch, stopped at its first decoder layer (projector and vision tower run before the language model in
    every supported VLM). Targets that see no input are absent from the result."""
    if not names:
        return {}
    first_layer = finetuned.get_submodule(vlm_parts(finetuned).layers)[0]

    def stop(_m: nn.Module, _args: Any, _kwargs: Any) -> None:
        raise StopForward

    emb_device = next(finetuned.get_input_embeddings().parameters()).device
    was_training = finetuned.training
    finetuned.eval()
    handle = first_layer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with HessianCollector({n: finetuned.get_submodule(n) for n in names}, device=device) as collector:
            for batch in batches:
                collector.run(lambda batch=batch: finetuned(**to_device(batch, emb_device), use_cache=False))
    finally:
        handle.remove()
        finetuned.train(was_training)
    return {n: collector.matrix(n) for n in names if collector.matrix(n) is not None}
