"""A corpus of malformed HTTP and JSON against the gateway in-process (issue 17's "bad
input" drill): every request gets one clear answer (or, when not even its head can be
parsed, a 400 and a closed connection), never a 500, never a traceback, never two answers,
and the gateway keeps serving afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway.test_gateway_wire import Env, post, raw_exchange, table

pytestmark = [pytest.mark.timeout(120), pytest.mark.drill]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = Env()
    try:
        yield e
    finally:
        await e.close()


H = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"

# (name, bytes on the wire): each is one request a client could send.
HTTP_CORPUS: list[tuple[str, bytes]] = [
    ("no-http-version", b"POST /v1/chat/completions\r\n\r\n"),
    ("bad-method-chars", b"P@ST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("http-2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("http-0.9", b"GET /\r\n"),
    ("space-in-header-name", H + b"content length: 2\r\n\r\n{}"),
    ("no-colon-header", H + b"content-length 2\r\n\r\n{}"),
    ("negative-length", H + b"content-length: -1\r\n\r\n"),
    ("non-numeric-length", H + b"content-length: ten\r\n\r\n"),
    ("two-lengths", H + b"content-length: 2\r\ncontent-length: 3\r\n\r\n{}"),
    ("length-and-chunked", H + b"content-length: 2\r\ntransfer-encoding: chunked\r\n\r\n{}"),
    ("bad-chunk-size", H + b"transfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
    ("huge-chunk-size", H + b"transfer-encoding: chunked\r\n\r\nffffffffffffffff\r\n{}"),
    ("nul-in-path", b"POST /v1/chat\x00/completions HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("nul-in-header", H + b"x-a: b\x00c\r\ncontent-length: 2\r\n\r\n{}"),
    ("bare-lf-lines", b"POST /v1/chat/completions HTTP/1.1\nhost: x\ncontent-length: 2\n\n{}"),
    ("obs-fold", H + b"x-a: b\r\n c\r\ncontent-length: 2\r\n\r\n{}"),
    ("unknown-te", H + b"transfer-encoding: gzip\r\n\r\n{}"),
]

JSON_CORPUS: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not-json", b"hello"),
    ("array", b'[{"model":"m"}]'),
    ("string", b'"m"'),
    ("null", b"null"),
    ("model-number", b'{"model":7}'),
    ("model-null", b'{"model":null}'),
    ("model-object", b'{"model":{"name":"m"}}'),
    ("model-empty", b'{"model":""}'),
    ("no-model", b'{"messages":[]}'),
    ("invalid-utf8", b'{"model":"\xff\xfe"}'),
    ("lone-surrogate", b'{"model":"\\ud800"}'),
    ("trailing-garbage", b'{"model":"nope"}garbage'),
    ("truncated", b'{"model":"m","messages":[{"role":'),
    ("deep-arrays", b'{"model":' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("deep-objects", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    ("nan", b'{"model":"nope","temperature":NaN}'),
    ("huge-number", b'{"model":"nope","max_tokens":' + b"9" * 5000 + b"}"),
    ("duplicate-model", b'{"model":"m","model":"nope"}'),
    ("escaped-model", b'{"model":"\\u006d"}'),
]


def one_response(out: bytes) -> tuple[int, bytes]:
    """(status, body) of the single response in `out`; fails on none or more than one."""
    heads = re.findall(rb"HTTP/1\.1 (\d{3}) ", out)
    assert len(heads) == 1, out[:600]
    _, _, body = out.partition(b"\r\n\r\n")
    return int(heads[0]), body


async def answers_health(env: Env) -> None:
    out = await env.raw(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n", wait=3, until_close=False)
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]


@pytest.mark.parametrize(("name", "data"), HTTP_CORPUS, ids=[n for n, _ in HTTP_CORPUS])
async def test_malformed_http_gets_one_clear_answer(
    env: Env, name: str, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await env.gateway(table("127.0.0.1:1"))
    with caplog.at_level(logging.ERROR, logger="llm_operator.gateway"):
        out = await env.raw(data, wait=1)
    if out:  # a client may also just be disconnected, but never answered twice
        status, body = one_response(out)
        assert 400 <= status < 500 or status == 503, (name, out[:300])
        if status != 503:
            assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert gw.in_flight == 0
    await answers_health(env)


@pytest.mark.parametrize(("name", "body"), JSON_CORPUS, ids=[n for n, _ in JSON_CORPUS])
async def test_malformed_json_gets_one_clear_answer(
    env: Env, name: str, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # The table's model "m" has no live backend: a body that names it is routed (503), one
    # that names another model is a 404, one without a usable model a 400.
    gw = await env.gateway(table("127.0.0.1:1"))
    with caplog.at_level(logging.ERROR, logger="llm_operator.gateway"):
        out = await env.raw(post(body), wait=3, until_close=False)
    status, answer = one_response(out)
    assert status in (400, 404, 503), (name, out[:300])
    error = json.loads(answer)["error"]
    assert error["message"] and error["type"] in ("invalid_request_error", "server_error")
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert gw.in_flight == 0


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_any_body_gets_one_answer(body: bytes) -> None:
    async def run() -> tuple[bytes, int]:
        wire = Env()
        try:
            gw = await wire.gateway(table("127.0.0.1:1"))
            out = await asyncio.to_thread(raw_exchange, wire.port, post(body), 3.0, False)
            return out, gw.in_flight
        finally:
            await wire.close()

    out, in_flight = asyncio.run(run())
    status, answer = one_response(out)
    assert status in (400, 404, 503), out[:300]
    assert "error" in json.loads(answer)
    assert in_flight == 0
