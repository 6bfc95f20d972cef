"""The operator's own Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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


class _Row(NamedTuple):
    """What one LLMDeployment's status says, as its series show it."""

    model: str
    desired: float
    ready: float
    max_replicas: float
    target_queue_depth: float | None  # no series without autoscaling
    gpus: float
    conditions: tuple[tuple[str, float], ...]
    canary_phase: str | None  # no series without a canary
    canary_weight: float


class _StatusSeries:
    """The per-LLMDeployment gauges, made from one row per LLMDeployment when scraped.

    prometheus_client's labelled Gauge keeps an object, a lock and a value per series: 12
    series per LLMDeployment held 10 MiB at 1,000 of them (bench/results/operator.md,
    2026-12-03), where this row is a tuple. A status replaces its row whole, so a scrape sees
    either the old series or the new ones, never none (an alert's `for:` is not reset), and
    series the new status no longer has are gone with the old row."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], _Row] = {}

    def describe(self) -> list[Metric]:
        return []  # names are not known to clash; collect is only run on a scrape

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "llm_operator_llmdeployment_info",
            "1 per LLMDeployment; `model` is its served name, the gateway's `model` label",
            labels=[*_OWNER, "model"],
        )
        desired = GaugeMetricFamily(
            "llm_operator_desired_replicas",
            "Replicas the Deployments of all tracks ask for",
            labels=_OWNER,
        )
        ready = GaugeMetricFamily(
            "llm_operator_ready_replicas", "Ready replicas of all tracks", labels=_OWNER
        )
        ceiling = GaugeMetricFamily(
            "llm_operator_max_replicas",
            "autoscaling.maxReplicas, or the fixed spec.replicas",
            labels=_OWNER,
        )
        target = GaugeMetricFamily(
            "llm_operator_target_queue_depth",
            "autoscaling.targetQueueDepth (waiting requests per replica); absent without "
            "autoscaling",
            labels=_OWNER,
        )
        gpus = GaugeMetricFamily(
            "llm_operator_gpus_per_replica", "GPUs one replica holds", labels=_OWNER
        )
        condition = GaugeMetricFamily(
            "llm_operator_condition",
            "Status conditions: 1 when True, 0 otherwise",
            labels=[*_OWNER, "type"],
        )
        phase = GaugeMetricFamily(
            "llm_operator_canary_phase",
            "1 for the canary's current phase (status.canary.phase); no series without a canary",
            labels=[*_OWNER, "phase"],
        )
        weight = GaugeMetricFamily(
            "llm_operator_canary_weight",
            "Percent of traffic on the canary track; 0 without one",
            labels=_OWNER,
        )
        for (namespace, name), row in list(self.rows.items()):
            owner = [namespace, name]
            info.add_metric([*owner, row.model], 1)
            desired.add_metric(owner, row.desired)
            ready.add_metric(owner, row.ready)
            ceiling.add_metric(owner, row.max_replicas)
            if row.target_queue_depth is not None:
                target.add_metric(owner, row.target_queue_depth)
            gpus.add_metric(owner, row.gpus)
            for type_, up in row.conditions:
                condition.add_metric([*owner, type_], up)
            if row.canary_phase is not None:
                phase.add_metric([*owner, row.canary_phase], 1)
            weight.add_metric(owner, row.canary_weight)
        yield from (info, desired, ready, ceiling, target, gpus, condition, phase, weight)


_STATUS_SERIES = _StatusSeries()
REGISTRY.register(_STATUS_SERIES)


def forget(namespace: str, name: str) -> None:
    """A deleted LLMDeployment leaves no series behind (a stale alert would never resolve)."""
    _STATUS_SERIES.rows.pop((namespace, label_value(name)), None)


def observe_status(namespace: str, name: str, body: dict[str, Any], status: dict[str, Any]) -> None:
    """Export what the status about to be written says (the reconciler calls this each time)."""
    spec = body.get("spec") or {}
    autoscaling = spec.get("autoscaling") or {}
    served = status.get("servedName") or (spec.get("model") or {}).get("servedName")
    canary = status.get("canary") or {}
    _STATUS_SERIES.rows[(namespace, label_value(name))] = _Row(
        model=str(served or (spec.get("model") or {}).get("name") or name),
        desired=status.get("desiredReplicas") or 0,
        ready=status.get("readyReplicas") or 0,
        max_replicas=(
            autoscaling.get("maxReplicas") or 0 if autoscaling else spec.get("replicas", 1)
        ),
        target_queue_depth=autoscaling.get("targetQueueDepth", 4) if autoscaling else None,
        gpus=status.get("gpusPerReplica") or 0,
        conditions=tuple(
            (str(c["type"]), 1 if c.get("status") == "True" else 0)
            for c in status.get("conditions") or []
        ),
        canary_phase=str(canary["phase"]) if canary.get("phase") else None,
        canary_weight=canary.get("weight") or 0,
    )


# -- day 2: cost and progress-based liveness (controller/day2.py) ------------------------------
class _CostSeries:
    """GPU-seconds, tokens and stall restarts per LLMDeployment, made when scraped (rows,
    not labelled series: see _StatusSeries)."""

    def __init__(self) -> None:
        #: owner -> (GPU-seconds, computed when scraped since pods run between two looks;
        #: tokens served).
        self.costs: dict[tuple[str, str], tuple[Callable[[], float], float]] = {}
        self.stall_restarts: dict[tuple[str, str], int] = {}

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        gpu = GaugeMetricFamily(
            "llm_operator_gpu_seconds",
            "GPU-seconds the engine pods held (run time x GPUs per pod), since "
            "status.cost.countedSince",
            labels=_OWNER,
        )
        tokens = GaugeMetricFamily(
            "llm_operator_tokens_served",
            "Prompt and generated tokens of the engine pods, counted with the GPU-seconds",
            labels=_OWNER,
        )
        stalls = CounterMetricFamily(
            "llm_operator_stall_restarts",
            "Engine pods deleted because requests waited while no token was generated",
            labels=_OWNER,
        )
        for owner, (gpu_seconds, served) in list(self.costs.items()):
            gpu.add_metric(list(owner), gpu_seconds())
            tokens.add_metric(list(owner), served)
            # 0 until the first restart, so rate() sees the first one.
            stalls.add_metric(list(owner), self.stall_restarts.get(owner, 0))
        for owner, count in list(self.stall_restarts.items()):
            if owner not in self.costs:
                stalls.add_metric(list(owner), count)
        yield from (gpu, tokens, stalls)


_COST_SERIES = _CostSeries()
REGISTRY.register(_COST_SERIES)


def observe_cost(
    namespace: str, name: str, gpu_seconds: Callable[[], float], tokens: float
) -> None:
    """GPU-seconds are computed when scraped (pods run between two looks of the loop)."""
    _COST_SERIES.costs[(namespace, label_value(name))] = (gpu_seconds, tokens)


def count_stall_restart(namespace: str, name: str) -> None:
    owner = (namespace, label_value(name))
    _COST_SERIES.stall_restarts[owner] = _COST_SERIES.stall_restarts.get(owner, 0) + 1


def forget_cost(namespace: str, name: str) -> None:
    owner = (namespace, label_value(name))
    _COST_SERIES.costs.pop(owner, None)
    _COST_SERIES.stall_restarts.pop(owner, None)
