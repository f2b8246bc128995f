"""A lean HTTP/1.1 transport for httpx, for thousands of concurrent streams in one process.

httpx's default pool (httpcore) rescans every pooled connection whenever a request starts or ends,
and for each idle one rescans them all again: with N connections in flight that is O(N) to O(N²) work
per request, which at a few hundred streams already costs more CPU than reading the streams, and its
anyio + h11 stack costs tens of µs per network read. This transport keeps idle connections in a
per-origin stack (O(1) checkout and return), reads with an asyncio.Protocol and frames bodies with
the incremental `ResponseParser`. The benchmark's own semaphore bounds the number of connections.
"""

from __future__ import annotations

import asyncio
import ssl

import httpx

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ProtocolError(Exception):
    pass


class ResponseParser:
    """Incremental HTTP/1.1 response parsing: the head, then a body framed by Content-Length, by
    chunked transfer coding, or by the end of the connection. feed() returns the body bytes it frees."""

    def __init__(self, head_request: bool = False) -> None:
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self._head_request = head_request  # a response to HEAD has no body whatever its headers say
        self._state = _HEAD
        self._remaining = 0
        self._buf = b""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        pos, size, out = 0, len(buf), []
        while pos < size and self._state != _DONE:
            state = self._state
            if state == _LENGTH or state == _CHUNK_DATA:
                take = min(self._remaining, size - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DONE if state == _LENGTH else _CHUNK_CRLF
            elif state == _UNTIL_CLOSE:
                out.append(buf[pos:])
                pos = size
            elif state == _CHUNK_CRLF:
                if size - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ProtocolError("chunk not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            else:  # _HEAD, _CHUNK_SIZE, _TRAILERS: wait for a whole line (or a whole head)
                end = buf.find(b"\r\n\r\n" if state == _HEAD else b"\r\n", pos)
                if end < 0:
                    break
                line, pos = buf[pos:end], end + (4 if state == _HEAD else 2)
                if state == _HEAD:
                    self._on_head(line)
                elif state == _CHUNK_SIZE:
                    try:
                        chunk = int(line.split(b";", 1)[0], 16)
                    except ValueError:
                        raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
                    self._state, self._remaining = (_CHUNK_DATA, chunk) if chunk else (_TRAILERS, 0)
                elif not line:  # the blank line that ends the trailers
                    self._state = _DONE
        if self._state == _DONE and pos < size:
            self.keep_alive = False  # bytes after the response: the connection's framing is lost
        self._buf = buf[pos:] if self._state != _DONE else b""
        return [piece for piece in out if piece]

    def feed_eof(self) -> None:
        """The server closed the connection; an error unless that is how this body ends."""
        self.keep_alive = False
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
        elif self._state != _DONE:
            raise ProtocolError("connection closed before the response was complete")

    def _on_head(self, head: bytes) -> None:
        status_line, *lines = head.split(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line[:60]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            return  # an interim response (100 Continue); the real head follows
        self.status = status
        self.headers = [(name.strip(), value.strip()) for name, _, value in (h.partition(b":") for h in lines)]
        fields = {name.lower(): value.lower() for name, value in self.headers}
        self.keep_alive = parts[0] != b"HTTP/1.0" and fields.get(b"connection") != b"close"
        if self._head_request or status in (204, 304):
            self._state = _DONE
        elif b"chunked" in fields.get(b"transfer-encoding", b""):
            self._state = _CHUNK_SIZE
        elif b"content-length" in fields:
            if not fields[b"content-length"].isdigit():
                raise ProtocolError(f"bad Content-Length {fields[b'content-length'][:20]!r}")
            self._remaining = int(fields[b"content-length"])
            self._state = _LENGTH if self._remaining else _DONE
        else:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False


class _Connection(asyncio.Protocol):
    """One TCP connection; the protocol callbacks feed the parser, a coroutine waits on `_waiter`."""

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.pieces: list[bytes] = []
        self.received = False  # any byte of the current response yet (for retrying a stale connection)
        self.closed = False
        self.error: Exception | None = None
        self._waiter: asyncio.Future | None = None

    def start(self, head_request: bool) -> None:
        self.parser = ResponseParser(head_request)
        self.pieces.clear()
        self.received = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.pieces += self.parser.feed(data)
        except ProtocolError as e:
            self.error = e
            self.transport.close()
        self._wake()

    def eof_received(self) -> bool:
        try:
            self.parser.feed_eof()
        except ProtocolError as e:
            self.error = self.error or e
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None and self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Until the protocol has news (data, EOF, error); TimeoutError after `timeout` seconds.
        (A bare timer rather than asyncio.timeout(): this runs once per network read.)"""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def failure(self) -> Exception | None:
        if self.error is not None:
            return httpx.RemoteProtocolError(str(self.error)) if isinstance(self.error, ProtocolError) \
                else httpx.ReadError(f"{type(self.error).__name__}: {self.error}")
        if self.closed and not self.parser.done:
            return httpx.RemoteProtocolError("server closed the connection mid-response")
        return None


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Body(httpx.AsyncByteStream):
    def __init__(self, transport: HTTP11Transport, conn: _Connection, read_timeout: float | None) -> None:
        self._transport, self._conn, self._timeout = transport, conn, read_timeout

    async def __aiter__(self):
        conn = self._conn
        while True:
            if conn.pieces:
                # Whatever arrived since the last read, as one piece: fewer iterations under load.
                data = conn.pieces[0] if len(conn.pieces) == 1 else b"".join(conn.pieces)
                conn.pieces.clear()
                yield data
            elif conn.parser.done:
                return
            elif (error := conn.failure()) is not None:
                raise error
            else:
                try:
                    await conn.wait(self._timeout)
                except TimeoutError:
                    raise httpx.ReadTimeout(f"no data for {self._timeout} s") from None

    async def aclose(self) -> None:
        self._transport._release(self._conn)


class HTTP11Transport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self._idle: dict[tuple, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        lines = [b"%s %s HTTP/1.1" % (request.method.encode(), url.raw_path)]
        lines += [b"%s: %s" % (name, value) for name, value in request.headers.raw]
        message = b"\r\n".join(lines) + b"\r\n\r\n" + b"".join([part async for part in request.stream])
        while True:
            conn, reused = self._checkout(key), True
            if conn is None:
                conn, reused = await self._connect(key, timeouts.get("connect")), False
            conn.start(request.method == "HEAD")
            conn.transport.write(message)
            try:
                while conn.parser.status is None:
                    if (error := conn.failure()) is not None:
                        raise error
                    await conn.wait(timeouts.get("read"))
            except TimeoutError:
                conn.transport.close()
                raise httpx.ReadTimeout(f"no response head within {timeouts.get('read')} s", request=request) from None
            except httpx.TransportError:
                conn.transport.close()
                if reused and not conn.received:
                    continue  # the server dropped an idle keep-alive connection: retry on a new one
                raise
            except BaseException:  # cancelled: the connection is mid-response, nobody will read it
                conn.transport.close()
                raise
            return httpx.Response(
                conn.parser.status, headers=conn.parser.headers,
                stream=_Body(self, conn, timeouts.get("read")), extensions={"http_version": b"HTTP/1.1"},
            )

    def _checkout(self, key: tuple) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing() and conn.parser.keep_alive:
                return conn
        return None

    def _release(self, conn: _Connection) -> None:
        parser = conn.parser
        if parser.done and parser.keep_alive and not conn.closed and conn.error is None:
            self._idle.setdefault(conn.key, []).append(conn)
        elif conn.transport is not None:
            conn.transport.close()  # unread or unframed rest of a response: the connection is unusable

    async def _connect(self, key: tuple, timeout: float | None) -> _Connection:
        scheme, host, port = key
        context = None
        if scheme == "https":
            self._ssl = self._ssl or ssl.create_default_context()
            context = self._ssl
        conn = _Connection(key)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().create_connection(
                    lambda: conn, host, port, ssl=context, server_hostname=host if context else None
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} took over {timeout} s") from None
        except OSError as e:
            raise httpx.ConnectError(f"{host}:{port}: {e}") from None
        return conn

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.transport.close()
        self._idle.clear()
