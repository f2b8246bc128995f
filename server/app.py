"""The HTTP surface: OpenAI's completions and chat completions (streaming or not), models, health,
metrics, tokenize/detokenize, version. Handlers validate, tokenize and hand each choice to
`generation.Choice`; the process shape behind them lives in engine_client."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass

import msgspec
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from engine.messages import SLO

from .generation import Choice, ChoiceResult
from .metrics import Metrics
from .middleware import current_request_id
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse,
                       TokenizeRequest, sampling_params)

VERSION = "0.1.0"
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
        param = str(e).rsplit("$.", 1)[-1].split("`")[0].split("[")[0] if "$." in str(e) else None
        raise APIError(f"invalid request: {e}", param=param) from None
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


def slo_of(req) -> SLO:
    # A target the request leaves out falls back to the scheduler's default (e.g. --slai-tbt-ms).
    return SLO(ttft_ms=req.slo_ttft_ms, tbt_ms=req.slo_tbt_ms)


def choice_seed(seed: int | None, index: int) -> int | None:
    return None if seed is None else seed + index  # n > 1: distinct but reproducible choices


async def start_choices(app: AppState, prompts: list[list[int]], req, max_tokens_of, logprobs,
                        prompt_logprobs=None) -> list[Choice]:
    check_token_ids(app, req.stop_token_ids or [], "stop_token_ids")
    choices = []
    for prompt_ids in prompts:
        max_tokens = max_tokens_of(len(prompt_ids))
        for j in range(req.n):
            params = sampling_params(req, max_tokens, logprobs, prompt_logprobs)
            params.seed = choice_seed(params.seed, j)
            choices.append(Choice(app, prompt_ids, params, req.priority, slo_of(req)))
    try:
        for c in choices:
            await c.start()
    except BaseException:
        for c in choices:  # those already submitted
            await c.abort()
        raise
    return choices


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


# ---- endpoints ----------------------------------------------------------------------------------------
async def completions(request: Request) -> Response:
    app: AppState = request.app.state.halffull
    req = decode(await read_body(request, app.config), CompletionRequest)
    check_model(app, req.model)
    if req.suffix:
        raise APIError("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError("best_of is not supported (other than equal to n)", param="best_of")
    if req.echo and req.stream and req.logprobs is not None:
        raise APIError("echo with logprobs is supported only without streaming", param="echo")
    p = req.prompt
    if isinstance(p, str):
        prompts = [encode_text(app, p)]
    elif not p:
        raise APIError("prompt is empty", param="prompt")
    elif all(isinstance(x, str) for x in p):
        prompts = [encode_text(app, x) for x in p]
    elif all(isinstance(x, list) for x in p):
        prompts = [check_token_ids(app, x) for x in p]
    else:
        prompts = [check_token_ids(app, p)]
    if len(prompts) * req.n > 256:
        raise APIError("at most 256 prompts times n per request", param="prompt")
    check_capacity(app)
    for ids in prompts:
        resolve_max_tokens(app, len(ids), req.max_tokens)
    choices = await start_choices(app, prompts, req, lambda n: resolve_max_tokens(app, n, req.max_tokens),
                                  req.logprobs, req.logprobs if req.echo and req.logprobs is not None else None)
    rid, created = f"cmpl-{current_request_id()}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": app.config.served_model_name}

    def prompt_of(i: int) -> list[int]:
        return prompts[i // req.n]

    if not req.stream:
        results = await run_all(request, choices)
        out = []
        for i, r in enumerate(results):
            text, logprobs = r.text, None
            if req.logprobs is not None:
                ids, entries = r.token_ids, r.logprobs
                if req.echo:
                    ids, entries = prompt_of(i) + ids, (r.prompt_logprobs or [None] * len(prompt_of(i))) + entries
                logprobs = completion_logprobs(app, ids, entries, 0)
            if req.echo:
                text = (app.tokenizer.decode(prompt_of(i)) if app.tokenizer else "") + text
            out.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": r.finish_reason})
        return json_response({**base, "choices": out, "usage": usage(choices, prompts)})

    async def gen():
        offsets = [0] * len(choices)
        if req.echo:
            for i in range(len(choices)):
                text = app.tokenizer.decode(prompt_of(i)) if app.tokenizer else ""
                yield sse({**base, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]})
        async for i, d in merged(choices):
            if not d.text and not d.finish_reason:
                continue
            logprobs = None
            if req.logprobs is not None and d.logprobs:
                logprobs = completion_logprobs(app, d.token_ids, d.logprobs, offsets[i])
            offsets[i] += len(d.text)
            yield sse({**base, "choices": [{"index": i, "text": d.text, "logprobs": logprobs,
                                            "finish_reason": d.finish_reason}]})
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": usage(choices, prompts)})
    return ChoicesStream(gen(), choices)


def chat_prompt(app: AppState, req) -> list[int]:
    if app.tokenizer is None:
        raise APIError("this model has no tokenizer, so it cannot serve chat")
    messages = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError("only text content parts are supported", param="messages")
                parts.append(part["text"])
            content = "".join(parts)
        messages.append({"role": m.role, "content": content or ""})
    if not messages:
        raise APIError("messages must not be empty", param="messages")
    check_text_length(app, sum(len(m["role"]) + len(m["content"]) for m in messages), "messages")
    try:
        ids = app.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                                tokenize=True)
    except Exception as e:  # noqa: BLE001 - template errors are the request's fault
        raise APIError(f"could not apply the chat template: {e}", param="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


async def chat_completions(request: Request) -> Response:
    app: AppState = request.app.state.halffull
    req = decode(await read_body(request, app.config), ChatCompletionRequest)
    check_model(app, req.model)
    if req.tools:
        raise APIError("tools are not supported", param="tools")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    prompt = chat_prompt(app, req)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    resolve_max_tokens(app, len(prompt), requested)
    check_capacity(app)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    choices = await start_choices(app, [prompt], req, lambda n: resolve_max_tokens(app, n, requested), logprobs)
    rid, created = f"chatcmpl-{current_request_id()}", int(time.time())
    name = app.config.served_model_name
    if not req.stream:
        results = await run_all(request, choices)
        out = [{"index": i, "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(app, r.token_ids, r.logprobs) if logprobs is not None else None,
                "finish_reason": r.finish_reason} for i, r in enumerate(results)]
        return json_response({"id": rid, "object": "chat.completion", "created": created, "model": name,
                              "choices": out, "usage": usage(choices, [prompt])})
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}

    async def gen():
        for i in range(len(choices)):
            yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        async for i, d in merged(choices):
            if not d.text and not d.finish_reason:
                continue
            lp = chat_logprobs(app, d.token_ids, d.logprobs) if logprobs is not None and d.logprobs else None
            delta = {"content": d.text} if d.text else {}
            yield sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": lp,
                                            "finish_reason": d.finish_reason}]})
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": usage(choices, [prompt])})
    return ChoicesStream(gen(), choices)


async def models(request: Request) -> Response:
    app: AppState = request.app.state.halffull
    return json_response({"object": "list", "data": [{
        "id": app.config.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "halffull",
        "max_model_len": app.config.max_model_len}]})


async def health(request: Request) -> Response:
    client = request.app.state.halffull.client
    if client.healthy:
        return Response(status_code=200)
    down = [w.worker_id for w in client.workers if not w.alive]
    return error_response(APIError(f"engine workers down: {down}" if down else "the balancer is down",
                                   status=503, type="server_error"))


async def metrics(request: Request) -> Response:
    return Response(request.app.state.halffull.metrics.render(), media_type="text/plain; version=0.0.4")


async def tokenize(request: Request) -> Response:
    app: AppState = request.app.state.halffull
    req = decode(await read_body(request, app.config), TokenizeRequest)
    check_model(app, req.model)
    if req.messages is not None:
        tokens = chat_prompt(app, req)
    elif req.prompt is not None:
        tokens = encode_text(app, req.prompt, req.add_special_tokens)
    else:
        raise APIError("give `prompt` or `messages`", param="prompt")
    return json_response({"tokens": tokens, "count": len(tokens), "max_model_len": app.config.max_model_len})


async def detokenize(request: Request) -> Response:
    app: AppState = request.app.state.halffull
    req = decode(await read_body(request, app.config), DetokenizeRequest)
    check_model(app, req.model)
    ids = check_token_ids(app, req.tokens, "tokens")
    if app.tokenizer is None:
        raise APIError("this model has no tokenizer")
    return json_response({"prompt": app.tokenizer.decode(ids)})


async def version(request: Request) -> Response:
    return json_response({"version": VERSION})


def openapi_spec() -> dict:
    """The two generation endpoints, their request schemas taken from the msgspec Structs that validate them."""
    (completion, chat, error), schemas = msgspec.json.schema_components(
        [CompletionRequest, ChatCompletionRequest, ErrorResponse], ref_template="#/components/schemas/{name}")
    errors = {"content": {"application/json": {"schema": error}}}

    def post(summary: str, body: dict) -> dict:
        return {"post": {
            "summary": summary, "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {"200": {"description": "the result; with `stream: true`, server-sent events ending in "
                                                 "`data: [DONE]` (an error after the first event is an error event)"},
                          "4XX": {"description": "invalid request (413: body too large, 429: over the queue "
                                                 "limit, with Retry-After)", **errors},
                          "503": {"description": "no engine worker available, or shutting down", **errors}}}}
    return {"openapi": "3.1.0", "info": {"title": "halffull", "version": VERSION},
            "paths": {"/v1/completions": post("Create a completion", completion),
                      "/v1/chat/completions": post("Create a chat completion", chat)},
            "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}


async def openapi(request: Request) -> Response:
    return json_response(openapi_spec())


class Guard:
    """ASGI middleware: API-key check and OpenAI-shaped errors for everything below it."""

    OPEN_PATHS = ("/health", "/version", "/openapi.json")

    def __init__(self, app, state_ref):
        self.app, self.state_ref = app, state_ref

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state: AppState = self.state_ref()
        key = state.config.api_key if state else None
        path = scope["path"]
        if key and path not in self.OPEN_PATHS and (path != "/metrics" or state.config.protect_metrics):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                resp = error_response(APIError("invalid or missing API key", 401, "authentication_error",
                                               code="invalid_api_key"))
                return await resp(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        except APIError as e:
            await error_response(e)(scope, receive, send)


def build_app(lifespan) -> Starlette:
    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]), Route("/tokenize", tokenize, methods=["POST"]),
              Route("/detokenize", detokenize, methods=["POST"]), Route("/version", version, methods=["GET"]),
              Route("/openapi.json", openapi, methods=["GET"])]

    async def not_found(request, exc):
        return error_response(APIError(f"no route {request.url.path}", 404, "NotFoundError"))

    async def method_not_allowed(request, exc):
        return error_response(APIError(f"method {request.method} not allowed", exc.status_code))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: method_not_allowed})
    app.state.halffull = None
    app.add_middleware(Guard, state_ref=lambda: app.state.halffull)
    return app
