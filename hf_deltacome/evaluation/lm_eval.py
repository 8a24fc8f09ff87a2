"""lm-evaluation-harness with Delta-CoMe adapters.

The harness loads adapters through PEFT, so our method must be registered (by importing ``hf_deltacome``) before it
loads one. Either run the harness through us::

    deltacome lm-eval --model hf --model_args pretrained=BASE,peft=ADAPTER --tasks TASK

or, from Python, ``lm_eval.simple_evaluate(model=lm_eval_model(BASE, ADAPTER), tasks=[...])``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from ..errors import DeltaCoMeError


def lm_eval_model(pretrained: str, adapter: str, **kwargs: Any) -> Any:
    """An lm-evaluation-harness ``HFLM`` of ``pretrained`` with our ``adapter`` (loaded through PEFT).

    Importing ``hf_deltacome`` registers the method first, which is all the harness needs. ``kwargs`` go to
    ``HFLM`` (``batch_size``, ``device``, ``dtype``, ...). Use it as ``lm_eval.simple_evaluate(model=..., tasks=...)``.
    """
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise DeltaCoMeError("lm-evaluation-harness is not installed: pip install lm-eval") from e
    return HFLM(pretrained=pretrained, peft=adapter, **kwargs)


def lm_eval_cli(argv: Sequence[str] | None = None) -> None:
    """Run lm-evaluation-harness's command line with our method registered (``--model_args ...,peft=ADAPTER``)."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise DeltaCoMeError("lm-evaluation-harness is not installed: pip install lm-eval") from e
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
