"""Progress bars for long work (tqdm, with elapsed and remaining time); one helper for every loop of the library;
the library's INFO messages on stderr for the command line."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "it") -> Any:
    """A tqdm bar over ``total`` steps; silent (but still countable) when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


def log_to_stderr() -> None:
    """Show the library's INFO messages (logger ``hf_deltacome``) on stderr, once (commands call this)."""
    import logging

    log = logging.getLogger("hf_deltacome")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("deltacome: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
