"""Merge a Delta-CoMe adapter into its base: a standalone fine-tuned model for any runtime (``deltacome merge``).

Two steps, kept apart so that a streamed loader (one decoder layer at a time, for models larger than memory) can
replace the first without touching the second:

1. :func:`load_merged` -- the whole base in float32, the adapter loaded through PEFT, ``merge_and_unload()`` (every
   packed delta and dense extra added in float32, then one rounding to the output dtype);
2. :func:`write_merged` -- sharded safetensors with their index, config, generation config, tokenizer and a model
   card naming the base and the adapter, written so that the output folder is never half-written.

The result loads with plain ``transformers`` (``AutoModelForCausalLM.from_pretrained``), without this package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import ConfigError
from ..io.atomic import write_folder
from .output import check_new_output

PathLike = Union[str, os.PathLike]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "2GB"


def _checkpoint_dtype(config: Any) -> torch.dtype:
    """The dtype the base checkpoint was saved in (``config.dtype`` / ``torch_dtype``), float32 if unknown."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = _DTYPES.get(value.replace("torch.", ""))
    return value if isinstance(value, torch.dtype) else torch.float32


def load_merged(base: PathLike, adapter: PathLike, *, dtype: str = "auto", strict: Optional[bool] = None) -> Any:
    """The loading step: ``base`` + ``adapter`` merged, as a plain ``transformers`` model in the output dtype.

    Loads the whole base in float32 (a streamed, layer-by-layer version replaces this function later).
    """
    from peft import PeftModel

    from ..loading import load_model_and_tokenizer  # importing the package registers our method with PEFT

    if dtype != "auto" and dtype not in _DTYPES:
        raise ConfigError(f"--dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    model, _ = load_model_and_tokenizer(os.fspath(base), "base", "float32")
    target = _checkpoint_dtype(model.config) if dtype == "auto" else _DTYPES[dtype]
    kwargs = {} if strict is None else {"strict": strict}
    merged = PeftModel.from_pretrained(model, os.fspath(adapter), **kwargs).merge_and_unload()
    return merged.to(target).eval()


def _tokenizer(adapter: PathLike, base: PathLike) -> Any:
    """The adapter folder's tokenizer when it has one (``deltacome compress`` saves the fine-tune's), else the base's."""
    from transformers import AutoTokenizer

    for source in (adapter, base):
        try:
            return AutoTokenizer.from_pretrained(os.fspath(source))
        except (OSError, ValueError, TypeError):
            continue
    return None


def model_card(base: str, adapter: str, config: Any, dtype: torch.dtype) -> str:
    """README.md of the merged model: what it is made of and how to load it."""
    from .. import __version__

    method = getattr(config, "method", "deltacome")
    ratio = getattr(config, "ratio", None)
    dtype_name = str(dtype).replace("torch.", "")
    return (
        f"---\nbase_model: {base}\nlibrary_name: transformers\ntags: [deltacome, merged]\n---\n\n"
        f"# {Path(adapter).name or adapter} merged into {base}\n\n"
        f"This model is the base model `{base}` with the Delta-CoMe adapter `{adapter}` ({method}"
        f"{f', ratio {ratio:g}' if ratio else ''}) merged into its weights by hf-deltacome {__version__}, saved in "
        f"{dtype_name}. It needs nothing but transformers:\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n```\n\n"
        "Its weights are `base + decompressed delta`: they reproduce the adapter, which approximates the original "
        "fine-tune.\n"
    )


def write_merged(
    model: Any, tokenizer: Any, output: Path, card: str, *, max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE
) -> list[str]:
    """The writing step: every file of the merged model into ``output`` in one transaction."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)

    return write_folder(output, fill, stale=["*.safetensors", "model.safetensors.index.json"])


def merge_adapter(
    base: PathLike,
    adapter: PathLike,
    output: PathLike,
    *,
    dtype: str = "auto",
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    strict: Optional[bool] = None,
) -> Path:
    """Write ``base`` + ``adapter`` (folders or Hub ids) merged into ``output``; returns the output folder.

    ``output`` may not be (or lie inside) the base or the adapter folder; an existing non-empty one needs
    ``overwrite``. ``dtype`` ``auto`` keeps the base checkpoint's dtype.
    """
    from ..io.adapter_files import read_adapter_config

    out = check_new_output(output, [("base", base), ("adapter", adapter)], overwrite=overwrite)
    config = read_adapter_config(adapter) if Path(adapter).is_dir() else None
    model = load_merged(base, adapter, dtype=dtype, strict=strict)
    card = model_card(os.fspath(base), os.fspath(adapter), config, next(model.parameters()).dtype)
    write_merged(model, _tokenizer(adapter, base), out, card, max_shard_size=max_shard_size)
    return out
