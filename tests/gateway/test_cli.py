"""The gateway process: metrics port, bad reloads, graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import urllib.error
import urllib.request

import httpx
import pytest

from tests.gateway.conftest import GatewayProc
from tests.gateway.fake_backend import FakeBackend
from tests.support.sim import metric_value

pytestmark = pytest.mark.timeout(60)


def _table(address: str, **kw: object) -> dict[str, object]:
    return {
        "models": [
            {"name": "m", "tracks": [{"name": "stable", "weight": 1, "addresses": [address]}], **kw}
        ]
    }


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_metrics_port_serves_only_metrics(gateway: GatewayProc) -> None:
    fake = await FakeBackend().start()
    try:
        gateway.start(_table(fake.address), "--metrics-port", "0")
        ports = json.loads((gateway.root / "port.json").read_text())
        metrics_url = f"http://127.0.0.1:{ports['metricsPort']}"
        async with httpx.AsyncClient(timeout=5) as h:
            r = await h.post(
                gateway.url + "/v1/chat/completions", json={"model": "m", "messages": []}
            )
            assert r.status_code == 200
            wrong = await h.post(metrics_url + "/v1/chat/completions", json={"model": "m"})
            assert wrong.status_code == 404
        status, text = await asyncio.to_thread(_get, metrics_url + "/metrics")
        assert status == 200
        assert metric_value(text, "llm_gateway_requests_total", {"outcome": "success"}) == 1
        assert (await asyncio.to_thread(_get, gateway.url + "/metrics"))[0] == 404
    finally:
        await fake.stop()


async def test_a_broken_table_is_ignored_and_the_last_good_one_keeps_serving(
    gateway: GatewayProc,
) -> None:
    fake = await FakeBackend().start()
    try:
        gateway.start(_table(fake.address))
        gen = gateway.generation()
        broken = _table(fake.address, fallbacks=[{"model": "ghost"}])
        gateway.update(broken, wait_generation=False)
        for _ in range(100):
            if gateway.metric("llm_gateway_config_reloads_total", result="error") >= 1:
                break
            await asyncio.sleep(0.05)
        assert gateway.metric("llm_gateway_config_reloads_total", result="error") == 1
        assert gateway.generation() == gen
        status, _, _ = await asyncio.to_thread(
            gateway.post, "/v1/chat/completions", b'{"model":"m","messages":[]}'
        )
        assert status == 200
        assert "not in this table" in gateway.log_path.read_text()
    finally:
        await fake.stop()


async def test_sigterm_lets_in_flight_streams_finish(gateway: GatewayProc) -> None:
    fake = await FakeBackend(chunks=5, delay=0.1).start()
    try:
        gateway.start(_table(fake.address))
        assert gateway.proc is not None
        body = {"model": "m", "messages": [], "stream": True}
        async with (
            httpx.AsyncClient(timeout=10) as h,
            h.stream("POST", gateway.url + "/v1/chat/completions", json=body) as r,
        ):
            assert r.status_code == 200
            gateway.proc.send_signal(signal.SIGTERM)
            raw = b"".join([c async for c in r.aiter_raw()])
        assert raw.count(b"data: ") == 6 and raw.endswith(b"data: [DONE]\n\n")
        assert await asyncio.to_thread(gateway.proc.wait, 5) == 0
    finally:
        await fake.stop()


async def test_sigterm_closes_idle_keep_alive_connections(gateway: GatewayProc) -> None:
    fake = await FakeBackend(chunks=5, delay=0.3).start()
    try:
        gateway.start(_table(fake.address))
        assert gateway.proc is not None
        idle = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        idle.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")
        body = {"model": "m", "messages": [], "stream": True}
        async with (
            httpx.AsyncClient(timeout=10) as h,
            h.stream("POST", gateway.url + "/v1/chat/completions", json=body) as r,
        ):
            gateway.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            # Draining: the idle keep-alive connection is closed at once, not at exit.
            assert await asyncio.to_thread(idle.recv, 65536) == b""
            assert time.monotonic() - t0 < 0.7
            raw = b"".join([c async for c in r.aiter_raw()])
        idle.close()
        assert raw.endswith(b"data: [DONE]\n\n")
        assert await asyncio.to_thread(gateway.proc.wait, 5) == 0
    finally:
        await fake.stop()
