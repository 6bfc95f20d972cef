"""Day-2 loop: progress-based liveness and GPU cost, every CHECK_SECONDS.

One loop for the whole operator rather than a timer per LLMDeployment: one pod LIST per
watched namespace with LLMDeployments (from the API server's watch cache) and four Prometheus
queries answer for every engine at once, whatever their number. Decisions are pure
(llm_operator.stall, llm_operator.cost); this module only reads, deletes pods and writes
status.cost and Events.

Why the operator and not a probe helper in the engine pod: the operator already reads
Prometheus, knows which pods belong to which LLMDeployment, and is the one place that can
rate-limit restarts across the cluster (a probe in every pod would restart every pod of a
cluster-wide stall at once, and would need its own image or sidecar next to vLLM).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
import urllib3
from prometheus_api_client.exceptions import PrometheusApiClientException

from llm_operator.constants import LABEL_COMPONENT, LABEL_DEPLOYMENT, LABEL_MANAGED_BY, MANAGED_BY
from llm_operator.controller import metrics
from llm_operator.controller.reconciler import Controller, OwnerKey
from llm_operator.controller.standby import Standby
from llm_operator.cost import Ledger, cost_status, pod_run, status_due
from llm_operator.kube.transport import ApiError
from llm_operator.kubeformat import parse_rfc3339, rfc3339
from llm_operator.render.names import label_value
from llm_operator.stall import (
    CHECK_SECONDS,
    GENERATION_METRIC,
    PROMPT_METRIC,
    RUNNING_METRIC,
    WAITING_METRIC,
    PodView,
    Restart,
    Sample,
    StallTracker,
    per_pod_query,
)

log = logging.getLogger("llm_operator.controller")
ENGINE_PODS = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_COMPONENT}=engine"
STALL_REASON = "EngineStalled"


def ready_since(pod: Mapping[str, Any]) -> float | None:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            if condition.get("status") != "True":
                return None
            return parse_rfc3339(condition.get("lastTransitionTime")) or 0.0
    return None


@dataclass
class Day2:
    controller: Controller
    namespace_label: str = "namespace"
    pod_label: str = "pod"
    stall_timeout_seconds: float = 300.0
    stall_restarts_per_minute: int = 1
    gpu_hour_price: float | None = None
    cost_status_interval_seconds: float = 600.0
    standby: Standby = field(default_factory=lambda: Standby(client=None))
    """With kopf peering, only the active replica restarts pods and counts cost."""
    epoch: Any = time.time
    tracker: StallTracker = field(init=False)
    ledgers: dict[OwnerKey, Ledger] = field(default_factory=dict)
    since: dict[OwnerKey, str] = field(default_factory=dict)
    jitter: dict[OwnerKey, float] = field(default_factory=dict)
    first_seen: dict[OwnerKey, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tracker = StallTracker(self.stall_timeout_seconds, self.stall_restarts_per_minute)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            try:
                await self.tick()
            except (OSError, urllib3.exceptions.HTTPError) as error:  # the API is unreachable
                log.warning("day-2 check skipped: %s", str(error)[:200])
            except Exception:  # one bad look must not end the loop
                log.exception("day-2 check failed")

    # -- reading (worker thread) ---------------------------------------------------------

    def _pods(self, namespaces: set[str]) -> list[dict[str, Any]] | None:
        pods: list[dict[str, Any]] = []
        for namespace in sorted(namespaces):
            try:
                pods += self.controller.client.list_pods(namespace, ENGINE_PODS)
            except ApiError as error:
                log.info("day-2: cannot list pods in %s (API %s)", namespace, error.status)
                return None
            except (OSError, urllib3.exceptions.HTTPError) as error:  # the API is unreachable
                log.info("day-2: cannot list pods in %s: %s", namespace, str(error)[:200])
                return None
        return pods

    def _series(self, metric: str) -> dict[tuple[str, str], float]:
        prometheus = self.controller.analyst.prometheus
        assert prometheus is not None
        out = {}
        for item in prometheus.custom_query(
            query=per_pod_query(metric, self.namespace_label, self.pod_label)
        ):
            labels = item.get("metric") or {}
            value = float(item["value"][1])
            if math.isfinite(value):
                out[(labels.get(self.namespace_label, ""), labels.get(self.pod_label, ""))] = value
        return out

    def _samples(self) -> tuple[dict[tuple[str, str], Sample], dict[tuple[str, str], float]]:
        """Per-pod samples and token totals (prompt plus generated); empty without data."""
        if self.controller.analyst.prometheus is None:
            return {}, {}
        try:
            running = self._series(RUNNING_METRIC)
            waiting = self._series(WAITING_METRIC)
            generated = self._series(GENERATION_METRIC)
            prompt = self._series(PROMPT_METRIC)
        except (requests.RequestException, PrometheusApiClientException, ValueError) as error:
            log.info("day-2: Prometheus did not answer: %s", str(error)[:200])
            return {}, {}
        samples = {
            pod: Sample(running[pod], waiting.get(pod, 0.0), generated[pod])
            for pod in running.keys() & generated.keys()
        }
        tokens = {pod: generated[pod] + prompt.get(pod, 0.0) for pod in generated}
        return samples, tokens

    # -- one look ------------------------------------------------------------------------

    async def tick(self) -> None:
        bodies = dict(self.controller.bodies)
        active = await asyncio.to_thread(self.standby.active, {ns for ns, _ in bodies})
        bodies = {key: body for key, body in bodies.items() if key[0] in active}
        owners = {(ns, label_value(name)): (ns, name) for ns, name in bodies}
        pods = await asyncio.to_thread(self._pods, {ns for ns, _ in bodies})
        if pods is None:
            return
        samples, tokens = await asyncio.to_thread(self._samples)
        now = self.epoch()
        by_owner: dict[OwnerKey, list[dict[str, Any]]] = {key: [] for key in bodies}
        views = []
        for pod in pods:
            metadata = pod["metadata"]
            label = str((metadata.get("labels") or {}).get(LABEL_DEPLOYMENT, ""))
            owner = owners.get((metadata["namespace"], label))
            if owner is None:
                continue
            by_owner[owner].append(pod)
            views.append(
                PodView(
                    namespace=metadata["namespace"],
                    name=metadata["name"],
                    uid=metadata["uid"],
                    owner=owner[1],
                    ready_since=ready_since(pod),
                )
            )
        if samples and self.stall_timeout_seconds > 0:  # no Prometheus: no samples
            for restart in self.tracker.observe(views, samples, now):
                await self._restart(bodies[(restart.pod.namespace, restart.pod.owner)], restart)
        for owner, owned_pods in by_owner.items():
            await self._account(owner, bodies[owner], owned_pods, tokens, now)
        for gone in set(self.ledgers) - set(bodies):
            del self.ledgers[gone]
            for table in (self.since, self.jitter, self.first_seen):
                table.pop(gone, None)
            metrics.forget_cost(*gone)

    async def _restart(self, body: dict[str, Any], restart: Restart) -> None:
        pod = restart.pod
        try:
            await asyncio.to_thread(
                self.controller.client.delete_pod, pod.namespace, pod.name, pod.uid
            )
        except ApiError as error:
            log.warning("could not delete stalled pod %s/%s: API %s", pod.namespace, pod.name,
                        error.status)  # fmt: skip
            return
        log.warning("%s/%s: %s: %s", pod.namespace, pod.owner, STALL_REASON, restart.message)
        metrics.WRITES.labels(verb="delete", kind="Pod").inc()
        metrics.count_stall_restart(pod.namespace, pod.owner)
        await asyncio.to_thread(
            self.controller.client.post_event, body, "Warning", STALL_REASON, restart.message
        )

    async def _account(
        self,
        owner: OwnerKey,
        body: dict[str, Any],
        pods: list[dict[str, Any]],
        tokens: dict[tuple[str, str], float],
        now: float,
    ) -> None:
        previous = (body.get("status") or {}).get("cost") or {}
        ledger = self.ledgers.get(owner)
        first = ledger is None
        if ledger is None:
            ledger = Ledger(
                base_gpu_seconds=float(previous.get("gpuSeconds") or 0.0),
                base_tokens=float(previous.get("tokens") or 0.0),
                counted_from=parse_rfc3339(previous.get("updatedAt")) or 0.0,
            )
            self.ledgers[owner] = ledger
            self.since[owner] = str(previous.get("countedSince") or rfc3339(now))
            # Spread the interval's writes so that many LLMDeployments do not write in step.
            self.jitter[owner] = random.uniform(0.0, 0.2)  # spread, not secret
            self.first_seen[owner] = now
        runs = [run for run in (pod_run(p) for p in pods) if run is not None]
        changed = ledger.observe_pods(runs, now) and not first
        for pod in pods:
            value = tokens.get((pod["metadata"]["namespace"], pod["metadata"]["name"]))
            if value is not None:
                ledger.observe_tokens(pod["metadata"]["uid"], value)
        seconds, served = ledger.gpu_seconds(now), ledger.total_tokens()
        metrics.observe_cost(*owner, lambda: ledger.gpu_seconds(self.epoch()), served)
        interval = self.cost_status_interval_seconds * (1.0 + self.jitter[owner])
        if not status_due(
            previous, seconds, served, pods_changed=changed, now=now, interval_seconds=interval
        ):
            return
        if not changed and now - self.first_seen[owner] < interval:
            # Just after an operator start: a pod change or a whole interval of its own
            # first, so a restart writes nothing (no burst of status writes at start-up).
            return
        cost = cost_status(
            gpu_seconds=seconds,
            tokens=served,
            gpu_hour_price=self.gpu_hour_price,
            counted_since=self.since[owner],
            updated_at=rfc3339(now),
        )
        async with self.controller.locks[owner]:
            if owner not in self.controller.bodies:
                return
            try:
                result = await asyncio.to_thread(
                    self.controller.client.patch_status, owner[0], owner[1], {"cost": cost}
                )
            except ApiError as error:
                log.info("day-2: cost status of %s/%s not written: API %s", *owner, error.status)
                return
            metrics.WRITES.labels(verb="patch", kind="LLMDeployment/status").inc()
            # The next reconcile must start from this status, or its full patch would put
            # the old cost back.
            self.controller.remember_owner(result)
