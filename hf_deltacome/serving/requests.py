"""One generation request of the serving engine: its sampling options, its events, and its text as it grows.

Nothing here touches the model: :func:`sample_token` picks a token from one row's logits, :func:`token_logprob`
reads its log-probability (when asked), :func:`append_token` takes it into the request and says what to send (text
pieces, each with the log-probabilities of the tokens it completes, and the end), holding back what may still become
a stop string or an incomplete multi-byte character.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import ConfigError

CONTEXT = 4  # tokens before a token that its text is decoded after (a sentencepiece space shows only after one)
MAX_LOGPROBS = 20  # most alternatives a token's log-probabilities list (OpenAI's chat API allows 20)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: ``temperature`` 0 is greedy; ``stop`` strings end the text (not included);
    ``presence_penalty`` / ``frequency_penalty`` (OpenAI's: subtracted from a token's logit once it appears / per
    time it appears in the completion) and ``logit_bias`` (``(token, bias)`` pairs added to the logits) shape the
    choice, greedy or sampled. vLLM's options: ``repetition_penalty`` (a token of the prompt or the completion has
    its logit divided by it when positive, multiplied when not), ``min_tokens`` (no end token before that many),
    ``top_k`` / ``min_p`` (sampling keeps the ``k`` likeliest tokens / those at least ``min_p`` times as likely as
    the likeliest; 0: off), ``ignore_eos`` (the model's end tokens do not end it) and ``stop_token_ids`` (more
    tokens that end it, as an end token does: not in the text)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # None: none; k: each token's log-probability and its k likeliest alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ConfigError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not -100 <= b <= 100 for _, b in self.logit_bias):
            raise ConfigError(f"logit_bias values must be in [-100, 100], got {dict(self.logit_bias)}")
        if self.top_k < 0 or not 0 <= self.min_p <= 1 or not self.repetition_penalty > 0:
            raise ConfigError(f"top_k must be >= 0 (0: off), min_p in [0, 1] and repetition_penalty > 0; got "
                              f"{self.top_k}, {self.min_p} and {self.repetition_penalty}")  # fmt: skip
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")

    @property
    def shapes_logits(self) -> bool:
        """Whether penalties, biases or ``min_tokens`` change the logits before the choice."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.min_tokens
                    or self.repetition_penalty != 1)  # fmt: skip


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log-probability under the model (before temperature and ``top_p``), the likeliest
    ``(token, log-probability)`` alternatives, ``offset``: where its text starts in the completion, ``text``: what
    it added there, and ``context``: the few tokens before it, after which an alternative is decoded (:func:`piece`)."""

    token: int
    logprob: Optional[float]  # None: an echoed prompt's first token (nothing before it)
    top: tuple[tuple[int, float], ...] = ()
    offset: int = 0
    text: str = ""
    context: tuple[int, ...] = ()


@dataclass
class Event:
    """What a request's sink receives: ``text`` (a new piece), ``done`` (with ``finish_reason``) or ``error``;
    ``logprobs``: the tokens whose text this event completes (when the request asked for log-probabilities)."""

    kind: str
    text: str = ""
    finish_reason: Optional[str] = None
    error: Optional[BaseException] = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


_ids = itertools.count()


@dataclass(eq=False)
class GenerationRequest:
    """One prompt for one adapter (``"__base__"``: the base); ``sink`` is called on the scheduler thread."""

    prompt_ids: list[int]
    adapter: str
    params: SamplingParams
    sink: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    text: str = ""  # text emitted so far
    ends: list[int] = field(default_factory=list)  # per generated token (end tokens aside): where its text ends
    sent_logprobs: int = 0
    finish_reason: Optional[str] = None
    finished: bool = False
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one a generated token, when asked (not sent yet)
    _generator: Optional[torch.Generator] = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    def tail(self) -> tuple[int, ...]:
        """The last :data:`CONTEXT` tokens of the prompt and what was generated (what the next token follows)."""
        return (*self.prompt_ids[-CONTEXT:], *self.generated[-CONTEXT:])[-CONTEXT:]

    @property
    def done(self) -> bool:
        """Finished or cancelled: the request takes no more tokens."""
        return self.finished or self.cancelled


def shaped_logits(logits: torch.Tensor, request: GenerationRequest, eos_ids: frozenset[int] = frozenset()) -> torch.Tensor:
    """One row's ``logits`` with the request's ``logit_bias`` added, its penalties applied (repetition: over the
    prompt and the completion; presence and frequency: over the completion) and, before ``min_tokens``, its end
    tokens (``eos_ids`` unless ignored, and ``stop_token_ids``) ruled out (a new tensor; the model's own stay for the
    log-probabilities)."""
    params, out = request.params, logits.clone()
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias, strict=True)
        out[list(ids)] += torch.tensor(bias, dtype=out.dtype, device=out.device)
    if params.repetition_penalty != 1:
        seen = torch.tensor([*request.prompt_ids, *request.generated], device=out.device).unique()
        seen = seen[seen < out.shape[-1]]
        values = out[seen]
        out[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if request.generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(request.generated), minlength=out.shape[-1])[: out.shape[-1]].to(out)
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(out)
    if len(request.generated) < params.min_tokens:
        ends = [t for t in end_tokens(params, eos_ids) if t < out.shape[-1]]
        out[ends] = float("-inf")
    return out


def end_tokens(params: SamplingParams, eos_ids: frozenset[int]) -> frozenset[int]:
    """The tokens that end a request: the model's end tokens (unless ``ignore_eos``) and its ``stop_token_ids``
    (``eos_ids`` itself when neither option is set: asked once a token, no new set then)."""
    if not params.ignore_eos and not params.stop_token_ids:
        return eos_ids
    return (frozenset() if params.ignore_eos else eos_ids) | frozenset(params.stop_token_ids)


def sample_token(logits: torch.Tensor, request: GenerationRequest) -> int:
    """A token from one row's ``logits`` at the request's temperature, kept to its ``top_k`` likeliest, to those
    ``min_p`` times as likely as the likeliest, and to the nucleus ``top_p`` (its seeded generator)."""
    params = request.params
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if 0 < params.top_k < probs.shape[-1]:
        probs = probs.masked_fill(probs < probs.topk(params.top_k).values[-1], 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        shares = sorted_probs / sorted_probs.sum()  # top_k / min_p may have zeroed some
        drop = shares.cumsum(-1) - shares > params.top_p  # keep the smallest nucleus
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=request._generator))


def token_logprob(logits: torch.Tensor, token: int, top: int, context: tuple[int, ...] = ()) -> TokenLogprob:
    """``token``'s log-probability in one row's ``logits`` (which followed ``context``) and the ``top`` likeliest
    alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
    alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), alternatives, context=context)


