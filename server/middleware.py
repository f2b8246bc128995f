"""What wraps every HTTP exchange, outside the API-key guard: the request id and, when configured, CORS.

The request id is the client's `X-Request-Id` if it sent a usable one, else a fresh one; it is echoed in
the response's `X-Request-Id`, is the tail of the response's `id` (`cmpl-<request id>`), and starts every
engine request id of the exchange (`<request id>-<n>`), so a log line, a client's header and an engine
request lead to one another."""

from __future__ import annotations

import contextvars
import re
import uuid
from dataclasses import dataclass

from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware

REQUEST_ID_HEADER = "X-Request-Id"
# Visible ASCII without separators that would make log lines or ids ambiguous; anything else is replaced.
_USABLE_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def current_request_id() -> str:
    """The id of the HTTP exchange being handled (a fresh one outside any)."""
    return _request_id.get() or uuid.uuid4().hex


class RequestIdMiddleware:
    """ASGI middleware: picks the exchange's request id, makes it current for the handler (and every task
    it starts, which copy the context), and adds it to the response headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        request_id = given if _USABLE_ID.fullmatch(given) else uuid.uuid4().hex

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        token = _request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)


@dataclass
class CorsConfig:
    """vLLM's CORS flags; each list is given on the command line as JSON (`--allowed-origins '["*"]'`)."""
    allowed_origins: list[str]
    allowed_methods: list[str]
    allowed_headers: list[str]
    allow_credentials: bool = False


def add_middleware(app, cors: CorsConfig | None) -> None:
    """Request ids on every exchange; CORS only when origins are configured (off by default)."""
    app.add_middleware(RequestIdMiddleware)
    if cors is not None:  # outermost: a preflight is answered before the API-key check, as browsers expect
        app.add_middleware(CORSMiddleware, allow_origins=cors.allowed_origins, allow_methods=cors.allowed_methods,
                           allow_headers=cors.allowed_headers, allow_credentials=cors.allow_credentials,
                           expose_headers=[REQUEST_ID_HEADER])
