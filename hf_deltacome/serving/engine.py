"""Continuous batching of generation requests over many Delta-CoMe adapters on one base (the server's scheduler).

One thread owns the model. Each turn of its loop it

1. runs queued adapter loads and drops (so PEFT never mutates the model under a running forward);
2. removes finished and cancelled rows from the running batch (and the KV-cache columns that only they used);
3. prefills waiting requests together as one left-padded batch with per-row ``adapter_names`` and joins them to the
   running batch (KV caches left-padded to a common length and concatenated along the batch);
4. runs one decode step for every running row, again with per-row ``adapter_names``.

Rows therefore join and leave **between decode steps**: a request for one adapter never waits for another adapter's
long generation to end. This needs a cache whose layers are plain ``DynamicLayer`` tensors (full attention: Llama,
Mistral without sliding window, Qwen2, SmolLM2, ...). For other caches (sliding-window or hybrid layers) rows join
only between batches: waiting requests start when the running batch has drained.

Failures stay with their request: a prefill that raises is retried one request at a time, a decode step that raises
is rolled back (the cache is cropped) and retried row by row, and a row that fails alone ends with an ``error``
event; sampling and detokenisation errors are per row too. Nothing here knows about HTTP (see ``server.py``).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Optional

import torch

from ..compression.sampling import left_pad
from ..errors import ConfigError, EngineClosedError, UnknownAdapterError
from ..layer import BASE_ADAPTER_NAME
from . import requests as rq
from .kvbatch import RunningBatch, cache_argument, crop, join, joinable, keep_rows, repeat_rows, select_rows
from .requests import Event, GenerationRequest, SamplingParams

logger = logging.getLogger("hf_deltacome.serving")

DEFAULT_MAX_MODEL_LEN = 2048  # when the model's config names no maximum position
__all__ = ["Engine", "EngineClosedError", "Event", "GenerationRequest", "SamplingParams", "UnknownAdapterError"]


class Engine:
    """Serve ``model`` (a ``PeftModel`` holding Delta-CoMe adapters, or a plain causal LM) with continuous batching.

    ``submit`` a :class:`GenerationRequest` from any thread; its ``sink`` receives :class:`Event` s from the
    scheduler thread (keep it cheap and non-blocking). ``max_batch`` rows decode together; ``max_model_len`` bounds
    prompt + completion. :meth:`add_adapter` / :meth:`drop_adapter` change the adapters while serving.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int = 8,
        max_model_len: Optional[int] = None,
        max_prefill_tokens: int = 8192,
    ) -> None:
        from peft import PeftModel

        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if tokenizer is None:
            raise ConfigError("serving needs a tokenizer (the base model folder has none)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._detok = copy.deepcopy(tokenizer)  # the scheduler decodes while request threads encode
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        config = getattr(model, "config", None)
        self.max_model_len = int(
            max_model_len or getattr(config, "max_position_embeddings", 0) or DEFAULT_MAX_MODEL_LEN
        )
        self._peft = isinstance(model, PeftModel)
        self._cache_arg = cache_argument(model)
        self.pad_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None and i >= 0), 0
        )
        self.eos_ids = rq.eos_token_ids(model, tokenizer)
        self._device = next(model.parameters()).device
        self._lock = threading.Lock()
        self._waiting: deque[GenerationRequest] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._draining: dict[str, Future] = {}  # adapters being dropped once their requests are done
        self._wake = threading.Event()
        self._batch: Optional[RunningBatch] = None
        self._joinable = True  # until a prefill shows a cache that cannot be joined
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self.stats = {"steps": 0, "prefills": 0, "shared_prefills": 0, "joins": 0, "tokens": 0, "max_rows": 0, "failed": 0}

    # ------------------------------------------------------------------------------------------ public API
    @property
    def adapters(self) -> list[str]:
        """Names of the adapters requests may use (loaded and not being dropped)."""
        names = list(getattr(self.model, "peft_config", {})) if self._peft else []
        return [n for n in names if n not in self._draining]

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        batch = self._batch
        return len(batch.rows) if batch is not None else 0

    @property
    def waiting(self) -> int:
        """Requests queued for the next prefill."""
        return len(self._waiting)

    @property
    def joins_between_steps(self) -> bool:
        """True while rows join between decode steps; False once the model's cache showed it cannot be joined."""
        return self._joinable

    def start(self) -> Engine:
        """Start the scheduler thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="deltacome-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting requests, fail the waiting and running ones, stop the thread."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._abort_all(EngineClosedError("the server is shutting down"))

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Queue ``request``; raises :class:`UnknownAdapterError` / :class:`EngineClosedError` / ``ConfigError``."""
        if self._closing:
            raise EngineClosedError("the server is shutting down")
        if request.adapter != BASE_ADAPTER_NAME and request.adapter not in self.adapters:
            raise UnknownAdapterError(f"adapter {request.adapter!r} is not loaded")
        if not request.prompt_ids:
            raise ConfigError("the prompt is empty")
        if len(request.prompt_ids) >= self.max_model_len:
            raise ConfigError(
                f"the prompt has {len(request.prompt_ids)} tokens; this model's maximum length is {self.max_model_len}"
            )
        if request.params.seed is not None:
            request._generator = torch.Generator(device=self._device).manual_seed(int(request.params.seed))
        with self._lock:
            self._waiting.append(request)
        self._wake.set()
        return request

    def cancel(self, request: GenerationRequest) -> None:
        """Stop generating for ``request`` (e.g. its client went away); no further events are sent."""
        request.cancelled = True
        self._wake.set()

    def generate(self, prompt_ids: Sequence[int], adapter: str = BASE_ADAPTER_NAME, **params: Any) -> tuple[str, str]:
        """Blocking convenience: ``(text, finish_reason)`` of one request (runs through the scheduler)."""
        done = threading.Event()
        events: list[Event] = []

        def sink(event: Event) -> None:
            events.append(event)
            if event.kind != "text":
                done.set()

        self.submit(GenerationRequest(list(prompt_ids), adapter, SamplingParams(**params), sink))
        done.wait()
        last = events[-1]
        if last.kind == "error":
            raise last.error  # type: ignore[misc]
        return "".join(e.text for e in events if e.kind == "text"), last.finish_reason or ""

    def add_adapter(self, name: str, source: str, **kwargs: Any) -> None:
        """Load adapter ``name`` from ``source`` between decode steps; returns once it serves (raises on failure)."""
        from .deltas import add_delta, load_deltas

        if not self._peft:

            def first() -> None:
                self.model = load_deltas(self.model, {name: source}, **kwargs)
                self._peft = True

            return self.between_steps(first)
        return self.between_steps(lambda: add_delta(self.model, name, source, **kwargs))

    def drop_adapter(self, name: str, timeout: Optional[float] = None) -> None:
        """Stop accepting requests for ``name`` now; unload it once its running and waiting requests are done."""
        if name not in self.adapters:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        future: Future = Future()
        with self._lock:
            self._draining[name] = future
        self._wake.set()
        if self._thread is None:
            self._drop_drained()
        future.result(timeout)

    def between_steps(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` (its result or its error) on the scheduler thread between decode steps: one model user at a time."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._lock:
            self._commands.append((fn, future))
        self._wake.set()
        return future.result()

    # ------------------------------------------------------------------------------------------ scheduler loop
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._closing:
                self._wake.clear()
                try:
                    self._turn()
                except Exception as e:  # a bug, not a request's fault: fail what runs, keep serving
                    logger.exception("scheduler error; failing the running requests")
                    self._fail_batch(e)
                with self._lock:
                    idle = not self._waiting and not self._commands and self._batch is None
                if idle:
                    self._wake.wait(timeout=0.5)

    def _turn(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    break
                fn, future = self._commands.popleft()
            try:
                with torch.inference_mode(False):  # adapters loaded now hold ordinary tensors, like those at start
                    future.set_result(fn())
            except BaseException as e:  # reported to the caller, the engine keeps serving
                future.set_exception(e)
        self._reap()
        self._drop_drained()
        self._admit()
        if self._batch is not None:
            self._decode()

    def _drop_drained(self) -> None:
        from .deltas import drop_delta

        with self._lock:
            draining = dict(self._draining)
            used = {r.adapter for r in self._waiting}
        if self._batch is not None:
            used |= {r.adapter for r in self._batch.rows}
        for name, future in draining.items():
            if name in used:
                continue
            try:
                drop_delta(self.model, name)
                future.set_result(None)
            except BaseException as e:
                future.set_exception(e)
            with self._lock:
                self._draining.pop(name, None)

    def _admit(self) -> None:
        running = len(self._batch.rows) if self._batch is not None else 0
        if running and not self._joinable:
            return
        group: list[GenerationRequest] = []
        with self._lock:
            while self._waiting and running + len(group) < self.max_batch:
                request = self._waiting[0]
                if request.cancelled:
                    self._waiting.popleft()
                    continue
                width = max([len(r.prompt_ids) for r in group] + [len(request.prompt_ids)])
                if group and width * (len(group) + 1) > self.max_prefill_tokens:
                    break  # the rest joins after the next decode step
                group.append(self._waiting.popleft())
        if group:
            try:
                self._prefill(group)
            except Exception as e:  # a bug past the forward: these requests must still hear back
                logger.exception("prefill error")
                for request in group:
                    if not request.finished:
                        self._fail(request, e)

    # ------------------------------------------------------------------------------------------ model calls
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, names: list[str], cache: Any):
        kwargs: dict[str, Any] = {self._cache_arg: cache}
        if self._peft:
            kwargs["adapter_names"] = names
        out = self.model(
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            position_ids=positions.to(self._device),
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        cache = out.cache if self._cache_arg == "cache" else out.past_key_values
        return out.logits[:, -1, :].float(), cache

    def _prefill(self, group: list[GenerationRequest]) -> None:
        keys = [(tuple(r.prompt_ids + r.generated), r.adapter) for r in group]
        unique = list(dict.fromkeys(keys))  # n choices of one prompt: one row computed, its cache copied to the rest
        ids, mask = left_pad([list(seq) for seq, _ in unique], self.pad_id)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        try:
            logits, cache = self._forward(ids, mask, positions, [adapter for _, adapter in unique], None)
            if len(unique) < len(group):
                logits, mask = repeat_rows(cache, [unique.index(k) for k in keys], logits, mask)
                self.stats["shared_prefills"] += len(group) - len(unique)
        except Exception as e:
            if len(group) == 1:
                self._fail(group[0], e)
            else:  # find the culprit: each request alone
                for request in group:
                    self._prefill([request])
            return
        self.stats["prefills"] += 1
        new = RunningBatch(group, cache, mask.to(self._device), torch.zeros(len(group), dtype=torch.long))
        self._after_logits(new, logits)
        new = keep_rows(new, [i for i, r in enumerate(new.rows) if not r.done])
        if new is None:
            return
        if self._batch is None:
            self._joinable = self._joinable and joinable(new.cache)
            self._batch = new
        else:
            self._batch = join(self._batch, new)
            self.stats["joins"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._batch.rows))

    def _decode(self) -> None:
        batch = self._batch
        assert batch is not None
        length = batch.mask.shape[1]
        try:
            logits = self._decode_forward(batch)
        except Exception as e:
            if len(batch.rows) == 1 or not self._joinable:
                self._fail_batch(e)
                return
            crop(batch, length)  # undo the layers that appended before the failure
            parts, part_logits = [], []
            for i, request in enumerate(batch.rows):  # find the culprit: each row alone
                row = select_rows(batch, [i])
                try:
                    part_logits.append(self._decode_forward(row))
                    parts.append(row)
                except Exception as row_error:
                    self._fail(request, row_error)
            self._batch = None
            for part in parts:
                self._batch = part if self._batch is None else join(self._batch, part)
            if self._batch is None:
                return
            batch, logits = self._batch, torch.cat(part_logits)
        self.stats["steps"] += 1
        self._after_logits(batch, logits)

    def _decode_forward(self, batch: RunningBatch) -> torch.Tensor:
        """One decode step of ``batch`` (its cache grows by one column, its mask too); returns next-token logits."""
        ones = torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=batch.mask.device)
        mask = torch.cat([batch.mask, ones], dim=1)
        positions = batch.mask.sum(1, keepdim=True)
        logits, batch.cache = self._forward(
            batch.pending[:, None], mask, positions, [r.adapter for r in batch.rows], batch.cache
        )
        batch.mask = mask
        return logits

    def _reap(self) -> None:
        if self._batch is None:
            return
        keep = [i for i, r in enumerate(self._batch.rows) if not r.done]
        if len(keep) < len(self._batch.rows):
            self._batch = keep_rows(self._batch, keep)

    # ------------------------------------------------------------------------------------------ tokens and text
    def _after_logits(self, batch: RunningBatch, logits: torch.Tensor) -> None:
        greedy = logits.argmax(dim=-1).cpu()
        tokens = greedy.clone()
        now = time.perf_counter()
        for i, request in enumerate(batch.rows):
            if request.done:
                continue
            try:
                shaped = request.params.shapes_logits
                row = rq.shaped_logits(logits[i], request, self.eos_ids) if shaped else logits[i]
                if request.params.temperature > 0:
                    tokens[i] = rq.sample_token(row, request)
                elif shaped:
                    tokens[i] = int(row.argmax())
                if request.params.logprobs is not None:
                    request.logprobs.append(rq.token_logprob(logits[i], int(tokens[i]), request.params.logprobs, request.tail()))
                if request.first_token_at is None:
                    request.first_token_at = now
                self._append(request, int(tokens[i]))
            except Exception as e:
                self._fail(request, e)
        batch.pending = tokens
        self.stats["tokens"] += len(batch.rows)

    def _append(self, request: GenerationRequest, token: int) -> None:
        for event in rq.append_token(request, token, self.eos_ids, self._detok, self.max_model_len):
            self._emit(request, event)

    def _fail(self, request: GenerationRequest, error: BaseException) -> None:
        logger.warning("request %d (adapter %r) failed: %s", request.id, request.adapter, error)
        self.stats["failed"] += 1
        request.finished = True
        request.finish_reason = "error"
        self._emit(request, Event("error", error=error))

    def _fail_batch(self, error: BaseException) -> None:
        rows = self._batch.rows if self._batch is not None else []
        self._batch = None
        for request in rows:
            if not request.finished:
                self._fail(request, error)

    def _abort_all(self, error: BaseException) -> None:
        self._fail_batch(error)
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            commands, self._commands = list(self._commands), deque()
            draining, self._draining = dict(self._draining), {}
        for request in waiting:
            self._fail(request, error)
        for _, future in commands:
            future.set_exception(error)
        for future in draining.values():
            future.set_exception(error)

    def _emit(self, request: GenerationRequest, event: Event) -> None:
        if request.cancelled:
            return
        try:
            request.sink(event)
        except Exception:  # the receiving side is gone (e.g. its event loop closed): stop generating for it
            logger.debug("sink of request %d failed; cancelling it", request.id, exc_info=True)
            request.cancelled = True
