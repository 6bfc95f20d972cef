"""The PromQL of canary analysis, over the gateway's per-model, per-track metrics.

The gateway labels every series with `model` (the served name) and `track` (stable or
canary). One analysis asks, for each track, three instant queries over the last interval:
requests answered, requests failed (5xx from the engine, timeouts, streams cut mid-way), and
the p95 time to first token. docs/canary.md prints the same queries for dashboards.
"""

from __future__ import annotations

from dataclasses import dataclass

REQUESTS_METRIC = "llm_gateway_requests_total"
ATTEMPT_FAILURES_METRIC = "llm_gateway_attempt_failures_total"
TTFT_METRIC = "llm_gateway_time_to_first_token_seconds"
TPOT_METRIC = "llm_gateway_time_per_output_token_seconds"
# What counts against a canary: its attempts that failed with a 5xx, a timeout or a refused
# connection (counted per attempt, so a failure the gateway retried on the stable, which the
# client never saw, still counts), and its streams that broke after the head. Not counted:
# 429 (busy), client errors, clients that went away, the gateway's own "no backend".
FAILED_ATTEMPT_REASONS = ("5xx", "timeout", "connectError")


@dataclass(frozen=True)
class TrackQueries:
    requests: str
    errors: str
    ttft_p95: str
    tpot_p95: str


def _label_value(value: str) -> str:
    """A PromQL string literal: served names may hold `/`, `:` and `.`, never quotes, but
    escape anyway so a query can never be broken by a name."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _duration(seconds: float) -> str:
    """A PromQL range: whole seconds, at least 1s."""
    return f"{max(1, round(seconds))}s"


def analysis_queries(served_name: str, track: str, interval_seconds: float) -> TrackQueries:
    """requests: the track's answered successes plus its errors; errors: failed attempts
    plus broken streams (each request counted once: a failed attempt that was answered as
    it is has outcome server_error, which is not added again)."""
    window = _duration(interval_seconds)
    selector = f"model={_label_value(served_name)},track={_label_value(track)}"
    failed = "|".join(FAILED_ATTEMPT_REASONS)

    def total(metric: str, matcher: str) -> str:
        return f"(sum(increase({metric}{{{selector},{matcher}}}[{window}])) or vector(0))"

    failed_attempts = total(ATTEMPT_FAILURES_METRIC, 'reason=~"' + failed + '"')
    broken_streams = total(REQUESTS_METRIC, 'outcome="stream_error"')
    errors = f"{failed_attempts} + {broken_streams}"
    successes = total(REQUESTS_METRIC, 'outcome="success"')
    return TrackQueries(
        requests=f"{successes} + {errors}",
        errors=errors,
        ttft_p95=(
            f"histogram_quantile(0.95, sum by (le) "
            f"(rate({TTFT_METRIC}_bucket{{{selector}}}[{window}])))"
        ),
        tpot_p95=(
            f"histogram_quantile(0.95, sum by (le) "
            f"(rate({TPOT_METRIC}_bucket{{{selector}}}[{window}])))"
        ),
    )
