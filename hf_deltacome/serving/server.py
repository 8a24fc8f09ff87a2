"""OpenAI-compatible HTTP server (FastAPI + uvicorn) for one base and many Delta-CoMe adapters.

``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``GET /health``, ``GET /metrics`` (Prometheus); when allowed, ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's names) add and
remove adapters while serving. The request's ``model`` picks an adapter by name, or the base (its own name, or
``"base"``); a call's ``n`` choices, its list of prompts, ``echo`` and log-probabilities are :mod:`.choices`'.
Generation runs on :class:`~hf_deltacome.serving.engine.Engine`'s scheduler thread, which batches concurrent
requests for different adapters into mixed batches. Errors are OpenAI error bodies
``{"error": {"message", "type", "param", "code"}}``: 400 bad request (unparseable JSON, prompt too long,
unsupported option), 401 bad API key, 403 adapter updates off, 404 unknown model or route, 422 a field of the wrong
type or range, 500 a failed generation (that request only), 503 shutting down.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..compression.vocab import vocab_size
from ..errors import ConfigError, EngineClosedError, UnknownAdapterError
from ..layer import BASE_ADAPTER_NAME
from .choices import MAX_CHOICES, ChoiceResult, Echo, choice_requests, echo_prompt, logprobs_body, shifted
from .engine import Engine
from .requests import Event, SamplingParams, piece
from .schema import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationBody,
    LoadAdapterRequest,
    refuse_unsupported,
    sampling_params,
)

BASE_ALIAS = "base"
DEFAULT_MAX_TOKENS = 256


class _APIKeyMiddleware:
    """Pure ASGI: every ``/v1`` request needs ``Authorization: Bearer <key>`` (checked before the body is read)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "Incorrect or missing API key", param=None, code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return APIError(422, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param, code="invalid_value")


