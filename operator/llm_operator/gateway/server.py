"""The gateway's HTTP/1.1 front: process-wide state and the dispatch of each request.

Why not aiohttp: its server and client stacks cost well over 100 µs of CPU per proxied
request in middleware, header objects and stream readers; the issue asks for ≥4,000 req/s
on one core. Here a request costs two parser passes (C), one routing decision over
precomputed state, one write each way, and one task.

Per request, by module: `connection` reads it off the client's connection; `admission`
checks the client key, its rate limit and the body (`bodyscan`) and makes it a `Call`;
`fallback` runs the attempts (`ModelState.pick`, an `Exchange` on a pooled upstream
connection) down the fallback chain; `streaming` decides at the response head to fail over
or commit, and relays the answer; `report` counts and logs it. This module holds what lives
longer than a request (routing table, pools, connections, draining) and the small GET/HEAD
endpoints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from llm_operator import http11
from llm_operator.gateway.accesslog import AccessLog
from llm_operator.gateway.admission import Refused, admit, identify, unknown_model
from llm_operator.gateway.connection import ClientConnection
from llm_operator.gateway.fallback import Proxy
from llm_operator.gateway.metrics import Metrics
from llm_operator.gateway.request import Call, Request, error_body
from llm_operator.gateway.routing import CIRCUIT_STATE_VALUE, Backend, RoutingTable
from llm_operator.gateway.upstream import Pool

log = logging.getLogger("llm_operator.gateway")

HEALTH_PATHS = (b"/health", b"/healthz", b"/readyz")


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
        self.max_request_bytes = table.max_request_bytes
        self.max_header_bytes = table.max_header_bytes
        """The current table's, read by each request (an attribute: no property call)."""
        self.max_header_bytes = table.max_header_bytes
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
        self._proxy = Proxy(loop, metrics, access_log, self.pool)
        self.holds = self._proxy.holds
        self.holds.on_table(table)
        if not metrics_only:
            # The --metrics-port listener shares the metrics but not the state behind them.
            metrics.circuit_source = self._circuit_states
            metrics.held_source = self.holds.held
            metrics.generation = table.generation

    def _circuit_states(self) -> list[tuple[str, int]]:
        now = time.monotonic()
        return [(k, CIRCUIT_STATE_VALUE[b.state(now)]) for k, b in sorted(self.backends.items())]

    def set_table(self, table: RoutingTable) -> None:
        """Swap the routing table; in-flight requests keep the objects they hold."""
        self.table = table
        self.max_request_bytes = table.max_request_bytes
        self.max_header_bytes = table.max_header_bytes
        self.metrics.generation = table.generation
        self.holds.on_table(table)
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

    def refused(self, path: bytes, peer: str, status: int, model: str, key_name: str) -> None:
        self.access_log.refused(path, peer, status, model, key_name)

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
        self.holds.expire_all()
        for c in list(self.connections):
            if c.idle:
                c.close()

    def _health(self, path: bytes, ka: bool, head: bool) -> bytes:
        if self.draining and path != b"/health":
            resp = http11.response(503, b"draining", b"text/plain", keep_alive=ka)
            return resp[: -len(b"draining")] if head else resp
        if path != b"/health" and self.ready is not None and not self.ready():
            resp = http11.response(503, b"not ready", b"text/plain", keep_alive=ka)
            return resp[: -len(b"not ready")] if head else resp
        resp = http11.response(200, b"ok", b"text/plain", keep_alive=ka)
        return resp[:-2] if head else resp

    # --- request handling
    async def handle(self, conn: ClientConnection, req: Request) -> None:
        if self.draining:
            req.keep_alive = False  # every answer says `connection: close`
        keep_alive = req.keep_alive
        try:
            # A slice compare, not `startswith` (which parses its arguments: ~500 instructions).
            if req.method == b"POST" and req.path[:4] == b"/v1/" and not self.metrics_only:
                # `proxy`, inline: one coroutine less per API request (each level is
                # created, resumed at every suspension and finished: ~1.3k instructions).
                # `admit` here, not in a helper (one call less per request); a `Refused`
                # is the edge's answer.
                call: Call | None
                try:
                    call = admit(self.table, self.metrics, req)
                except Refused as r:
                    self.refused(req.path, req.peer, r.status, r.model, r.key_name)
                    conn.write(r.response)
                    call = None
                if call is not None:
                    call.model.budget.on_request()  # counted against its retry budget
                    self.in_flight += 1
                    try:
                        route = self._proxy.route_held if call.model.cold else self._proxy.route
                        keep_alive = await route(conn, call)
                    finally:
                        self.in_flight -= 1
                        if call.budgets:
                            call.finish(time.monotonic())
            else:
                keep_alive = self._dispatch(conn, req)
        except Exception:
            log.exception("gateway: unexpected error handling %s", req.path[:200])
            keep_alive = False
            if conn.upstream is None:
                conn.write(
                    http11.response(
                        500,
                        error_body("internal gateway error", "server_error", 500),
                        keep_alive=False,
                    )
                )
        conn.finish(keep_alive)

    def _dispatch(self, conn: ClientConnection, req: Request) -> bool:
        """Answer `req`, anything but an API call (`proxy`); whether the connection stays
        open."""
        method, path = req.method, req.path
        if self.metrics_only and (method not in (b"GET", b"HEAD") or path.startswith(b"/v1/")):
            conn.write(_not_found(req.keep_alive))
            return req.keep_alive
        if method == b"GET":
            return self.get(conn, req)
        if method == b"HEAD":
            return self.head(conn, req)
        conn.write(
            http11.response(
                405,
                error_body("method not allowed", "invalid_request_error", 405),
                keep_alive=req.keep_alive,
            )
        )
        return req.keep_alive

    def get(self, conn: ClientConnection, req: Request) -> bool:
        path = req.path.split(b"?", 1)[0]
        ka = req.keep_alive
        if path.startswith(b"/v1/"):
            try:
                identify(self.table, self.metrics, req)
            except Refused as r:
                self.refused(req.path, req.peer, r.status, r.model, r.key_name)
                conn.write(r.response)
                return ka
        conn.write(self._get_body(path, ka))
        return ka

    def _get_body(self, path: bytes, ka: bool) -> bytes:
        if path == b"/v1/models":
            return http11.response(200, self.table.models_body, keep_alive=ka)
        if path.startswith(b"/v1/models/"):
            name = path[len(b"/v1/models/") :].decode(errors="replace")
            if name not in self.table.models:
                return unknown_model(self.metrics, name, ka)
            body = json.dumps(
                {"id": name, "object": "model", "created": 0, "owned_by": "llm-operator"}
            ).encode()
            return http11.response(200, body, keep_alive=ka)
        if path in HEALTH_PATHS:
            return self._health(path, ka, False)
        if path == b"/metrics" and self.serve_metrics:
            return http11.response(
                200, self.metrics.render(), b"text/plain; version=0.0.4", keep_alive=ka
            )
        return _not_found(ka)

    def head(self, conn: ClientConnection, req: Request) -> bool:
        """HEAD: health checks answer 200, anything else 405; never a body (RFC 9110 9.3.2)."""
        path = req.path.split(b"?", 1)[0]
        ka = req.keep_alive
        if path in HEALTH_PATHS:
            conn.write(self._health(path, ka, True))
        else:
            body = error_body("method not allowed", "invalid_request_error", 405)
            resp = http11.response(405, body, extra=b"allow: GET, POST\r\n", keep_alive=ka)
            conn.write(resp[: -len(body)])
        return ka


def _not_found(ka: bool) -> bytes:
    return http11.response(
        404, error_body("not found", "invalid_request_error", 404), keep_alive=ka
    )
