"""The shared path that serves choices, for both generation endpoints: request decoding and the checks both
make, starting each choice, and answering them (one JSON body, or an SSE stream of chunks); each endpoint
supplies only how one choice reads (a `ChoiceView`). Also the app's state and its error responses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from engine.messages import SLO, SamplingParams

from .generation import Choice, ChoiceResult, Delta
from .metrics import Metrics
from .middleware import current_request_id
from .protocol import APIError, ChatCompletionRequest, CompletionRequest

_json = msgspec.json.Encoder()


class ClientGone(APIError):
    """The client closed the connection: nobody reads this answer."""

    def __init__(self):
        super().__init__("the client closed the connection", status=499)


@dataclass
class ServerConfig:
    served_model_name: str
    max_model_len: int
    vocab_size: int
    api_key: str | None = None
    protect_metrics: bool = False
    max_queued_requests: int | None = None
    max_request_body_bytes: int = 8 << 20
    scheduler: str = "fcfs"
    honors_priority: bool = False  # the scheduler's class orders by request priority
    tool_call_parser: str | None = None  # --tool-call-parser
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None  # --reasoning-parser
    structured_outputs_backend: str = "auto"


class AppState:
    def __init__(self, client, tokenizer, config: ServerConfig):
        self.client, self.tokenizer, self.config = client, tokenizer, config
        self.metrics = Metrics(client, config.served_model_name)
        # No token stands for more characters than its own text has (x4 for normalizers that merge characters),
        # so longer text cannot fit the context.
        longest = max(map(len, tokenizer.get_vocab()), default=1) if tokenizer is not None else 1
        self.max_text_chars = 4 * longest * config.max_model_len


def json_response(body, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_json.encode(body), status_code=status, media_type="application/json", headers=headers)


def error_response(e: APIError) -> Response:
    return json_response(e.body(), e.status, e.headers)


# ---- request decoding and shared checks -------------------------------------------------------------
async def read_body(request: Request, config: ServerConfig) -> bytes:
    limit = config.max_request_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(f"request body larger than {limit} bytes", status=413)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(f"request body larger than {limit} bytes", status=413)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def decode(body: bytes, cls):
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        msg = str(e)
        if "$." in msg:
            param = msg.rsplit("$.", 1)[-1].split("`")[0].split("[")[0]
        elif msg.startswith("Object contains unknown field `"):  # at the top level
            param = msg.split("`")[1]
        else:
            param = None
        raise APIError(f"invalid request: {msg}", param=param) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        raise APIError(f"malformed JSON body: {e}") from None


def check_model(app: AppState, model: str | None) -> None:
    if model is not None and model != app.config.served_model_name:
        raise APIError(f"the model `{model}` does not exist; this server serves `{app.config.served_model_name}`",
                       status=404, type="NotFoundError", param="model", code="model_not_found")


def check_capacity(app: AppState) -> None:
    if app.client.draining:
        raise APIError("the server is shutting down", status=503, type="server_error")
    if not app.client.healthy and not any(w.alive for w in app.client.workers):
        raise APIError("no engine worker is available", status=503, type="server_error")
    limit = app.config.max_queued_requests
    if limit is not None:
        queued = sum(1 for s in app.client.requests.values() if s.first_output_time is None)
        if queued >= limit:
            app.metrics.rejected.labels(app.config.served_model_name).inc()
            raise APIError(f"the server is over its queue limit of {limit} requests; retry later", status=429,
                           type="rate_limit_error", headers={"Retry-After": "1"})


def check_text_length(app: AppState, chars: int, param: str) -> None:
    """Refuse text that cannot fit the context before tokenizing it: a tokenizer holds the event loop for about
    a second per million characters and needs some 200 bytes per character while it works."""
    if chars > app.max_text_chars:
        raise APIError(f"the prompt has {chars} characters, more than this model's maximum context length of "
                       f"{app.config.max_model_len} tokens can hold", param=param)


def encode_text(app: AppState, text: str, add_special_tokens: bool = True) -> list[int]:
    # (msgspec has decoded `text`: it is valid Unicode, without lone surrogates.)
    if app.tokenizer is None:
        raise APIError("this model has no tokenizer: send token ids")
    check_text_length(app, len(text), "prompt")
    return app.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def check_token_ids(app: AppState, ids, param: str = "prompt") -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise APIError("token id prompts must be lists of integers", param=param)
    vocab = app.config.vocab_size
    if any(t < 0 or t >= vocab for t in ids):
        raise APIError(f"token ids must be in [0, {vocab})", param=param)
    return list(ids)


def resolve_max_tokens(app: AppState, prompt_len: int, requested: int | None) -> int:
    limit = app.config.max_model_len
    if prompt_len == 0:
        raise APIError("prompt is empty", param="prompt")
    if requested is None:
        requested = limit - prompt_len
    if requested < 0:
        raise APIError("max_tokens must be >= 0", param="max_tokens")
    if prompt_len + requested > limit or prompt_len >= limit:
        raise APIError(f"this model's maximum context length is {limit} tokens; the request has {prompt_len} "
                       f"prompt tokens and asks for {requested} more", param="max_tokens")
    return requested


async def disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_all(request: Request, choices: list[Choice]) -> list[ChoiceResult]:
    """Run the choices to their end, or abort them all once the client goes away: a client that gave up
    (a timeout, say) must not leave its request running."""
    tasks = [asyncio.ensure_future(c.run()) for c in choices]
    results = asyncio.gather(*tasks)
    # A choice cancelled below ends `results` with a CancelledError that nobody awaits: mark it retrieved.
    results.add_done_callback(lambda f: f.cancelled() or f.exception())
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait([results, gone], return_when=asyncio.FIRST_COMPLETED)
        if not results.done():
            raise ClientGone()
        return results.result()
    finally:
        gone.cancel()
        for t in tasks:  # also when one choice failed: a cancelled choice is aborted on its worker
            t.cancel()


async def merged(choices: list[Choice]):
    """(choice index, delta) pairs from all choices as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, c):
        try:
            async for d in c.deltas():
                await queue.put((i, d, None))
        except APIError as e:
            await queue.put((i, None, e))
        await queue.put((i, None, None))
    tasks = [asyncio.ensure_future(pump(i, c)) for i, c in enumerate(choices)]
    try:
        remaining = len(choices)
        while remaining:
            i, d, err = await queue.get()
            if err is not None:
                raise err
            if d is None:
                remaining -= 1
            else:
                yield i, d
    finally:
        for t in tasks:
            t.cancel()


