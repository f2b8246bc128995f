"""OpenAI request shapes (msgspec Structs: decoding them is the validation), error bodies, and the
mapping from request fields to the engine's SamplingParams."""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


class Strict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A request object: a field it does not know is a 400 naming it, never silently dropped."""


class StreamOptions(Strict, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # with include_usage: usage so far on every chunk


class StructuredOutputsRequest(Strict, kw_only=True):
    """vLLM's `structured_outputs` request object: exactly one constraint."""
    json: str | dict[str, Any] | bool | None = None  # a JSON schema (object or its JSON text)
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF / Lark


class _Common(Strict):
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
    user: str | None = None  # accepted metadata, no effect (README)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
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
    structured_outputs: StructuredOutputsRequest | None = None


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]
    max_tokens: Count | None = 16
    echo: bool = False
    logprobs: Logprobs | None = None
    suffix: str | None = None
    best_of: int | None = None


class FunctionCall(Strict, kw_only=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages
    reasoning: str | None = None  # assistant messages: an earlier turn's thinking, for templates that show it


class FunctionDefinition(Strict, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None  # accepted: calls forced by tool_choice always follow the schema


class Tool(Strict, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(Strict, kw_only=True):
    name: str


class NamedToolChoice(Strict, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionName


class JSONSchema(Strict, kw_only=True):
    name: str = "response"
    description: str | None = None  # accepted metadata, no effect (README)
    schema: dict[str, Any] | bool | None = None
    strict: bool | None = None  # accepted: the output always follows the schema


class ResponseFormat(Strict, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: Logprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    metadata: dict[str, str] | None = None  # accepted metadata, no effect (README)
    store: bool | None = None  # accepted metadata, no effect (README)


class TokenizeRequest(Strict, kw_only=True):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    model: str | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Strict, kw_only=True):
    tokens: list[int]
    model: str | None = None


def logit_bias_of(body: CompletionRequest | ChatCompletionRequest, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as strings) as the engine takes it; raises APIError naming the field."""
    if not body.logit_bias:
        return None
    bias = {}
    for key, value in body.logit_bias.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise APIError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}", param="logit_bias")
        if not -100.0 <= value <= 100.0:  # also rejects NaN
            raise APIError(f"logit_bias values must be in [-100, 100], got {value!r}", param="logit_bias")
        bias[int(key)] = value
    return bias


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None, **engine_fields) -> SamplingParams:
    """Map request fields to SamplingParams (`engine_fields`: those the endpoint has already worked out, such as
    structured_outputs and logit_bias); raises APIError naming the offending field."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    fields = {
        "max_tokens": max_tokens, "min_tokens": body.min_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": body.top_k or 0,
        "min_p": body.min_p or 0.0, "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
        "seed": body.seed, "stop": stop, "stop_token_ids": list(body.stop_token_ids or []),
        "ignore_eos": body.ignore_eos, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs,
        "skip_special_tokens": body.skip_special_tokens}
    params = SamplingParams(**(fields | engine_fields))
    try:
        params.validate()
    except ValueError as e:
        raise APIError(str(e), param=str(e).split()[0]) from None
    return params
