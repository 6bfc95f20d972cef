"""A small HTTP/1.1 server on asyncio protocols and httptools, built for streaming.

Why not aiohttp: with 500 concurrent SSE streams every token is a socket write, and
the scheduler emits a whole batch of tokens from one timer callback. Here a token
is a synchronous `transport.write()` from that callback; through aiohttp each write
would be a coroutine on its own task. The server does only what the simulator
needs: keep-alive, `Expect: 100-continue`, fixed-length and chunked responses,
pipelined requests (answered in order), and a disconnect callback so the engine can
drop a sequence whose client went away, as vLLM does.

Handlers are plain functions `handler(exchange)`; they answer at once
(`exchange.respond`) or later, e.g. from the engine (`start_stream`/`write_chunk`).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools  # type: ignore[import-untyped,unused-ignore]

from llm_operator import http11

log = logging.getLogger("llm_operator.sim.http")

MAX_BODY_BYTES = 64 * 1024 * 1024


_date_cache: tuple[int, bytes] = (0, b"")


def _date_header(loop: asyncio.AbstractEventLoop) -> bytes:
    # Formatting a date per response is measurable at high rates; once a second is enough.
    global _date_cache
    second = int(loop.time())
    if _date_cache[0] != second:
        _date_cache = (second, b"date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n")
    return _date_cache[1]


class Exchange:
    """One request and its response."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_done",
        "_started",
        "body",
        "headers",
        "keep_alive",
        "method",
        "on_close",
        "on_done",
        "path",
        "query",
        "status",
    )

    def __init__(
        self,
        conn: HttpConnection,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers  # lower-case names
        self.body = body
        self.keep_alive = keep_alive
        self.status = 0
        self._started = False
        self._chunked = False
        self._done = False
        # Called once if the client disconnects before the response is complete.
        self.on_close: Callable[[], None] | None = None
        # Called once when the response is complete (or the connection is gone).
        self.on_done: Callable[[Exchange], None] | None = None

    @property
    def closed(self) -> bool:
        return self._done

    def _head(self, status: int, headers: list[tuple[str, str]], extra: bytes) -> bytes:
        lines = [http11.status_line(status)]
        lines.append(b"server: llm-operator-sim\r\n")
        lines.append(_date_header(self._conn.loop))
        for name, value in headers:
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(extra)
        lines.append(b"\r\n")
        return b"".join(lines)

    def respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        """Send a complete response with a Content-Length."""
        if self._started:
            raise RuntimeError("response already started")
        self._started = True
        self.status = status
        hdrs = [("content-type", content_type), *(headers or [])]
        head = self._head(status, hdrs, b"content-length: %d\r\n" % len(body))
        self._conn.write(head + body)
        self._complete()

    def start_stream(
        self,
        status: int = 200,
        content_type: str = "text/event-stream; charset=utf-8",
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        """Send the head of a chunked response; follow with `write_chunk`/`end_stream`."""
        if self._started:
            raise RuntimeError("response already started")
        self._started = True
        self._chunked = True
        self.status = status
        hdrs = [("content-type", content_type), *(headers or [])]
        self._conn.write(self._head(status, hdrs, b"transfer-encoding: chunked\r\n"))

    def write_chunk(self, data: bytes) -> None:
        if self._done or not data:
            return
        self._conn.write(http11.chunk(data))

    def end_stream(self, last: bytes = b"") -> None:
        """Write `last` (if any) and the terminating chunk in one go."""
        if self._done:
            return
        self._conn.write(http11.last_chunk(last) if last else http11.LAST_CHUNK)
        self._complete()

    def drop_connection(self) -> None:
        """Close the socket without finishing the response (a crashed or cut-off server)."""
        if self._done:
            return
        self._done = True
        self.keep_alive = False
        self._conn.close_after_flush()
        if self.on_close is not None:
            self.on_close()
        if self.on_done is not None:
            self.on_done(self)

    def _complete(self) -> None:
        self._done = True
        if self.on_done is not None:
            self.on_done(self)
        self._conn.exchange_done(self)

    def _disconnected(self) -> None:
        if self._done:
            return
        self._done = True
        if self.on_close is not None:
            self.on_close()
        if self.on_done is not None:
            self.on_done(self)


Handler = Callable[[Exchange], None]


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, dispatches them one at a time."""

    def __init__(
        self,
        handler: Handler,
        loop: asyncio.AbstractEventLoop,
        registry: set[HttpConnection] | None = None,
    ) -> None:
        self.handler = handler
        self._registry = registry
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._current: Exchange | None = None
        self._pipeline: deque[Exchange] = deque()
        self._closing = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)
        if self._registry is not None:
            self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, b"upgrades are not supported")
        except httptools.HttpParserError as err:
            log.debug("bad request: %s", err)
            self._fail(400, b"Invalid HTTP request")
        except _BodyTooLarge:
            self._fail(413, b"Request body too large")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._registry is not None:
            self._registry.discard(self)
        pending = [self._current, *self._pipeline]
        self._current = None
        self._pipeline.clear()
        for exchange in pending:
            if exchange is not None:
                exchange._disconnected()

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._headers.get("expect", "").lower() == "100-continue":
            self.write(http11.CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > MAX_BODY_BYTES:
            raise _BodyTooLarge
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self._url)
        path = url.path.decode("latin-1") if url.path else "/"
        query = url.query.decode("latin-1") if url.query else ""
        exchange = Exchange(
            self,
            self.parser.get_method().decode("latin-1"),
            path,
            query,
            self._headers,
            b"".join(self._body),
            bool(self.parser.should_keep_alive()),
        )
        if self._current is None:
            self._dispatch(exchange)
        else:
            # A pipelined request: answer after the current one, in order.
            self._pipeline.append(exchange)
            assert self.transport is not None
            self.transport.pause_reading()

    # -- used by Exchange ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close_after_flush(self) -> None:
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.close()

    def exchange_done(self, exchange: Exchange) -> None:
        if exchange is not self._current:
            return
        self._current = None
        if not exchange.keep_alive:
            self.close_after_flush()
            return
        if self._pipeline:
            nxt = self._pipeline.popleft()
            if not self._pipeline and self.transport is not None:
                self.transport.resume_reading()
            self._dispatch(nxt)

    # -- internals ---------------------------------------------------------------------

    def _dispatch(self, exchange: Exchange) -> None:
        self._current = exchange
        try:
            self.handler(exchange)
        except Exception:
            log.exception("handler failed for %s %s", exchange.method, exchange.path)
            if not exchange._started:
                exchange.respond(
                    500,
                    b'{"error":{"message":"internal error","type":'
                    b'"Internal Server Error","param":null,"code":500}}',
                )
            else:
                exchange.drop_connection()

    def _fail(self, status: int, message: bytes) -> None:
        if self.transport is None or self._closing:
            return
        body = b'{"detail":"' + message + b'"}'
        self.transport.write(http11.response(status, body, keep_alive=False))
        self.close_after_flush()


class _BodyTooLarge(Exception):
    pass


async def serve(
    handler: Handler, host: str, port: int, *, backlog: int = 2048
) -> tuple[asyncio.Server, set[HttpConnection]]:
    """Listen on host:port (port 0: any free port) and serve `handler`.

    Returns the server and the live set of its connections (for a hard stop).
    """
    loop = asyncio.get_running_loop()
    connections: set[HttpConnection] = set()

    def factory() -> HttpConnection:
        return HttpConnection(handler, loop, connections)

    server = await loop.create_server(
        factory, host=host, port=port, backlog=backlog, reuse_address=True
    )
    return server, connections
