"""The gateway in front of the project's vLLM simulator, with the OpenAI SDK as the client.

Everything runs on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.conftest import EXT_KEY, GatewayProc, Sdk, addr, served
from tests.gateway.fake_backend import FakeBackend
from tests.support.sim import SimProcess, run_sims

pytestmark = pytest.mark.timeout(60)

MSG = [{"role": "user", "content": "Hello there"}]


def model(name: str, tracks: list[tuple[str, int, list[str]]], **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "tracks": [{"name": n, "weight": w, "addresses": a} for n, w, a in tracks],
        **kw,
    }


def dead_address() -> str:
    """A loopback port with nothing listening (bound, then closed)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


async def run_load(
    c: openai.AsyncOpenAI, model_name: str, total: int, concurrency: int
) -> list[Any]:
    """`total` chat requests with `concurrency` workers; returns the answers."""
    answers: list[Any] = []
    queue = iter(range(total))

    async def worker() -> None:
        for _ in queue:
            answers.append(
                await c.chat.completions.create(model=model_name, messages=MSG, max_tokens=4)
            )

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def test_canary_weight_holds_over_2000_requests(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], sdk: Sdk
) -> None:
    llama, _ = sims
    stable, canary = llama[0], llama[1]
    before = (served(stable), served(canary))
    gateway.start(
        {
            "models": [
                model("llama", [("stable", 90, [addr(stable)]), ("canary", 10, [addr(canary)])])
            ]
        }
    )
    answers = await run_load(sdk(gateway), "llama", 2000, 16)
    assert len(answers) == 2000
    await asyncio.sleep(0.1)
    n_stable = served(stable) - before[0]
    n_canary = served(canary) - before[1]
    assert n_stable + n_canary == 2000
    assert 160 <= n_canary <= 240, f"canary got {n_canary / 20:.1f}%"
    # The gateway's own accounting agrees with what the backends saw.
    assert (
        gateway.metric("llm_gateway_requests_total", track="canary", outcome="success") == n_canary
    )


async def test_stopped_stable_backends_fall_back_and_clients_get_answers(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], sdk: Sdk
) -> None:
    _, small = sims
    with run_sims(
        2, served_name="llama", args=["--sim-ttft-base", "0.002", "--sim-itl", "0.0005"]
    ) as own:
        table = {
            "models": [
                model(
                    "llama",
                    [("stable", 100, [addr(s) for s in own])],
                    fallbacks=[{"model": "small"}],
                    circuitBreaker={"consecutiveFailures": 2, "cooldown": 30},
                ),
                model("small", [("stable", 100, [addr(small)])]),
            ]
        }
        gateway.start(table)
        c = sdk(gateway)
        first = await c.chat.completions.create(model="llama", messages=MSG, max_tokens=4)
        assert first.model == "llama"
        for s in own:
            s.stop()
        before_small = served(small)
        # One at a time first: each dead backend fails twice, then its breaker opens.
        answers = await run_load(c, "llama", 5, 1)
        assert gateway.metric("llm_gateway_attempt_failures_total", model="llama") == 4
        answers += await run_load(c, "llama", 35, 4)
    assert len(answers) == 40
    # Answered by the fallback model, which says so in "model".
    assert {a.model for a in answers} == {"small"}
    assert served(small) - before_small == 40
    assert gateway.metric("llm_gateway_fallbacks_total", model="llama", target="model:small") == 40
    # The breakers are open: no later request paid for a connect attempt.
    assert gateway.metric("llm_gateway_attempt_failures_total", model="llama") == 4


@pytest.mark.parametrize("injected", ["500", "429"])
async def test_injected_errors_fall_back(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], injected: str, sdk: Sdk
) -> None:
    llama, small = sims
    stable = llama[0]
    gateway.start(
        {
            "models": [
                model("llama", [("stable", 100, [addr(stable)])], fallbacks=[{"model": "small"}]),
                model("small", [("stable", 100, [addr(small)])]),
            ]
        }
    )
    stable.admin(**{f"error_rate_{injected}": 1.0, "retry_after": 5})
    # One at a time, so the count of attempts on the failing backend is exact.
    answers = await run_load(sdk(gateway), "llama", 20, 1)
    assert {a.model for a in answers} == {"small"}
    reason = "5xx" if injected == "500" else "429"
    assert gateway.metric("llm_gateway_fallbacks_total", model="llama", reason=reason) >= 1
    tried = gateway.metric(
        "llm_gateway_attempt_failures_total", backend=addr(stable), reason=reason
    )
    if injected == "429":
        # 429 means busy now: after the first one the backend is left alone for Retry-After.
        assert tried == 1
    else:
        # 5xx: the breaker (3 consecutive failures by default) stops the bleeding.
        assert tried == 3


