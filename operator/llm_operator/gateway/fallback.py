"""The attempt and fallback loop: backends of the model first (within the retry budget),
then each fallback step in order, until one answers or a failure is not a trigger.

A failure that is a trigger (429, 5xx; or connect error/timeout before the response head)
moves on; anything else is committed (`streaming.respond`) or answered as it is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from llm_operator import http11
from llm_operator.gateway.accesslog import AccessLog
from llm_operator.gateway.connection import ClientConnection
from llm_operator.gateway.hold import Held, HoldQueues
from llm_operator.gateway.metrics import Metrics, Series
from llm_operator.gateway.report import report
from llm_operator.gateway.request import Attempt, Call, Failure, error_body
from llm_operator.gateway.resume import resumable
from llm_operator.gateway.routing import Backend, ModelState
from llm_operator.gateway.streaming import Try, end_resumed, respond, respond_complete
from llm_operator.gateway.upstream import (
    Exchange,
    Pool,
    UpstreamConnection,
    UpstreamError,
    expire,
    new_exchange,
)

_new = object.__new__

# The only client headers an external (url) fallback gets: a third party must not see the
# client's cookies, tracing, internal or identity headers. No accept-encoding: a compressed
# stream could not take the gateway's mid-stream error event.
EXTERNAL_REQUEST_HEADERS = (b"content-type:", b"accept:", b"user-agent:")


class _Progress:
    """Where the loop stands across steps. Class attributes are the defaults: building one
    runs no Python code, and a request answered by its first try writes none of them."""

    reason: Failure | None = None
    """The latest failure (it labels the next fallback step)."""
    last: Attempt | None = None
    """The latest attempt that kept a complete error answer to pass through."""
    budget_out: bool = False


class Proxy:
    """Routes admitted calls; one per gateway."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        metrics: Metrics,
        access_log: AccessLog,
        pool: Callable[[Backend], Pool],
    ) -> None:
        self.loop = loop
        self.metrics = metrics
        self.access_log = access_log
        self.pool = pool
        self.holds = HoldQueues(loop, metrics)

    async def route_held(self, conn: ClientConnection, call: Call) -> bool:
        """Answer `call` of a cold model: held until it has a ready backend (or its hold
        ends), then routed; whether the client connection stays open."""
        model = call.model
        result = await self.holds.wait(conn, call)
        self.metrics.inc(self.metrics.cold_requests, (model.name, result.value))
        if result == Held.CLIENT_CLOSED:
            report(
                self.access_log,
                call,
                self.metrics.target(model.name, "none", "none"),
                status=499,
                outcome="client_closed",
                backend="",
                track="none",
                failure="client_closed",
            )
            return False
        if result == Held.RELEASED:
            call.t0 = time.monotonic()  # timeouts count from here
        if result != Held.FALLBACK:
            return await self.route(conn, call)
        self.holds.begin_fallback(model)
        try:
            return await self.route(conn, call)
        finally:
            self.holds.end_fallback(model)

    async def route(self, conn: ClientConnection, call: Call) -> bool:
        """The model's backends, then its fallback chain; whether the client connection
        stays open. A model that is cold goes through `route_held` first."""
        model = call.model
        p = _Progress()
        if model.route.resume_streams:
            call.resume = resumable(call.req.path, call.scanned)
        # The model's own backends first: `admit` set the call's body and target for them;
        # the model is set here (a held call may come back with the new table's state).
        call.step_model = model
        answered = await self._step(conn, call, True, p)
        if answered is not None:
            return answered
        for step in model.fallbacks:
            if p.budget_out:
                break
            call.step_model, call.external, call.step_label = step.model, step.external, step.label
            call.body = call.scanned.with_model(step.target_model)
            call.target = step.target_model
            call.path += (step.label,)
            reason = p.reason or Failure.UNAVAILABLE
            self.metrics.inc(self.metrics.fallbacks, (model.name, step.label, reason))
            answered = await self._step(conn, call, False, p)
            if answered is not None:
                return answered
        return self._answer_failure(conn, call, p.last, reason=p.reason)

    async def _step(
        self, conn: ClientConnection, call: Call, first: bool, p: _Progress
    ) -> bool | None:
        """Try the backends of one step until one answers or none is left: whether the
        client connection stays open once answered, None to go on (or `p.budget_out`)."""
        model = call.model
        tried: list[Backend] = []
        while True:
            picked = self._pick(call, tried, first, p)
            if picked is None:  # saturated, and the request may wait for a slot
                picked = await self._wait_pick(call, tried, first, p)
            backend, track, now = picked
            if backend is None:
                return None
            if call.attempts > 0 and not model.budget.try_spend(now):
                self.metrics.inc(self.metrics.budget_exhausted, model.name)
                p.budget_out = True
                return None
            if now - call.t0 >= model.total_timeout:
                # The request's whole time is spent: no further attempt can answer.
                return self._answer_failure(conn, call, Attempt(Failure.TOTAL))
            if tried and first:
                self.metrics.inc(self.metrics.retries, model.name)
            call.attempts += 1
            tried.append(backend)
            result = await self._attempt(conn, call, backend, track, now)
            if result is None:
                return call.req.keep_alive and not conn.closed
            if result.reason == Failure.CLIENT_CLOSED:
                return False
            p.reason = result.reason
            if result.complete_error is not None:
                p.last = result
            self.metrics.inc(
                self.metrics.attempt_failures, (model.name, backend.key, track, p.reason)
            )
            if result.reason.value not in model.triggers and not call.resuming:
                # Not a trigger: this failure is the answer (a resumed stream goes on).
                return self._answer_failure(conn, call, result, backend=backend, track=track)

    def _pick(
        self, call: Call, tried: list[Backend], first: bool, p: _Progress
    ) -> tuple[Backend | None, str, float] | None:
        """The next backend of the current step; (None, ...) when the step has nothing
        left; None when the model is saturated and the request may queue for a slot."""
        now = time.monotonic()
        ext = call.external
        if ext is not None:
            if not tried and ext.backend.available(now):
                return ext.backend, "fallback", now
            if not tried:
                p.reason = Failure.CONNECT_ERROR  # breaker open on the external endpoint
            return None, "fallback", now
        step_model = call.step_model
        assert step_model is not None
        backend, track, saturated = step_model.pick(now, tried)
        if backend is not None:
            return backend, track if first else "fallback", now
        if saturated:
            if step_model.waiting < step_model.queue_depth or (
                Failure.SATURATED not in call.model.triggers
            ):
                return None
            p.reason = Failure.SATURATED
        elif not tried:
            p.reason = p.reason or Failure.UNAVAILABLE
        return None, track, now

    async def _wait_pick(
        self, call: Call, tried: list[Backend], first: bool, p: _Progress
    ) -> tuple[Backend | None, str, float]:
        """`_pick` after waiting in the saturation queue for each slot it needs."""
        while True:
            step_model = call.step_model
            assert step_model is not None
            if not await self._wait_slot(step_model, call):
                p.reason = Failure.TIMEOUT
                return None, "", time.monotonic()
            picked = self._pick(call, tried, first, p)
            if picked is not None:
                return picked

    def _answer_failure(
        self,
        conn: ClientConnection,
        call: Call,
        result: Attempt | None,
        *,
        backend: Backend | None = None,
        track: str = "none",
        reason: Failure | None = None,
    ) -> bool:
        """Nothing answered: pass a kept error answer through, or say why (502/503/504)."""
        req, model = call.req, call.model
        ka = req.keep_alive
        key = backend.key if backend is not None else ""
        series = self.metrics.target(model.name, key or "none", track)
        if call.resuming:
            # Mid-stream, and no route could continue it: end it as an unresumed one.
            self._end_resumed(conn, call, result, reason, series, key, track)
            return False
        if result is not None and result.complete_error is not None:
            status, head, body = result.complete_error
            conn.write(head + body)
            outcome = "server_error" if status >= 500 else "client_error"
        elif result is not None and result.reason in (Failure.TIMEOUT, Failure.TOTAL):
            status = 504
            msg = (
                "the request did not complete within its total timeout"
                if result.reason == Failure.TOTAL
                else "the model did not answer in time"
            )
            conn.write(http11.response(504, error_body(msg, "server_error", 504), keep_alive=ka))
            outcome = "timeout"
        else:
            status = 503
            msg = call.note or (
                "no backend of this model can answer now and no fallback could either"
            )
            if result is not None and result.reason not in model.triggers:
                status = 502
                msg = "the model's backend could not be reached"
            conn.write(
                http11.response(
                    status,
                    error_body(msg, "server_error", status),
                    extra=b"retry-after: %d\r\n" % model.retry_after if status == 503 else b"",
                    keep_alive=ka,
                )
            )
            outcome = "unavailable"
        report(
            self.access_log,
            call,
            series,
            status=status,
            outcome=outcome,
            backend=key,
            track=track,
            failure=reason or "",
        )
        return ka

    def _end_resumed(
        self,
        conn: ClientConnection,
        call: Call,
        result: Attempt | None,
        reason: Failure | None,
        series: Series,
        key: str,
        track: str,
    ) -> None:
        detail = (result.detail if result is not None else "") or str(reason or "unavailable")
        total = result is not None and result.reason == Failure.TOTAL
        end_resumed(conn, call, self.access_log, series, key, track, detail, total=total)

    async def _wait_slot(self, model: ModelState, call: Call) -> bool:
        """Wait in the saturation queue for a backend slot; False after the first-byte timeout."""
        fut: asyncio.Future[None] = self.loop.create_future()
        model.waiters.append(fut)
        model.waiting += 1
        try:
            remaining = call.t0 + min(model.first_byte_timeout, model.total_timeout)
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
        self, conn: ClientConnection, call: Call, backend: Backend, track: str, now: float
    ) -> Attempt | None:
        """One try on one backend (picked at `now`, a moment ago: no second clock read).
        None: an answer was committed (and fully handled)."""
        limits = call.step_model or call.model  # `call.limits`, without the property call
        series = self.metrics.series[(call.model.name, backend.key, track)]  # `target`, inline
        probe = backend.begin()
        series.in_flight += 1
        # A `Try` without its dataclass `__init__` (a frame entered from C: ~600
        # instructions more per attempt); every field set (tests/gateway/test_fields.py).
        t = _new(Try)
        t.backend = backend
        t.track = track
        t.series = series
        t.pool = pool = self.pool(backend)
        t.upc = t.ex = None
        try:
            data = _upstream_request(call, backend)
            # The usual case inline (an idle pooled connection, time left, the client
            # there): waiting here, not in `_send`, is one coroutine level less, and no
            # helper is one call less. Otherwise `_send` decides (the connection back).
            upc = pool.take_idle()
            total_left = call.t0 + call.model.total_timeout - now
            if upc is not None and (total_left <= 0 or conn.closed):
                pool.release(upc)
                upc = None
            if upc is None:
                failed = await self._send(conn, call, t, limits, data, 2)
            else:
                timer = self._start(conn, t, upc, limits, total_left, data)
                ex = t.ex
                assert ex is not None
                try:
                    await ex.head
                    failed = None
                except UpstreamError as e:
                    failed = self._head_failed(conn, t, ex, e, True)
                finally:
                    timer.cancel()
                if failed is _FRESH:
                    failed = await self._send(conn, call, t, limits, data, 1)
            if failed is not None:
                return failed
            resume = call.resume  # `call.resuming`, without the property call
            assert t.ex is not None
            if t.ex.complete and (resume is None or not resume.committed):
                return respond_complete(conn, call, t, self.access_log)  # no coroutine
            return await respond(conn, call, t, self.access_log)
        finally:
            backend.end(probe)
            series.in_flight -= 1
            if limits.limit is not None:
                limits.release_slot()

    def _start(
        self,
        conn: ClientConnection,
        t: Try,
        upc: UpstreamConnection,
        limits: ModelState,
        total_left: float,
        data: bytes,
    ) -> asyncio.TimerHandle:
        """Send the request on `upc` (`t.upc`, `t.ex`: an answer's head comes to `t.ex`);
        the returned timer is its deadline: its own first-byte timeout, but never past the
        request's total timeout (which is not the backend's fault)."""
        ex = new_exchange(self.loop)
        upc.send(ex, data)
        conn.upstream = upc
        t.upc, t.ex = upc, ex
        fb = limits.first_byte_timeout
        what = "first byte" if fb <= total_left else "total"
        loop = self.loop
        return loop.call_at(loop.time() + min(fb, max(0.0, total_left)), expire, ex, upc, what)

    def _head_failed(
        self, conn: ClientConnection, t: Try, ex: Exchange, e: UpstreamError, reused: bool
    ) -> Attempt:
        """No response head: the attempt's failure, or `_FRESH` when a pooled connection
        the backend closed while idle failed with no byte read (not the backend's fault:
        try again on a fresh connection)."""
        conn.upstream = None
        if conn.closed:
            return Attempt(Failure.CLIENT_CLOSED)
        if reused and not ex.received_any and e.reason == Failure.CONNECT_ERROR:
            return _FRESH
        if e.reason != Failure.TOTAL:
            t.backend.on_failure(time.monotonic())
        return Attempt(e.reason, str(e))

    async def _send(
        self,
        conn: ClientConnection,
        call: Call,
        t: Try,
        limits: ModelState,
        data: bytes,
        tries: int,
    ) -> Attempt | None:
        """Send the request and wait for the response head (`t.upc`/`t.ex` are the last
        connection and exchange tried); an `Attempt` if that failed. `limits`:
        `call.limits`. Up to `tries` connections: a pooled one that fails as `_head_failed`
        says is followed by another."""
        model, pool = call.model, t.pool
        for _ in range(tries):
            upc = pool.take_idle()
            reused = upc is not None
            total_left = call.t0 + model.total_timeout - time.monotonic()
            if total_left <= 0:
                if upc is not None:
                    pool.release(upc)
                return Attempt(Failure.TOTAL, "the request's total timeout passed")
            if upc is None:
                try:
                    upc = await pool.connect(min(limits.connect_timeout, total_left))
                except UpstreamError as e:
                    if time.monotonic() - call.t0 >= model.total_timeout:
                        return Attempt(Failure.TOTAL, "the request's total timeout passed")
                    t.backend.on_failure(time.monotonic())
                    return Attempt(e.reason, str(e))
                total_left = call.t0 + model.total_timeout - time.monotonic()
            if conn.closed:
                pool.release(upc)
                return Attempt(Failure.CLIENT_CLOSED)
            timer = self._start(conn, t, upc, limits, total_left, data)
            ex = t.ex
            assert ex is not None
            try:
                await ex.head
            except UpstreamError as e:
                failed = self._head_failed(conn, t, ex, e, reused)
                if failed is _FRESH:
                    continue
                return failed
            finally:
                timer.cancel()
            return None
        t.backend.on_failure(time.monotonic())
        return Attempt(Failure.CONNECT_ERROR, "backend closed reused connections")


# `_head_failed`'s "try again on a fresh connection" (compared by identity).
_FRESH = Attempt(Failure.CONNECT_ERROR, "a pooled connection was closed while idle")


def _upstream_request(call: Call, backend: Backend) -> bytes:
    """The request as the backend gets it, built once for every try on it."""
    req, ext, body = call.req, call.external, call.body
    if call.resume is not None:
        body = call.resume.body(call.target)  # stream options; after a failure, the rest
    if ext is not None:
        path = ext.base_path.encode() + req.path[3:]  # base URL + path after /v1
        host = ext.host_header.encode()
        auth = b"authorization: Bearer " + ext.api_key.encode() + b"\r\n" if ext.api_key else b""
        fwd = _external_headers(req.fwd)
    else:
        path, host, auth, fwd = req.path, backend.key.encode(), b"", req.fwd
    return b"".join(
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


def _external_headers(fwd: bytes) -> bytes:
    """The allowlisted lines of the serialized client headers `fwd`."""
    return b"".join(
        line + b"\r\n"
        for line in fwd.split(b"\r\n")
        if line.lower().startswith(EXTERNAL_REQUEST_HEADERS)
    )
