"""Progress bars for long work (tqdm, with elapsed and remaining time); one helper for every loop of the library;
the library's INFO messages on stderr for the command line."""

from __future__ import annotations

import logging
import sys
from typing import Any


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "it") -> Any:
    """A tqdm bar over ``total`` steps; silent (but still countable) when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


class _StderrHandler(logging.StreamHandler):
    """A stream handler that always writes to the current ``sys.stderr``."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:  # StreamHandler.__init__ assigns it; the property always reads sys
        pass


def log_to_stderr() -> None:
    """Show the library's INFO messages (logger ``hf_deltacome``) on stderr, once (commands call this).

    The handler writes to whatever ``sys.stderr`` is when a message is logged, not the stream of the first command:
    commands run in one process (tests, notebooks) under a redirected stderr see their own messages."""
    log = logging.getLogger("hf_deltacome")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("deltacome: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def peak_memory() -> str:
    """This process's peak resident memory so far (and the GPU's peak allocation when CUDA was used), for a bar."""
    text = ""
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        text = f"peak RSS {kb / (1 << 30 if sys.platform == 'darwin' else 1 << 20):.2f} GiB"
    except (ImportError, OSError):  # pragma: no cover - Windows
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", GPU {torch.cuda.max_memory_allocated() / (1 << 30):.2f} GiB"
    return text
