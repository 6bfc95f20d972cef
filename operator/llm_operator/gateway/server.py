"""The gateway's HTTP/1.1 front: a raw asyncio protocol with httptools, and the proxy logic.

Why not aiohttp: its server and client stacks cost well over 100 µs of CPU per proxied
request in middleware, header objects and stream readers; the issue asks for ≥4,000 req/s
on one core. Here a request costs two parser passes (C), one routing decision over
precomputed state, one write each way, and one task.

Per request: edge checks (size, client key, rate limit) -> `bodyscan` for model/stream ->
`ModelState.pick` -> an `Exchange` on a pooled upstream connection. At the response head
the proxy decides: a failure that is a trigger (429, 5xx; or connect error/timeout before
it) fails over to another backend of the model (within the retry budget) or down the
fallback chain; anything else is committed and streamed to the client. Once committed
there is no second answer: a backend failure mid-stream ends an SSE stream with an error
event and closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Callable

import httptools

from llm_operator.gateway.accesslog import AccessLog
from llm_operator.gateway.bodyscan import BodyError, Scanned, scan
from llm_operator.gateway.metrics import Metrics, Series
from llm_operator.gateway.routing import (
    CIRCUIT_STATE_VALUE,
    Backend,
    ExternalTarget,
    ModelState,
    RoutingTable,
)
from llm_operator.gateway.upstream import Exchange, Pool, UpstreamConnection, UpstreamError

log = logging.getLogger("llm_operator.gateway")

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
    431: b"Request Header Fields Too Large",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
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
# The only client headers an external (url) fallback gets: a third party must not see the
# client's cookies, tracing, internal or identity headers. No accept-encoding: a compressed
# stream could not take the gateway's mid-stream error event.
EXTERNAL_REQUEST_HEADERS = (b"content-type:", b"accept:", b"user-agent:")
MAX_HEAD_BYTES = 64 * 1024
"""Request line plus headers; more gets 431 and the connection closed."""
DROP_RESPONSE_HEADERS = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"trailer"}
)


def error_body(message: str, type_: str, code: str | int | None, param: str | None = None) -> bytes:
    """An OpenAI-style error object."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()


def http_response(
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    extra: bytes = b"",
    keep_alive: bool = True,
) -> bytes:
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Status")),
            b"content-type: ",
            content_type,
            b"\r\ncontent-length: %d\r\n" % len(body),
            extra,
            b"" if keep_alive else b"connection: close\r\n",
            b"\r\n",
            body,
        )
    )


