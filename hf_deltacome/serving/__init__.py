"""Serving many fine-tunes on one base: many adapters in one model, an OpenAI-compatible server, LoRA export, merge.

* :func:`load_deltas` / :func:`add_delta` / :func:`drop_delta` (``deltas.py``): every adapter in one ``PeftModel``,
  kept bit-packed; mixed batches with ``adapter_names=[...]``.
* ``engine.py``: the continuous-batching scheduler (``requests.py``: one request, its sampling and text;
  ``kvbatch.py``: the running batch and its KV-cache surgery); ``server.py``: the FastAPI app (``deltacome serve``).
* ``export.py``: ``deltacome export --format lora``; ``merge.py``: ``deltacome merge``.

Attributes are imported on first use, so ``import hf_deltacome.serving`` needs neither FastAPI nor uvicorn.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "load_deltas": "deltas",
    "add_delta": "deltas",
    "drop_delta": "deltas",
    "adapter_nbytes": "deltas",
    "Engine": "engine",
    "SamplingParams": "requests",
    "GenerationRequest": "requests",
    "create_app": "server",
    "run_server": "server",
    "export_lora": "export",
    "merge_adapter": "merge",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
