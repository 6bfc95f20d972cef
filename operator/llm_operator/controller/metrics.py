"""The operator's own Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECONCILES = Counter(
    "llm_operator_reconciles_total", "Reconciles of LLMDeployments by result", ["result"]
)
RECONCILE_SECONDS = Histogram(
    "llm_operator_reconcile_duration_seconds",
    "Time of one reconcile",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WRITES = Counter(
    "llm_operator_api_writes_total", "Writes the operator sent to the API server", ["verb", "kind"]
)
