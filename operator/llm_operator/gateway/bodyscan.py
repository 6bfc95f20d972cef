"""Read `model` and `stream` from an OpenAI request body without parsing all of it.

Chat bodies carry whole conversations; routing needs two fields. The fast path finds the
one `"model"` key and the one `"stream"` key with bytes searches (C speed) and reads their
values in place. Whenever the body is not the plain shape the fast path can be sure about
(a key appears twice, e.g. a tool schema with a "model" property; \\u escapes; an escaped
model name; a value that is not a literal), it falls back to `json.loads`.
"""

from __future__ import annotations

import json
from typing import Any

_MODEL = b'"model"'
_STREAM = b'"stream"'
_WS = b" \t\r\n"
_new = object.__new__


class BodyError(ValueError):
    """The body is not a JSON object with a string `model`."""


class Scanned:
    """What routing needs from the body, and how to rewrite the model name."""

    __slots__ = ("body", "model", "obj", "span", "stream")

    def __init__(
        self,
        body: bytes,
        model: str,
        stream: bool,
        span: tuple[int, int] | None,
        obj: dict[str, Any] | None,
    ) -> None:
        self.body = body
        self.model = model
        self.stream = stream
        self.span = span
        """Byte range of the model's JSON string (quotes included), from the fast path."""
        self.obj = obj
        """The parsed body, when the slow path ran."""

    def with_model(self, name: str) -> bytes:
        """The body with `model` replaced (for fallbacks that serve another name)."""
        if name == self.model:
            return self.body
        encoded = json.dumps(name).encode()
        if self.span is not None:
            start, end = self.span
            return self.body[:start] + encoded + self.body[end:]
        obj = dict(self.obj or {})
        obj["model"] = name
        return json.dumps(obj, separators=(",", ":")).encode()


def _value_start(body: bytes, key_end: int) -> int:
    """Index of the value after `"key"`, or -1 when no colon follows (not a key). The
    whitespace loops are inline: a helper per side was two Python calls per key."""
    n = len(body)
    i = key_end
    while i < n and body[i] in _WS:
        i += 1
    if i >= n or body[i] != 0x3A:  # ':'
        return -1
    i += 1
    while i < n and body[i] in _WS:
        i += 1
    return i


def scan(body: bytes) -> Scanned:
    fast = _fast(body)
    if fast is not None:
        return fast
    return _slow(body)


def _fast(body: bytes) -> Scanned | None:
    # `find`, not `in`: bytes' `in` first tries the operand as an integer, and raising and
    # clearing that TypeError costs more than the search (~3k instructions a test).
    if body.find(b"\\u") >= 0:
        return None
    i = body.find(_MODEL)
    if i < 0 or body.find(_MODEL, i + 7) >= 0:
        return None
    v = _value_start(body, i + 7)
    if v < 0 or v >= len(body) or body[v] != 0x22:  # '"'
        return None
    end = body.find(b'"', v + 1)
    if end < 0:
        return None
    raw = body[v + 1 : end]
    if raw.find(b"\\") >= 0:
        return None
    stream = _fast_stream(body)
    if stream is None:
        return None
    try:
        model = raw.decode()
    except UnicodeDecodeError:
        return None
    # `Scanned(...)` without its `__init__` (once per request: a Python `__init__` is a
    # frame entered from C, ~1k instructions more than setting the fields here).
    sc = _new(Scanned)
    sc.body = body
    sc.model = model
    sc.stream = stream
    sc.span = (v, end + 1)
    sc.obj = None
    return sc


def _fast_stream(body: bytes) -> bool | None:
    """The `stream` flag read without parsing; None when only a parser can tell."""
    j = body.find(_STREAM)
    if j < 0:
        return False
    if body.find(_STREAM, j + 8) >= 0:
        return None
    s = _value_start(body, j + 8)
    if s < 0:
        return None
    # Slice compares, not `startswith` (which parses its arguments: ~500 instructions).
    if body[s : s + 4] == b"true":
        return True
    if body[s : s + 5] == b"false" or body[s : s + 4] == b"null":
        return False
    return None


def _slow(body: bytes) -> Scanned:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BodyError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BodyError("request body nests JSON too deeply") from None
    if not isinstance(obj, dict):
        raise BodyError("request body must be a JSON object")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise BodyError("request body needs a string field 'model'")
    return Scanned(body, model, obj.get("stream") is True, None, obj)


_STREAM_OPTIONS = b'"stream_options"'
_WITH_USAGE = b',"stream_options":{"include_usage":true}}'


def with_usage(sc: Scanned) -> tuple[Scanned, bool]:
    """A streamed request that asks for the final usage block: (the request, whether the
    client did not ask for it itself, so the block must not reach it)."""
    body = sc.body
    if body.find(_STREAM_OPTIONS) < 0:
        end = len(body.rstrip(_WS)) - 1
        if end < 1 or body[end] != 0x7D:  # '}': not the plain object shape; leave it
            return sc, False
        obj = None
        if sc.obj is not None:
            obj = {**sc.obj, "stream_options": {"include_usage": True}}
        return Scanned(body[:end] + _WITH_USAGE, sc.model, sc.stream, sc.span, obj), True
    try:
        parsed: Any = sc.obj if sc.obj is not None else json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return sc, False  # the engine will say what is wrong with it
    options = parsed.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return sc, False
    kept = options if isinstance(options, dict) else {}
    # Usage on every chunk is for clients that asked for usage; this one did not.
    options = {k: v for k, v in kept.items() if k != "continuous_usage_stats"}
    options["include_usage"] = True
    obj = {**parsed, "stream_options": options}
    new = json.dumps(obj, separators=(",", ":")).encode()
    return Scanned(new, sc.model, sc.stream, None, obj), True
