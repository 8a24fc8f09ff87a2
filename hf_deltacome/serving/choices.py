"""The choices of one OpenAI API call: every prompt of it ``n`` times, one engine request each, their
log-probabilities in the two shapes OpenAI's APIs give them, and the prompt itself when it is echoed.

A call's requests run side by side in the engine's batches (the choices of one prompt prefilled once, then each
decoded on its own); choice ``i * n + j`` is sample ``j`` of prompt ``i``, as OpenAI numbers them. Sample ``j`` of a seeded call draws
with ``seed + j``, so a call is repeatable and its samples differ. ``echo`` (completions) puts the prompt before the
completion, and with ``logprobs`` each prompt token's log-probability after the ones before it (one forward pass of
the prompt under the call's adapter, :func:`echo_prompt`): how a harness scores a continuation through the API.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from peft import PeftModel

from .requests import CONTEXT, Event, GenerationRequest, SamplingParams, TokenLogprob, piece, token_logprob

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


@dataclasses.dataclass(frozen=True)
class Echo:
    """A prompt as a completion echoes it: its text and, when asked, its tokens' log-probabilities (the first token
    has none: nothing comes before it)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


def echo_prompt(engine: Any, prompt_ids: list[int], adapter: str, top: Optional[int]) -> Echo:
    """``prompt_ids`` decoded, each token's text and offset in it, and (``top`` not None) its log-probability under
    ``adapter`` with the ``top`` likeliest alternatives, from one forward pass between the engine's decode steps."""
    before = [tuple(prompt_ids[max(0, i - CONTEXT) : i]) for i in range(len(prompt_ids))]  # what each token follows
    pieces, text = [], ""
    for token, context in zip(prompt_ids, before, strict=True):  # its text after them (sentencepiece spaces)
        added = piece(engine.tokenizer, context, token)
        pieces.append((len(text), added))
        text += added
    if top is None:
        return Echo(text)

    def forward() -> list[TokenLogprob]:
        names = {"adapter_names": [adapter]} if isinstance(engine.model, PeftModel) else {}
        device = next(engine.model.parameters()).device
        with torch.inference_mode():
            logits = engine.model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=False, **names).logits
        return [token_logprob(logits[0, i - 1].float(), prompt_ids[i], top, before[i]) for i in range(1, len(prompt_ids))]

    scored = [None, *engine.between_steps(forward)]
    return Echo(text, tuple(dataclasses.replace(e, offset=at, text=added) if e is not None
                            else TokenLogprob(prompt_ids[0], None, (), at, added)
                            for e, (at, added) in zip(scored, pieces, strict=True)))  # fmt: skip


def logprobs_body(
    entries: Sequence[TokenLogprob], token_text: Callable[[tuple[int, ...], int], str], chat: bool
) -> dict[str, Any]:
    """``entries`` as a choice's (or a chunk's) ``logprobs``: the chat API's ``{"content": [...]}`` (each token with
    its ``top_logprobs`` list), or the completions API's parallel lists (``top_logprobs`` holds the likeliest tokens
    and the chosen one, as OpenAI's does; ``text_offset`` counts characters from the completion's start).
    ``token_text(context, token)``: an alternative's text after the tokens before it (:func:`requests.piece`)."""

    def text(entry: TokenLogprob, token: int) -> str:  # the chosen token as it reads in the completion
        return entry.text if token == entry.token else token_text(entry.context, token)

    if chat:

        def item(entry: TokenLogprob, token: int, logprob: float) -> dict[str, Any]:
            return {"token": text(entry, token), "logprob": logprob, "bytes": list(text(entry, token).encode("utf-8"))}

        content = [item(e, e.token, e.logprob) | {"top_logprobs": [item(e, t, lp) for t, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {text(e, t): lp for t, lp in (*e.top, (e.token, e.logprob))}
                         for e in entries],  # fmt: skip
        "text_offset": [e.offset for e in entries],
    }


def shifted(entries: Sequence[TokenLogprob], by: int) -> list[TokenLogprob]:
    """``entries`` with their offsets moved ``by`` characters (a completion after its echoed prompt)."""
    return [dataclasses.replace(e, offset=e.offset + by) for e in entries] if by else list(entries)


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
