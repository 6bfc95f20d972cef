"""Keep-alive HTTP/1.1 connections to backends, as raw asyncio protocols with httptools.

An `Exchange` is one attempt: the request bytes go out, the response head resolves a future
(the proxy then decides to commit it to the client or to fail over), and body pieces go to
a sink callback — straight to the client's transport once committed, without a task switch
per chunk. Body pieces that arrive before the decision are buffered (a non-streaming answer
usually arrives with its head in one read).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable

import httptools

from llm_operator import http11
from llm_operator.gateway.request import Failure
from llm_operator.gateway.routing import Backend


class UpstreamError(Exception):
    """The attempt failed before or after the head; `reason` is a fallback trigger name."""

    def __init__(self, reason: Failure, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class Exchange:
    """One request/response on one upstream connection."""

    __slots__ = (
        "buffered",
        "complete",
        "conn",
        "done",
        "error",
        "head",
        "headers",
        "keep_alive",
        "on_read_done",
        "received_any",
        "sink",
        "status",
    )

    head: asyncio.Future[None]
    done: asyncio.Future[None] | None
    status: int
    headers: list[tuple[bytes, bytes]]
    buffered: list[bytes]
    complete: bool
    keep_alive: bool
    sink: Callable[[bytes | None, UpstreamError | None], None] | None
    error: UpstreamError | None
    received_any: bool
    conn: UpstreamConnection | None
    on_read_done: Callable[[], None] | None
    """Called after each read is parsed: the sink batches the chunks of one read into
    one write (one syscall, and fewer wake-ups for the client)."""

    # Called by the connection.
    def on_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers
        if not self.head.done():
            self.head.set_result(None)

    def on_complete(self, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive
        if self.sink is not None:
            self.sink(None, None)
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def on_error(self, err: UpstreamError) -> None:
        # Idempotent: a timeout and the abort it causes must not end the stream twice.
        if self.complete or self.error is not None:
            return
        self.error = err
        if not self.head.done():
            self.head.set_exception(err)
            # Nobody may await it (a timeout already fired): avoid "exception never retrieved".
            self.head.exception()
            return
        if self.sink is not None:
            self.sink(None, err)
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


_new = object.__new__


def new_exchange(loop: asyncio.AbstractEventLoop) -> Exchange:
    """A fresh exchange. A function, not `Exchange.__init__`: a Python `__init__` is a frame
    entered from C (~600 instructions more, once per attempt)."""
    ex = _new(Exchange)
    ex.head = loop.create_future()
    ex.done = None
    ex.status = 0
    ex.headers = []
    ex.buffered = []
    ex.complete = False
    ex.keep_alive = False
    ex.sink = None
    ex.error = None
    ex.received_any = False
    ex.conn = None
    ex.on_read_done = None
    return ex


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a backend."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.used = False
        self.paused = False
        """Reading is paused (the client is slower than the backend)."""
        self.idle_since = 0.0
        """time.monotonic() when the pool last took it back idle."""
        self._headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; the interface is the same.
        self.transport = transport  # type: ignore[assignment]
        # Without it a small SSE chunk after a reused connection's last write can wait
        # for the peer's delayed ACK (~40 ms): sglang-router's first-chunk bug.
        http11.set_nodelay(transport)

    def send(self, exchange: Exchange, data: bytes) -> None:
        self.exchange = exchange
        exchange.conn = self
        self.used = True
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # Bytes with no request outstanding: the server misbehaves; drop the connection.
            self.abort()
            return
        ex.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.abort()
        except httptools.HttpParserError as e:
            # Detach first: the abort's connection_lost must not report a second error.
            self.exchange = None
            self.abort()
            ex.on_error(UpstreamError(Failure.STATUS_5XX, f"bad response from backend: {e}"))
        if ex.on_read_done is not None:
            ex.on_read_done()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.exchange
        headers, self._headers = self._headers, []
        if ex is not None:
            ex.on_head(self.parser.get_status_code(), headers)

    def on_body(self, body: bytes) -> None:
        # Once per streamed chunk: the exchange's sink (or buffer) without a call between.
        ex = self.exchange
        if ex is not None:
            sink = ex.sink
            if sink is not None:
                sink(body, None)
            else:
                ex.buffered.append(body)

    def on_message_complete(self) -> None:
        ex = self.exchange
        self.exchange = None
        if ex is not None:
            ex.on_complete(self.parser.should_keep_alive())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        ex = self.exchange
        self.exchange = None
        if ex is None:
            return
        if ex.head.done() and ex.error is None and _ends_at_close(ex.status, ex.headers):
            # No Content-Length and not chunked: the body ends when the connection does.
            ex.on_complete(False)
        else:
            ex.on_error(UpstreamError(Failure.CONNECT_ERROR, "backend closed the connection"))

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed and self.paused:
            self.paused = False
            self.transport.resume_reading()


def _ends_at_close(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    """A response whose body is delimited by the connection closing (RFC 9112 6.3)."""
    if status < 200 or status in (204, 304):
        return False
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            return False
        if lname == b"transfer-encoding" and value.lower().rstrip().endswith(b"chunked"):
            return False
    return True


class Pool:
    """Idle keep-alive connections to one backend."""

    MAX_IDLE = 256
    IDLE_SECONDS = 15.0

    def __init__(
        self,
        backend: Backend,
        loop: asyncio.AbstractEventLoop,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self.backend = backend
        self.loop = loop
        self.idle: list[UpstreamConnection] = []
        """Oldest release first: the newest idle connection is taken first."""
        self.idle_seconds = idle_seconds
        """A connection idle longer than this is not reused (NAT and firewalls silently drop
        quiet flows; the next request would wait its whole firstByte timeout). 0: no limit."""
        self.closed = False
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if backend.tls else None

    def take_idle(self) -> UpstreamConnection | None:
        """The newest reusable idle connection; too-old ones are closed (one clock read)."""
        idle = self.idle
        if not idle:
            return None
        limit = self.idle_seconds
        oldest_ok = time.monotonic() - limit if limit > 0 else float("-inf")
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.idle_since < oldest_ok:
                # Too old, and so is every one below it (the list is in release order).
                stale = [conn, *idle]
                idle.clear()
                for old in stale:
                    old.abort()
                return None
            return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        b = self.backend
        try:
            async with asyncio.timeout(timeout):
                _, proto = await self.loop.create_connection(
                    lambda: UpstreamConnection(self),
                    b.host,
                    b.port,
                    ssl=self.ssl,
                    server_hostname=b.host if self.ssl else None,
                )
        except TimeoutError:
            raise UpstreamError(Failure.CONNECT_ERROR, f"connect to {b.key} timed out") from None
        except OSError as e:
            raise UpstreamError(
                Failure.CONNECT_ERROR, f"connect to {b.key}: {e.strerror or e}"
            ) from None
        return proto

    def release(self, conn: UpstreamConnection) -> None:
        if conn.closed or conn.exchange is not None:
            return
        if self.closed or len(self.idle) >= self.MAX_IDLE:
            conn.abort()
            return
        if conn.paused:
            # Paused for a slow client while its answer streamed: an idle connection must
            # read, or the next request on it would wait for a head it never sees.
            conn.resume_reading()
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close(self) -> None:
        """The backend left the table: drop idle connections; busy ones close on release."""
        self.closed = True
        for conn in self.idle:
            conn.abort()
        self.idle.clear()


def expire(ex: Exchange, upc: UpstreamConnection, what: str) -> None:
    """A deadline passed: fail the exchange and drop its connection (a timer callback)."""
    if what == "total":
        # Reason "total": the request's own deadline, never a fallback trigger and never
        # charged to the backend's circuit breaker.
        err = UpstreamError(Failure.TOTAL, "the request did not complete within its total timeout")
    else:
        err = UpstreamError(Failure.TIMEOUT, f"no {what} from the backend in time")
    ex.on_error(err)
    upc.abort()