class Request:
    __slots__ = (
        "auth",
        "body",
        "fwd",
        "keep_alive",
        "method",
        "path",
        "peer",
        "start",
    )

    def __init__(
        self,
        method: bytes,
        path: bytes,
        fwd: bytes,
        auth: bytes | None,
        body: bytes,
        keep_alive: bool,
        start: float,
        peer: str,
    ) -> None:
        self.method = method
        self.path = path
        self.fwd = fwd
        """Client headers to forward upstream, already serialized."""
        self.auth = auth
        self.body = body
        self.keep_alive = keep_alive
        self.start = start
        self.peer = peer


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests and hands them to the gateway in order."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.loop = gw.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = False
        self.pending: deque[Request] = deque()
        self.upstream: UpstreamConnection | None = None
        self.paused = False
        self.peer = ""
        self._url = b""
        self._fwd: list[bytes] = []
        self._auth: bytes | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._rejected = False
        self._continue = False
        """A pipelined request waits for `100 Continue` until the earlier ones are answered."""
        self._deferred: bytes | None = None
        """A rejection of a pipelined request, written once the earlier ones are answered."""
        self._in_head = True
        """Between requests or inside a request's head (bytes count toward MAX_HEAD_BYTES)."""
        self._head_bytes = 0
        self.idle_since = self.loop.time()
        """When the connection last had no request in progress (the idle sweep reads it)."""

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; the interface is the same.
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
            self.reject(400, "upgrades are not supported", "invalid_request_error")
        except httptools.HttpParserError as e:
            self.reject(400, f"malformed HTTP request: {e}", "invalid_request_error")
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self._rejected:
            self.gw._reject_count("431")
            self.reject(431, "request line and headers too large", "invalid_request_error")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gw.connections.discard(self)
        up = self.upstream
        if up is not None:
            # The client left: stop the backend's work instead of generating into the void.
            up.abort()

    def pause_writing(self) -> None:
        self.paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()

    # --- httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._fwd = []
        self._auth = None
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in DROP_REQUEST_HEADERS:
            if lname == b"authorization":
                self._auth = value
            elif lname == b"content-length":
                try:
                    too_big = int(value) > self.gw.table.max_request_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    self.gw.metrics.edge_rejections["413"] = (
                        self.gw.metrics.edge_rejections.get("413", 0) + 1
                    )
                    self.reject(413, "request body too large", "invalid_request_error")
            elif lname == b"expect" and value.lower() == b"100-continue" and self.transport:
                if self.busy:
                    self._continue = True  # not in the middle of an earlier response
                else:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        self._fwd.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        self._in_head = False

    def on_body(self, body: bytes) -> None:
        if self._rejected:
            return
        self._size += len(body)
        if self._size > self.gw.table.max_request_bytes:
            self.gw.metrics.edge_rejections["413"] = (
                self.gw.metrics.edge_rejections.get("413", 0) + 1
            )
            self.reject(413, "request body too large", "invalid_request_error")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._continue = False
        if self._rejected:
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        req = Request(
            self.parser.get_method(),
            self._url,
            b"".join(self._fwd),
            self._auth,
            body,
            self.parser.should_keep_alive(),
            time.monotonic(),
            self.peer,
        )
        if self.busy:
            self.pending.append(req)
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
            self.loop.create_task(self.gw.handle(self, self.pending.popleft()))
        elif self._deferred is not None:
            self.write(self._deferred)
            self.close()
        else:
            self.busy = False
            self.idle_since = self.loop.time()
            if self._continue:
                self._continue = False
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if self.gw.draining and self._in_head and self._head_bytes == 0:
                self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True

    def reject(self, status: int, message: str, type_: str) -> None:
        """Answer at once and close: used before the request is fully read."""
        self._rejected = True
        resp = http_response(status, error_body(message, type_, status), keep_alive=False)
        if self.busy:
            # An earlier request is still being answered: ours comes after it, in order.
            self._deferred = resp
            return
        if self.transport is not None and not self.closed:
            self.transport.write(resp)
        self.close()


