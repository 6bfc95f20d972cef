"""Edge settings through the real gateway process, the simulator and the OpenAI SDK: client
keys from a directory (a mounted Secret) and their rotation, token budgets counted from the
answers' usage, concurrency per key, per-model budgets, header limits and the audit log."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from llm_operator.api.gateway_config import ClientLimits
from llm_operator.gateway.limits import Budget, retry_after
from tests.gateway.conftest import GatewayProc, Sdk, addr
from tests.support.sim import SimProcess

pytestmark = pytest.mark.timeout(60)

MSG = [{"role": "user", "content": "Hello there"}]


# -- the budgets themselves ----------------------------------------------------------------


def test_token_budget_admits_while_above_zero_and_refills() -> None:
    b = Budget("a", ClientLimits(tokens_per_minute=600), now=0.0)
    assert b.wait(0.0) == (0.0, "")
    b.take()
    b.finish(900, now=0.0)  # one long answer takes the budget below zero
    wait, why = b.wait(0.0)
    # 600 per minute = 10 per second: from -300 to above 0 takes just over 30 s.
    assert why == "600 tokens per minute" and wait == pytest.approx(30.1)
    assert b.wait(29.0)[0] > 0
    assert b.wait(30.2) == (0.0, "")
    assert retry_after(wait) == 31


def test_concurrency_budget_counts_requests_in_flight() -> None:
    b = Budget("a", ClientLimits(max_concurrent_requests=2), now=0.0)
    for _ in range(2):
        assert b.wait(0.0)[0] == 0
        b.take()
    assert b.wait(0.0) == (1.0, "2 concurrent requests")
    b.finish(0, now=0.1)
    assert b.wait(0.1)[0] == 0


def test_refused_request_costs_the_other_budgets_nothing() -> None:
    # `wait` never takes: only `take` (after every budget agreed) uses the request rate.
    b = Budget("a", ClientLimits(requests_per_second=1, burst=1), now=0.0)
    for _ in range(5):
        assert b.wait(0.0)[0] == 0
    b.take()
    assert b.wait(0.0)[0] == pytest.approx(1.0)


# -- through the gateway -------------------------------------------------------------------


def write_keys(root: Path, keys: dict[str, str]) -> Path:
    """A directory laid out as a mounted Secret: files are links into `..data`, and an
    update swaps `..data` to a new timestamped directory."""
    root.mkdir(exist_ok=True)
    version = root / f"..{time.monotonic_ns()}"
    version.mkdir()
    for name, key in keys.items():
        (version / name).write_text(key)
    tmp = root / "..data_tmp"
    os.symlink(version.name, tmp)
    os.replace(tmp, root / "..data")
    for name in keys:
        link = root / name
        if not link.is_symlink():
            os.symlink(f"..data/{name}", link)
    for stale in root.iterdir():
        if stale.is_symlink() and stale.name not in keys and not stale.name.startswith(".."):
            stale.unlink()
    return root


def start_with_edge(
    gateway: GatewayProc, sim: SimProcess, edge: dict[str, Any], **route: Any
) -> Path:
    edge_file = gateway.root / "edge.yaml"
    edge_file.write_text(yaml.safe_dump(edge))
    table = {
        "models": [
            {
                "name": "llama",
                "tracks": [{"name": "stable", "weight": 100, "addresses": [addr(sim)]}],
                **route,
            }
        ],
        # The edge file replaces this: a key here must not be let in.
        "edge": {"apiKeys": [{"name": "table-key", "sha256": "0" * 64}]},
    }
    gateway.start(table, "--edge", str(edge_file))
    return edge_file


async def until_let_in(sdk: Sdk, gateway: GatewayProc, key: str, within: float = 5.0) -> None:
    """Until the gateway takes `key` (a changed key file is read by a poll), bounded."""
    deadline = time.monotonic() + within
    while True:
        try:
            await sdk(gateway, key).models.list()
            return
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, f"the key was not taken within {within} s"
            await asyncio.sleep(0.1)


def audit_lines(gateway: GatewayProc, count: int) -> list[dict[str, Any]]:
    """The access log's lines once there are `count` (it is written in batches)."""
    deadline = time.monotonic() + 5
    while True:
        text = gateway.access_path.read_text()
        lines = [json.loads(line) for line in text.splitlines() if '"msg":"request"' in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


async def test_keys_from_a_directory_rotate_without_a_restart(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], tmp_path: Path, sdk: Sdk
) -> None:
    llama, _ = sims
    keys = write_keys(tmp_path / "clients", {"team-a": "sk-a-1", "team-b": "sk-b-1"})
    start_with_edge(gateway, llama[0], {"keysDir": str(keys)})
    for key in ("sk-a-1", "sk-b-1"):
        r = await sdk(gateway, key).chat.completions.create(model="llama", messages=MSG)
        assert r.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        await sdk(gateway, "sk-wrong").chat.completions.create(model="llama", messages=MSG)
    with pytest.raises(openai.AuthenticationError):
        await sdk(gateway, "table-key").models.list()

    write_keys(keys, {"team-a": "sk-a-2", "team-b": "sk-b-1"})  # team-a's key rotated
    await until_let_in(sdk, gateway, "sk-a-2")
    with pytest.raises(openai.AuthenticationError):
        await sdk(gateway, "sk-a-1").models.list()
    await sdk(gateway, "sk-b-1").models.list()
    assert "sk-a" not in gateway.log_path.read_text()


