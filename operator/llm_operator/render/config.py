"""Operator-level settings the renderers need: one per installation, not per LLMDeployment.

The Helm chart sets them (through the operator's environment or a config file); tests and the
`llm-operator render` CLI build them directly. Field names are camelCase on the wire, like the
API models, and unknown keys are refused so a typo is not silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from llm_operator.planner import PlanError
from llm_operator.render.label_selector import parse_label_selector

DEFAULT_HPA_METRIC = "vllm_num_requests_waiting"
"""vLLM's `vllm:num_requests_waiting` as prometheus-adapter exposes it. The adapter rule in
docs/autoscaling.md renames `:` to `_`: the custom-metrics API serves metric names as URL path
segments, and a plain identifier keeps them portable across adapters and Helm values."""


class RenderConfig(BaseModel):
    """Settings of this operator installation that shape every rendered object."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
    )

    cluster_domain: str = "cluster.local"
    """DNS suffix of Services, for the in-cluster endpoint URL."""
    gateway_namespace: str | None = None
    """Namespace of the gateway; the routing-table render uses it (not yet)."""
    default_engine_image: str | None = None
    """Engine image for specs that leave engine.image unset (a mirror, a pinned digest).
    None keeps the API's default."""
    model_cache_mount_path: str = "/models"
    """Where model.cache is mounted; HF_HOME points there."""
    model_source_mount_path: str = "/mnt/model"
    """Where a pvc:// model's claim is mounted (read-only)."""
    hpa_enabled: bool = True
    """Render a HorizontalPodAutoscaler for provider hpa (needs prometheus-adapter). Off: an
    LLMDeployment asking for provider hpa is refused (Degraded, CannotPlan) with what to do."""
    keda_enabled: bool = True
    """KEDA's CRDs are installed: provider keda is allowed."""
    prometheus_operator_enabled: bool = False
    """prometheus-operator's CRDs (monitoring.coreos.com) are installed: spec.monitoring may
    ask for a PodMonitor and a PrometheusRule per LLMDeployment. Off: those are refused
    (Degraded) with what to do."""
    runbook_base_url: str = (
        "https://github.com/llm-operator/llm-operator/blob/main/docs/runbooks.md"
    )
    """Where the runbooks live; each per-LLMDeployment alert links this plus its anchor."""
    hpa_metric_name: str = DEFAULT_HPA_METRIC
    """Pods metric the HPA reads, as prometheus-adapter names it."""
    keda_prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090"
    """Prometheus the KEDA trigger queries unless the spec names one."""
    metric_namespace_label: str = "namespace"
    """Label carrying the pod's namespace on scraped series (Prometheus' Kubernetes SD)."""
    metric_pod_label: str = "pod"
    """Label carrying the pod's name on scraped series."""
    gateway_queue_metric: str | None = None
    """Gateway gauge of requests held per model (label `model`), added to the KEDA query so
    a deployment scaled to zero wakes up when requests wait at the gateway."""
    startup_timeout_seconds: Annotated[int, Field(ge=60, le=86400)] | None = None
    """Start-up budget of the engine (download, load, compile). None: sized from the weights,
    15 to 60 minutes."""
    run_as_user: Annotated[int, Field(ge=1)] | None = None
    """Run the engine as this non-root UID with a writable HOME. None: the image's user
    (root for vllm/vllm-openai); the module docstring of render/vllm_deployment.py says why."""

    network_policy_enabled: bool = False
    """Render a NetworkPolicy per LLMDeployment: only the gateway and Prometheus reach its
    engine pods, on the engine port. Off: the operator deletes the policies it made."""
    network_policy_gateway_pod_selector: str = (
        "app.kubernetes.io/name=llm-operator,app.kubernetes.io/component=gateway"
    )
    """Label selector (k=v,...) of the gateway pods in the gateway namespace that the policy
    admits (the chart passes its own gateway's labels). No gateway namespace: none is."""
    network_policy_prometheus_namespace_selector: str = "kubernetes.io/metadata.name=monitoring"
    """Label selector (k=v,...) of the namespaces Prometheus runs in, for the policy."""
    network_policy_prometheus_pod_selector: str = "app.kubernetes.io/name=prometheus"
    """Label selector (k=v,...) of the Prometheus pods the policy admits to scrape engines."""

    @field_validator(
        "network_policy_gateway_pod_selector",
        "network_policy_prometheus_namespace_selector",
        "network_policy_prometheus_pod_selector",
    )
    @classmethod
    def _selector(cls, text: str) -> str:
        # Refused at start-up, not at the first render: a bad selector is the installer's.
        parse_label_selector(text)
        return text

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> RenderConfig:
        """Settings from a parsed config file (camelCase or snake_case keys)."""
        return cls.model_validate(values or {})


class RenderError(PlanError):
    """This operator installation cannot render what the spec asks for. A PlanError, so
    callers catch one type for every spec the core refuses."""
