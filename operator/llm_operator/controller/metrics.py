"""The operator's own Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from llm_operator.render.names import label_value

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

# -- per-LLMDeployment state, for alerts and dashboards ---------------------------------------
# Label names: the operator's own scrape already sets `namespace` (the operator's), so the
# LLMDeployment's namespace gets its own label; `llmoperator_io_deployment` is the name the
# engine pods' series carry (their llmoperator.io/deployment label, same value), so a query
# can match both without relabelling the name.
_OWNER = ["llmdeployment_namespace", "llmoperator_io_deployment"]

INFO = Gauge(
    "llm_operator_llmdeployment_info",
    "1 per LLMDeployment; `model` is its served name, the gateway's `model` label",
    [*_OWNER, "model"],
)
DESIRED_REPLICAS = Gauge(
    "llm_operator_desired_replicas", "Replicas the Deployments of all tracks ask for", _OWNER
)
READY_REPLICAS = Gauge("llm_operator_ready_replicas", "Ready replicas of all tracks", _OWNER)
MAX_REPLICAS = Gauge(
    "llm_operator_max_replicas", "autoscaling.maxReplicas, or the fixed spec.replicas", _OWNER
)
TARGET_QUEUE_DEPTH = Gauge(
    "llm_operator_target_queue_depth",
    "autoscaling.targetQueueDepth (waiting requests per replica); absent without autoscaling",
    _OWNER,
)
GPUS_PER_REPLICA = Gauge("llm_operator_gpus_per_replica", "GPUs one replica holds", _OWNER)
CONDITION = Gauge(
    "llm_operator_condition", "Status conditions: 1 when True, 0 otherwise", [*_OWNER, "type"]
)
CANARY_PHASE = Gauge(
    "llm_operator_canary_phase",
    "1 for the canary's current phase (status.canary.phase); no series without a canary",
    [*_OWNER, "phase"],
)
CANARY_WEIGHT = Gauge(
    "llm_operator_canary_weight", "Percent of traffic on the canary track; 0 without one", _OWNER
)

#: The series set per LLMDeployment, so that they can be removed (prometheus_client removes
#: one label set at a time and does not list them).
_SERIES: dict[tuple[str, str], list[tuple[Gauge, tuple[str, ...]]]] = {}


def _set(gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
    gauge.labels(*labels).set(value)
    _SERIES.setdefault((labels[0], labels[1]), []).append((gauge, labels))


def _drop_gone(owner: tuple[str, str], before: list[tuple[Gauge, tuple[str, ...]]]) -> None:
    # Only what this status no longer has: removing all first would let a scrape in between
    # see no series, and reset every alert's `for:`.
    kept = set(_SERIES.get(owner, []))
    for series in set(before) - kept:
        series[0].remove(*series[1])


def forget(namespace: str, name: str) -> None:
    """A deleted LLMDeployment leaves no series behind (a stale alert would never resolve)."""
    for gauge, labels in _SERIES.pop((namespace, label_value(name)), []):
        gauge.remove(*labels)


def observe_status(namespace: str, name: str, body: dict[str, Any], status: dict[str, Any]) -> None:
    """Export what the status about to be written says (the reconciler calls this each time)."""
    owner = (namespace, label_value(name))
    spec = body.get("spec") or {}
    autoscaling = spec.get("autoscaling") or {}
    before = _SERIES.pop(owner, [])
    served = status.get("servedName") or (spec.get("model") or {}).get("servedName")
    model = str(served or (spec.get("model") or {}).get("name") or name)
    _set(INFO, (*owner, model), 1)
    _set(DESIRED_REPLICAS, owner, status.get("desiredReplicas") or 0)
    _set(READY_REPLICAS, owner, status.get("readyReplicas") or 0)
    if autoscaling:
        _set(MAX_REPLICAS, owner, autoscaling.get("maxReplicas") or 0)
        _set(TARGET_QUEUE_DEPTH, owner, autoscaling.get("targetQueueDepth", 4))
    else:
        _set(MAX_REPLICAS, owner, spec.get("replicas", 1))
    _set(GPUS_PER_REPLICA, owner, status.get("gpusPerReplica") or 0)
    for condition in status.get("conditions") or []:
        up = condition.get("status") == "True"
        _set(CONDITION, (*owner, str(condition["type"])), 1 if up else 0)
    canary = status.get("canary") or {}
    if canary.get("phase"):
        _set(CANARY_PHASE, (*owner, str(canary["phase"])), 1)
    _set(CANARY_WEIGHT, owner, canary.get("weight") or 0)
    _drop_gone(owner, before)


# -- day 2: cost and progress-based liveness (controller/day2.py) ------------------------------
GPU_SECONDS = Gauge(
    "llm_operator_gpu_seconds",
    "GPU-seconds the engine pods held (run time x GPUs per pod), since status.cost.countedSince",
    _OWNER,
)
TOKENS_SERVED = Gauge(
    "llm_operator_tokens_served",
    "Prompt and generated tokens of the engine pods, counted with the GPU-seconds",
    _OWNER,
)
STALL_RESTARTS = Counter(
    "llm_operator_stall_restarts_total",
    "Engine pods deleted because requests waited while no token was generated",
    _OWNER,
)


#: Owners (namespace, label value) the day-2 loop exported series for.
_COSTED: set[tuple[str, str]] = set()


def observe_cost(
    namespace: str, name: str, gpu_seconds: Callable[[], float], tokens: float
) -> None:
    """GPU-seconds are computed when scraped (pods run between two looks of the loop)."""
    labels = (namespace, label_value(name))
    GPU_SECONDS.labels(*labels).set_function(gpu_seconds)
    TOKENS_SERVED.labels(*labels).set(tokens)
    STALL_RESTARTS.labels(*labels)  # 0 until the first restart, so rate() sees the first one
    _COSTED.add(labels)


def forget_cost(namespace: str, name: str) -> None:
    labels = (namespace, label_value(name))
    if labels in _COSTED:
        _COSTED.discard(labels)
        for series in (GPU_SECONDS, TOKENS_SERVED, STALL_RESTARTS):
            series.remove(*labels)
