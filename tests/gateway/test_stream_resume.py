"""Resumed streams (`resumeStreams`): a backend cut after N SSE events, the client's stream
goes on from the next route, and equals an uninterrupted answer token by token.

The real gateway in front of real simulators on 127.0.0.1: with a request `seed` the
simulator's answer depends only on the seed and the prompt, and it continues an answer
from a final assistant message (`continue_final_message`) or from the end of a prompt.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

from tests.gateway.conftest import GatewayProc, addr
from tests.support.sim import SimProcess

pytestmark = pytest.mark.timeout(60)

CHAT = {
    "model": "llama",
    "messages": [{"role": "user", "content": "Tell me a story"}],
    "stream": True,
    "seed": 11,
}
COMPLETION = {"model": "llama", "prompt": "Once upon a time", "stream": True, "seed": 5}


def events(body: bytes) -> list[Any]:
    """The SSE data events of a stream: parsed chunks, and "[DONE]"."""
    out: list[Any] = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def pieces(chunks: list[Any], chat: bool) -> list[str]:
    """Token by token: the text of every chunk that has choices."""
    out = []
    for c in chunks:
        if c == "[DONE]" or not c["choices"]:
            continue
        choice = c["choices"][0]
        out.append(choice["delta"].get("content", "") if chat else choice["text"])
    return out


def finish(chunks: list[Any]) -> list[str]:
    return [c["choices"][0]["finish_reason"] for c in chunks if c != "[DONE]" and c["choices"]]


def usage(chunks: list[Any]) -> list[dict[str, Any]]:
    return [c["usage"] for c in chunks if c != "[DONE]" and not c["choices"]]


def table(llama: list[SimProcess], resume: bool) -> dict[str, Any]:
    """llama: two backends (both cut), then a fallback model on the third simulator."""

    def route(name: str, addresses: list[str], **kw: Any) -> dict[str, Any]:
        tracks = [{"name": "stable", "weight": 100, "addresses": addresses}]
        return {
            "name": name,
            "tracks": tracks,
            "circuitBreaker": {"consecutiveFailures": 100},
            **kw,
        }

    return {
        "models": [
            route(
                "llama",
                [addr(llama[0]), addr(llama[1])],
                fallbacks=[{"model": "spare", "targetModel": "llama"}],
                resumeStreams=resume,
            ),
            route("spare", [addr(llama[2])]),
        ]
    }


def ask(gw: GatewayProc, path: str, body: dict[str, Any]) -> list[Any]:
    status, raw, headers = gw.post(path, json.dumps(body).encode())
    assert status == 200, raw
    assert headers["content-type"].startswith("text/event-stream")
    return events(raw)


def uninterrupted(sim: SimProcess, path: str, body: dict[str, Any]) -> list[Any]:
    """The same request straight to a simulator that is not cut."""
    req = urllib.request.Request(
        sim.base_url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return events(r.read())


@pytest.fixture
def cut(sims: tuple[list[SimProcess], SimProcess]) -> list[SimProcess]:
    """Long answers everywhere; the model's two backends cut after 4 and 9 events."""
    llama, _ = sims
    for s in llama:
        s.admin(output_tokens=40)
    llama[0].admin(disconnect_after=4)
    llama[1].admin(disconnect_after=9)
    return llama


