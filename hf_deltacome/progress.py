"""Progress bars for long work (tqdm, with elapsed and remaining time); one helper for every loop of the library."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "it") -> Any:
    """A tqdm bar over ``total`` steps; silent (but still countable) when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)
