"""Resuming a stream whose backend failed half-way (`resumeStreams` on the model's route).

A resumable request is a streamed chat or text completion with one choice. Its body is
parsed once; every attempt gets it with `stream_options.include_usage` and
`continuous_usage_stats` (vLLM's: every chunk then says how many tokens it has produced),
so the gateway knows exactly what it has sent. The client gets whole SSE events only,
each re-written: the first backend's `id`, `created` and `model` on every chunk, the usage
only where the client asked for it. When the backend fails before `[DONE]`, the next
route gets a continuation: the text sent so far as a final assistant message with
`continue_final_message: true, add_generation_prompt: false` (chat) or appended to the
prompt (completions), and `max_tokens` (`max_completion_tokens`, `min_tokens`) less the
tokens sent. The continuation's role chunk is dropped and its usage block is re-counted:
the original prompt's tokens, and every completion token the client got.

No I/O here: the relay in `streaming.py` feeds the backend's bytes in and writes what
comes out.
"""

from __future__ import annotations

import json
from typing import Any

from llm_operator.gateway.bodyscan import Scanned

CHAT_PATH = b"/v1/chat/completions"
COMPLETIONS_PATH = b"/v1/completions"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default for /v1/completions


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def resumable(path: bytes, scanned: Scanned) -> Resume | None:
    """The state of a request whose stream may be resumed, or None when it cannot be."""
    chat = path == CHAT_PATH
    if not scanned.stream or not (chat or path == COMPLETIONS_PATH):
        return None
    obj = scanned.obj
    if obj is None:
        try:
            obj = json.loads(scanned.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
    return Resume(obj, chat) if _fits(obj, chat) else None


def _fits(obj: Any, chat: bool) -> bool:
    """One choice, text in and text out, stream options the gateway can extend."""
    if not isinstance(obj, dict) or obj.get("n") not in (None, 1):
        return False
    if not isinstance(obj.get("stream_options") or {}, dict):
        return False
    if chat:
        # Tool calls stream as deltas the continuation could not carry: not resumed.
        messages = obj.get("messages")
        return isinstance(messages, list) and bool(messages) and not obj.get("tools")
    prompt = obj.get("prompt")
    one_string = isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)
    return not obj.get("echo") and (isinstance(prompt, str) or one_string)


