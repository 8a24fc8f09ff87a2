"""The choices of one OpenAI API call: every prompt of it ``n`` times, one engine request each, and their
log-probabilities in the two shapes OpenAI's APIs give them.

A call's requests run side by side in the engine's batches (the rows of one prompt share nothing but the batch);
choice ``i * n + j`` is sample ``j`` of prompt ``i``, as OpenAI numbers them. Sample ``j`` of a seeded call draws
with ``seed + j``, so a call is repeatable and its samples differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Optional

from .requests import Event, GenerationRequest, SamplingParams, TokenLogprob

MAX_CHOICES = 256  # prompts x n of one call


def choice_requests(
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams],
    n: int,
    adapter: str,
    sink: Callable[[int, Event], None],
) -> list[GenerationRequest]:
    """One request per choice, in choice order; ``sink(choice, event)`` receives their events."""
    out = []
    for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
        for j in range(n):
            drawn = p if p.seed is None or j == 0 else dataclasses.replace(p, seed=p.seed + j)
            out.append(GenerationRequest(list(ids), adapter, drawn, lambda e, c=i * n + j: sink(c, e)))
    return out


def logprobs_body(entries: Sequence[TokenLogprob], token_text: Callable[[int], str], chat: bool) -> dict[str, Any]:
    """``entries`` as a choice's (or a chunk's) ``logprobs``: the chat API's ``{"content": [...]}`` (each token with
    its ``top_logprobs`` list), or the completions API's parallel lists (``top_logprobs`` holds the likeliest tokens
    and the chosen one, as OpenAI's does; ``text_offset`` counts characters from the completion's start)."""
    def text(entry: TokenLogprob, token: int) -> str:  # the chosen token as it reads in the completion
        return entry.text if token == entry.token else token_text(token)

    if chat:

        def item(entry: TokenLogprob, token: int, logprob: float) -> dict[str, Any]:
            return {"token": text(entry, token), "logprob": logprob, "bytes": list(text(entry, token).encode("utf-8"))}

        content = [item(e, e.token, e.logprob) | {"top_logprobs": [item(e, t, lp) for t, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text(e, t): lp for t, lp in (*e.top, (e.token, e.logprob))} for e in entries],
        "text_offset": [e.offset for e in entries],
    }


@dataclasses.dataclass
class ChoiceResult:
    """What one choice has received so far: its text, log-probabilities and end."""

    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[Event] = None

    def take(self, event: Event) -> None:
        if event.kind == "text":
            self.text.append(event.text)
            self.logprobs += event.logprobs
        elif event.kind == "error":
            self.error = event
        else:
            self.finish_reason = event.finish_reason

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None