def piece(tokenizer: Any, context: Sequence[int], token: int, special: bool = False) -> str:
    """The text ``token`` adds after the tokens ``context``: decoded alone, a sentencepiece token loses its leading
    space (``▁Paris`` reads ``Paris``), so it is decoded after them. A special token reads as nothing, as in a
    completion's text, or (``special``) as itself."""
    if token in tokenizer.all_special_ids:
        return tokenizer.decode([token]) if special else ""
    head = tokenizer.decode(list(context), skip_special_tokens=True)
    full = tokenizer.decode([*context, token], skip_special_tokens=True)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode([token], skip_special_tokens=True)


def stop_position(text: str, stop: tuple[str, ...]) -> Optional[int]:
    """Where the earliest stop string starts in ``text`` (None when none occurs)."""
    hits = [at for at in (text.find(s) for s in stop) if at >= 0]
    return min(hits) if hits else None


def emittable(text: str, stop: tuple[str, ...]) -> int:
    """How many leading characters of a running ``text`` are final: the tail that may still grow into a stop string,
    and an incomplete multi-byte character (decoded as U+FFFD), are held back."""
    safe = len(text) - max((len(s) - 1 for s in stop), default=0)
    while safe > 0 and text[safe - 1] == "\ufffd":
        safe -= 1
    return max(safe, 0)


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token id that ends a generation: the model's generation config's and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _covered(request: GenerationRequest, chars: int, final: bool) -> list[TokenLogprob]:
    """Take the waiting log-probabilities of the tokens whose text ends within the first ``chars`` characters sent
    (when ``final``: every token whose text starts there, and those of no text)."""
    n = 0
    for entry, end in zip(request.logprobs, request.ends[request.sent_logprobs :]):
        if end > chars and not (final and entry.offset < chars):
            break
        n += 1
    taken, request.logprobs = request.logprobs[:n], request.logprobs[n:]
    request.sent_logprobs += n
    return taken


def _finish(request: GenerationRequest, reason: str, text: str, end_token: bool = False) -> list[Event]:
    if end_token and request.logprobs:  # an end token has no text: not among the completion's tokens
        request.logprobs.pop()
    events = []
    if text.startswith(request.text) and len(text) > len(request.text):
        events.append(Event("text", text=text[len(request.text) :]))
    request.text = text if text.startswith(request.text) else request.text
    request.finished = True
    request.finish_reason = reason
    taken = _covered(request, len(request.text), final=True)
    if events:
        events[0].logprobs = taken
    elif taken:
        events.append(Event("text", logprobs=taken))
    request.logprobs = []
    return events + [Event("done", finish_reason=reason)]


def append_token(
    request: GenerationRequest, token: int, eos_ids: frozenset[int], tokenizer: Any, max_model_len: int
) -> list[Event]:
    """Take ``token`` into ``request`` and return the events it causes: a new text piece, and ``done`` when an end
    token, a stop string, ``max_tokens`` or the model's length ends the request."""
    request.generated.append(token)
    params = request.params
    if token in end_tokens(params, eos_ids):
        return _finish(request, "stop", tokenizer.decode(request.generated[:-1], skip_special_tokens=True), True)
    start = request.ends[-1] if request.ends else 0
    text = tokenizer.decode(request.generated, skip_special_tokens=True)
    request.ends.append(len(text))
    if request.logprobs and len(request.logprobs) + request.sent_logprobs == len(request.ends):
        request.logprobs[-1] = dataclasses.replace(request.logprobs[-1], offset=start, text=text[start:])
    at = stop_position(text, params.stop)
    if at is not None:  # the earliest stop string ends the text (never sent: see the hold-back below)
        return _finish(request, "stop", text[:at])
    if len(request.generated) >= params.max_tokens or request.prompt_tokens + len(request.generated) >= max_model_len:
        return _finish(request, "length", text)
    safe = emittable(text, params.stop)
    if safe > len(request.text) and text.startswith(request.text):
        piece, request.text = text[len(request.text) : safe], text[:safe]
        return [Event("text", text=piece, logprobs=_covered(request, safe, final=False))]
    return []
