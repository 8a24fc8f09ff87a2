"""The request bodies of the OpenAI-compatible server (pydantic: a field of the wrong type or range is a 422 naming
it), the OpenAI options it cannot honour (a 400 naming the option, never silently ignored), what a body asks of the
sampler (:func:`sampling_params`: OpenAI's options and vLLM's ``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``, ``ignore_eos``, ``stop_token_ids``) and :class:`APIError`, an OpenAI error body."""

from __future__ import annotations

from typing import Any, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from .choices import MAX_CHOICES
from .requests import MAX_LOGPROBS, SamplingParams

# options whose non-default values we cannot honour: refused with 400 naming the option rather than ignored
UNSUPPORTED = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),  # JSON mode / schemas: the sampler is not constrained
    "modalities": (None, ["text"]),
    "audio": (None,),
}


class APIError(Exception):
    """An error answered as an OpenAI error body with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationBody(BaseModel):
    """What both generation routes take."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string, as OpenAI sends it) -> bias in [-100, 100]
    # vLLM's sampling options (what its OpenAI server takes beside OpenAI's)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatCompletionRequest(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(GenerationBody):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    max_tokens: Optional[int] = Field(None, ge=0)  # 0: nothing generated, with echo (the prompt scored)


class LoadAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str = ""


def refuse_unsupported(body: GenerationBody) -> None:
    """A 400 naming the first option of :data:`UNSUPPORTED` the body sets to a value we cannot honour."""
    for name, allowed in UNSUPPORTED.items():
        if (body.model_extra or {}).get(name) not in allowed:
            raise APIError(400, f"{name}={body.model_extra[name]!r} is not supported", param=name)


def sampling_params(
    body: GenerationBody,
    prompt_len: int,
    max_tokens: Optional[int],
    param: str,
    logprobs: Optional[int],
    *,
    max_model_len: int,
    default_max_tokens: int,
    vocab: int,
) -> SamplingParams:
    """What ``body`` asks of the sampler for a prompt of ``prompt_len`` tokens (``param`` names the prompt's field in
    errors); a 400 naming what does not fit: the model's length, a token id outside ``[0, vocab)``."""
    room = max_model_len - prompt_len
    wanted = max_tokens if max_tokens is not None else min(default_max_tokens, room)
    if wanted > room or room < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max(wanted, 1)} tokens ({prompt_len} in the {param}, {max(wanted, 1)} in the "
            "completion). Please reduce the length of the prompt or completion.",
            param=param,
            code="context_length_exceeded",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bias = []
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model, in [0, {vocab})",
                           param="logit_bias")  # fmt: skip
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias[{key!r}] = {value}: biases are in [-100, 100]", param="logit_bias")
        bias.append((int(key), float(value)))
    stop_ids = body.stop_token_ids or []
    if any(not 0 <= t < vocab for t in stop_ids):
        raise APIError(400, f"stop_token_ids: {stop_ids} holds ids outside this model's [0, {vocab})",
                       param="stop_token_ids")  # fmt: skip
    try:
        return SamplingParams(
            max_tokens=wanted, temperature=body.temperature, top_p=body.top_p, stop=tuple(s for s in stop if s),
            seed=body.seed, logprobs=logprobs, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logit_bias=tuple(bias), top_k=max(body.top_k, 0),
            min_p=body.min_p, repetition_penalty=body.repetition_penalty, min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos, stop_token_ids=tuple(stop_ids),
        )  # fmt: skip
    except ConfigError as e:
        raise APIError(400, str(e)) from e
