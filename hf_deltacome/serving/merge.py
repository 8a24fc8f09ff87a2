"""Merge a Delta-CoMe adapter into its base: a standalone fine-tuned model for any runtime (``deltacome merge``).

Streamed by default (:mod:`.merge_stream`): when the base is a local (or cached) safetensors text model and the
adapter a Delta-CoMe one, the base is read one tensor at a time and each merged tensor is written as it is computed,
so a 7B model merges in the memory of one of its tensors; the result is bit-identical to the loaded path's. Otherwise
(a Hub base not in the cache, a quantized or vision-language base, pickles, another PEFT method; or
``in_memory=True``) a log line says why and the loaded path runs, in two steps:

1. :func:`load_merged` -- the whole base in float32, the adapter loaded through PEFT, ``merge_and_unload()`` (every
   packed delta and dense extra added in float32, then one rounding to the output dtype);
2. :func:`write_merged` -- sharded safetensors with their index, config, generation config, tokenizer and a model
   card naming the base and the adapter, written so that the output folder is never half-written.

The result loads with plain ``transformers`` (``AutoModelForCausalLM.from_pretrained``), without this package.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import ConfigError
from ..io.atomic import write_folder
from .output import check_new_output

log = logging.getLogger("hf_deltacome")
PathLike = Union[str, os.PathLike]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "2GB"


def _checkpoint_dtype(config: Any) -> torch.dtype:
    """The dtype the base checkpoint was saved in (``config.dtype`` / ``torch_dtype``), float32 if unknown."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = _DTYPES.get(value.replace("torch.", ""))
    return value if isinstance(value, torch.dtype) else torch.float32


def output_dtype(dtype: str, base: PathLike) -> torch.dtype:
    """The merged model's dtype: ``dtype``, or with ``auto`` the one the base checkpoint's config.json names."""
    if dtype != "auto" and dtype not in _DTYPES:
        raise ConfigError(f"--dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return _DTYPES[dtype]
    from transformers import AutoConfig

    try:
        return _checkpoint_dtype(AutoConfig.from_pretrained(os.fspath(base)))
    except (OSError, ValueError, KeyError):  # loading the base reports it
        return torch.float32


def load_merged(base: PathLike, adapter: PathLike, *, dtype: str = "auto", strict: Optional[bool] = None) -> Any:
    """The loading step: ``base`` + ``adapter`` merged, as a plain ``transformers`` model in the output dtype.

    Loads the whole base in float32 (:mod:`.merge_stream` merges without loading it).
    """
    from peft import PeftModel

    from ..loading import load_model_and_tokenizer  # importing the package registers our method with PEFT

    target = output_dtype(dtype, base)  # the checkpoint's, before loading it in float32 overwrites config.dtype
    model, _ = load_model_and_tokenizer(os.fspath(base), "base", "float32")
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
    in_memory: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``base`` + ``adapter`` (folders or Hub ids) merged into ``output``; returns the output folder.

    ``output`` may not be (or lie inside) the base or the adapter folder; an existing non-empty one needs
    ``overwrite``. ``dtype`` ``auto`` keeps the base checkpoint's dtype. Streamed when it can be (see the module's
    doc; ``in_memory`` loads the whole base instead), with a logged reason when it cannot.
    """
    from ..io.adapter_files import read_adapter_config

    out = check_new_output(output, [("base", base), ("adapter", adapter)], overwrite=overwrite)
    target = output_dtype(dtype, base)
    if _merge_streamed(base, adapter, out, target, max_shard_size, strict, in_memory, progress):
        return out
    config = read_adapter_config(adapter) if Path(adapter).is_dir() else None
    model = load_merged(base, adapter, dtype=dtype, strict=strict)
    card = model_card(os.fspath(base), os.fspath(adapter), config, next(model.parameters()).dtype)
    write_merged(model, _tokenizer(adapter, base), out, card, max_shard_size=max_shard_size)
    return out


def _merge_streamed(
    base: PathLike,
    adapter: PathLike,
    out: Path,
    dtype: torch.dtype,
    max_shard_size: Union[int, str],
    strict: Optional[bool],
    in_memory: bool,
    progress: bool,
) -> bool:
    """Merge streamed (:mod:`.merge_stream`) and return True, or log why not and return False."""
    from ..errors import DeltaCoMeError
    from .merge_stream import StreamedMerge, not_deltacome, streamable_base
    from .output import local_adapter_folder

    folder, why = (None, "--in-memory") if in_memory else streamable_base(base)
    if folder is not None:
        adapter_folder = local_adapter_folder(adapter)
        why = not_deltacome(adapter_folder)
    if folder is not None and why is None:
        try:
            merge = StreamedMerge(folder, os.fspath(base), adapter_folder)
        except DeltaCoMeError as e:  # e.g. checkpoint keys not named like the parameters
            why = str(e)
    if why is not None:
        log.info("merging with the whole base in memory: %s", why)
        return False
    log.info("merging streamed: %s read one tensor at a time", os.fspath(base))
    merge.check(os.fspath(adapter), strict)
    card = model_card(os.fspath(base), os.fspath(adapter), merge.config, dtype)
    merge.write(out, dtype, tokenizer=_tokenizer(adapter_folder, folder), card=card, max_shard_size=max_shard_size,
                progress=progress)  # fmt: skip
    return True
