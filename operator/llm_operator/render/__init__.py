"""LLMDeployment -> Kubernetes manifests (pure: plain data in, JSON-ready dicts out).

`render_all(llmd, config)` returns the stable track's objects in a fixed order: the
NetworkPolicy (when the installation enables them; first, so no engine pod runs unfenced),
Deployment, Service, PodDisruptionBudget (when more than one replica can run), then the
autoscaler (HorizontalPodAutoscaler, or a KEDA ScaledObject), and the PodMonitor and
PrometheusRule that spec.monitoring asks for. The canary track's Deployment
comes from `render_deployment(..., track="canary", replicas=n)`. ownerReferences are included
once the LLMDeployment has a uid (as it does inside the operator). Anything the core refuses
raises `PlanError` (`RenderError` is one) with a message a person can act on.
"""

from __future__ import annotations

from typing import Any

from llm_operator.api.v1alpha1 import LLMDeployment
from llm_operator.planner import Plan, PlanError, plan
from llm_operator.render.autoscaler import (
    keda_query,
    render_autoscaler,
    render_hpa,
    render_scaled_object,
)
from llm_operator.render.config import RenderConfig, RenderError
from llm_operator.render.disruption_budget import render_pdb
from llm_operator.render.monitoring import render_pod_monitor, render_prometheus_rule
from llm_operator.render.names import Track, object_name, owner_reference
from llm_operator.render.network_policy import render_network_policy
from llm_operator.render.service import render_service, service_endpoint
from llm_operator.render.vllm_deployment import pod_template_hash, render_deployment

__all__ = [
    "PlanError",
    "RenderConfig",
    "RenderError",
    "Track",
    "keda_query",
    "object_name",
    "owner_reference",
    "pod_template_hash",
    "render_all",
    "render_autoscaler",
    "render_deployment",
    "render_hpa",
    "render_network_policy",
    "render_pdb",
    "render_pod_monitor",
    "render_prometheus_rule",
    "render_scaled_object",
    "render_service",
    "service_endpoint",
    "status_extras",
]


def render_all(
    llmd: LLMDeployment, config: RenderConfig | None = None, *, sizing: Plan | None = None
) -> list[dict[str, Any]]:
    """Every object of the stable track, in apply order. `sizing` reuses a plan the caller
    already made (for status); without it the planner runs here."""
    config = config or RenderConfig()
    sizing = sizing or plan(llmd.spec)
    objects: list[dict[str, Any] | None] = [
        render_network_policy(llmd, config),
        render_deployment(llmd, config, sizing),
        render_service(llmd),
        render_pdb(llmd),
        render_autoscaler(llmd, config),
        render_pod_monitor(llmd, config),
        render_prometheus_rule(llmd, config),
    ]
    return [obj for obj in objects if obj is not None]


def status_extras(
    llmd: LLMDeployment, config: RenderConfig | None = None, *, sizing: Plan | None = None
) -> dict[str, Any]:
    """The status fields rendering decides, on the wire (camelCase): gpusPerReplica,
    endpoint, servedName, revision (the stable pod-template hash) and plan (without the numbers
    the planner could not know for a model outside the catalog)."""
    config = config or RenderConfig()
    sizing = sizing or plan(llmd.spec)
    status_plan = sizing.sizing_plan()
    return {
        "gpusPerReplica": sizing.gpus_per_replica,
        "endpoint": service_endpoint(llmd, config),
        "servedName": llmd.spec.model.effective_served_name,
        "revision": pod_template_hash(llmd, config, sizing),
        "plan": status_plan.model_dump(by_alias=True, mode="json", exclude_none=True),
    }
