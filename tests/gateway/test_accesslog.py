"""Access log lines: valid JSON, no bodies or keys, nothing dropped under volume."""

from __future__ import annotations

import asyncio
import io
import json

from llm_operator.gateway.accesslog import AccessLog
from llm_operator.gateway.request import Request


def _req() -> Request:
    return Request(
        b"POST",
        b"/v1/chat/completions?x=1",
        b"",
        b"Bearer sk-secret",
        b'{"prompt":"p"}',
        True,
        0.0,
        "127.0.0.1",
    )


async def test_every_line_is_written_in_small_batches() -> None:
    out = io.StringIO()
    log = AccessLog(out)
    log.start(asyncio.get_running_loop())
    for i in range(5000):
        log.record(
            _req(),
            model='we"ird',
            status=200,
            outcome="success",
            backend="10.0.0.1:8000",
            track="canary",
            attempts=1,
            failure="",
            fallback=None,
            duration=0.01,
            nbytes=i,
            key_name="team-a",
            stream=True,
            ttfb=0.002,
        )
        if i % 100 == 0:
            await asyncio.sleep(0)  # let scheduled flushes run, as the event loop would
    log.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5000
    first = json.loads(lines[0])
    assert first["model"] == 'we"ird' and first["path"] == "/v1/chat/completions"
    assert first["track"] == "canary" and first["client"] == "team-a"
    assert "sk-secret" not in out.getvalue() and '"prompt"' not in out.getvalue()


def test_sampling_and_text_format() -> None:
    out = io.StringIO()
    log = AccessLog(out, fmt="text", sample=0.0)
    log.record(
        _req(),
        model="m",
        status=200,
        outcome="success",
        backend="b",
        track="stable",
        attempts=1,
        failure="",
        fallback=None,
        duration=0.01,
        nbytes=1,
        key_name="",
        stream=False,
    )
    assert log.buffer == []
    log = AccessLog(out, fmt="text")
    log.record(
        _req(),
        model="m",
        status=503,
        outcome="unavailable",
        backend="",
        track="none",
        attempts=2,
        failure="5xx",
        fallback="model:s",
        duration=0.01,
        nbytes=0,
        key_name="",
        stream=False,
    )
    log.flush()
    assert 'model="m" status=503 outcome=unavailable' in out.getvalue()
