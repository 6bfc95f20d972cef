"""The canary's shell: reads what the rollout state machine needs from the cache and from
Prometheus, and turns its decision into objects to apply and status to write.

The decisions themselves are `llm_operator.rollout` (pure); this module only gathers inputs
(the live stable and canary Deployments, the rollout-command annotation, one analysis) and
shapes outputs (the stable Deployment keeps its live template while a canary runs, the canary
Deployment sized from the weight, status.canary and the CanaryProgressing condition).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException

from llm_operator.api import LLMDeployment
from llm_operator.api.v1alpha1 import CanarySpec, parse_duration_seconds
from llm_operator.constants import ANNOTATION_POD_TEMPLATE_HASH, ANNOTATION_ROLLOUT_COMMAND
from llm_operator.planner import Plan
from llm_operator.reconcile import deployment_counts, key, owned, set_condition
from llm_operator.render import RenderConfig, object_name, pod_template_hash, render_deployment
from llm_operator.rollout import (
    COMMANDS,
    CanaryState,
    Decision,
    Observed,
    Sample,
    TrackSample,
    analysis_queries,
    decide,
    parse_state,
)
from llm_operator.rollout.machine import analysis_due, to_status

log = logging.getLogger("llm_operator.controller")

PROMETHEUS_TIMEOUT_SECONDS = 5


class Analyst:
    """Asks Prometheus for one analysis: both tracks' requests, errors and TTFT p95."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.prometheus = (
            PrometheusConnect(url=url, disable_ssl=True, timeout=PROMETHEUS_TIMEOUT_SECONDS)
            if url
            else None
        )

    def sample(self, served_name: str, interval_seconds: float) -> tuple[Sample | None, str]:
        if self.prometheus is None:
            return None, "no Prometheus configured (llm-operator run --prometheus-url)"
        try:
            tracks = [self._track(served_name, t, interval_seconds) for t in ("canary", "stable")]
        except (requests.RequestException, PrometheusApiClientException, ValueError) as error:
            return None, f"Prometheus at {self.url} did not answer: {_short(error)}"
        return Sample(canary=tracks[0], stable=tracks[1]), ""

    def scalars(self, *queries: str) -> list[float | None] | None:
        """Instant queries' values; None when Prometheus is unset or did not answer."""
        if self.prometheus is None:
            return None
        try:
            return [self._scalar(q) for q in queries]
        except (requests.RequestException, PrometheusApiClientException, ValueError) as error:
            log.info("Prometheus at %s did not answer: %s", self.url, _short(error))
            return None

    def _track(self, served_name: str, track: str, interval_seconds: float) -> TrackSample:
        queries = analysis_queries(served_name, track, interval_seconds)
        return TrackSample(
            requests=self._scalar(queries.requests),
            errors=self._scalar(queries.errors),
            ttft_p95=self._scalar(queries.ttft_p95),
            tpot_p95=self._scalar(queries.tpot_p95),
        )

    def _scalar(self, query: str) -> float | None:
        assert self.prometheus is not None
        result = self.prometheus.custom_query(query=query)
        if not result:
            return None
        value = float(result[0]["value"][1])
        return value if math.isfinite(value) else None


def _short(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]


@dataclass(frozen=True)
class CanaryStep:
    """One reconcile's canary outcome for the controller."""

    desired: list[dict[str, Any]]
    decision: Decision
    stable_revision: str | None


def command_of(body: Mapping[str, Any]) -> str | None:
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    value = str(annotations.get(ANNOTATION_ROLLOUT_COMMAND) or "").strip().lower()
    return value if value in COMMANDS else None


