"""OpenAI request shapes (msgspec Structs: decoding them is the validation), error bodies, and the
mapping from request fields to the engine's SamplingParams."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from engine.messages import SamplingParams


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    """OpenAI's error shape: every 4xx and 5xx body, and an error event inside a stream."""
    error: ErrorDetail


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorDetail(self.message, self.type, self.param, self.code))


MAX_N = 16
MAX_STOP = 16
MAX_STOP_LEN = 256
MAX_LOGPROBS = 20

# Ranges that decoding enforces, so that no out-of-range number reaches the wire (msgpack carries 64-bit
# ints at most) or a tensor; limits that depend on the model (vocabulary, context) are checked in app.
Int64 = Annotated[int, Meta(ge=-2**63, le=2**63 - 1)]
Int32 = Annotated[int, Meta(ge=-2**31, le=2**31 - 1)]
Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Logprobs = Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)]
Positive = Annotated[float, Meta(gt=0)]
StopString = Annotated[str, Meta(max_length=MAX_STOP_LEN)]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Common(msgspec.Struct, kw_only=True):
    """Fields both endpoints share, with vLLM's extensions."""
    model: str | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Int64 | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions users of vLLM rely on.
    top_k: Annotated[int, Meta(ge=-1, le=2**31 - 1)] | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: Count = 0
    stop_token_ids: list[Count] | None = None
    skip_special_tokens: bool = True
    priority: Int32 = 0
    # Per-request SLO targets, for SLO-aware schedulers (SLAI).
    slo_ttft_ms: Positive | None = None
    slo_tbt_ms: Positive | None = None


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]
    max_tokens: Count | None = 16
    echo: bool = False
    logprobs: Logprobs | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: Logprobs | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(msgspec.Struct, kw_only=True):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    model: str | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[int]
    model: str | None = None


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """Map request fields to SamplingParams; raises APIError naming the offending field."""
    if req.logit_bias:
        raise APIError("logit_bias is not supported", param="logit_bias")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    params = SamplingParams(
        max_tokens=max_tokens, min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
        min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed, stop=stop, stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens)
    try:
        params.validate()
    except ValueError as e:
        raise APIError(str(e), param=str(e).split()[0]) from None
    return params
