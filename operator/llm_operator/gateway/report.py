"""The one place a request's end is counted and logged: its outcome, latencies, access log."""

from __future__ import annotations

import time
from bisect import bisect_left

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
    # `Histogram.observe`, inline for the histograms of every answer (three calls less
    # per request; `observe` does the same).
    if ttfb is not None:
        h = series.ttfb
        h.counts[bisect_left(h.buckets, ttfb)] += 1
        h.sum += ttfb
        h.count += 1
    if ttft is not None:
        h = series.ttft
        h.counts[bisect_left(h.buckets, ttft)] += 1
        h.sum += ttft
        h.count += 1
        if tpot is not None:
            series.tpot.observe(tpot)
    elapsed = time.monotonic() - call.req.start
    h = series.total
    h.counts[bisect_left(h.buckets, elapsed)] += 1
    h.sum += elapsed
    h.count += 1
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
