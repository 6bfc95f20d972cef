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
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from llm_operator.gateway.server import Request

FLUSH_INTERVAL_S = 0.25
MAX_BUFFERED = 4096


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
        req: Request,
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
    ) -> None:
        if self.stream is None:
            return
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        if len(self.buffer) >= MAX_BUFFERED:
            # The writer cannot keep up (a blocked stdout): count, do not grow without bound.
            self.dropped += 1
            return
        rec = {
            "ts": round(time.time(), 3),
            "msg": "request",
            "path": req.path.decode(errors="replace").split("?", 1)[0],
            "model": model,
            "status": status,
            "outcome": outcome,
            "backend": backend,
            "track": track,
            "attempts": attempts,
            "failure": failure or None,
            "fallback": fallback,
            "stream": stream,
            "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 3),
            "duration_ms": round(duration * 1000, 3),
            "bytes": nbytes,
            "client": key_name or None,
            "peer": req.peer,
        }
        if self.fmt == "json":
            self.buffer.append(json.dumps(rec, separators=(",", ":")) + "\n")
        else:
            self.buffer.append(" ".join(f"{k}={v}" for k, v in rec.items() if v is not None) + "\n")


def default_stream() -> TextIO:
    # Line buffering off: we write whole batches ourselves.
    return os.fdopen(os.dup(1), "w", buffering=1 << 16)