def usage(choices: list[Choice], prompts: list[list[int]]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(c.result.token_ids) for c in choices)
    cached = sum(c.result.num_cached_tokens for c in choices[:: max(1, len(choices) // max(1, len(prompts)))])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


class ChoicesStream(StreamingResponse):
    """SSE of the choices' chunks, ended by an error event if they fail, then [DONE]. However the response
    ends, the choices are aborted: a client that leaves before the first chunk cancels the response before
    `gen` ever runs, so `gen` cannot clean up after itself."""

    def __init__(self, gen, choices: list[Choice]):
        async def body():
            try:
                async for chunk in gen:
                    yield chunk
            except APIError as e:
                yield sse(e.body())
            yield b"data: [DONE]\n\n"
        super().__init__(body(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.choices = choices

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for c in self.choices:
                await c.abort()


# ---- logprobs formatting ------------------------------------------------------------------------------
def token_text(app: AppState, token_id: int) -> str:
    return app.tokenizer.decode([token_id]) if app.tokenizer is not None else f"token_id:{token_id}"


def completion_logprobs(app: AppState, token_ids: list[int], entries, offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for tid, e in zip(token_ids, entries):
        t = token_text(app, tid)
        tokens.append(t)
        offsets.append(offset)
        offset += len(t)
        if e is None:
            lps.append(None)
            tops.append(None)
        else:
            lps.append(e.logprob)
            top: dict[str, float] = {}
            for i, lp in zip(e.top_ids, e.top_logprobs):  # best first: a text shared by two tokens keeps the best
                top.setdefault(token_text(app, i), lp)
            top.setdefault(t, e.logprob)
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(app: AppState, token_ids: list[int], entries) -> dict:
    content = []
    for tid, e in zip(token_ids, entries):
        t = token_text(app, tid)
        content.append({"token": t, "logprob": e.logprob, "bytes": list(t.encode("utf-8", "replace")),
                        "top_logprobs": [{"token": (s := token_text(app, i)), "logprob": lp,
                                          "bytes": list(s.encode("utf-8", "replace"))}
                                         for i, lp in zip(e.top_ids, e.top_logprobs)]})
    return {"content": content}


# ---- the shared path --------------------------------------------------------------------------------------
class ChoiceView(Protocol):
    """How one choice reads on one endpoint. Payloads are the choice's fields without its index."""

    def opening(self) -> dict | None:
        """The first chunk's payload, sent before any token (None: nothing)."""

    def chunk(self, d: Delta) -> list[dict]:
        """The chunks' payloads for one delta (none while nothing is ready to show)."""

    def final(self, r: ChoiceResult) -> dict:
        """The choice in a non-streaming answer."""


@dataclass
class Endpoint:
    id_prefix: str  # cmpl / chatcmpl
    object: str  # text_completion / chat.completion
    chunk_object: str


def check_priority(app: AppState, priority: int) -> None:
    # vLLM's answer too: a priority nobody reads would silently reorder nothing.
    if priority != 0 and not app.config.honors_priority:
        raise APIError(f"priority is honored only by a scheduler that orders by it (e.g. `--scheduler priority`); "
                       f"this server runs `--scheduler {app.config.scheduler}`", param="priority")


async def serve_choices(request: Request, app: AppState, endpoint: Endpoint,
                        body: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]],
                        params_of: Callable[[int], SamplingParams], view_of: Callable[[int], ChoiceView]) -> Response:
    """Start `body.n` choices per prompt (`params_of(prompt length)` makes each one's SamplingParams), then answer
    them, streaming or not; `view_of(choice index)` says how each reads."""
    check_priority(app, body.priority)
    check_token_ids(app, body.stop_token_ids or [], "stop_token_ids")
    params = [params_of(len(p)) for p in prompts]  # all checks before anything is submitted
    check_capacity(app)
    slo = SLO(ttft_ms=body.slo_ttft_ms, tbt_ms=body.slo_tbt_ms)  # unset: the scheduler's default (e.g. --slai-tbt-ms)
    choices = []
    for prompt_ids, p in zip(prompts, params):
        for j in range(body.n):  # n > 1: distinct but reproducible choices
            seed = None if p.seed is None else p.seed + j
            choices.append(Choice(app, prompt_ids, msgspec.structs.replace(p, seed=seed), body.priority, slo))
    try:
        for c in choices:
            await c.start()
    except BaseException:
        for c in choices:  # those already submitted
            await c.abort()
        raise
    views = [view_of(i) for i in range(len(choices))]
    base = {"id": f"{endpoint.id_prefix}-{current_request_id()}", "created": int(time.time()),
            "model": app.config.served_model_name}
    if not body.stream:
        results = await run_all(request, choices)
        return json_response({**base, "object": endpoint.object,
                              "choices": [{"index": i, **v.final(r)} for i, (v, r) in enumerate(zip(views, results))],
                              "usage": usage(choices, prompts)})
    base["object"] = endpoint.chunk_object
    options = body.stream_options
    running_usage = options is not None and options.include_usage and options.continuous_usage_stats

    def chunk(i: int, payload: dict) -> bytes:
        return sse({**base, "choices": [{"index": i, **payload}]}
                   | ({"usage": usage(choices, prompts)} if running_usage else {}))

    async def gen():
        for i, v in enumerate(views):
            if (payload := v.opening()) is not None:
                yield chunk(i, payload)
        async for i, d in merged(choices):
            for payload in views[i].chunk(d):
                yield chunk(i, payload)
        if options and options.include_usage:
            yield sse({**base, "choices": [], "usage": usage(choices, prompts)})
    return ChoicesStream(gen(), choices)