def plan_canary(
    *,
    llmd: LLMDeployment,
    body: Mapping[str, Any],
    config: RenderConfig,
    sizing: Plan,
    desired: list[dict[str, Any]],
    live: list[dict[str, Any]],
    analyst: Analyst,
    now: float | None = None,
) -> CanaryStep:
    """The desired objects with the canary's say, and the decision to record."""
    spec = llmd.spec.rollout.canary
    assert spec is not None
    now = time.time() if now is None else now
    live_by_key = {key(obj): obj for obj in live}
    stable_name, canary_name = object_name(llmd), object_name(llmd, "canary")
    live_stable = live_by_key.get(("Deployment", stable_name))
    live_canary = live_by_key.get(("Deployment", canary_name))
    desired_revision = pod_template_hash(llmd, config, sizing)
    stable_revision = _revision(live_stable)
    state = parse_state((body.get("status") or {}).get("canary"))
    observed = Observed(
        now=now,
        desired_revision=desired_revision,
        stable_revision=stable_revision,
        stable_replicas=_stable_replicas(llmd, live_stable),
        stable_rolled_out=live_stable is not None
        and stable_revision == desired_revision
        and deployment_counts([live_stable])[2],
        canary_ready=int(((live_canary or {}).get("status") or {}).get("readyReplicas") or 0),
        command=command_of(body),
    )
    observed = _with_analysis(spec, state, observed, llmd, analyst)
    decision = decide(spec, state, observed)
    objects = [copy.deepcopy(obj) for obj in desired]
    if decision.stable_template == "live" and live_stable is not None:
        for obj in objects:
            if key(obj) == ("Deployment", stable_name):
                _keep_live_template(obj, live_stable)
    if decision.canary_replicas is not None:
        canary = render_deployment(
            llmd, config, sizing, track="canary", replicas=decision.canary_replicas
        )
        objects += owned([canary], body)
    return CanaryStep(objects, decision, stable_revision)


def _with_analysis(
    spec: CanarySpec,
    state: CanaryState | None,
    observed: Observed,
    llmd: LLMDeployment,
    analyst: Analyst,
) -> Observed:
    if not analysis_due(spec, state, observed.now):
        return observed
    interval = parse_duration_seconds(spec.analysis.interval)
    sample, why = analyst.sample(llmd.spec.model.effective_served_name, interval)
    return Observed(
        **{**observed.__dict__, "analysis_ran": True, "sample": sample, "sample_error": why}
    )


def _revision(deployment: Mapping[str, Any] | None) -> str | None:
    if deployment is None:
        return None
    annotations = (deployment.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(ANNOTATION_POD_TEMPLATE_HASH)
    return str(value) if value else None


def _stable_replicas(llmd: LLMDeployment, live_stable: Mapping[str, Any] | None) -> int:
    replicas = ((live_stable or {}).get("spec") or {}).get("replicas")
    return int(replicas) if isinstance(replicas, int) else llmd.spec.desired_replicas


def _keep_live_template(obj: dict[str, Any], live: Mapping[str, Any]) -> None:
    """The stable Deployment as rendered, but running the template it runs now."""
    obj["spec"]["template"] = copy.deepcopy(live["spec"]["template"])
    revision = _revision(live)
    if revision:
        obj["metadata"].setdefault("annotations", {})[ANNOTATION_POD_TEMPLATE_HASH] = revision


def canary_status(
    status: dict[str, Any],
    step: CanaryStep,
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    """status.canary, the CanaryProgressing condition, and the stable's revision."""
    decision = step.decision
    status = dict(status)
    if decision.state is None:
        status.pop("canary", None)
    else:
        status["canary"] = to_status(decision.state)
    if step.stable_revision and decision.stable_template == "live":
        status["revision"] = step.stable_revision
    conditions = list(status.get("conditions") or [])
    if decision.progressing is not None:
        conditions = set_condition(
            conditions, "CanaryProgressing", *decision.progressing, generation, now
        )
    if decision.degraded is not None:
        conditions = set_condition(
            conditions, "Degraded", True, *decision.degraded, generation, now
        )
        status["phase"] = "Degraded"
    status["conditions"] = sorted(conditions, key=lambda c: str(c["type"]))
    return status


def clear_canary(status: dict[str, Any]) -> dict[str, Any]:
    """Strategy is no longer Canary: nothing of a canary stays in status."""
    status = dict(status)
    status.pop("canary", None)
    status["conditions"] = [
        c for c in status.get("conditions") or [] if c.get("type") != "CanaryProgressing"
    ]
    return status
