"""The per-request objects the hot path builds field by field (`object.__new__`, no
`__init__`: a Python `__init__` is a frame entered from C, ~1k instructions a request) have
every field set: a field added to the class and forgotten at its build site fails here, not
as an AttributeError on some rare path in production."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llm_operator.gateway import fallback, streaming
from llm_operator.gateway.bodyscan import Scanned, scan
from llm_operator.gateway.request import Call, Request
from llm_operator.gateway.streaming import Try
from tests.gateway.test_gateway_wire import SSE_HEAD, Env, post, read_request, sse_chunk, table

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def wire() -> AsyncIterator[Env]:
    e = Env()
    try:
        yield e
    finally:
        await e.close()


def _slots(cls: type) -> list[str]:
    return [s for c in cls.__mro__ for s in getattr(c, "__slots__", ())]


def _unset(obj: object) -> list[str]:
    """The slots of `obj` that hold nothing (reading them would raise AttributeError)."""
    return [s for s in _slots(type(obj)) if not hasattr(obj, s)]


def test_slots_helper_sees_an_unset_field() -> None:
    # The check below must be able to fail: an object built with `object.__new__` and one
    # field left out is caught.
    sc = object.__new__(Scanned)
    sc.body, sc.model, sc.stream, sc.span = b"{}", "m", False, None
    assert _unset(sc) == ["obj"]


def test_the_fast_scan_sets_every_field_as_the_constructor_would() -> None:
    body = b'{"model": "m", "stream": true, "messages": []}'
    sc = scan(body)
    assert _unset(sc) == []
    assert (sc.body, sc.model, sc.stream, sc.obj) == (body, "m", True, None)
    assert body[sc.span[0] : sc.span[1]] == b'"m"' if sc.span else False


async def _captured(env: Env, answer: Any, body: bytes) -> dict[str, list[Any]]:
    """One request through the gateway; the objects its stages handed each other."""
    seen: dict[str, list[Any]] = {"call": [], "try": [], "head": []}
    mp = pytest.MonkeyPatch()

    def wrap(name: str, mod: Any) -> None:
        inner = getattr(mod, name)

        def spy(*a: Any) -> Any:
            if name == "_read_head":
                head = inner(*a)
                seen["head"].append(head)
                return head
            seen["call"].append(a[1])
            seen["try"].append(a[2])
            return inner(*a)

        mp.setattr(mod, name, spy)

    wrap("respond_complete", fallback)
    wrap("respond", fallback)
    wrap("_read_head", streaming)
    try:
        await env.gateway(table(await env.backend(answer)))
        out = await env.raw(post(body), wait=3, until_close=False)
        assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    finally:
        mp.undo()
    return seen


def _check(seen: dict[str, list[Any]]) -> None:
    assert seen["call"] and seen["try"] and seen["head"]
    for call in seen["call"]:
        assert isinstance(call, Call) and _unset(call) == []
        assert isinstance(call.req, Request) and _unset(call.req) == []
        assert _unset(call.scanned) == []
        assert call.step_model is call.model and call.t0 == call.req.start
        assert call.req.method == b"POST" and call.req.path == b"/v1/chat/completions"
        assert call.req.peer == "127.0.0.1" and call.req.keep_alive is True
    for t in seen["try"]:
        assert isinstance(t, Try) and _unset(t) == []
        assert t.ex is not None and _unset(t.ex) == []
    for head in seen["head"]:
        assert _unset(head) == []


async def test_a_whole_answer_builds_complete_objects(wire: Env) -> None:
    async def whole(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        b = b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}'
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        w.write(b"content-length: %d\r\n\r\n%b" % (len(b), b))
        await w.drain()
        await asyncio.sleep(1)

    seen = await _captured(wire, whole, b'{"model":"m"}')
    _check(seen)
    assert seen["call"][0].tokens_in == 3 and seen["call"][0].tokens_out == 4


async def test_a_stream_builds_complete_objects(wire: Env) -> None:
    async def stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(SSE_HEAD)
        await w.drain()
        await asyncio.sleep(0.05)  # the head alone first: the relay path, not the whole one
        w.write(sse_chunk(b'{"i":1}') + sse_chunk(b"[DONE]") + b"0\r\n\r\n")
        await w.drain()
        await asyncio.sleep(1)

    seen = await _captured(wire, stream, b'{"model":"m","stream":true}')
    _check(seen)
    assert seen["head"][0].sse is True
