"""The kinds the operator owns, and where they live in the API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    def collection_path(self, namespace: str | None) -> str:
        prefix = f"/apis/{self.api_version}" if self.group else f"/api/{self.version}"
        return (
            f"{prefix}/namespaces/{namespace}/{self.plural}"
            if namespace
            else f"{prefix}/{self.plural}"
        )

    def object_path(self, namespace: str, name: str) -> str:
        return f"{self.collection_path(namespace)}/{name}"


LLMDEPLOYMENT = Kind("llmoperator.io/v1alpha1", "LLMDeployment", "llmdeployments")

# Children, in apply order: what pods need first, the autoscaler last.
CHILD_KINDS: tuple[Kind, ...] = (
    # Watched even with policies off, so the ones made while they were on get pruned.
    Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
    Kind("v1", "ConfigMap", "configmaps"),
    Kind("v1", "Service", "services"),
    Kind("apps/v1", "Deployment", "deployments"),
    Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Kind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
    Kind("keda.sh/v1alpha1", "ScaledObject", "scaledobjects"),
    Kind("monitoring.coreos.com/v1", "PodMonitor", "podmonitors"),
    Kind("monitoring.coreos.com/v1", "PrometheusRule", "prometheusrules"),
)
#: Kinds whose CRDs another project installs: watched only when the installation says so.
OPTIONAL_KINDS = {
    "ScaledObject": "keda_enabled",
    "PodMonitor": "prometheus_operator_enabled",
    "PrometheusRule": "prometheus_operator_enabled",
}
# Written, never watched: the gateway's copy of the fallback keys LLMDeployments reference.
SECRET = Kind("v1", "Secret", "secrets")
BY_KIND = {k.kind: k for k in (*CHILD_KINDS, SECRET)}
# Read only, never owned: the engine pods, listed to say why replicas are not turning ready.
POD = Kind("v1", "Pod", "pods")
# Read only, cluster-wide: whether any node has a new revision's nodeSelector labels.
NODE = Kind("v1", "Node", "nodes")


def kind_of(obj: dict[str, object]) -> Kind:
    kind = BY_KIND.get(str(obj.get("kind")))
    if kind is None:
        raise KeyError(f"the operator does not manage kind {obj.get('kind')!r}")
    return kind
