"""Unit tests of resumed streams' bookkeeping (`gateway/resume.py`): no sockets."""

from __future__ import annotations

import json
from typing import Any

from llm_operator.gateway.bodyscan import scan
from llm_operator.gateway.resume import CHAT_PATH, COMPLETIONS_PATH, Resume, resumable


def _resume(path: bytes, body: dict[str, Any]) -> Resume:
    r = resumable(path, scan(json.dumps(body).encode()))
    assert r is not None
    return r


def _chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    delta.update(extra)
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    obj = {"id": "chatcmpl-1", "created": 7, "model": "m", "choices": [choice]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def test_only_streamed_single_choice_text_requests_are_resumable() -> None:
    def can(path: bytes, body: dict[str, Any]) -> bool:
        return resumable(path, scan(json.dumps(body).encode())) is not None

    assert can(CHAT_PATH, CHAT)
    assert not can(CHAT_PATH, {**CHAT, "stream": False})
    assert not can(CHAT_PATH, {**CHAT, "n": 2})
    assert not can(CHAT_PATH, {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert not can(b"/v1/embeddings", {**CHAT})
    text = {"model": "m", "prompt": "hi", "stream": True}
    assert can(COMPLETIONS_PATH, text) and can(COMPLETIONS_PATH, {**text, "prompt": ["hi"]})
    assert not can(COMPLETIONS_PATH, {**text, "prompt": [1, 2, 3]})
    assert not can(COMPLETIONS_PATH, {**text, "echo": True})


def test_partial_events_wait_for_their_end_and_a_continuation_drops_its_role_chunk() -> None:
    r = _resume(CHAT_PATH, CHAT)
    first = _chunk("", role="assistant") + _chunk(" Hel")
    assert r.feed(first[:10]) == b""
    out = r.feed(first[10:] + _chunk("lo")[:20])
    assert out.count(b"data: ") == 2 and r.text == " Hel" and r.sent == 1
    r.begin()  # the backend failed: its partial event is never sent
    r.resumes += 1
    other = _chunk("", role="assistant").replace(b"chatcmpl-1", b"chatcmpl-2")
    assert r.feed(other) == b""
    out = r.feed(_chunk("lo", "stop").replace(b'"created": 7', b'"created": 9'))
    event = json.loads(out[6:])
    assert (event["id"], event["created"]) == ("chatcmpl-1", 7)
    assert r.text == " Hello" and r.finished and r.sent == 2


def test_the_continuation_carries_the_text_and_the_tokens_left() -> None:
    r = _resume(CHAT_PATH, {**CHAT, "max_completion_tokens": 10, "max_tokens": 12, "min_tokens": 3})
    first = json.loads(r.body("m"))
    assert first["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert "continue_final_message" not in first
    usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    r.feed(_chunk(" abc").replace(b"}]}", b'}], "usage": ' + json.dumps(usage).encode() + b"}"))
    assert r.sent == 4 and r.prompt_tokens == 5
    body = json.loads(r.body("spare"))
    assert body["model"] == "spare"
    assert body["messages"][-1] == {"role": "assistant", "content": " abc"}
    assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)
    assert (body["max_completion_tokens"], body["max_tokens"], body["min_tokens"]) == (6, 8, 0)
    # The client's own final assistant message is extended, not repeated.
    own = [*CHAT["messages"], {"role": "assistant", "content": "Sure:"}]
    r = _resume(CHAT_PATH, {**CHAT, "messages": own, "continue_final_message": True})
    r.feed(_chunk(" yes"))
    body = json.loads(r.body("m"))
    assert body["messages"][-1] == {"role": "assistant", "content": "Sure: yes"}
    assert len(body["messages"]) == 2
    # Completions: the prompt grows, max_tokens (vLLM's default 16 when unset) shrinks.
    r = _resume(COMPLETIONS_PATH, {"model": "m", "prompt": "Go", "stream": True})
    r.feed(b'data: {"id":"c","created":1,"model":"m","choices":[{"index":0,"text":" on"}]}\n\n')
    body = json.loads(r.body("m"))
    assert (body["prompt"], body["max_tokens"]) == ("Go on", 15)


def test_an_error_event_fails_the_attempt_and_its_done_is_held_back() -> None:
    r = _resume(CHAT_PATH, CHAT)
    r.feed(_chunk(" a"))
    out = r.feed(b'data: {"error": {"message": "engine died", "code": 500}}\n\ndata: [DONE]\n\n')
    assert out == b"" and r.error == "engine died" and not r.done


def test_usage_is_what_the_client_asked_for_and_counts_every_token_sent() -> None:
    r = _resume(CHAT_PATH, {**CHAT, "stream_options": {"include_usage": True}})
    u = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    with_usage = _chunk(" ab").replace(b"}]}", b'}], "usage": ' + json.dumps(u).encode() + b"}")
    assert b"usage" not in r.feed(with_usage)  # the per-chunk usage was the gateway's
    r.begin()
    r.resumes += 1
    final = {
        "id": "x",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": {**u, "prompt_tokens": 9},
    }
    out = r.feed(b"data: " + json.dumps(final).encode() + b"\n\n")
    assert json.loads(out[6:])["usage"] == {
        "prompt_tokens": 5,  # the original request's, not the continuation's
        "total_tokens": 9,
        "completion_tokens": 4,
    }
    # A backend that failed after the last token: the gateway owes only the ending.
    r = _resume(CHAT_PATH, {**CHAT, "stream_options": {}})
    r.feed(_chunk(" a") + _chunk("", "stop"))
    ending = r.ending().split(b"\n\n")
    assert json.loads(ending[0][6:])["usage"]["completion_tokens"] == 2
    assert ending[1] == b"data: [DONE]"
