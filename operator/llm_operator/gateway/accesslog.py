"""One access-log line per request, buffered and written in batches.

A `logging` call per request (handler lock, LogRecord, formatter) costs ~10-20 µs and a
write syscall; here a record is one small dict serialization appended to a list, and a
timer writes the batch a few times a second. Lines never hold prompt bodies, response
bodies or keys: only routing facts, sizes and timings (and the client key's name).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from typing import Protocol, TextIO


class Logged(Protocol):
    """What a line takes from the request itself (the gateway's `request.Request`)."""

    @property
    def path(self) -> bytes: ...

    @property
    def peer(self) -> str: ...


class _Refused:
    __slots__ = ("path", "peer")

    def __init__(self, path: bytes, peer: str) -> None:
        self.path = path
        self.peer = peer


class _Quoted(dict[str | bytes | None, str]):
    """json.dumps of client-chosen strings (a path without its query), cached: a hit is one
    dict subscript, no Python call (three per line)."""

    def __missing__(self, value: str | bytes | None) -> str:
        text = (
            value.split(b"?", 1)[0].decode(errors="replace") if isinstance(value, bytes) else value
        )
        quoted = json.dumps(text)
        if len(self) < 10_000:  # client-chosen strings: bound the cache
            self[value] = quoted
        return quoted


# `AccessLog.record`'s arguments, in its order.
_Line = tuple[
    Logged, str, int, str, str, str, int, str, str | None, float, int, str, bool,
    float | None, int | None, int | None, tuple[str, ...],
]  # fmt: skip

FLUSH_INTERVAL_S = 0.25
# Write at least every this many lines: one big write every 0.25 s at 20k req/s (~1.5 MB)
# would stall the loop for milliseconds and show up in the p99; 128 lines are ~40 KB.
FLUSH_LINES = 128
MAX_BUFFERED = 65536


class AccessLog:
    def __init__(
        self,
        stream: TextIO | None,
        fmt: str = "json",
        sample: float = 1.0,
    ) -> None:
        self.stream = stream
        self.fmt = fmt
        self.sample = sample
        self.buffer: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dropped = 0
        self._quoted = _Quoted()
        # The fields that are null when empty (failure, fallback step, client key name).
        self._or_null = _Quoted({"": "null", None: "null"})
        self._flush_scheduled = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer = loop.call_later(FLUSH_INTERVAL_S, self._tick)

    def _tick(self) -> None:
        self.flush()
        if self._loop is not None:
            self._timer = self._loop.call_later(FLUSH_INTERVAL_S, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self.buffer or self.stream is None:
            self.buffer.clear()
            return
        data, self.buffer = self.buffer, []
        try:
            self.stream.write("".join(data))
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def record(
        self,
        req: Logged,
        model: str,
        status: int,
        outcome: str,
        backend: str,
        track: str,
        attempts: int,
        failure: str,
        fallback: str | None,
        duration: float,
        nbytes: int,
        key_name: str,
        stream: bool,
        ttfb: float | None = None,
        tokens_in: int | None = None,
        tokens_out: int | None = None,
        fallback_path: tuple[str, ...] = (),
    ) -> None:
        """Callers name the arguments (seventeen facts in a row are too easy to swap by
        position), except `report`, the one per-request caller: matching keywords costs
        ~1.5k instructions a call there, and its order is pinned by a test."""
        if self.stream is None:
            return
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        if len(self.buffer) >= MAX_BUFFERED:
            # The writer cannot keep up (a blocked stdout): count, do not grow without bound.
            self.dropped += 1
            return
        if self.fmt != "json":
            self._text_line(
                (req, model, status, outcome, backend, track, attempts, failure, fallback,
                 duration, nbytes, key_name, stream, ttfb, tokens_in, tokens_out, fallback_path)
            )  # fmt: skip
            return
        q, n = self._quoted, self._or_null
        steps = ",".join([q[p] for p in fallback_path]) if fallback_path else ""
        # Hand-formatted: json.dumps of a dict costs ~3x more. Strings that come from
        # clients (path, model) go through json.dumps via a small cache.
        self.buffer.append(
            f'{{"ts":{time.time():.3f},"msg":"request","path":{q[req.path]},"model":{q[model]},'
            f'"status":{status},"outcome":"{outcome}","backend":{q[backend]},'
            f'"track":"{track}","attempts":{attempts},'
            f'"failure":{n[failure]},"fallback":{n[fallback]},'
            f'"stream":{"true" if stream else "false"},'
            f'"ttfb_ms":{"null" if ttfb is None else f"{ttfb * 1000:.3f}"},'
            f'"duration_ms":{duration * 1000:.3f},"bytes":{nbytes},'
            f'"tokens_in":{"null" if tokens_in is None else tokens_in},'
            f'"tokens_out":{"null" if tokens_out is None else tokens_out},'
            f'"fallback_path":[{steps}],'
            f'"client":{n[key_name]},"peer":"{req.peer}"}}\n'
        )
        if len(self.buffer) >= FLUSH_LINES:  # the test of `_maybe_flush`, without its call
            self._maybe_flush()

    def _text_line(self, line: _Line) -> None:
        """`record` in the text format (`--log-format text`), of `record`'s arguments."""
        (req, model, status, outcome, backend, track, attempts, failure, fallback, duration,
         nbytes, key_name, stream, ttfb, tokens_in, tokens_out, fallback_path) = line  # fmt: skip
        q = self._quoted
        self.buffer.append(
            f"ts={time.time():.3f} path={q[req.path]} model={q[model]} status={status} "
            f"outcome={outcome} backend={backend} track={track} attempts={attempts} "
            f"failure={failure or '-'} fallback={fallback or '-'} stream={stream} "
            f"ttfb_ms={'-' if ttfb is None else f'{ttfb * 1000:.3f}'} "
            f"duration_ms={duration * 1000:.3f} bytes={nbytes} "
            f"tokens_in={'-' if tokens_in is None else tokens_in} "
            f"tokens_out={'-' if tokens_out is None else tokens_out} "
            f"fallback_path={','.join(fallback_path) or '-'} client={key_name or '-'} "
            f"peer={req.peer}\n"
        )
        self._maybe_flush()

    def refused(self, path: bytes, peer: str, status: int, model: str, key_name: str) -> None:
        """A request answered at the edge (401, 400, 404, 413, 429, 431): no backend."""
        self.record(
            _Refused(path, peer),
            model=model,
            status=status,
            outcome="rejected",
            backend="",
            track="none",
            attempts=0,
            failure="",
            fallback=None,
            duration=0.0,
            nbytes=0,
            key_name=key_name,
            stream=False,
        )

    def _maybe_flush(self) -> None:
        if len(self.buffer) >= FLUSH_LINES and not self._flush_scheduled and self._loop:
            # After the callbacks now running, not in the middle of answering a request.
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)


def default_stream() -> TextIO:
    # Line buffering off: we write whole batches ourselves.
    return os.fdopen(os.dup(1), "w", buffering=1 << 16)


def open_log(path: str) -> TextIO:
    """An access-log file, appended to (a restart keeps earlier lines)."""
    return open(path, "a", buffering=1 << 16)  # lives for the process