def create_app(
    engine: Engine, *, base_name: str, api_key: Optional[str] = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
    allow_adapter_updates: bool = False,
) -> FastAPI:  # fmt: skip
    """The FastAPI app serving ``engine``; its lifespan starts and stops the engine's scheduler thread.
    ``allow_adapter_updates``: ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's names) add and
    remove adapters while serving; off, they answer 403."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app = FastAPI(title="hf-deltacome", lifespan=lifespan)
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    def card(name: str) -> dict[str, Any]:
        parent = None if name == base_name else base_name
        # vLLM's card: "parent", the base an adapter extends; "max_model_len", prompt + completion tokens
        return {"id": name, "object": "model", "created": created, "owned_by": "hf-deltacome", "parent": parent,
                "max_model_len": engine.max_model_len}  # fmt: skip

    def resolve(model: str) -> str:
        if model in (base_name, BASE_ALIAS):
            return BASE_ADAPTER_NAME
        if model != BASE_ADAPTER_NAME and model in engine.adapters:
            return model
        served = ", ".join([base_name, *engine.adapters])
        raise APIError(
            404, f"The model {model!r} does not exist (served: {served})", param="model", code="model_not_found"
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "adapters": engine.adapters,
            "running": engine.running,
            "waiting": engine.waiting,
            "joins_between_steps": engine.joins_between_steps,
            "stats": dict(engine.stats),
        }

    served: Counter[tuple[str, str]] = Counter()  # (metric, model) -> requests answered, tokens

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        """Prometheus text format: the engine's counters and gauges, and per served model its requests and tokens."""
        out = []
        for name, value in engine.stats.items():
            kind = "gauge" if name == "max_rows" else "counter"
            metric = f"deltacome_{name}" + ("_total" if kind == "counter" else "")
            out += [f"# TYPE {metric} {kind}", f"{metric} {value}"]
        for name, value in (("running", engine.running), ("waiting", engine.waiting), ("adapters", len(engine.adapters))):
            out += [f"# TYPE deltacome_{name} gauge", f"deltacome_{name} {value}"]
        for metric in ("requests", "prompt_tokens", "completion_tokens"):
            out.append(f"# TYPE deltacome_{metric}_total counter")
            out += [f'deltacome_{metric}_total{{model={json.dumps(m)}}} {v}' for (k, m), v in sorted(served.items()) if k == metric]  # fmt: skip
        return PlainTextResponse("\n".join(out) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(n) for n in [base_name, *engine.adapters]]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        resolve(model_id)
        return card(base_name if model_id == BASE_ALIAS else model_id)

    async def update(body: LoadAdapterRequest, load: bool) -> dict[str, Any]:
        if not allow_adapter_updates:
            raise APIError(403, "adapter updates are off: start the server with --allow-adapter-updates",
                           "permission_error", param=None, code="adapter_updates_off")  # fmt: skip
        name, loop = body.lora_name, asyncio.get_running_loop()
        if name in (base_name, BASE_ALIAS):
            raise APIError(400, f"adapter name {name!r} is the base model's", param="lora_name")
        if not load and name not in engine.adapters:
            raise APIError(404, f"no adapter {name!r} is served", param="lora_name", code="model_not_found")
        if load and not body.lora_path:
            raise APIError(400, "lora_path: the adapter folder or Hub id to load", param="lora_path")
        try:
            if load:
                await loop.run_in_executor(None, engine.add_adapter, name, body.lora_path)
            else:  # new requests for it are refused now; it goes once the running ones are done
                await loop.run_in_executor(None, engine.drop_adapter, name)
        except (OSError, ValueError) as e:  # a bad name, folder or file (our errors are ValueErrors): the caller's to fix
            raise APIError(400, f"{type(e).__name__}: {e}", param="lora_path" if load else "lora_name") from e
        return {"id": name, "object": "model", "status": "loaded" if load else "unloaded"}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest) -> dict[str, Any]:
        return await update(body, load=True)

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: LoadAdapterRequest) -> dict[str, Any]:
        return await update(body, load=False)

    def token_ids() -> int:  # the valid ids: the embedding's rows (more than the tokenizer's when it is padded)
        return vocab_size(engine.model) or len(engine.tokenizer)

    def sampling(
        body: GenerationBody, prompt_len: int, max_tokens: Optional[int], param: str, logprobs: Optional[int]
    ) -> SamplingParams:
        return sampling_params(body, prompt_len, max_tokens, param, logprobs, max_model_len=engine.max_model_len,
                               default_max_tokens=default_max_tokens, vocab=token_ids())  # fmt: skip

    def chat_ids(body: ChatCompletionRequest) -> list[int]:
        tokenizer = engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "the base tokenizer has no chat template; use /v1/completions", param="messages")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                if any(part.get("type") != "text" for part in content):
                    raise APIError(400, "only text content parts are supported", param=f"messages.{i}.content")
                content = "".join(str(part.get("text", "")) for part in content)
            messages.append({**(m.model_extra or {}), "role": m.role, "content": content or ""})
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # e.g. a template that insists on alternating roles
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from e
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    def completion_ids(body: CompletionRequest) -> list[list[int]]:
        """Each prompt's token ids (a string, token ids, or a list of either: a batch)."""
        batch = body.prompt if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], (str, list)) else [body.prompt]  # fmt: skip
        if len(batch) * body.n > MAX_CHOICES:
            raise APIError(400, f"{len(batch)} prompt(s) x n={body.n} is over {MAX_CHOICES} choices", param="n")
        out, vocab = [], token_ids()
        for i, prompt in enumerate(batch):
            where = "prompt" if len(batch) == 1 else f"prompt.{i}"
            ids = list(engine.tokenizer(prompt).input_ids) if isinstance(prompt, str) else list(prompt)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"{where}: token ids must be in [0, {vocab})", param="prompt")
            if not ids:
                raise APIError(400, f"{where} is empty", param="prompt")
            out.append(ids)
        return out

    async def run(
        body: GenerationBody, prompts: list[list[int]], params: list[Optional[SamplingParams]], chat: bool,
        echoes: Optional[list[Echo]] = None,
    ) -> Any:  # fmt: skip
        """Generate every choice (``params`` None: nothing, the echoed prompts alone) and answer as OpenAI does."""
        adapter = resolve(body.model)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        requests = [] if params[0] is None else choice_requests(
            prompts, params, body.n, adapter, lambda c, e: loop.call_soon_threadsafe(events.put_nowait, (c, e))
        )  # fmt: skip
        n_choices = len(prompts) * body.n
        try:
            for request in requests:
                engine.submit(request)
        except Exception as e:
            for request in requests:
                engine.cancel(request)
            if isinstance(e, UnknownAdapterError):
                raise APIError(404, str(e), param="model", code="model_not_found") from e
            if isinstance(e, EngineClosedError):
                raise APIError(503, str(e), "server_error") from e
            if isinstance(e, ConfigError):
                raise APIError(400, str(e)) from e
            raise
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"
        results = [ChoiceResult() if requests else ChoiceResult(finish_reason="length") for _ in range(n_choices)]
        echoed = [echoes[c // body.n] if echoes else Echo("") for c in range(n_choices)]
        wants_logprobs = bool(body.logprobs) if chat else body.logprobs is not None  # type: ignore[attr-defined]
        token_text = functools.lru_cache(maxsize=None)(lambda context, t: piece(engine.tokenizer, context, t, special=True))

        def logprobs(entries: list) -> Optional[dict[str, Any]]:
            return logprobs_body(entries, token_text, chat) if wants_logprobs else None

        def usage() -> dict[str, int]:
            p, c = sum(len(ids) for ids in prompts), sum(r.completion_tokens for r in requests)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        accounted = []

        def account() -> None:  # what /metrics counts: once per call, when it has been answered (or abandoned)
            if accounted:
                return
            accounted.append(True)
            counts = usage()
            served["requests", body.model] += 1
            served["prompt_tokens", body.model] += counts["prompt_tokens"]
            served["completion_tokens", body.model] += counts["completion_tokens"]

        def failure(event: Event) -> APIError:
            return APIError(500, f"generation failed: {type(event.error).__name__}: {event.error}", "server_error")

        def cancel_all() -> None:
            for request in requests:
                if not request.finished:
                    engine.cancel(request)

        if not body.stream:
            try:
                while not all(r.done for r in results):
                    c, event = await events.get()
                    results[c].take(event)
                    if event.kind == "error":
                        raise failure(event)
            finally:
                cancel_all()
                account()
            choices = []
            for c, (result, echo) in enumerate(zip(results, echoed, strict=True)):
                text = echo.text + "".join(result.text)
                entries = [*echo.logprobs, *shifted(result.logprobs, len(echo.text))]
                choice: dict[str, Any] = {"index": c, "finish_reason": result.finish_reason,
                                          "logprobs": logprobs(entries)}  # fmt: skip
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                choices.append(choice)
            return {"id": rid, "object": kind, "created": int(time.time()), "model": body.model, "choices": choices,
                    "usage": usage()}  # fmt: skip

        def chunk(c: int, text: Optional[str], finish: Optional[str], entries: list, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
                choice = {"index": c, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": c, "text": text or "", "finish_reason": finish, "logprobs": None}
            if entries:
                choice["logprobs"] = logprobs(entries)
            data = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": int(time.time()),
                    "model": body.model, "choices": [choice]}  # fmt: skip
            return f"data: {json.dumps(data)}\n\n"

        async def stream() -> AsyncIterator[str]:
            try:
                for c in range(n_choices):
                    if chat or echoed[c].text:
                        yield chunk(c, echoed[c].text, None, list(echoed[c].logprobs), first=True)
                    if not requests:
                        yield chunk(c, "", "length", [])
                while not all(r.done for r in results):
                    c, event = await events.get()
                    results[c].take(event)
                    if event.kind == "error":
                        yield f"data: {json.dumps({'error': failure(event).body()})}\n\n"
                        break
                    if event.kind == "text":
                        yield chunk(c, event.text, None, shifted(event.logprobs, len(echoed[c].text)))
                    else:
                        yield chunk(c, None if chat else "", event.finish_reason, [])
                else:
                    if body.stream_options is not None and body.stream_options.include_usage:
                        data = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": int(time.time()),
                                "model": body.model, "choices": [], "usage": usage()}  # fmt: skip
                        yield f"data: {json.dumps(data)}\n\n"
                account()  # before the client can see the end
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): stop generating for it
                cancel_all()
                account()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        resolve(body.model)
        refuse_unsupported(body)
        if (body.model_extra or {}).get("echo") not in (None, False):
            raise APIError(400, "echo is for /v1/completions; chat completions do not echo", param="echo")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        ids = chat_ids(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await run(body, [ids], [sampling(body, len(ids), max_tokens, "messages", logprobs)], chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        adapter = resolve(body.model)
        refuse_unsupported(body)
        prompts = completion_ids(body)
        if body.max_tokens == 0:  # the prompt alone, echoed (and scored): nothing to sample
            if not body.echo:
                raise APIError(400, "max_tokens=0 generates nothing: it is for echo (the prompt scored)", param="max_tokens")  # fmt: skip
            if max(len(ids) for ids in prompts) > engine.max_model_len:
                raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens",
                               param="prompt", code="context_length_exceeded")  # fmt: skip
            params: list[Optional[SamplingParams]] = [None] * len(prompts)
        else:
            params = [sampling(body, len(ids), body.max_tokens, "prompt", body.logprobs) for ids in prompts]
        echoes = None
        if body.echo:
            loop = asyncio.get_running_loop()
            echoes = [await loop.run_in_executor(None, echo_prompt, engine, ids, adapter, body.logprobs) for ids in prompts]  # fmt: skip
        return await run(body, prompts, params, chat=False, echoes=echoes)

    return app


def run_server(
    engine: Engine,
    *,
    base_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    log_level: str = "info",
    allow_adapter_updates: bool = False,
) -> None:
    """Serve ``engine`` with uvicorn until interrupted (binds 127.0.0.1 unless told otherwise)."""
    import uvicorn

    app = create_app(engine, base_name=base_name, api_key=api_key, default_max_tokens=default_max_tokens,
                     allow_adapter_updates=allow_adapter_updates)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level=log_level)