async def test_external_endpoint_gets_the_key_and_the_rewritten_model(
    gateway: GatewayProc, external_sim: SimProcess, tmp_path: Path, sdk: Sdk
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(EXT_KEY + "\n")
    fake = await FakeBackend("ext").start()
    try:
        table = {
            "models": [
                model(
                    "llama",
                    [("stable", 100, [dead_address()])],
                    fallbacks=[
                        {
                            "url": f"http://127.0.0.1:{external_sim.port}/v1",
                            "targetModel": "ext-model",
                            "apiKeyFile": str(key_file),
                        },
                    ],
                ),
                model(
                    "other",
                    [("stable", 100, [dead_address()])],
                    fallbacks=[
                        {
                            "url": f"http://127.0.0.1:{fake.port}/v1",
                            "targetModel": "vendor/model-x",
                            "apiKeyEnv": "EXT_API_KEY",
                        }
                    ],
                ),
            ]
        }
        gateway.start(table, env={"EXT_API_KEY": "sk-from-env"})
        c = sdk(gateway)
        # The simulator requires the key (401 without it) and serves only ext-model (404).
        r = await c.chat.completions.create(model="llama", messages=MSG, max_tokens=4)
        assert r.model == "ext-model" and r.choices[0].message.content
        # The fake provider shows exactly what arrived.
        r2 = await c.chat.completions.create(model="other", messages=MSG, max_tokens=4)
        assert r2.choices[0].message.content == "hello from ext"
        seen = fake.seen[-1]
        assert seen.path == "/v1/chat/completions"
        assert seen.headers["Authorization"] == "Bearer sk-from-env"
        assert seen.body["model"] == "vendor/model-x"
        assert seen.body["messages"] == MSG
    finally:
        await fake.stop()
    gateway.stop()
    logs = gateway.log_path.read_text() + gateway.access_path.read_text()
    assert EXT_KEY not in logs and "sk-from-env" not in logs
    # Access lines exist, and carry no prompt text.
    assert '"model":"llama"' in logs and "Hello there" not in logs


def _normalize(raw: bytes) -> bytes:
    return re.sub(rb'"created":\s*\d+', b'"created":0', raw)


async def test_streaming_passes_through_byte_for_byte(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], sdk: Sdk
) -> None:
    llama, _ = sims
    sim = llama[0]
    gateway.start({"models": [model("llama", [("stable", 100, [addr(sim)])])]})
    body = {"model": "llama", "messages": MSG, "stream": True, "max_tokens": 12, "ignore_eos": True}
    raws: list[bytes] = []
    async with httpx.AsyncClient(timeout=10) as h:
        for base in (sim.base_url, gateway.url):
            # Same request id on both paths, so the only difference left is the timestamp.
            async with h.stream(
                "POST", base + "/v1/chat/completions", json=body, headers={"x-request-id": "same"}
            ) as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/event-stream")
                raws.append(b"".join([chunk async for chunk in resp.aiter_raw()]))
    direct, via = raws
    assert direct.count(b"data: ") >= 12
    assert _normalize(via) == _normalize(direct)
    # And the SDK reads it as a stream.
    stream = await sdk(gateway).chat.completions.create(
        model="llama", messages=MSG, stream=True, max_tokens=5
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text


async def test_streaming_exact_bytes_from_a_deterministic_backend(gateway: GatewayProc) -> None:
    fake = await FakeBackend("b", chunks=20).start()
    try:
        gateway.start({"models": [model("m", [("stable", 100, [fake.address])])]})
        body = {"model": "m", "messages": MSG, "stream": True}
        raws = []
        async with httpx.AsyncClient(timeout=10) as h:
            for base in (f"http://{fake.address}", gateway.url):
                async with h.stream("POST", base + "/v1/chat/completions", json=body) as resp:
                    raws.append(b"".join([c async for c in resp.aiter_raw()]))
        assert raws[0] == raws[1]
        assert raws[0].endswith(b"data: [DONE]\n\n")
    finally:
        await fake.stop()


async def test_first_chunk_is_not_delayed_on_reused_connections(gateway: GatewayProc) -> None:
    """sglang-router's bug: without TCP_NODELAY a small SSE chunk on a reused connection
    waits for the peer's delayed ACK (~40 ms). Chunks sent 30 ms apart must arrive so."""
    fake = await FakeBackend("slow", chunks=4, delay=0.03).start()
    try:
        gateway.start({"models": [model("m", [("stable", 100, [fake.address])])]})
        body = {"model": "m", "messages": MSG, "stream": True}
        gaps: list[float] = []
        async with httpx.AsyncClient(timeout=10) as h:
            for _ in range(5):  # one client connection, one upstream connection, reused
                t0 = time.monotonic()
                async with h.stream("POST", gateway.url + "/v1/chat/completions", json=body) as r:
                    async for _chunk in r.aiter_raw():
                        now = time.monotonic()
                        gaps.append(now - t0)
                        t0 = now
        # Every chunk follows the previous one by the backend's 30 ms, not 30 + 40.
        late = [g for g in gaps if g > 0.03 + 0.025]
        assert len(late) <= 1, [round(g * 1000, 1) for g in gaps]
    finally:
        await fake.stop()


async def test_backend_dying_mid_stream_ends_with_an_error_event_not_a_second_answer(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], sdk: Sdk
) -> None:
    llama, small = sims
    a, b = llama[0], llama[1]
    gateway.start(
        {
            "models": [
                model(
                    "llama", [("stable", 100, [addr(a), addr(b)])], fallbacks=[{"model": "small"}]
                ),
                model("small", [("stable", 100, [addr(small)])]),
            ]
        }
    )
    before = [served(s) for s in (a, b, small)]
    body = {"model": "llama", "messages": MSG, "stream": True, "max_tokens": 30, "ignore_eos": True}
    async with (
        httpx.AsyncClient(timeout=10) as h,
        h.stream(
            "POST",
            gateway.url + "/v1/chat/completions",
            json=body,
            headers={"x-sim-fail": "disconnect-after:3"},
        ) as resp,
    ):
        assert resp.status_code == 200
        raw = b"".join([c async for c in resp.aiter_bytes()])
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    assert len(events) == 4, raw
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert "error" in last and "mid-stream" in last["error"]["message"]
    assert b"[DONE]" not in raw
    # One response only: every earlier event is from the same stream, and no other backend
    # (nor the fallback) was asked to start over.
    ids = {json.loads(e.removeprefix(b"data: "))["id"] for e in events[:-1]}
    assert len(ids) == 1
    await asyncio.sleep(0.2)
    after = [served(s) for s in (a, b, small)]
    assert after[2] == before[2]
    assert (after[0] - before[0]) + (after[1] - before[1]) <= 1
    assert gateway.metric("llm_gateway_fallbacks_total") == 0
    assert gateway.metric("llm_gateway_requests_total", outcome="stream_error") == 1
    # The SDK surfaces it as an error, after the tokens it already got.
    stream = await sdk(gateway).chat.completions.create(
        model="llama",
        messages=MSG,
        stream=True,
        max_tokens=30,
        extra_body={"ignore_eos": True},
        extra_headers={"x-sim-fail": "disconnect-after:3"},
    )
    got = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        async for chunk in stream:
            got.append(chunk)
    assert 1 <= len(got) <= 3