async def test_a_key_over_its_token_budget_gets_429_and_others_go_on(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], tmp_path: Path, sdk: Sdk
) -> None:
    llama, _ = sims
    keys = write_keys(tmp_path / "clients", {"team-a": "sk-a", "team-b": "sk-b"})
    start_with_edge(
        gateway,
        llama[0],
        {"keysDir": str(keys), "keyLimits": {"team-a": {"tokensPerMinute": 40}}},
    )
    a, b = sdk(gateway, "sk-a"), sdk(gateway, "sk-b")
    used = 0
    # Streams without include_usage are counted too: the gateway asks for the usage block
    # and keeps it from the client.
    for _ in range(10):
        try:
            stream = await a.chat.completions.create(
                model="llama", messages=MSG, max_tokens=16, stream=True
            )
        except openai.RateLimitError as e:
            refused = e
            break
        chunks = [c async for c in stream]
        assert all(c.choices for c in chunks), "a usage chunk the client did not ask for"
        assert all(c.usage is None for c in chunks)
        used += 1
    else:
        pytest.fail("team-a was never refused")
    assert 1 <= used <= 3
    assert refused.status_code == 429 and refused.code == "rate_limit_exceeded"
    assert refused.type == "rate_limit_error"
    assert "40 tokens per minute" in refused.message
    assert int(refused.response.headers["retry-after"]) >= 1
    for _ in range(5):  # team-b has no budget: unaffected
        r = await b.chat.completions.create(model="llama", messages=MSG, max_tokens=16)
        assert r.usage is not None and r.usage.completion_tokens > 0

    # A client that asks for usage gets it, once, from the engine.
    stream = await b.chat.completions.create(
        model="llama",
        messages=MSG,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert [c.usage is not None for c in chunks].count(True) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4

    lines = audit_lines(gateway, used + 7)
    assert len(lines) == used + 7, lines
    a_lines = [ln for ln in lines if ln["client"] == "team-a"]
    # One line per request, the refused one too.
    assert [ln["status"] for ln in a_lines] == [200] * used + [429]
    assert a_lines[-1]["outcome"] == "rejected" and a_lines[-1]["tokens_in"] is None
    for ln in lines:
        assert ln["model"] == "llama" and ln["fallback_path"] == []
        assert {"ts", "client", "backend", "track", "status", "tokens_in", "tokens_out"} <= set(ln)
    answered = [ln for ln in lines if ln["status"] == 200]
    assert all(ln["tokens_in"] > 0 and ln["tokens_out"] > 0 for ln in answered), answered
    assert lines[-1]["tokens_out"] == 4
    text = gateway.access_path.read_text()
    assert "sk-a" not in text and "sk-b" not in text and "Hello there" not in text


async def test_concurrency_per_key_and_budgets_per_model(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], tmp_path: Path, sdk: Sdk
) -> None:
    llama, _ = sims
    keys = write_keys(tmp_path / "clients", {"team-a": "sk-a", "team-b": "sk-b"})
    start_with_edge(
        gateway,
        llama[0],
        {"keysDir": str(keys), "defaultLimits": {"maxConcurrentRequests": 2}},
        clientLimits={"requestsPerSecond": 0.01, "burst": 3},
    )
    llama[0].admin(itl=0.1)  # slow answers (0.8 s): the four requests overlap
    a = sdk(gateway, "sk-a")

    async def one(client: openai.AsyncOpenAI) -> int:
        try:
            await client.chat.completions.create(model="llama", messages=MSG, max_tokens=8)
            return 200
        except openai.RateLimitError as e:
            assert "concurrent requests" in e.message or "on model `llama`" in e.message
            return 429

    statuses = await asyncio.gather(*(one(a) for _ in range(4)))
    assert sorted(statuses) == [200, 200, 429, 429], statuses
    # The model's burst of 3 per key: team-a spent 2; team-b has its own 3.
    b = sdk(gateway, "sk-b")
    assert [await one(b) for _ in range(3)] == [200, 200, 200]
    assert await one(b) == 429
    assert await one(a) == 200
    assert await one(a) == 429


