"""The FallbackActive condition: how much of a model's traffic the gateway sent down its
fallback chain lately, from the gateway's own counters (pure: the queries and the decision).
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_operator.rollout.queries import REQUESTS_METRIC

FALLBACKS_METRIC = "llm_gateway_fallbacks_total"
#: The window the share is measured over, and how often the operator looks again.
WINDOW_SECONDS = 120
CHECK_SECONDS = 30.0


@dataclass(frozen=True)
class FallbackQueries:
    fallbacks: str
    requests: str


def _literal(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fallback_queries(served_name: str) -> FallbackQueries:
    """Fallback steps taken, and requests answered, for one model over the window."""
    selector = f"model={_literal(served_name)}"
    window = f"{WINDOW_SECONDS}s"
    return FallbackQueries(
        fallbacks=f"sum(increase({FALLBACKS_METRIC}{{{selector}}}[{window}])) or vector(0)",
        requests=f"sum(increase({REQUESTS_METRIC}{{{selector}}}[{window}])) or vector(0)",
    )


def fallback_condition(
    fallbacks: float | None, requests: float | None
) -> tuple[bool, str, str] | None:
    """(status, reason, message) of FallbackActive; None when nothing can be said (Prometheus
    did not answer): the condition is then left as it was."""
    if fallbacks is None or requests is None:
        return None
    taken = round(fallbacks)
    if taken <= 0:
        return (False, "NoFallback", f"no request fell back in the last {WINDOW_SECONDS}s")
    # A request can take more than one step, so the share is capped at all of them.
    share = min(1.0, fallbacks / requests) if requests > 0 else 1.0
    return (
        True,
        "FallingBack",
        f"{share:.0%} of requests fell back in the last {WINDOW_SECONDS}s",
    )
