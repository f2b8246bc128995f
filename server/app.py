"""The HTTP surface: the route table, the API-key guard, and the small endpoints (models, health, metrics,
tokenize/detokenize, version, openapi). The two generation endpoints live in completions and chat, over the
shared choice-serving path in serving; the process shape behind them lives in engine_client."""

from __future__ import annotations

import hmac
import time

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .chat import chat_completions
from .chat_template import render
from .completions import completions
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
)
from .serving import (
    AppState,
    ServerConfig,
    check_model,
    check_token_ids,
    decode,
    encode_text,
    error_response,
    json_response,
    read_body,
)

__all__ = ["AppState", "ServerConfig", "build_app"]
VERSION = "0.1.0"


# ---- endpoints ----------------------------------------------------------------------------------------
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
    body = decode(await read_body(request, app.config), TokenizeRequest)
    check_model(app, body.model)
    if body.messages is not None:
        text = render(app, body.messages, body.tools, body.add_generation_prompt, body.chat_template_kwargs)
        tokens = app.tokenizer.encode(text, add_special_tokens=False)
    elif body.prompt is not None:
        tokens = encode_text(app, body.prompt, body.add_special_tokens)
    else:
        raise APIError("give `prompt` or `messages`", param="prompt")
    return json_response({"tokens": tokens, "count": len(tokens), "max_model_len": app.config.max_model_len})


async def detokenize(request: Request) -> Response:
    app: AppState = request.app.state.halffull
    body = decode(await read_body(request, app.config), DetokenizeRequest)
    check_model(app, body.model)
    ids = check_token_ids(app, body.tokens, "tokens")
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
