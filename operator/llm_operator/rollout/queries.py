"""The PromQL of canary analysis, over the gateway's per-model, per-track metrics.

The gateway labels every series with `model` (the served name) and `track` (stable or
canary). One analysis asks, for each track, three instant queries over the last interval:
requests answered, requests failed (5xx from the engine, timeouts, streams cut mid-way), and
the p95 time to first token. docs/canary.md prints the same queries for dashboards.
"""

from __future__ import annotations

from dataclasses import dataclass

REQUESTS_METRIC = "llm_gateway_requests_total"
TTFT_METRIC = "llm_gateway_time_to_first_token_seconds"
TPOT_METRIC = "llm_gateway_time_per_output_token_seconds"
# What counts against a canary: the engine's 5xx, timeouts, and streams that broke after the
# head. Client errors (4xx), clients that went away, and "no backend" (the gateway's own 503)
# say nothing about the revision.
ERROR_OUTCOMES = ("server_error", "timeout", "stream_error")
COUNTED_OUTCOMES = ("success", *ERROR_OUTCOMES)


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
    window = _duration(interval_seconds)
    selector = f"model={_label_value(served_name)},track={_label_value(track)}"
    counted = "|".join(COUNTED_OUTCOMES)
    errors = "|".join(ERROR_OUTCOMES)
    return TrackQueries(
        requests=(f'sum(increase({REQUESTS_METRIC}{{{selector},outcome=~"{counted}"}}[{window}]))'),
        errors=f'sum(increase({REQUESTS_METRIC}{{{selector},outcome=~"{errors}"}}[{window}]))',
        ttft_p95=(
            f"histogram_quantile(0.95, sum by (le) "
            f"(rate({TTFT_METRIC}_bucket{{{selector}}}[{window}])))"
        ),
        tpot_p95=(
            f"histogram_quantile(0.95, sum by (le) "
            f"(rate({TPOT_METRIC}_bucket{{{selector}}}[{window}])))"
        ),
    )
