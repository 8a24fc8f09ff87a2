"""Vision-language models (LLaVA-style ``*ForConditionalGeneration``): a vision tower, a multimodal projector and a
language model.

* :mod:`.parts` — detection, the pair check and the default targets (language-model and projector linears, and the
  vision tower's linears that changed);
* :mod:`.calibration` — image + text calibration through the base's processor (text-only otherwise);
* :mod:`.kind` — the VLM kind of :func:`hf_deltacome.compress` (projector and vision tower compressed first, with
  Hessians from the fine-tune's own forward on image + text calibration);
* :mod:`.loading` — :class:`AutoDeltaCoMeModelForImageTextToText`, :func:`load_processor`.
"""

from ..compression.targets import register_model_kind
from .calibration import VLMCalibration, get_vlm_calibration, image_text_records, split_processor
from .kind import VisionLanguageKind, collect_outside_hessians
from .loading import AutoDeltaCoMeModelForImageTextToText, is_vlm_checkpoint, load_processor, load_vlm_and_processor
from .parts import VLMParts, check_vlm_compatible, is_vlm, select_vlm_targets, vlm_parts

register_model_kind(VisionLanguageKind())

__all__ = [
    "AutoDeltaCoMeModelForImageTextToText",
    "VLMCalibration",
    "VLMParts",
    "VisionLanguageKind",
    "check_vlm_compatible",
    "collect_outside_hessians",
    "get_vlm_calibration",
    "image_text_records",
    "is_vlm",
    "is_vlm_checkpoint",
    "load_processor",
    "load_vlm_and_processor",
    "select_vlm_targets",
    "split_processor",
    "vlm_parts",
]
