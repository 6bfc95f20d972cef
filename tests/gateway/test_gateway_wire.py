"""The gateway in-process on loopback against small raw-socket backends: wire-level cases
(framing, pausing, timeouts, headers) that the simulator cannot produce.

Every test is bounded: raw sockets have timeouts and the module has a pytest timeout.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop

from llm_operator.api.gateway_config import GatewayConfig
from llm_operator.gateway.accesslog import AccessLog
from llm_operator.gateway.loader import read_api_key
from llm_operator.gateway.metrics import Metrics
from llm_operator.gateway.routing import BackendRegistry, build_table
from llm_operator.gateway.server import Gateway

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
STREAM_BODY = b'{"model":"m","stream":true}'


def post(
    body: bytes = STREAM_BODY, extra: bytes = b"", path: bytes = b"/v1/chat/completions"
) -> bytes:
    head = b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" % path
    return head + extra + b"content-length: %d\r\n\r\n" % len(body) + body


def table(*addresses: str, **kw: Any) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "m",
                "tracks": [{"name": "stable", "weight": 1, "addresses": list(addresses)}],
                **kw,
            }
        ]
    }


class Env:
    def __init__(self) -> None:
        self.servers: list[asyncio.AbstractServer] = []
        self.gw: Gateway | None = None
        self.port = 0

    async def backend(self, handler: Handler) -> str:
        async def guarded(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await handler(r, w)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        srv = await asyncio.start_server(guarded, "127.0.0.1", 0)
        self.servers.append(srv)
        return f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"

    async def gateway(self, tbl: dict[str, Any], **kw: Any) -> Gateway:
        loop = asyncio.get_running_loop()
        t = build_table(GatewayConfig.model_validate(tbl), BackendRegistry(), read_api_key)
        self.gw = Gateway(loop, t, Metrics(), AccessLog(None), **kw)
        srv = await loop.create_server(self.gw.protocol, "127.0.0.1", 0)
        self.servers.append(srv)
        self.port = srv.sockets[0].getsockname()[1]
        return self.gw

    async def close(self) -> None:
        if self.gw is not None:
            for c in list(self.gw.connections):
                c.close()
            for p in self.gw.pools.values():
                p.close()
        for s in self.servers:
            s.close()
        await asyncio.sleep(0)

    async def raw(self, data: bytes, wait: float = 3.0, until_close: bool = True) -> bytes:
        """Send `data` on a new connection and read until the gateway closes it (or `wait`)."""
        return await asyncio.to_thread(raw_exchange, self.port, data, wait, until_close)


def raw_exchange(port: int, data: bytes, wait: float, until_close: bool = True) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=wait)
    deadline = time.monotonic() + wait
    out = b""
    try:
        s.sendall(data)
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                d = s.recv(65536)
            except TimeoutError:
                break
            if not d:
                break
            out += d
            if not until_close and complete_response(out):
                break
    finally:
        s.close()
    return out


def complete_response(out: bytes) -> bool:
    """One whole response (content-length or chunked) is in `out`."""
    if b"\r\n\r\n" not in out:
        return False
    head, rest = out.split(b"\r\n\r\n", 1)
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            return len(rest) >= int(line.split(b":")[1])
    return rest.endswith(b"0\r\n\r\n")


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    cl = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            cl = int(line.split(b":")[1])
    return head, await reader.readexactly(cl)


def sse_chunk(data: bytes) -> bytes:
    ev = b"data: " + data + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(ev), ev)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = Env()
    try:
        yield e
    finally:
        await e.close()


# --- 1. a connection paused for a slow client goes back to the pool reading


def test_connection_paused_for_a_slow_client_is_pooled_reading() -> None:
    # uvloop, as in production: its buffer sizes make the last read of a big answer land
    # while the client's transport is still over its high-water mark.
    uvloop.run(_paused_for_a_slow_client())


async def _paused_for_a_slow_client() -> None:
    big = [b""]

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_request(r)
            w.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                % len(big[0])
                + big[0]
            )
            await w.drain()

    env = Env()
    try:
        gw = await env.gateway(table(await env.backend(backend), timeouts={"firstByte": 3}))

        def slow_client() -> int:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(10)
            s.connect(("127.0.0.1", env.port))
            s.sendall(post(b'{"model":"m"}'))
            time.sleep(0.3)  # the gateway's writes back up: it pauses reading the backend
            n = 0
            while n < len(big[0]):
                d = s.recv(1 << 20)
                if not d:
                    break
                n += len(d)
            s.close()
            return n

        for size in (1_500_000, 4_000_000, 4_000_000):
            big[0] = b"x" * size
            assert await asyncio.to_thread(slow_client) >= size
            await asyncio.sleep(0.05)
            idle = next(iter(gw.pools.values())).idle
            assert idle, "the connection went back to the pool"
            assert all(c.transport is not None and c.transport.is_reading() for c in idle)
        t0 = time.monotonic()
        out = await env.raw(post(b'{"model":"m"}'), wait=5, until_close=False)
        assert out.startswith(b"HTTP/1.1 200 "), out[:200]
        assert time.monotonic() - t0 < 2
    finally:
        await env.close()


# --- 2. the total timeout bounds the whole request and is never the backend's fault


def _backends(gw: Gateway) -> list[Any]:
    return list(gw.backends.values())


async def test_total_timeout_covers_the_wait_for_the_head(env: Env) -> None:
    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await asyncio.sleep(3)
        w.write(SSE_HEAD + sse_chunk(b"late") + b"0\r\n\r\n")

    gw = await env.gateway(table(await env.backend(slow), timeouts={"firstByte": 2, "total": 0.5}))
    t0 = time.monotonic()
    out = await env.raw(post(), wait=5, until_close=False)
    took = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 504 "), out[:300]
    assert b"total timeout" in out
    assert 0.4 < took < 1.5
    assert all(b.consecutive_failures == 0 for b in _backends(gw))


async def test_a_retry_gets_what_is_left_of_the_total_not_a_fresh_first_byte(env: Env) -> None:
    async def hang(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await asyncio.sleep(5)

    a, b = await env.backend(hang), await env.backend(hang)
    gw = await env.gateway(
        table(a, b, timeouts={"firstByte": 0.6, "total": 1.0}, fallbackOn=["timeout"])
    )
    t0 = time.monotonic()
    out = await env.raw(post(), wait=5, until_close=False)
    took = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 504 "), out[:300]
    assert b"total timeout" in out  # not the second attempt's own first-byte timeout
    assert 0.9 < took < 1.5, took
    # The first attempt timed out on its own first-byte timer; the second hit the total.
    assert sorted(x.consecutive_failures for x in _backends(gw)) == [0, 1]


async def test_total_timeout_mid_stream_does_not_charge_the_breaker(env: Env) -> None:
    async def long_stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(SSE_HEAD)
        for i in range(40):
            w.write(sse_chunk(b'{"i":%d}' % i))
            await w.drain()
            await asyncio.sleep(0.05)

    gw = await env.gateway(table(await env.backend(long_stream), timeouts={"total": 0.4}))
    out = await env.raw(post(), wait=5)
    assert out.startswith(b"HTTP/1.1 200 "), out[:300]
    assert out.count(b'"error"') == 1 and b"total timeout" in out
    assert out.endswith(b"0\r\n\r\n")
    assert all(b.consecutive_failures == 0 for b in _backends(gw))


# --- 3. a response that ends at connection close is complete, not a failure


async def test_a_response_delimited_by_close_completes_normally(env: Env) -> None:
    async def until_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        for i in range(3):
            w.write(b'data: {"i":%d}\n\n' % i)
            await w.drain()
            await asyncio.sleep(0.05)
        w.write(b"data: [DONE]\n\n")
        await w.drain()

    gw = await env.gateway(table(await env.backend(until_close)))
    out = await env.raw(post(), wait=3, until_close=False)
    assert out.startswith(b"HTTP/1.1 200 "), out[:300]
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head
    assert body.endswith(b"0\r\n\r\n")
    assert b'"error"' not in body and b"data: [DONE]" in body
    assert all(b.consecutive_failures == 0 for b in _backends(gw))
    series = next(iter(gw.metrics.series.values()))
    assert series.outcomes["success"] == 1 and series.outcomes["stream_error"] == 0


# --- 4. HEAD answers carry no body


async def test_head_requests_get_no_body_on_a_kept_alive_connection(env: Env) -> None:
    await env.gateway(table("127.0.0.1:1"))
    out = await env.raw(
        b"HEAD /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
        b"HEAD /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"
        b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        wait=3,
    )
    first, second, third = out.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 ") and first.endswith(b"\r\n\r\n"), out
    assert second.startswith(b"405 ") and second.endswith(b"\r\n\r\n"), out
    assert third.startswith(b"200 ") and third.endswith(b"\r\n\r\nok"), out


# --- 5. one error event, then the end of the stream, and nothing after it


async def test_a_broken_chunk_mid_stream_ends_with_exactly_one_error_event(env: Env) -> None:
    async def broken(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(SSE_HEAD + sse_chunk(b'{"i":0}'))
        await w.drain()
        await asyncio.sleep(0.1)
        w.write(b"zz\r\nbroken\r\n")
        await w.drain()
        await asyncio.sleep(1)

    gw = await env.gateway(table(await env.backend(broken)))
    out = await env.raw(post(), wait=3)
    assert out.startswith(b"HTTP/1.1 200 "), out[:300]
    assert out.count(b'"error"') == 1, out
    assert out.endswith(b"\r\n0\r\n\r\n") and out.count(b"\r\n0\r\n\r\n") == 1, out
    assert next(iter(gw.metrics.series.values())).outcomes["stream_error"] == 1


# --- 6. an external fallback gets only allowlisted client headers


async def test_external_fallback_gets_only_allowlisted_headers(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.gateway.fake_backend import FakeBackend

    monkeypatch.setenv("WIRE_EXT_KEY", "sk-wire")
    fake = await FakeBackend("ext").start()
    try:
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_addr = f"127.0.0.1:{dead.getsockname()[1]}"
        dead.close()
        await env.gateway(
            table(
                dead_addr,
                fallbacks=[
                    {
                        "url": f"http://127.0.0.1:{fake.port}/v1",
                        "targetModel": "vendor/x",
                        "apiKeyEnv": "WIRE_EXT_KEY",
                    }
                ],
            )
        )
        extra = (
            b"accept: application/json\r\nuser-agent: test-sdk/1\r\ncookie: session=secret\r\n"
            b"x-internal-user: alice\r\nauthorization: Bearer client-key\r\n"
            b"traceparent: 00-abc-def-01\r\n"
        )
        out = await env.raw(post(b'{"model":"m"}', extra=extra), wait=5, until_close=False)
        assert out.startswith(b"HTTP/1.1 200 "), out[:300]
        headers = {k.lower(): v for k, v in fake.seen[-1].headers.items()}
        assert headers["authorization"] == "Bearer sk-wire"
        assert headers["accept"] == "application/json"
        assert headers["user-agent"] == "test-sdk/1"
        assert headers["content-type"] == "application/json"
        for name in ("cookie", "x-internal-user", "traceparent"):
            assert name not in headers
    finally:
        await fake.stop()


# --- 7. header-size cap, idle timeout, draining


async def test_oversized_request_head_gets_431_and_the_connection_closes(env: Env) -> None:
    gw = await env.gateway(table("127.0.0.1:1"))

    def flood() -> bytes:
        s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
        out = b""
        try:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            pad = b"x-pad: " + b"a" * 8000 + b"\r\n"
            for _ in range(64):  # 512 KiB of headers, far over the cap
                try:
                    s.sendall(pad)
                except OSError:
                    break
            while True:
                d = s.recv(65536)
                if not d:
                    break
                out += d
        except OSError:
            pass
        finally:
            s.close()
        return out

    out = await asyncio.to_thread(flood)
    assert out.startswith(b"HTTP/1.1 431 "), out[:200]
    assert gw.metrics.edge_rejections.get("431") == 1
    # A single huge header line is caught too (httptools would buffer it whole).
    out = await env.raw(b"GET /health HTTP/1.1\r\nx-big: " + b"b" * 100_000, wait=3)
    assert out.startswith(b"HTTP/1.1 431 "), out[:200]
    # Big bodies are not head bytes.
    body = b'{"model":"nope","pad":"' + b"c" * 200_000 + b'"}'
    out = await env.raw(post(body), wait=3, until_close=False)
    assert out.startswith(b"HTTP/1.1 404 "), out[:200]


async def test_idle_keep_alive_connections_are_closed(env: Env) -> None:
    gw = await env.gateway(table("127.0.0.1:1"), idle_timeout=0.3)

    def idle_client() -> tuple[bytes, float]:
        s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
        out = b""
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        t0 = time.monotonic()
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
        s.close()
        return out, time.monotonic() - t0

    out, took = await asyncio.to_thread(idle_client)
    assert out.endswith(b"\r\n\r\nok")
    assert 0.25 < took < 1.5, took
    await asyncio.sleep(0.05)
    assert not gw.connections


async def test_draining_fails_health_checks_and_closes_connections(env: Env) -> None:
    gw = await env.gateway(table("127.0.0.1:1"))

    def client() -> tuple[bytes, bytes]:
        s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        first = s.recv(65536)
        time.sleep(0.3)  # SIGTERM arrives meanwhile: the idle connection is closed
        rest = s.recv(65536)
        s.close()
        return first, rest

    task = asyncio.create_task(asyncio.to_thread(client))
    await asyncio.sleep(0.1)
    gw.start_draining()
    first, rest = await task
    assert first.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in first
    assert rest == b""
    # A new connection (still accepted for a moment) gets 503 and `connection: close`.
    out = await env.raw(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n", wait=3)
    assert out.startswith(b"HTTP/1.1 503 ") and b"connection: close" in out, out
    out = await env.raw(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n", wait=3)
    assert out.startswith(b"HTTP/1.1 200 ") and b"connection: close" in out, out


# --- 7b. a backend connection idle for too long is not reused


async def test_a_connection_idle_too_long_is_not_reused(env: Env) -> None:
    # NAT and firewalls drop quiet flows without a word: the first connection's second
    # request goes into a void, so reusing it would cost the whole firstByte timeout.
    accepted: list[int] = []
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = len(accepted)
        accepted.append(n)
        await read_request(r)
        w.write(reply)
        await w.drain()
        while True:
            await read_request(r)
            if n == 0:
                await asyncio.sleep(10)  # the dropped flow: never answers
            w.write(reply)
            await w.drain()

    gw = await env.gateway(
        table(await env.backend(backend), timeouts={"firstByte": 3}), upstream_idle_seconds=0.3
    )
    out = await env.raw(post(b'{"model":"m"}'), wait=5, until_close=False)
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    pool = next(iter(gw.pools.values()))
    first = pool.idle[-1]
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    out = await env.raw(post(b'{"model":"m"}'), wait=5, until_close=False)
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    assert time.monotonic() - t0 < 1.5
    assert first.closed and len(accepted) == 2
    # Within the limit the pooled connection is reused.
    out = await env.raw(post(b'{"model":"m"}'), wait=5, until_close=False)
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    assert len(accepted) == 2


# --- 8. nothing is written into the middle of an earlier pipelined response


async def _streaming_backend(env: Env) -> str:
    async def stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_request(r)
            w.write(SSE_HEAD)
            for i in range(3):
                w.write(sse_chunk(b'{"i":%d}' % i))
                await w.drain()
                await asyncio.sleep(0.1)
            w.write(b"0\r\n\r\n")
            await w.drain()

    return await env.backend(stream)


async def test_pipelined_100_continue_waits_for_the_earlier_response(env: Env) -> None:
    await env.gateway(table(await _streaming_backend(env)))
    r2_head = post(extra=b"expect: 100-continue\r\n")[: -len(STREAM_BODY)]

    def client() -> bytes:
        s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
        s.sendall(post())
        time.sleep(0.05)
        s.sendall(r2_head)
        out = b""
        while b"100 Continue" not in out:
            d = s.recv(65536)
            assert d, out
            out += d
        s.sendall(STREAM_BODY)
        while out.count(b"\r\n0\r\n\r\n") < 2:
            d = s.recv(65536)
            assert d, out
            out += d
        s.close()
        return out

    out = await asyncio.to_thread(client)
    first, rest = out.split(b"\r\n0\r\n\r\n", 1)
    assert b"100 Continue" not in first
    assert rest.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), rest[:200]


async def test_pipelined_rejection_waits_for_the_earlier_response(env: Env) -> None:
    await env.gateway(table(await _streaming_backend(env)))
    too_big = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 999999999\r\n\r\n"

    def client() -> bytes:
        s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
        s.sendall(post())
        time.sleep(0.05)
        s.sendall(too_big)
        out = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
        s.close()
        return out

    out = await asyncio.to_thread(client)
    first, rest = out.split(b"\r\n0\r\n\r\n", 1)
    assert b"413" not in first and first.count(b"data: ") == 3
    assert rest.startswith(b"HTTP/1.1 413 "), rest[:200]


@pytest.mark.drill
async def test_a_client_that_pipelines_without_reading_is_held_back(env: Env) -> None:
    """Issue 17's defect: a client pipelining requests without reading the answers grew the
    gateway to gigabytes. Now the gateway stops reading from it (a short pipeline queue, no
    next answer while the client reads none), so the client's own sends block instead."""
    answer = b'{"id":"x","choices":[{"message":{"content":"' + b"y" * 16_000 + b'"}}]}'

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await r.readexactly(length)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
            w.write(b"content-length: %d\r\n\r\n%b" % (len(answer), answer))
            await w.drain()

    gw = await env.gateway(table(await env.backend(backend)))
    request = post(b'{"model":"m"}')
    total = 200_000  # 17 MB of requests: far more than the sockets' buffers hold

    def flood() -> tuple[int, int]:
        s = socket.create_connection(("127.0.0.1", env.port), timeout=2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sent = 0
        try:
            for _ in range(total):
                s.sendall(request)
                sent += 1
        except OSError:  # the send timed out: the gateway stopped reading
            pass
        conns = list(gw.connections)
        held = max((len(c.pending) for c in conns), default=0)
        # The client now reads every answer it is owed: they arrive whole and in order.
        s.settimeout(10)
        got, buf = 0, b""
        while got < sent:
            data = s.recv(1 << 20)
            assert data, f"closed after {got} of {sent} answers"
            buf += data
            while True:
                end = buf.find(b"}]}")
                if end < 0:
                    break
                got += 1
                buf = buf[end + 3 :]
        s.close()
        return sent, held

    sent, held = await asyncio.to_thread(flood)
    assert sent < total, "the gateway read every request of a client that reads nothing"
    # What the gateway holds: the requests of its last reads, not the client's 200,000.
    assert held < 3_000, held
    print(f"client sent {sent} of {total} requests before blocking; {held} queued")


@pytest.mark.drill
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            400,
        ),
        (b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n", 405),
        (post(b'{"model":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400),
    ],
    ids=["upgrade", "connect", "json-nested-100k"],
)
async def test_odd_requests_get_one_clear_answer(
    env: Env, request_bytes: bytes, status: int
) -> None:
    """Issue 17's defects: Upgrade and CONNECT were answered twice, deep JSON was a 500."""
    gw = await env.gateway(table("127.0.0.1:1"))
    out = await env.raw(request_bytes, wait=3)
    assert out.count(b"HTTP/1.1 ") == 1, out[:400]
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:400]
    assert b'"type":"invalid_request_error"' in out
    assert gw.in_flight == 0