class Attempt:
    """What `Gateway._attempt` reports back to the failover loop."""

    __slots__ = ("complete_error", "detail", "reason")

    def __init__(
        self, reason: str, detail: str = "", complete_error: tuple[int, bytes, bytes] | None = None
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.complete_error = complete_error
        """(status, head, body) of a discarded error answer, passed through if nothing else
        can answer."""


class Gateway:
    """Process-wide state: the current routing table, connection pools, metrics, logs."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        table: RoutingTable,
        metrics: Metrics,
        access_log: AccessLog,
        serve_metrics: bool = True,
        metrics_only: bool = False,
        idle_timeout: float = 75.0,
        upstream_idle_seconds: float = Pool.IDLE_SECONDS,
    ) -> None:
        self.loop = loop
        self.table = table
        self.metrics = metrics
        self.access_log = access_log
        self.serve_metrics = serve_metrics
        self.metrics_only = metrics_only
        """A listener for --metrics-port: /metrics and health only, no API."""
        self.pools: dict[str, Pool] = {}
        self.backends: dict[str, Backend] = {}
        self.connections: set[ClientConnection] = set()
        self.in_flight = 0
        self.idle_timeout = idle_timeout
        """Close a client connection with no request in progress for this long."""
        self.upstream_idle_seconds = upstream_idle_seconds
        """Do not reuse a backend connection idle for longer than this (0: no limit)."""
        self.draining = False
        """SIGTERM: /healthz and /readyz answer 503, every response closes its connection."""
        self.ready: Callable[[], bool] | None = None
        """Readiness beyond draining (the first Pod list of every watched selector): /healthz and
        /readyz answer 503 while it returns False; /health (liveness) does not ask it."""
        self._sweeper: asyncio.TimerHandle | None = None
        metrics.circuit_source = self._circuit_states
        metrics.generation = table.generation

    def _circuit_states(self) -> list[tuple[str, int]]:
        now = time.monotonic()
        return [(k, CIRCUIT_STATE_VALUE[b.state(now)]) for k, b in sorted(self.backends.items())]

    def set_table(self, table: RoutingTable) -> None:
        """Swap the routing table; in-flight requests keep the objects they hold."""
        self.table = table
        self.metrics.generation = table.generation
        keep = table.backend_keys()
        for key in [k for k in self.pools if k not in keep]:
            pool = self.pools[key]
            if pool.backend.outstanding == 0:
                pool.close()
                del self.pools[key]
                self.backends.pop(key, None)

    def pool(self, backend: Backend) -> Pool:
        pool = self.pools.get(backend.key)
        if pool is None:
            pool = self.pools[backend.key] = Pool(backend, self.loop, self.upstream_idle_seconds)
            self.backends[backend.key] = backend
        elif pool.backend is not backend:
            # The registry forgot and re-created this address: follow the new state object.
            pool.backend = self.backends[backend.key] = backend
        return pool

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    def start_sweeping(self) -> None:
        """Arm the idle-connection sweep: one timer per gateway, not one per connection."""
        if self._sweeper is None and self.idle_timeout > 0:
            interval = min(5.0, self.idle_timeout / 4)
            self._sweeper = self.loop.call_later(interval, self._sweep, interval)

    def _sweep(self, interval: float) -> None:
        limit = self.loop.time() - self.idle_timeout
        for c in [c for c in self.connections if not c.busy and c.idle_since < limit]:
            c.close()
        if self.connections:
            self._sweeper = self.loop.call_later(interval, self._sweep, interval)
        else:
            self._sweeper = None

    def start_draining(self) -> None:
        """SIGTERM: fail health checks, close idle connections, close each busy one after
        its current response."""
        self.draining = True
        for c in list(self.connections):
            if not c.busy and c._in_head and c._head_bytes == 0:
                c.close()

    def _health(self, path: bytes, ka: bool, head: bool) -> bytes:
        if self.draining and path != b"/health":
            resp = http_response(503, b"draining", b"text/plain", keep_alive=ka)
            return resp[: -len(b"draining")] if head else resp
        if path != b"/health" and self.ready is not None and not self.ready():
            resp = http_response(503, b"not ready", b"text/plain", keep_alive=ka)
            return resp[: -len(b"not ready")] if head else resp
        resp = http_response(200, b"ok", b"text/plain", keep_alive=ka)
        return resp[:-2] if head else resp

    # --- request handling
    async def handle(self, conn: ClientConnection, req: Request) -> None:
        if self.draining:
            req.keep_alive = False  # every answer says `connection: close`
        keep_alive = req.keep_alive
        try:
            path = req.path
            if self.metrics_only and (
                req.method not in (b"GET", b"HEAD") or path.startswith(b"/v1/")
            ):
                conn.write(
                    http_response(
                        404,
                        error_body("not found", "invalid_request_error", 404),
                        keep_alive=keep_alive,
                    )
                )
            elif req.method == b"POST" and path.startswith(b"/v1/"):
                keep_alive = await self.proxy(conn, req)
            elif req.method == b"GET":
                keep_alive = self.get(conn, req)
            elif req.method == b"HEAD":
                keep_alive = self.head(conn, req)
            else:
                conn.write(
                    http_response(
                        405,
                        error_body("method not allowed", "invalid_request_error", 405),
                        keep_alive=keep_alive,
                    )
                )
        except Exception:
            log.exception("gateway: unexpected error handling %s", req.path[:200])
            keep_alive = False
            if conn.upstream is None:
                conn.write(
                    http_response(
                        500,
                        error_body("internal gateway error", "server_error", 500),
                        keep_alive=False,
                    )
                )
        conn.finish(keep_alive)

    def get(self, conn: ClientConnection, req: Request) -> bool:
        path = req.path.split(b"?", 1)[0]
        ka = req.keep_alive
        if path.startswith(b"/v1/") and self._edge_auth(conn, req) is None:
            return ka  # answered 401/429 ("" means no keys are configured)
        if path == b"/v1/models":
            conn.write(http_response(200, self.table.models_body, keep_alive=ka))
        elif path.startswith(b"/v1/models/"):
            name = path[len(b"/v1/models/") :].decode(errors="replace")
            if name in self.table.models:
                body = json.dumps(
                    {"id": name, "object": "model", "created": 0, "owned_by": "llm-operator"}
                ).encode()
                conn.write(http_response(200, body, keep_alive=ka))
            else:
                conn.write(self._unknown_model(name, ka))
        elif path in (b"/health", b"/healthz", b"/readyz"):
            conn.write(self._health(path, ka, False))
        elif path == b"/metrics" and self.serve_metrics:
            conn.write(
                http_response(
                    200, self.metrics.render(), b"text/plain; version=0.0.4", keep_alive=ka
                )
            )
        else:
            conn.write(
                http_response(
                    404, error_body("not found", "invalid_request_error", 404), keep_alive=ka
                )
            )
        return ka

    def head(self, conn: ClientConnection, req: Request) -> bool:
        """HEAD: health checks answer 200, anything else 405; never a body (RFC 9110 9.3.2)."""
        path = req.path.split(b"?", 1)[0]
        ka = req.keep_alive
        if path in (b"/health", b"/healthz", b"/readyz"):
            conn.write(self._health(path, ka, True))
        else:
            body = error_body("method not allowed", "invalid_request_error", 405)
            resp = http_response(405, body, extra=b"allow: GET, POST\r\n", keep_alive=ka)
            conn.write(resp[: -len(body)])
        return ka

    def _unknown_model(self, name: str, ka: bool) -> bytes:
        self._reject_count("404")
        return http_response(
            404,
            error_body(
                f"The model `{name}` does not exist.",
                "invalid_request_error",
                "model_not_found",
                "model",
            ),
            keep_alive=ka,
        )

    def _reject_count(self, reason: str) -> None:
        er = self.metrics.edge_rejections
        er[reason] = er.get(reason, 0) + 1

    def _edge_auth(self, conn: ClientConnection, req: Request) -> str | None:
        """Client key check and rate limit. Returns the key's name ("" without keys), or
        None after answering 401/429."""
        keys = self.table.keys
        if not keys:
            return ""
        auth = req.auth
        token = auth[7:].strip() if auth and auth[:7].lower() == b"bearer " else None
        state = keys.get(hashlib.sha256(token).hexdigest()) if token else None
        if state is None:
            self._reject_count("401")
            conn.write(
                http_response(
                    401,
                    error_body(
                        "invalid or missing API key", "invalid_request_error", "invalid_api_key"
                    ),
                    extra=b'www-authenticate: Bearer realm="llm-gateway"\r\n',
                    keep_alive=req.keep_alive,
                )
            )
            return None
        wait = state.allow(time.monotonic())
        if wait > 0:
            self._reject_count("429")
            retry = max(1, int(wait + 0.999))
            conn.write(
                http_response(
                    429,
                    error_body("rate limit exceeded for this API key", "rate_limit_error", 429),
                    extra=b"retry-after: %d\r\n" % retry,
                    keep_alive=req.keep_alive,
                )
            )
            return None
        return state.name

    async def proxy(self, conn: ClientConnection, req: Request) -> bool:
        table = self.table
        ka = req.keep_alive
        key_name = self._edge_auth(conn, req)
        if key_name is None:
            return ka
        try:
            sc = scan(req.body)
        except BodyError as e:
            self._reject_count("400")
            conn.write(
                http_response(400, error_body(str(e), "invalid_request_error", 400), keep_alive=ka)
            )
            return ka
        model = table.models.get(sc.model)
        if model is None:
            conn.write(self._unknown_model(sc.model, ka))
            return ka
        model.budget.on_request()
        self.in_flight += 1
        try:
            return await self._route(conn, req, sc, model, key_name)
        finally:
            self.in_flight -= 1

    async def _route(
        self, conn: ClientConnection, req: Request, sc: Scanned, model: ModelState, key_name: str
    ) -> bool:
        metrics = self.metrics
        triggers = model.triggers
        attempts = 0
        last: Attempt | None = None
        reason = ""
        steps = len(model.fallbacks) + 1
        budget_out = False
        for step_i in range(steps):
            if step_i == 0:
                step_model: ModelState | None = model
                ext: ExternalTarget | None = None
                body = sc.body
                step_label = ""
            else:
                step = model.fallbacks[step_i - 1]
                step_model, ext, step_label = step.model, step.external, step.label
                body = sc.with_model(step.target_model)
                metrics.inc(metrics.fallbacks, (model.name, step_label, reason or "unavailable"))
            tried: list[Backend] = []
            while True:
                now = time.monotonic()
                if ext is not None:
                    backend: Backend | None = (
                        ext.backend if not tried and ext.backend.available(now) else None
                    )
                    track = "fallback"
                    if backend is None and not tried:
                        reason = "connectError"  # breaker open on the external endpoint
                else:
                    assert step_model is not None
                    backend, track, saturated = step_model.pick(now, tried)
                    if step_i > 0:
                        track = "fallback"
                    if backend is None:
                        if saturated:
                            if step_model.waiting < step_model.queue_depth or (
                                "saturated" not in triggers
                            ):
                                if await self._wait_slot(step_model, req):
                                    continue
                                reason = "timeout"
                            else:
                                reason = "saturated"
                        elif not tried:
                            reason = reason or "unavailable"
                if backend is None:
                    break
                if attempts > 0 and not model.budget.try_spend(now):
                    metrics.budget_exhausted[model.name] = (
                        metrics.budget_exhausted.get(model.name, 0) + 1
                    )
                    budget_out = True
                    break
                if now - req.start >= model.total_timeout:
                    # The request's whole time is spent: no further attempt can answer.
                    return self._answer_failure(
                        conn, req, model, Attempt("total"), None, "none", key_name, attempts
                    )
                if tried and step_i == 0:
                    metrics.retries[model.name] = metrics.retries.get(model.name, 0) + 1
                attempts += 1
                tried.append(backend)
                result = await self._attempt(
                    conn,
                    req,
                    sc,
                    model,
                    step_model,
                    ext,
                    backend,
                    track,
                    body,
                    key_name,
                    attempts,
                    step_label,
                )
                if result is None:
                    return req.keep_alive and not conn.closed
                if result.reason == "client_closed":
                    return False
                reason = result.reason
                if result.complete_error is not None:
                    last = result
                metrics.inc(metrics.attempt_failures, (model.name, backend.key, reason))
                if reason not in triggers:
                    # Not a trigger: this failure is the answer.
                    return self._answer_failure(
                        conn, req, model, result, backend, track, key_name, attempts
                    )
            if budget_out:
                break
        return self._answer_failure(
            conn, req, model, last, None, "none", key_name, attempts, reason
        )

    def _answer_failure(
        self,
        conn: ClientConnection,
        req: Request,
        model: ModelState,
        result: Attempt | None,
        backend: Backend | None,
        track: str,
        key_name: str,
        attempts: int,
        reason: str = "",
    ) -> bool:
        ka = req.keep_alive
        series = self.metrics.target(model.name, backend.key if backend else "none", track)
        if result is not None and result.complete_error is not None:
            status, head, body = result.complete_error
            conn.write(head + body)
            outcome = "server_error" if status >= 500 else "client_error"
        elif result is not None and result.reason in ("timeout", "total"):
            status = 504
            msg = (
                "the request did not complete within its total timeout"
                if result.reason == "total"
                else "the model did not answer in time"
            )
            conn.write(http_response(504, error_body(msg, "server_error", 504), keep_alive=ka))
            outcome = "timeout"
        else:
            status = 503
            msg = "no backend of this model can answer now and no fallback could either"
            if result is not None and result.reason not in model.triggers:
                status = 502
                msg = "the model's backend could not be reached"
            conn.write(
                http_response(
                    status,
                    error_body(msg, "server_error", status),
                    extra=b"retry-after: %d\r\n" % model.retry_after if status == 503 else b"",
                    keep_alive=ka,
                )
            )
            outcome = "unavailable"
        series.outcomes[outcome] += 1
        elapsed = time.monotonic() - req.start
        series.total.observe(elapsed)
        self.access_log.record(
            req,
            model.name,
            status,
            outcome,
            series_backend(backend),
            track,
            attempts,
            reason,
            None,
            elapsed,
            0,
            key_name,
            False,
        )
        return ka

    async def _wait_slot(self, model: ModelState, req: Request) -> bool:
        """Wait in the saturation queue for a backend slot; False after the first-byte timeout."""
        fut: asyncio.Future[None] = self.loop.create_future()
        model.waiters.append(fut)
        model.waiting += 1
        try:
            remaining = req.start + min(model.first_byte_timeout, model.total_timeout)
            remaining -= time.monotonic()
            if remaining <= 0:
                return False
            async with asyncio.timeout(remaining):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            model.waiting -= 1
            if not fut.done():
                fut.cancel()

    async def _attempt(
        self,
        conn: ClientConnection,
        req: Request,
        sc: Scanned,
        model: ModelState,
        step_model: ModelState | None,
        ext: ExternalTarget | None,
        backend: Backend,
        track: str,
        body: bytes,
        key_name: str,
        attempts: int,
        step_label: str,
    ) -> Attempt | None:
        """One try on one backend. None: an answer was committed (and fully handled)."""
        loop = self.loop
        limits = step_model or model
        series = self.metrics.target(model.name, backend.key, track)
        probe = backend.begin()
        series.in_flight += 1
        pool = self.pool(backend)
        try:
            # Build the upstream request once.
            if ext is not None:
                path = ext.base_path.encode() + req.path[3:]  # base URL + path after /v1
                host = ext.host_header.encode()
                auth = (
                    b"authorization: Bearer " + ext.api_key.encode() + b"\r\n"
                    if ext.api_key
                    else b""
                )
                fwd = _external_headers(req.fwd)
            else:
                path, host, auth, fwd = req.path, backend.key.encode(), b"", req.fwd
            data = b"".join(
                (
                    b"POST ",
                    path,
                    b" HTTP/1.1\r\nhost: ",
                    host,
                    b"\r\n",
                    fwd,
                    auth,
                    b"content-length: %d\r\n\r\n" % len(body),
                    body,
                )
            )
            # A pooled connection the backend closed while idle fails with no byte read;
            # that is not the backend's fault, so try once more on a fresh connection.
            for _ in range(2):
                upc = pool.take_idle()
                reused = upc is not None
                # This attempt's deadline: its own first-byte timeout, but never past the
                # request's total timeout (which is not the backend's fault).
                total_left = req.start + model.total_timeout - time.monotonic()
                if total_left <= 0:
                    if upc is not None:
                        pool.release(upc)
                    return Attempt("total", "the request's total timeout passed")
                if upc is None:
                    try:
                        upc = await pool.connect(min(limits.connect_timeout, total_left))
                    except UpstreamError as e:
                        if time.monotonic() - req.start >= model.total_timeout:
                            return Attempt("total", "the request's total timeout passed")
                        backend.on_failure(time.monotonic())
                        return Attempt(e.reason, str(e))
                    total_left = req.start + model.total_timeout - time.monotonic()
                if conn.closed:
                    pool.release(upc)
                    return Attempt("client_closed")
                ex = Exchange(loop)
                upc.send(ex, data)
                conn.upstream = upc
                fb = limits.first_byte_timeout
                timer = loop.call_at(
                    loop.time() + min(fb, max(0.0, total_left)),
                    _timeout,
                    ex,
                    upc,
                    "first byte" if fb <= total_left else "total",
                )
                try:
                    await ex.head
                except UpstreamError as e:
                    conn.upstream = None
                    if conn.closed:
                        return Attempt("client_closed")
                    if reused and not ex.received_any and e.reason == "connectError":
                        continue
                    if e.reason != "total":
                        backend.on_failure(time.monotonic())
                    return Attempt(e.reason, str(e))
                finally:
                    timer.cancel()
                break
            else:
                backend.on_failure(time.monotonic())
                return Attempt("connectError", "backend closed reused connections")
            return await self._respond(
                conn,
                req,
                sc,
                model,
                backend,
                track,
                upc,
                ex,
                pool,
                series,
                key_name,
                attempts,
                step_label,
            )
        finally:
            backend.end(probe)
            series.in_flight -= 1
            if limits.limit is not None:
                limits.release_slot()

    async def _respond(
        self,
        conn: ClientConnection,
        req: Request,
        sc: Scanned,
        model: ModelState,
        backend: Backend,
        track: str,
        upc: UpstreamConnection,
        ex: Exchange,
        pool: Pool,
        series: Series,
        key_name: str,
        attempts: int,
        step_label: str,
    ) -> Attempt | None:
        now = time.monotonic()
        status = ex.status
        ttfb = now - req.start
        # Response head: keep the backend's headers except framing, which we redo.
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Status"))]
        sse = False
        content_length: bytes | None = None
        retry_after = 0.0
        for name, value in ex.headers:
            lname = name.lower()
            if lname in DROP_RESPONSE_HEADERS:
                if lname == b"content-length":
                    content_length = value
                continue
            if lname == b"content-type" and value.startswith(b"text/event-stream"):
                sse = True
            elif lname == b"retry-after":
                try:
                    retry_after = float(value)
                except ValueError:
                    retry_after = 0.0
            parts.append(name + b": " + value + b"\r\n")
        if not req.keep_alive:
            parts.append(b"connection: close\r\n")

        if status == 429 or status >= 500:
            reason = "429" if status == 429 else "5xx"
            if status == 429:
                backend.on_busy(now, retry_after if retry_after > 0 else float(model.retry_after))
            else:
                backend.on_failure(now)
            if reason in model.triggers:
                # Fail over. Keep a complete small error answer to pass through if nothing
                # else can answer; drop the connection if the body is still coming.
                kept: tuple[int, bytes, bytes] | None = None
                if ex.complete:
                    b = b"".join(ex.buffered)
                    kept = (status, b"".join(parts) + b"content-length: %d\r\n\r\n" % len(b), b)
                    if ex.keep_alive:
                        pool.release(upc)
                    else:
                        upc.abort()
                else:
                    upc.abort()
                conn.upstream = None
                return Attempt(reason, f"backend answered {status}", kept)
        else:
            backend.on_success()

        # Commit: from here on there is no failover.
        outcome = (
            "success" if status < 400 else ("client_error" if status < 500 else "server_error")
        )
        if ex.complete:
            body = ex.buffered[0] if len(ex.buffered) == 1 else b"".join(ex.buffered)
            parts.append(b"content-length: %d\r\n\r\n" % len(body))
            parts.append(body)
            conn.write(b"".join(parts))
            if ex.keep_alive:
                pool.release(upc)
            else:
                upc.abort()
            conn.upstream = None
            nbytes = len(body)
            stream_err = None
        else:
            chunked = content_length is None
            if content_length is None:
                parts.append(b"transfer-encoding: chunked\r\n\r\n")
            else:
                parts.append(b"content-length: " + content_length + b"\r\n\r\n")
            state = _StreamState()
            transport = conn.transport
            assert transport is not None

            pending: list[bytes] = []

            def sink(data: bytes | None, err: UpstreamError | None) -> None:
                if conn.closed:
                    return
                if data is not None:
                    state.nbytes += len(data)
                    pending.append(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
                elif err is None:
                    if chunked:
                        pending.append(b"0\r\n\r\n")
                    # Also when the end is the backend closing (no read follows to flush).
                    flush()
                else:
                    flush()
                    state.error = err
                    if sse and chunked:
                        msg = (
                            str(err)
                            if err.reason == "total"
                            else f"the backend failed mid-stream: {err}"
                        )
                        event = b"data: " + error_body(msg, "server_error", 502) + b"\n\n"
                        transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))

            def flush() -> None:
                if pending and not conn.closed:
                    transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
                pending.clear()

            for piece in ex.buffered:
                state.nbytes += len(piece)
                parts.append(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
            ex.buffered = []
            conn.write(b"".join(parts))
            done: asyncio.Future[None] = self.loop.create_future()
            ex.done = done
            ex.sink = sink
            ex.on_read_done = flush
            if ex.error is not None:
                # The backend failed between its head and our commit: same as mid-stream.
                sink(None, ex.error)
            if conn.paused:
                upc.pause_reading()
            timer = self.loop.call_at(
                self.loop.time() + max(0.0, req.start + model.total_timeout - time.monotonic()),
                _timeout,
                ex,
                upc,
                "total",
            )
            try:
                if not ex.complete and ex.error is None:
                    await done
            finally:
                timer.cancel()
            conn.upstream = None
            nbytes = state.nbytes
            stream_err = ex.error
            if ex.complete and ex.keep_alive and not conn.closed:
                pool.release(upc)
            elif not ex.complete:
                upc.abort()
            if stream_err is not None:
                if conn.closed:
                    outcome = "client_closed"
                elif stream_err.reason == "total":
                    # A long answer, not a broken backend: the breaker is not charged.
                    outcome = "timeout"
                    conn.close()
                else:
                    outcome = "stream_error"
                    backend.on_failure(time.monotonic())
                    # No second answer: the error event (if SSE) was the last thing sent.
                    conn.close()
            elif conn.closed:
                outcome = "client_closed"
        end = time.monotonic()
        series.outcomes[outcome] += 1
        series.ttfb.observe(ttfb)
        series.total.observe(end - req.start)
        self.access_log.record(
            req,
            model.name,
            status,
            outcome,
            backend.key,
            track,
            attempts,
            "",
            step_label or None,
            end - req.start,
            nbytes,
            key_name,
            sc.stream,
            ttfb,
        )
        return None


class _StreamState:
    __slots__ = ("error", "nbytes")

    def __init__(self) -> None:
        self.nbytes = 0
        self.error: UpstreamError | None = None


def _timeout(ex: Exchange, upc: UpstreamConnection, what: str) -> None:
    if what == "total":
        # Reason "total": the request's own deadline, never a fallback trigger and never
        # charged to the backend's circuit breaker.
        err = UpstreamError("total", "the request did not complete within its total timeout")
    else:
        err = UpstreamError("timeout", f"no {what} from the backend in time")
    ex.on_error(err)
    upc.abort()


def _external_headers(fwd: bytes) -> bytes:
    """The allowlisted lines of the serialized client headers `fwd`."""
    return b"".join(
        line + b"\r\n"
        for line in fwd.split(b"\r\n")
        if line.lower().startswith(EXTERNAL_REQUEST_HEADERS)
    )


def series_backend(backend: Backend | None) -> str:
    return backend.key if backend is not None else ""