async def test_circuit_opens_and_recovers(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], sdk: Sdk
) -> None:
    llama, _ = sims
    good, bad = llama[0], llama[1]
    gateway.start(
        {
            "models": [
                model(
                    "llama",
                    [("stable", 100, [addr(good), addr(bad)])],
                    circuitBreaker={"consecutiveFailures": 3, "cooldown": 3.0},
                )
            ]
        }
    )
    bad.admin(error_rate_500=1.0)
    c = sdk(gateway)
    answers = await run_load(c, "llama", 30, 1)
    # Every client got an answer: failed attempts were retried on the good backend at once.
    assert len(answers) == 30
    state = gateway.metric("llm_gateway_circuit_state", backend=addr(bad))
    assert state == 1
    assert gateway.metric("llm_gateway_attempt_failures_total", backend=addr(bad)) == 3
    # Heal the backend; after the cooldown one probe closes the circuit again.
    bad.admin(error_rate_500=0.0)
    before = served(bad)
    await asyncio.sleep(3.2)
    deadline = time.monotonic() + 10
    while gateway.metric("llm_gateway_circuit_state", backend=addr(bad)) != 0:
        assert time.monotonic() < deadline, "circuit did not close"
        await run_load(c, "llama", 4, 1)
    await run_load(c, "llama", 20, 2)
    assert served(bad) - before >= 5  # it takes traffic again