async def test_header_limit_is_a_setting(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess]
) -> None:
    llama, _ = sims
    start_with_edge(gateway, llama[0], {"maxHeaderBytes": 2048})
    status, _, _ = gateway.post(
        "/v1/chat/completions",
        json.dumps({"model": "llama", "messages": MSG}).encode(),
        {"X-Big": "x" * 3000},
    )
    assert status == 431
    status, _, _ = gateway.post(
        "/v1/chat/completions", json.dumps({"model": "llama", "messages": MSG}).encode()
    )
    assert status == 200


async def test_an_empty_or_missing_keys_directory_lets_nobody_in(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], tmp_path: Path, sdk: Sdk
) -> None:
    llama, _ = sims
    start_with_edge(gateway, llama[0], {"keysDir": str(tmp_path / "not-there-yet")})
    with pytest.raises(openai.AuthenticationError):
        await sdk(gateway, "anything").chat.completions.create(model="llama", messages=MSG)
    write_keys(tmp_path / "not-there-yet", {"team-a": "sk-a"})  # the Secret arrives
    await until_let_in(sdk, gateway, "sk-a")


async def test_the_audit_log_can_go_to_a_file(
    gateway: GatewayProc, sims: tuple[list[SimProcess], SimProcess], tmp_path: Path, sdk: Sdk
) -> None:
    llama, _ = sims
    audit = tmp_path / "audit.log"
    table = {
        "models": [
            {
                "name": "llama",
                "tracks": [{"name": "stable", "weight": 100, "addresses": [addr(llama[0])]}],
            }
        ]
    }
    gateway.start(table, "--access-log-file", str(audit))
    await sdk(gateway, "none").chat.completions.create(model="llama", messages=MSG, max_tokens=2)
    deadline = time.monotonic() + 5
    while not (audit.exists() and '"msg":"request"' in audit.read_text()):
        assert time.monotonic() < deadline, "no audit line in the file within 5 s"
        time.sleep(0.05)
    [line] = [json.loads(x) for x in audit.read_text().splitlines()]
    assert line["model"] == "llama" and line["status"] == 200 and line["tokens_out"] == 2
    assert '"msg":"request"' not in gateway.access_path.read_text()  # not on stdout too
