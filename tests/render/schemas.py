"""Validation of rendered objects against the real Kubernetes schemas.

kubernetes-validate ships the OpenAPI schemas of each Kubernetes release; strict mode also
rejects fields the schema does not know, which is how a misspelt field would otherwise slip
through. KEDA's ScaledObject is a CRD outside those schemas: its shape is checked by hand.
"""

from __future__ import annotations

from typing import Any

from kubernetes_validate import utils as kubernetes_validate

KUBERNETES_VERSION = kubernetes_validate.latest_version()
"""The newest release the installed kubernetes-validate knows (1.37 when this was written)."""


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


assert _minor(KUBERNETES_VERSION) >= (1, 33), f"kubernetes-validate too old: {KUBERNETES_VERSION}"


def validate(obj: dict[str, Any]) -> None:
    """Raise if `obj` is not a valid object of the current release (strict)."""
    if obj["apiVersion"] == "keda.sh/v1alpha1":
        assert_scaled_object_shape(obj)
        return
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def assert_scaled_object_shape(obj: dict[str, Any]) -> None:
    """What KEDA's CRD (keda.sh/v1alpha1 ScaledObject) requires of what we render."""
    assert obj["kind"] == "ScaledObject"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    spec = obj["spec"]
    allowed = {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "advanced",
        "triggers",
    }
    assert set(spec) <= allowed, set(spec) - allowed
    assert set(spec["scaleTargetRef"]) == {"apiVersion", "kind", "name"}
    assert isinstance(spec["minReplicaCount"], int) and spec["minReplicaCount"] >= 0
    assert isinstance(spec["maxReplicaCount"], int)
    assert spec["maxReplicaCount"] >= max(1, spec["minReplicaCount"])
    assert set(spec["advanced"]) == {"horizontalPodAutoscalerConfig"}
    assert set(spec["advanced"]["horizontalPodAutoscalerConfig"]) == {"behavior"}
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] in {"AverageValue", "Value", "Utilization"}
    metadata = trigger["metadata"]
    assert set(metadata) == {"serverAddress", "query", "threshold", "activationThreshold"}
    # KEDA reads trigger metadata as strings only.
    assert all(isinstance(value, str) for value in metadata.values())
    float(metadata["threshold"])
    float(metadata["activationThreshold"])
    # The HPA behavior KEDA passes on must itself be valid autoscaling/v2.
    probe = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "probe"},
        "spec": {
            "scaleTargetRef": spec["scaleTargetRef"],
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        },
    }
    kubernetes_validate.validate(probe, KUBERNETES_VERSION, strict=True)