async def test_routing_table_change_under_load_loses_no_request(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], sdk: Sdk
) -> None:
    llama, _ = sims
    a, b, c3 = llama
    t1 = {"models": [model("llama", [("stable", 100, [addr(a)])])]}
    t2 = {"models": [model("llama", [("stable", 50, [addr(b)]), ("canary", 50, [addr(c3)])])]}
    gateway.start(t1)
    c = sdk(gateway)
    stop = asyncio.Event()
    done = 0
    errors: list[BaseException] = []

    async def worker() -> None:
        nonlocal done
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                await c.chat.completions.create(model="llama", messages=MSG, max_tokens=4)
                done += 1
            except Exception as e:  # collected and asserted below
                errors.append(e)

    workers = [asyncio.create_task(worker()) for _ in range(16)]
    await asyncio.sleep(1.0)
    before = [served(s) for s in llama]
    t0 = time.monotonic()
    await asyncio.to_thread(gateway.update, t2)
    applied = time.monotonic() - t0
    await asyncio.sleep(1.0)
    mid = [served(s) for s in llama]
    await asyncio.to_thread(gateway.update, t1)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*workers)
    assert not errors, errors[:3]
    assert done > 100
    assert applied < 2.0
    # After the switch the new backends took the traffic.
    assert mid[1] - before[1] > 10 and mid[2] - before[2] > 10


async def test_first_byte_timeout_and_saturation_fall_back(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], sdk: Sdk
) -> None:
    llama, small = sims
    slow = llama[0]
    gateway.start(
        {
            "models": [
                model(
                    "llama",
                    [("stable", 100, [addr(slow)])],
                    fallbacks=[{"model": "small"}],
                    timeouts={"firstByte": 0.5},
                    maxConcurrency=1,
                    circuitBreaker={"consecutiveFailures": 100},
                ),
                model("small", [("stable", 100, [addr(small)])]),
            ]
        }
    )
    slow.admin(hang=True)
    c = sdk(gateway)
    t0 = time.monotonic()
    first, second = await asyncio.gather(
        c.chat.completions.create(model="llama", messages=MSG, max_tokens=4),
        c.chat.completions.create(model="llama", messages=MSG, max_tokens=4),
    )
    assert first.model == second.model == "small"
    assert time.monotonic() - t0 < 3
    assert gateway.metric("llm_gateway_fallbacks_total", reason="timeout") == 1
    assert gateway.metric("llm_gateway_fallbacks_total", reason="saturated") == 1


async def test_edge_errors(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], sdk: Sdk
) -> None:
    import hashlib

    llama, _ = sims
    key = "sk-client-1"
    gateway.start(
        {
            "models": [
                model("llama", [("stable", 100, [addr(llama[0])])]),
                model("down", [("stable", 100, [dead_address()])], retryAfter=7),
            ],
            "edge": {
                "maxRequestBytes": 4096,
                "apiKeys": [
                    {
                        "name": "team-a",
                        "sha256": hashlib.sha256(key.encode()).hexdigest(),
                        "limits": {"requestsPerSecond": 0.05, "burst": 3},
                    }
                ],
            },
        }
    )
    ok = sdk(gateway, key)
    with pytest.raises(openai.AuthenticationError):
        await sdk(gateway).chat.completions.create(model="llama", messages=MSG)
    with pytest.raises(openai.NotFoundError) as nf:
        await ok.chat.completions.create(model="nope", messages=MSG)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.InternalServerError) as down:
        await ok.chat.completions.create(model="down", messages=MSG)
    assert down.value.status_code == 503
    assert down.value.response.headers["retry-after"] == "7"
    status, _, _ = gateway.post(
        "/v1/chat/completions",
        json.dumps(
            {"model": "llama", "messages": [{"role": "user", "content": "x" * 5000}]}
        ).encode(),
        {"Authorization": f"Bearer {key}"},
    )
    assert status == 413
    models = await ok.models.list()
    assert sorted(m.id for m in models.data) == ["down", "llama"]
    # The burst of 3: the 503 and two answers (the 401, 404, 413 and the model list are
    # not routed and do not count); the next request is over the key's limit.
    for _ in range(2):
        await ok.chat.completions.create(model="llama", messages=MSG, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as rl:
        await ok.chat.completions.create(model="llama", messages=MSG, max_tokens=2)
    assert int(rl.value.response.headers["retry-after"]) >= 1
    assert rl.value.code == "rate_limit_exceeded"
    assert "requests per second" in rl.value.message


async def test_completions_endpoint_and_model_listing(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], sdk: Sdk
) -> None:
    llama, small = sims
    gateway.start(
        {
            "models": [
                model("llama", [("stable", 100, [addr(llama[0])])]),
                model("small", [("stable", 100, [addr(small)])]),
            ]
        }
    )
    c = sdk(gateway)
    r = await c.completions.create(model="small", prompt="Once upon a time", max_tokens=4)
    assert r.model == "small" and r.choices[0].text
    stream = await c.completions.create(model="llama", prompt="Hi", max_tokens=4, stream=True)
    assert "".join([ch.choices[0].text async for ch in stream if ch.choices])
    assert sorted(m.id for m in (await c.models.list()).data) == ["llama", "small"]
    assert (await c.models.retrieve("llama")).id == "llama"
    assert gateway.get("/health")[:2] == (200, b"ok")