class Resume:
    """One resumable stream, across the attempts that write it."""

    __slots__ = (
        "base",
        "buf",
        "chat",
        "client_continuous",
        "client_usage",
        "committed",
        "created",
        "done",
        "error",
        "finish",
        "id",
        "model",
        "obj",
        "parts",
        "prompt_tokens",
        "relay",
        "resumes",
        "sent",
        "ttfb",
        "usage_sent",
    )

    def __init__(self, obj: dict[str, Any], chat: bool) -> None:
        self.obj = obj
        self.chat = chat
        options = obj.get("stream_options")
        # vLLM's StreamOptions: include_usage defaults to true once stream_options is there.
        self.client_usage = options is not None and bool(options.get("include_usage", True))
        self.client_continuous = options is not None and bool(
            options.get("continuous_usage_stats", False)
        )
        self.committed = False
        """The first backend's head went to the client: from now on only events follow."""
        self.ttfb = 0.0
        self.relay: Any = None
        """The client side's relay (`streaming._ResumeRelay`), kept across attempts."""
        self.resumes = 0
        """Continuations started."""
        self.parts: list[str] = []
        """The text the client got, in pieces."""
        self.sent = 0
        """Completion tokens the client got."""
        self.base = 0
        """Completion tokens the client got before the current attempt."""
        self.prompt_tokens: int | None = None
        self.id: Any = None
        self.created: Any = None
        self.model: Any = None
        self.finish: str | None = None
        self.done = False
        """`data: [DONE]` went to the client."""
        self.usage_sent = False
        self.error: str | None = None
        """The message of an error event the backend sent instead of finishing."""
        self.buf = b""

    # -- the request ------------------------------------------------------------------

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def body(self, model: str) -> bytes:
        """The request for the next attempt, its `model` set to `model`."""
        obj = dict(self.obj)
        obj["model"] = model
        options = dict(obj.get("stream_options") or {})
        options["include_usage"] = True
        options["continuous_usage_stats"] = True
        obj["stream_options"] = options
        if self.sent or self.parts:
            self._continuation(obj)
        return _dumps(obj)

    def _continuation(self, obj: dict[str, Any]) -> None:
        text, sent = self.text, self.sent
        if self.chat:
            messages = list(obj["messages"])
            last = messages[-1]
            if (
                obj.get("continue_final_message")
                and isinstance(last, dict)
                and last.get("role") == "assistant"
                and isinstance(last.get("content"), str)
            ):
                messages[-1] = {**last, "content": last["content"] + text}
            else:
                messages.append({"role": "assistant", "content": text})
            obj["messages"] = messages
            obj["continue_final_message"] = True
            obj["add_generation_prompt"] = False
        else:
            prompt = obj["prompt"]
            obj["prompt"] = prompt + text if isinstance(prompt, str) else [prompt[0] + text]
            obj.setdefault("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        for key in ("max_completion_tokens", "max_tokens"):
            value = obj.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                obj[key] = max(1, value - sent)
        min_tokens = obj.get("min_tokens")
        if isinstance(min_tokens, int) and not isinstance(min_tokens, bool):
            obj["min_tokens"] = max(0, min_tokens - sent)

    # -- the answer -------------------------------------------------------------------

    def begin(self) -> None:
        """A new attempt starts streaming (its partial event, if any, was never sent)."""
        self.base = self.sent
        self.buf = b""
        self.error = None

    @property
    def finished(self) -> bool:
        """The last token went out: only the usage block and `[DONE]` can be missing."""
        return self.finish is not None

    def feed(self, data: bytes) -> bytes:
        """Backend bytes in; the whole events the client gets out."""
        buf = self.buf + data if self.buf else data
        out: list[bytes] = []
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            event = self._event(buf[start:end])
            if event:
                out.append(event)
            start = end + 2
        self.buf = buf[start:]
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data:"):
            return event + b"\n\n"  # an SSE comment or field other than data: as it came
        payload = event[5:].strip()
        if payload == b"[DONE]":
            if self.error is not None:
                return b""  # vLLM closes a failed stream with [DONE]: resume instead
            self.done = True
            return b"data: [DONE]\n\n"
        try:
            chunk = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return event + b"\n\n"
        if not isinstance(chunk, dict):
            return event + b"\n\n"
        if "error" in chunk:
            err = chunk["error"]
            self.error = str(err.get("message") if isinstance(err, dict) else err)
            return b""
        if self.id is None:
            self.id, self.created = chunk.get("id"), chunk.get("created")
            self.model = chunk.get("model")
        else:
            chunk["id"], chunk["created"], chunk["model"] = self.id, self.created, self.model
        choices = chunk.get("choices")
        if not choices:
            return self._usage_chunk(chunk)
        self._count(chunk.get("usage"), choices)
        if not self._take(choices):
            return b""
        self._client_usage(chunk)
        return b"data: " + _dumps(chunk) + b"\n\n"

    def _count(self, usage: Any, choices: list[Any]) -> None:
        """Tokens sent: exact from the chunk's usage; else one per chunk with a token."""
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            if self.prompt_tokens is None and isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]
            self.sent = self.base + usage["completion_tokens"]
            return
        choice = choices[0] if isinstance(choices[0], dict) else {}
        piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
        if piece or choice.get("finish_reason"):
            self.sent += 1

    def _take(self, choices: list[Any]) -> bool:
        """Note the chunk's text and finish; False to drop it (a continuation's role chunk)."""
        choice = choices[0]
        if not isinstance(choice, dict):
            return True
        finish = choice.get("finish_reason")
        if self.chat:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                return True
            if self.resumes and "role" in delta:
                del delta["role"]
                if not delta.get("content") and not finish and len(delta) <= 1:
                    return False
            piece = delta.get("content")
        else:
            piece = choice.get("text")
        if isinstance(piece, str) and piece:
            self.parts.append(piece)
        if finish:
            self.finish = finish
        return True

    def _usage_numbers(self) -> dict[str, int]:
        prompt = self.prompt_tokens or 0
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + self.sent,
            "completion_tokens": self.sent,
        }

    def _client_usage(self, chunk: dict[str, Any]) -> None:
        if self.client_continuous:
            chunk["usage"] = self._usage_numbers()
        elif self.chat:
            chunk.pop("usage", None)
        elif "usage" in chunk:
            chunk["usage"] = None

    def _usage_chunk(self, chunk: dict[str, Any]) -> bytes:
        """The final usage block: the original prompt, every completion token sent."""
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            if self.prompt_tokens is None and isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                self.sent = self.base + usage["completion_tokens"]
        if not self.client_usage or self.usage_sent:
            return b""
        self.usage_sent = True
        chunk["usage"] = self._usage_numbers()
        return b"data: " + _dumps(chunk) + b"\n\n"

    def ending(self) -> bytes:
        """What a finished answer still owes the client when its backend failed after the
        last token: the usage block (if asked for) and `[DONE]`."""
        out = b""
        if self.client_usage and not self.usage_sent:
            self.usage_sent = True
            obj = "chat.completion.chunk" if self.chat else "text_completion"
            chunk = {
                "id": self.id,
                "object": obj,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self._usage_numbers(),
            }
            out += b"data: " + _dumps(chunk) + b"\n\n"
        if not self.done:
            self.done = True
            out += b"data: [DONE]\n\n"
        return out
