"""The one place a request's end is counted and logged: its outcome, latencies, access log."""

from __future__ import annotations

import time

from llm_operator.gateway.accesslog import AccessLog
from llm_operator.gateway.metrics import Series
from llm_operator.gateway.request import Call


def report(
    log: AccessLog,
    call: Call,
    series: Series,
    status: int,
    outcome: str,
    backend: str,
    track: str,
    failure: str = "",
    nbytes: int = 0,
    ttfb: float | None = None,
    ttft: float | None = None,
    tpot: float | None = None,
) -> None:
    """Count and log an answered request. `ttfb` is set when a backend's answer went to
    the client (committed: the log then names the fallback step and whether it streamed).
    `ttft` and `tpot` are set by the relay for 2xx answers only (see `Series`)."""
    series.outcomes[outcome] += 1
    committed = ttfb is not None
    if ttfb is not None:
        series.ttfb.observe(ttfb)
    if ttft is not None:
        series.ttft.observe(ttft)
        if tpot is not None:
            series.tpot.observe(tpot)
    elapsed = time.monotonic() - call.req.start
    series.total.observe(elapsed)
    resume = call.resume
    if resume is not None and resume.committed:
        call.tokens_in, call.tokens_out = resume.prompt_tokens, resume.sent
    # Positional, in `AccessLog.record`'s order: keyword matching costs more than the
    # rest of this call (tests/gateway/test_report.py pins the fields).
    log.record(
        call.req,
        call.model.name,
        status,
        outcome,
        backend,
        track,
        call.attempts,
        failure,
        (call.step_label or None) if committed else None,
        elapsed,
        nbytes,
        call.key_name,
        call.scanned.stream if committed else False,
        ttfb,
        call.tokens_in,
        call.tokens_out,
        call.path,
    )
