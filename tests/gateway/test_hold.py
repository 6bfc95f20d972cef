"""Scale from zero: requests for a model with no ready backend are held at the gateway and
go out, in arrival order, when a backend turns ready; a full queue or an expired wait gets an
OpenAI-shaped 503 with Retry-After, or the fallback's answer.

Real sockets on 127.0.0.1, the real simulator; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_operator.api.gateway_config import GatewayConfig
from llm_operator.gateway.discovery import Cluster
from tests.gateway.conftest import GatewayProc, Sdk, addr
from tests.gateway.fake_backend import FakeBackend
from tests.gateway.test_discovery import FakeApiServer, _pod, _token
from tests.support.sim import SimProcess, metric_value, run_sims

pytestmark = pytest.mark.timeout(60)

MSG = [{"role": "user", "content": "Hello there"}]
# A track of pods: outside a cluster it has no backends, so the model is cold.
PODS = {
    "namespace": "ml",
    "matchLabels": {"llmoperator.io/deployment": "llama", "llmoperator.io/track": "stable"},
    "port": "http",
}


def cold_model(name: str = "llama", **kw: Any) -> dict[str, Any]:
    return {"name": name, "tracks": [{"name": "stable", "weight": 1, "pods": PODS}], **kw}


def warm_model(name: str, address: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "tracks": [{"name": "stable", "weight": 1, "pods": PODS, "addresses": [address]}],
        **kw,
    }


def held(gw: GatewayProc, model: str = "llama") -> float:
    return gw.metric("llm_gateway_requests_held", model=model)


async def until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


def chat(i: int = 0, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "llama",
        "messages": [{"role": "user", "content": f"req-{i}"}],
        "max_tokens": 4,
        "stream": stream,
    }


async def test_held_requests_go_out_in_arrival_order_when_a_backend_appears(
    gateway: GatewayProc,
) -> None:
    fake = await FakeBackend("warm").start()
    try:
        gateway.start({"models": [cold_model()]})
        assert held(gateway) == 0  # the series exists before anything is held
        async with httpx.AsyncClient(timeout=20) as h:
            tasks = []
            for i in range(8):
                tasks.append(
                    asyncio.create_task(
                        h.post(gateway.url + "/v1/chat/completions", json=chat(i, i % 2 == 1))
                    )
                )
                # One at a time into the queue, so the arrival order is known.
                await until(lambda n=i + 1: held(gateway) == n, f"{i + 1} held")
            await asyncio.sleep(0.2)
            assert not any(t.done() for t in tasks)
            t0 = time.monotonic()
            await asyncio.to_thread(gateway.update, {"models": [warm_model("llama", fake.address)]})
            answers = await asyncio.wait_for(asyncio.gather(*tasks), 10)
            released_in = time.monotonic() - t0
        assert [r.status_code for r in answers] == [200] * 8
        assert [s.body["messages"][0]["content"] for s in fake.seen] == [
            f"req-{i}" for i in range(8)
        ]
        assert released_in < 2.0
        assert held(gateway) == 0
        assert gateway.metric("llm_gateway_cold_requests_total", result="released") == 8
        assert gateway.metric("llm_gateway_hold_seconds_count", model="llama") == 8
        assert gateway.metric("llm_gateway_requests_total", outcome="success") == 8
    finally:
        await fake.stop()


async def test_twenty_concurrent_cold_requests_are_all_answered_by_a_simulator_that_starts_late(
    gateway: GatewayProc,
    sdk: Sdk,
) -> None:
    gateway.start({"models": [cold_model()]})
    c = sdk(gateway, "x", timeout=30)
    calls = [
        asyncio.create_task(
            c.chat.completions.create(model="llama", messages=MSG, max_tokens=4, stream=False)
        )
        for _ in range(20)
    ]
    await until(lambda: held(gateway) == 20, "20 held")
    # The "pod" starts only now, as a scale from zero would start it.
    with run_sims(
        1, served_name="llama", args=["--sim-ttft-base", "0.01", "--sim-itl", "0.001"]
    ) as sims:
        t0 = time.monotonic()
        await asyncio.to_thread(gateway.update, {"models": [warm_model("llama", addr(sims[0]))]})
        answers = await asyncio.wait_for(asyncio.gather(*calls), 20)
        after_ready = time.monotonic() - t0
    assert len(answers) == 20 and all(a.choices[0].message.content for a in answers)
    assert after_ready < 2.0
    assert held(gateway) == 0
    assert gateway.metric("llm_gateway_cold_requests_total", result="released") == 20


def _assert_503(status: int, body: bytes, headers: dict[str, str], words: str) -> None:
    assert status == 503
    err = json.loads(body)["error"]
    assert set(err) >= {"message", "type", "code"} and err["code"] == 503
    assert words in err["message"]
    assert headers["retry-after"] == "4"


async def test_full_queue_and_expired_wait_answer_503_with_retry_after(
    gateway: GatewayProc,
) -> None:
    gateway.start(
        {
            "models": [
                cold_model(hold={"maxQueue": 2, "timeout": 30}, retryAfter=4),
                cold_model("brief", hold={"timeout": 0.5}, retryAfter=4),
            ]
        }
    )
    body = json.dumps(chat()).encode()
    waiting = [asyncio.create_task(asyncio.to_thread(gateway.post, "/v1/chat/completions", body))]
    waiting.append(
        asyncio.create_task(asyncio.to_thread(gateway.post, "/v1/chat/completions", body))
    )
    await until(lambda: held(gateway) == 2, "2 held")
    t0 = time.monotonic()
    status, raw, headers = await asyncio.to_thread(gateway.post, "/v1/chat/completions", body)
    assert time.monotonic() - t0 < 0.5  # a full queue answers at once
    _assert_503(status, raw, headers, "hold queue is full")
    assert held(gateway) == 2

    brief = json.dumps({**chat(), "model": "brief"}).encode()
    t0 = time.monotonic()
    status, raw, headers = await asyncio.to_thread(gateway.post, "/v1/chat/completions", brief)
    assert 0.45 < time.monotonic() - t0 < 2.0
    _assert_503(status, raw, headers, "none became ready within 0.5 s")
    assert held(gateway, "brief") == 0
    assert gateway.metric("llm_gateway_cold_requests_total", model="llama", result="full") == 1
    assert gateway.metric("llm_gateway_cold_requests_total", model="brief", result="expired") == 1
    assert gateway.metric("llm_gateway_requests_total", outcome="unavailable") == 2
    # The two still held are not forgotten: a table without the model ends their wait.
    gateway.update({"models": [cold_model("brief")]})
    for t in waiting:
        assert (await asyncio.wait_for(t, 5))[0] == 503
    assert gateway.metric("llm_gateway_cold_requests_total", result="removed") == 2


async def test_fallback_instead_of_503_and_while_cold(
    gateway: GatewayProc, small_sim: SimProcess, sdk: Sdk
) -> None:
    small = {
        "name": "small",
        "tracks": [{"name": "stable", "weight": 1, "addresses": [addr(small_sim)]}],
    }
    gateway.start(
        {
            "models": [
                cold_model(hold={"timeout": 0.5}, fallbacks=[{"model": "small"}]),
                cold_model(
                    "eager", hold={"fallbackWhileCold": True}, fallbacks=[{"model": "small"}]
                ),
                cold_model("full", hold={"maxQueue": 0}, fallbacks=[{"model": "small"}]),
                small,
            ]
        }
    )
    c = sdk(gateway, "x")
    t0 = time.monotonic()
    r = await c.chat.completions.create(model="llama", messages=MSG, max_tokens=4)
    assert r.model == "small" and 0.45 < time.monotonic() - t0 < 3
    t0 = time.monotonic()
    r = await c.chat.completions.create(model="full", messages=MSG, max_tokens=4)
    assert r.model == "small" and time.monotonic() - t0 < 0.5
    t0 = time.monotonic()
    r = await c.chat.completions.create(model="eager", messages=MSG, max_tokens=4)
    assert r.model == "small" and time.monotonic() - t0 < 0.5
    # The answer came from the fallback, but the model must still wake: its gauge says so
    # until it has a backend.
    assert held(gateway, "eager") == 1
    assert held(gateway, "llama") == 0 and held(gateway, "small") == 0
    assert gateway.metric("llm_gateway_cold_requests_total", result="fallback") == 1
    assert gateway.metric("llm_gateway_cold_requests_total", result="expired") == 1
    assert gateway.metric("llm_gateway_cold_requests_total", result="full") == 1
    assert gateway.metric("llm_gateway_fallbacks_total", target="model:small") == 3
    gateway.update(
        {
            "models": [
                warm_model("eager", addr(small_sim), hold={"fallbackWhileCold": True}),
                small,
            ]
        }
    )
    assert held(gateway, "eager") == 0


async def test_a_client_that_leaves_while_held_is_never_sent(gateway: GatewayProc) -> None:
    fake = await FakeBackend("warm").start()
    try:
        gateway.start({"models": [cold_model()]})
        body = json.dumps(chat(0)).encode()
        s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await until(lambda: held(gateway) == 1, "1 held")
        s.close()
        await until(lambda: held(gateway) == 0, "the queue is empty again")
        gateway.update({"models": [warm_model("llama", fake.address)]})
        await asyncio.sleep(0.3)
        assert fake.seen == []
        assert gateway.metric("llm_gateway_cold_requests_total", result="client_closed") == 1
        assert gateway.metric("llm_gateway_requests_total", outcome="client_closed") == 1
        # The model works as usual once warm.
        status, _, _ = await asyncio.to_thread(
            gateway.post, "/v1/chat/completions", json.dumps(chat(1)).encode()
        )
        assert status == 200 and len(fake.seen) == 1
    finally:
        await fake.stop()


@pytest.mark.timeout(30)
async def test_pod_turning_ready_releases_held_requests_and_nothing_is_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, through the Pod watch's swap of the routing table: the futures and timers
    of held requests are gone after release and after expiry."""
    from llm_operator.gateway import cli

    fake = await FakeBackend("pod").start()
    api = FakeApiServer()
    api.items = [_pod("p0", "127.0.0.1", ready=False)]
    cluster = Cluster(await api.start(), _token(tmp_path), None)
    monkeypatch.setattr(Cluster, "in_cluster", classmethod(lambda _cls: cluster))
    ports = [{"name": "http", "containerPort": fake.port}]
    config = GatewayConfig.model_validate(
        {
            "models": [
                cold_model(hold={"timeout": 20}),
                cold_model("other", hold={"timeout": 0.3}),
            ]
        }
    )
    args = cli.parse_args(["--config", str(tmp_path / "routes.yaml"), "--access-log", "off"])
    app = cli.App(args, config)
    holds = app.gateway.holds
    loop = asyncio.get_running_loop()
    server = await loop.create_server(app.gateway.protocol, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with httpx.AsyncClient(timeout=20) as h:
            await until(app.ready, "the first pod list")
            # Expiry leaves nothing behind.
            other = {**chat(), "model": "other"}
            expired = await asyncio.gather(
                *(h.post(url + "/v1/chat/completions", json=other) for _ in range(3))
            )
            assert [r.status_code for r in expired] == [503] * 3
            assert all(r.headers["retry-after"] == "1" for r in expired)
            assert holds.queues == {} and holds.timers == {}
            assert dict(app.metrics.held_source()) == {"llama": 0, "other": 0}

            tasks = []
            for i in range(5):  # one at a time, so the arrival order is known
                tasks.append(
                    asyncio.create_task(h.post(url + "/v1/chat/completions", json=chat(i)))
                )
                await until(
                    lambda n=i + 1: len(holds.queues.get("llama", ())) == n, f"{i + 1} held"
                )
            timers = list(holds.timers.values())
            futures = list(holds.queues["llama"])
            assert len(timers) == 5
            assert dict(app.metrics.held_source()) == {"llama": 5, "other": 0}

            # The pod turns Ready: the watch swaps the table and the held requests go out.
            ready = _pod("p0", "127.0.0.1", version="6", containers=[{"ports": ports}])
            await api.events.put({"type": "MODIFIED", "object": ready})
            answers = await asyncio.wait_for(asyncio.gather(*tasks), 10)
            assert [r.status_code for r in answers] == [200] * 5
            assert [s.body["messages"][0]["content"] for s in fake.seen] == [
                f"req-{i}" for i in range(5)
            ]
            assert holds.queues == {} and holds.timers == {}
            assert all(t.cancelled() for t in timers) and all(f.done() for f in futures)
            assert dict(app.metrics.held_source()) == {"llama": 0, "other": 0}
    finally:
        server.close()
        if app.discovery is not None:
            await app.discovery.close()
        await api.stop()
        await fake.stop()


async def test_the_metrics_port_shows_the_held_gauge_and_circuit_states(
    gateway: GatewayProc,
) -> None:
    """The chart serves /metrics on --metrics-port: its listener must show the API
    listener's state, not its own empty one."""
    gateway.start(
        {"models": [cold_model(), warm_model("warm", "127.0.0.1:1")]}, "--metrics-port", "0"
    )
    metrics_port = json.loads((gateway.root / "port.json").read_text())["metricsPort"]

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    task = asyncio.create_task(
        asyncio.to_thread(gateway.post, "/v1/chat/completions", json.dumps(chat()).encode())
    )
    await until(
        lambda: metric_value(scrape(), "llm_gateway_requests_held", {"model": "llama"}) == 1,
        "1 held",
    )
    assert 'llm_gateway_requests_held{model="warm"} 0' in scrape()
    status, _, _ = await asyncio.to_thread(
        gateway.post, "/v1/chat/completions", json.dumps({**chat(), "model": "warm"}).encode()
    )
    assert status == 503  # nothing listens on port 1
    assert 'llm_gateway_circuit_state{backend="127.0.0.1:1"} 0' in scrape()
    gateway.write({"models": [cold_model("warm")]})  # not `update`: no /metrics on --port
    assert (await asyncio.wait_for(task, 5))[0] == 503
    await until(lambda: metric_value(scrape(), "llm_gateway_config_generation") == 2, "reload")