async def test_starts_without_a_table_and_serves_it_once_the_operator_writes_it(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], sdk: Sdk
) -> None:
    _, small = sims
    gateway.start(None)
    status, body, _ = gateway.get("/v1/models")
    assert status == 200 and json.loads(body)["data"] == []
    with pytest.raises(openai.NotFoundError):
        await sdk(gateway).chat.completions.create(model="small", messages=MSG, max_tokens=4)
    gateway.update({"models": [model("small", [("stable", 100, [addr(small)])])]})
    answer = await sdk(gateway).chat.completions.create(model="small", messages=MSG, max_tokens=4)
    assert answer.choices[0].message.content


async def test_a_canary_error_that_a_retry_hides_still_counts_against_the_canary(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], sdk: Sdk
) -> None:
    """Canary analysis reads failed attempts by track: the client got the stable's answer,
    the canary's 500 is still on the canary's books."""
    llama, _ = sims
    stable, canary = llama[0], llama[1]
    gateway.start(
        {
            "models": [
                model("llama", [("stable", 50, [addr(stable)]), ("canary", 50, [addr(canary)])])
            ]
        }
    )
    canary.admin(error_rate_500=1.0)
    answers = await run_load(sdk(gateway), "llama", 10, 1)
    assert len(answers) == 10  # every one answered, by the stable
    failed = gateway.metric(
        "llm_gateway_attempt_failures_total", track="canary", backend=addr(canary), reason="5xx"
    )
    assert failed >= 1
    assert gateway.metric("llm_gateway_attempt_failures_total", track="stable") == 0
    assert gateway.metric("llm_gateway_requests_total", track="canary", outcome="success") == 0


async def test_requests_waiting_for_a_slot_count_as_held_demand(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], sdk: Sdk
) -> None:
    """With maxConcurrency the gateway queues the excess itself, where vLLM's own
    num_requests_waiting never sees it: llm_gateway_requests_held counts it, so the KEDA query
    (engines' queue + held) still sees the demand."""
    llama, _ = sims
    slow = llama[0]
    gateway.start(
        {
            "models": [
                model(
                    "llama",
                    [("stable", 100, [addr(slow)])],
                    maxConcurrency=1,
                    saturationQueueDepth=10,
                    fallbackOn=["connectError"],
                )
            ]
        }
    )
    slow.admin(itl=0.2)
    c = sdk(gateway)
    tasks = [
        asyncio.ensure_future(c.chat.completions.create(model="llama", messages=MSG, max_tokens=8))
        for _ in range(4)
    ]
    deadline = time.monotonic() + 10
    held = 0.0
    while time.monotonic() < deadline and held < 3:
        await asyncio.sleep(0.1)
        held = gateway.metric("llm_gateway_requests_held", model="llama")
    assert held == 3  # one runs on the only slot, three wait at the gateway
    await asyncio.gather(*tasks)
    assert gateway.metric("llm_gateway_requests_held", model="llama") == 0
