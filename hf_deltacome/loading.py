"""Loading models by name for the command line: a base or fine-tune (text or vision-language), or base + adapter; a
fine-tune given as a PEFT adapter folder (a LoRA, ...) is that adapter merged into its own copy of the base.

Every failure is a :class:`DeltaCoMeError` naming the option (``--base``, ``--finetuned``, ``--adapter``) and the
path, instead of a traceback from deep inside transformers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DeltaCoMeError
from .multimodal.loading import is_vlm_checkpoint, load_vlm_and_processor

DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_model_and_tokenizer(name_or_path: str, role: str, dtype: str, device_map: str | None = None):
    """Load a causal LM (local folder or Hub id) and its tokenizer, with an error naming ``role`` on failure.

    A vision-language model is loaded with ``AutoModelForImageTextToText`` and comes with its processor instead.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.is_dir():
        raise DeltaCoMeError(f"--{role} {name_or_path!r}: no such model directory")
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype
    ]
    if is_vlm_checkpoint(name_or_path):  # LLaVA-style: AutoModelForImageTextToText, and the processor
        try:
            return load_vlm_and_processor(name_or_path, dtype=torch_dtype, device_map=device_map)
        except (OSError, ValueError) as e:
            raise DeltaCoMeError(f"--{role} {name_or_path!r}: cannot load the vision-language model: {e}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, device_map=device_map)
    except (OSError, ValueError) as e:
        raise DeltaCoMeError(f"--{role} {name_or_path!r}: cannot load the model: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer


def load_merged_adapter(base: nn.Module, base_name: str, adapter: str) -> tuple[nn.Module, Any]:
    """The fine-tune an adapter folder stands for: a copy of the loaded ``base`` with the adapter merged into it
    (PEFT's own ``merge_and_unload``, whatever the adapter's method), and the adapter's tokenizer (``None``: it has
    none)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    try:
        merged = PeftModel.from_pretrained(copy.deepcopy(base), adapter).merge_and_unload()
    except Exception as e:  # a mismatched base (shapes), an unknown method, an adapter that cannot merge
        raise DeltaCoMeError(
            f"--finetuned {adapter!r} is a PEFT adapter and does not merge into --base {base_name!r}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    merged.config._name_or_path = str(adapter)  # the fine-tune's name (the adapter's card, the output check)
    try:
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return merged.eval(), tokenizer


def load_adapter_model(
    base: str, adapter: str, *, dtype: str = "float32", device: str | None = None
) -> tuple[nn.Module, Any]:
    """``PeftModel.from_pretrained(base, adapter)`` with our method registered, and a tokenizer (adapter's or base's)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    if not Path(adapter).is_dir():
        raise ConfigError(f"--adapter {adapter!r}: no such adapter folder")
    model, tokenizer = load_model_and_tokenizer(base, "base", dtype)
    if device:
        model.to(device)
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    except (OSError, ValueError, TypeError):
        pass
    return peft_model, tokenizer
