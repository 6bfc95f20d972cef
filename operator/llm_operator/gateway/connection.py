"""The gateway's client side of HTTP/1.1: one asyncio protocol per client connection.

It parses requests with httptools, keeps their header lines serialized for forwarding,
enforces the head and body limits, answers `100 Continue`, and hands complete requests to
its owner one at a time: pipelined ones wait their turn, and so does a rejection of a
pipelined request (answers go out in order). What to answer is the owner's business.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import httptools

from llm_operator import http11
from llm_operator.gateway.metrics import Metrics
from llm_operator.gateway.request import Request, error_body
from llm_operator.gateway.upstream import UpstreamConnection

# Request headers never forwarded upstream: hop-by-hop ones, ones we rewrite, and the
# client's own key (backends must not see gateway credentials).
DROP_REQUEST_HEADERS = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
        b"authorization",
    }
)


_new = object.__new__

MAX_PIPELINED = 16
"""Pipelined requests queued per connection before the gateway stops reading from it."""


class Owner(Protocol):
    """What a connection needs from the gateway that owns it."""

    loop: asyncio.AbstractEventLoop
    metrics: Metrics
    connections: set[ClientConnection]
    draining: bool

    @property
    def max_request_bytes(self) -> int: ...

    @property
    def max_header_bytes(self) -> int:
        """Request line plus headers; more gets 431 and the connection closed."""

    def start_sweeping(self) -> None: ...

    def refused(self, path: bytes, peer: str, status: int, model: str, key_name: str) -> None:
        """Log a request answered at the edge."""

    async def handle(self, conn: ClientConnection, req: Request) -> None: ...


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests and hands them to the gateway in order."""

    def __init__(self, gw: Owner) -> None:
        self.gw = gw
        self.loop = gw.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = False
        self.pending: deque[Request] = deque()
        self.upstream: UpstreamConnection | None = None
        self.on_lost: Callable[[], None] | None = None
        """Called once when the client goes away (a held request leaves its queue)."""
        self.paused = False
        """The client is not reading: its transport's write buffer is full."""
        self.reading_paused = False
        """We stopped reading from the client (too many pipelined requests, or `paused`)."""
        self._next_waits = False
        """A pipelined request waits for the client to read the answers before it."""
        self.peer = ""
        self._url = b""
        self._fwd: list[bytes] = []
        self._auth: bytes | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._limit = 0
        """The gateway's body limit, read once per request."""
        self._rejected = False
        self._upgrade = False
        """The request asks for a protocol upgrade (refused: the gateway speaks HTTP/1.1)."""
        self._continue = False
        """A pipelined request waits for `100 Continue` until the earlier ones are answered."""
        self._deferred: bytes | None = None
        """A rejection of a pipelined request, written once the earlier ones are answered."""
        self._in_head = True
        """Between requests or inside a request's head (bytes count toward the gateway's
        `max_header_bytes`)."""
        self._head_bytes = 0
        self.idle_since = self.loop.time()
        """When the connection last had no request in progress (the idle sweep reads it)."""

    @property
    def idle(self) -> bool:
        """No request in progress and none begun: safe to close while draining."""
        return not self.busy and self._in_head and self._head_bytes == 0

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; the interface is the same.
        self.transport = transport  # type: ignore[assignment]
        http11.set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.gw.connections.add(self)
        self.gw.start_sweeping()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._in_head:
            # Counted before parsing: a request completed within this read resets the count.
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # `on_message_complete` already refused it (once): nothing more to say.
            if not self._rejected:
                self.reject(400, "upgrades are not supported")
        except httptools.HttpParserError as e:
            self.reject(400, f"malformed HTTP request: {e}")
        if self._in_head and self._head_bytes > self.gw.max_header_bytes and not self._rejected:
            self.gw.metrics.inc(self.gw.metrics.edge_rejections, "431")
            self.reject(431, "request line and headers too large")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gw.connections.discard(self)
        up = self.upstream
        if up is not None:
            # The client left: stop the backend's work instead of generating into the void.
            up.abort()
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        self.paused = True
        self._stop_reading()
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()
        if self._next_waits and not self.closed:
            self._next_waits = False
            self.loop.create_task(self.gw.handle(self, self.pending.popleft()))
        self._maybe_read()

    def _stop_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def _maybe_read(self) -> None:
        """Read from the client again once it reads and its pipeline is short."""
        if self.reading_paused and not self.paused and len(self.pending) < MAX_PIPELINED // 2:
            self.reading_paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    # --- httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._fwd = []
        self._auth = None
        self._body = []
        self._size = 0
        self._limit = self.gw.max_request_bytes

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname not in DROP_REQUEST_HEADERS:
            self._fwd.append(name + b": " + value + b"\r\n")
        elif lname == b"authorization":
            self._auth = value
        elif lname == b"content-length":
            try:
                too_big = int(value) > self._limit
            except ValueError:
                too_big = False
            if too_big:
                self._too_large()
        elif lname == b"upgrade":
            self._upgrade = True
        elif lname == b"expect" and value.lower() == b"100-continue" and self.transport:
            if self.busy:
                self._continue = True  # not in the middle of an earlier response
            else:
                self.transport.write(http11.CONTINUE)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_bytes > self.gw.max_header_bytes and not self._rejected:
            # The head may have come whole in one read with its body: measure it (the
            # request line and the headers kept; rare, so not counted on every header).
            size = len(self._url) + len(self._auth or b"") + sum(len(h) for h in self._fwd)
            if size > self.gw.max_header_bytes:
                self.gw.metrics.inc(self.gw.metrics.edge_rejections, "431")
                self.reject(431, "request line and headers too large")

    def on_body(self, body: bytes) -> None:
        if self._rejected:
            return
        self._size += len(body)
        if self._size > self._limit:
            self._too_large()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._continue = False
        if self._rejected:
            return
        method = self.parser.get_method()
        if self._upgrade or method == b"CONNECT":
            # httptools stops parsing after these (HttpParserUpgrade): one answer, then close.
            self._upgrade = False
            if method == b"CONNECT":
                self.reject(405, "CONNECT is not supported")
            else:
                self.reject(400, "upgrades are not supported")
            return
        # A `Request` without its dataclass `__init__`: a Python `__init__` is a frame
        # entered from C (~1k instructions a request); every field is set here
        # (tests/gateway/test_fields.py checks that none is left out).
        req = _new(Request)
        req.method = method
        req.path = self._url
        req.fwd = b"".join(self._fwd)
        req.auth = self._auth
        req.body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        req.keep_alive = self.parser.should_keep_alive()
        req.start = time.monotonic()
        req.peer = self.peer
        if self.busy:
            self.pending.append(req)
            if len(self.pending) >= MAX_PIPELINED:
                self._stop_reading()
        else:
            self.busy = True
            self.loop.create_task(self.gw.handle(self, req))

    # --- used by the gateway
    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def finish(self, keep_alive: bool) -> None:
        """The current response is fully written."""
        self.upstream = None
        if not keep_alive or self.closed:
            self.close()
            return
        if self.pending:
            if self.paused:
                # The client reads none of its answers: the next waits (`resume_writing`),
                # so a client that pipelines without reading costs one answer of buffer.
                self._next_waits = True
                return
            self.loop.create_task(self.gw.handle(self, self.pending.popleft()))
            self._maybe_read()
        elif self._deferred is not None:
            self.write(self._deferred)
            self.close()
        else:
            self.busy = False
            self.idle_since = self.loop.time()
            if self._continue:
                self._continue = False
                self.write(http11.CONTINUE)
            if self.gw.draining and self.idle:
                self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True

    def _too_large(self) -> None:
        self.gw.metrics.inc(self.gw.metrics.edge_rejections, "413")
        self.reject(413, "request body too large")

    def reject(self, status: int, message: str) -> None:
        """Answer at once and close: used before the request is fully read."""
        self._rejected = True
        self.gw.refused(self._url or b"-", self.peer, status, "", "")
        body = error_body(message, "invalid_request_error", status)
        resp = http11.response(status, body, keep_alive=False)
        if self.busy:
            # An earlier request is still being answered: ours comes after it, in order.
            self._deferred = resp
            return
        if self.transport is not None and not self.closed:
            self.transport.write(resp)
        self.close()