@pytest.mark.parametrize(
    ("path", "body", "chat"),
    [
        ("/v1/chat/completions", CHAT, True),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 17}, True),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 30, "seed": 3}, True),
        ("/v1/completions", {**COMPLETION, "max_tokens": 33}, False),
        ("/v1/completions", {**COMPLETION, "max_tokens": 60, "seed": 8}, False),
    ],
    ids=["chat-stop", "chat-max-tokens", "chat-max-completion-tokens", "text-length", "text-stop"],
)
def test_a_cut_stream_resumes_and_equals_the_uninterrupted_one(
    gateway: GatewayProc, cut: list[SimProcess], path: str, body: dict[str, Any], chat: bool
) -> None:
    gateway.start(table(cut, resume=True))
    with_usage = {**body, "stream_options": {"include_usage": True}}
    ref = uninterrupted(cut[2], path, with_usage)
    got = ask(gateway, path, with_usage)

    assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
    assert pieces(got, chat) == pieces(ref, chat)  # no token lost or repeated
    assert "".join(pieces(got, chat)) == "".join(pieces(ref, chat))
    assert finish(got) == finish(ref)
    assert len(pieces(ref, chat)) > 12  # long enough to have been cut twice
    [u], [ref_u] = usage(got), usage(ref)
    assert u == ref_u  # the original prompt, every completion token
    chunks = [c for c in got if c != "[DONE]"]
    first = chunks[0]
    assert first["id"] != ref[0]["id"]
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {
        (first["id"], first["created"], "llama")
    }
    if chat:
        roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
        assert len(roles) == 1 and roles[0] is first
    # One client request, successful; two failed attempts, each charged to its backend.
    assert gateway.metric("llm_gateway_requests_total", model="llama", outcome="success") == 1
    for s in cut[:2]:
        failures = gateway.metric(
            "llm_gateway_attempt_failures_total",
            model="llama",
            backend=addr(s),
            track="stable",
            reason="connectError",
        )
        assert failures == 1
    assert gateway.metric("llm_gateway_fallbacks_total", model="llama", target="model:spare") == 1


def test_without_usage_asked_the_resumed_stream_has_none(
    gateway: GatewayProc, cut: list[SimProcess]
) -> None:
    gateway.start(table(cut, resume=True))
    ref = uninterrupted(cut[2], "/v1/chat/completions", CHAT)
    got = ask(gateway, "/v1/chat/completions", CHAT)
    assert pieces(got, True) == pieces(ref, True)
    assert usage(got) == []
    assert all("usage" not in c for c in got if c != "[DONE]")
    text = ask(gateway, "/v1/completions", {**COMPLETION, "max_tokens": 30})
    assert usage(text) == [] and all(c["usage"] is None for c in text if c != "[DONE]")


def test_off_a_cut_stream_ends_with_the_error_event(
    gateway: GatewayProc, cut: list[SimProcess]
) -> None:
    gateway.start(table(cut, resume=False))
    got = ask(gateway, "/v1/chat/completions", CHAT)
    assert "[DONE]" not in got
    assert "the backend failed mid-stream" in got[-1]["error"]["message"]
    assert gateway.metric("llm_gateway_requests_total", model="llama", outcome="stream_error") == 1


def test_when_no_route_can_continue_the_stream_ends_with_the_error_event(
    gateway: GatewayProc, cut: list[SimProcess]
) -> None:
    ref = uninterrupted(cut[2], "/v1/chat/completions", CHAT)
    cut[2].admin(disconnect_after=6)  # the fallback is cut too
    gateway.start(table(cut, resume=True))
    got = ask(gateway, "/v1/chat/completions", CHAT)
    assert "[DONE]" not in got
    assert "the backend failed mid-stream" in got[-1]["error"]["message"]
    # What came before the error is the answer's start: three routes' worth, no repeats.
    sent = pieces(got[:-1], True)
    assert sent == pieces(ref, True)[: len(sent)]
    assert len(sent) >= 4 + 9 + 6 - 3  # every route's events but the two role chunks dropped
    assert gateway.metric("llm_gateway_requests_total", model="llama", outcome="stream_error") == 1
    assert (
        gateway.metric(
            "llm_gateway_attempt_failures_total",
            model="llama",
            track="fallback",
            reason="connectError",
        )
        == 1
    )


def test_a_backend_cut_after_the_last_token_is_not_asked_again(
    gateway: GatewayProc, cut: list[SimProcess]
) -> None:
    # max_tokens 5: the role chunk, 4 tokens, the last token with its finish: 6 events.
    for s in cut[:2]:
        s.admin(disconnect_after=6)
    gateway.start(table(cut, resume=True))
    body = {**CHAT, "max_tokens": 5, "stream_options": {"include_usage": True}}
    ref = uninterrupted(cut[2], "/v1/chat/completions", body)
    before = cut[2].metric("vllm:request_success_total")
    got = ask(gateway, "/v1/chat/completions", body)
    assert pieces(got, True) == pieces(ref, True) and finish(got) == finish(ref)
    assert usage(got) == usage(ref) and got[-1] == "[DONE]"
    assert cut[2].metric("vllm:request_success_total") == before  # no continuation
    assert gateway.metric("llm_gateway_requests_total", model="llama", outcome="success") == 1
