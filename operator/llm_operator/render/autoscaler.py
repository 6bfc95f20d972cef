"""The stable track's autoscaler: an HPA (through prometheus-adapter) or a KEDA ScaledObject.

Autoscaling follows vLLM's queue: `vllm:num_requests_waiting` per replica, the requests
admitted but not yet scheduled because the batch (or the KV cache) is full. docs/autoscaling.md
has the prometheus-adapter rule that serves it to the HPA.
"""

from __future__ import annotations

from typing import Any

from llm_operator.api.v1alpha1 import AutoscalingSpec, LLMDeployment, ScalingBehavior
from llm_operator.render.config import RenderConfig, RenderError
from llm_operator.render.names import common_labels, object_metadata, object_name

VLLM_QUEUE_METRIC = "vllm:num_requests_waiting"

# Defaults of the API's autoscaling docs: scale up at once by up to 4 pods per 30 s (a queue
# means users wait now); scale down after 5 minutes of calm, one pod a minute (a GPU pod
# takes minutes to come back).
SCALE_UP_DEFAULT = ScalingBehavior(stabilization_seconds=0, max_pods_per_step=4, period_seconds=30)
SCALE_DOWN_DEFAULT = ScalingBehavior(
    stabilization_seconds=300, max_pods_per_step=1, period_seconds=60
)
KEDA_POLLING_SECONDS = 15


def _quantity(value: float) -> str:
    """A float as a Kubernetes quantity: whole numbers plain, others in thousandths."""
    if float(value).is_integer():
        return str(int(value))
    return f"{max(1, round(value * 1000))}m"


def _rules(given: ScalingBehavior | None, default: ScalingBehavior) -> dict[str, Any]:
    def pick(name: str) -> int:
        value = getattr(given, name) if given is not None else None
        return int(value if value is not None else getattr(default, name))

    return {
        "stabilizationWindowSeconds": pick("stabilization_seconds"),
        "selectPolicy": "Max",
        "policies": [
            {
                "type": "Pods",
                "value": pick("max_pods_per_step"),
                "periodSeconds": pick("period_seconds"),
            }
        ],
    }


def scaling_behavior(autoscaling: AutoscalingSpec) -> dict[str, Any]:
    """HPA behavior: fast scale-up, stabilized scale-down, from the spec or the defaults."""
    return {
        "scaleUp": _rules(autoscaling.scale_up, SCALE_UP_DEFAULT),
        "scaleDown": _rules(autoscaling.scale_down, SCALE_DOWN_DEFAULT),
    }


def _target_ref(llmd: LLMDeployment) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": object_name(llmd)}


def render_hpa(llmd: LLMDeployment, config: RenderConfig) -> dict[str, Any]:
    """autoscaling/v2 HPA on the per-pod queue depth. AverageValue: the HPA sums the metric
    over the pods and divides by the target, so N waiting requests ask for
    ceil(N / targetQueueDepth) replicas."""
    autoscaling = llmd.spec.autoscaling
    assert autoscaling is not None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": object_metadata(llmd, object_name(llmd), common_labels(llmd, "autoscaler")),
        "spec": {
            "scaleTargetRef": _target_ref(llmd),
            "minReplicas": autoscaling.min_replicas,
            "maxReplicas": autoscaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": config.hpa_metric_name},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": _quantity(autoscaling.target_queue_depth),
                        },
                    },
                }
            ],
            "behavior": scaling_behavior(autoscaling),
        },
    }


# Pods are named (<ReplicaSet name>-)[:58] + 5 random characters, and a ReplicaSet is named
# <Deployment>-<pod-template-hash of up to 10 characters>.
_POD_PREFIX_MAX = 58
_RS_HASH_MAX = 10


def stable_pod_matchers(llmd: LLMDeployment, label: str) -> list[str]:
    """PromQL matchers for the stable track's pods, never the canary's. Names are DNS labels
    (letters, digits, '-'), which mean themselves in a regex: nothing to escape."""
    stable, canary = object_name(llmd), object_name(llmd, "canary")
    if len(stable) + 2 + _RS_HASH_MAX <= _POD_PREFIX_MAX:
        # <name>-<hash>-<id>: exactly two more segments, so neither the canary's pods
        # (<name>-canary-<hash>-<id>) nor another <name>-x deployment's match.
        return [f'{label}=~"{stable}-[a-z0-9]+-[a-z0-9]+"']
    # Long names: the API server cuts the pod-name prefix, so match on what survives of it
    # and leave out the canary's pods explicitly.
    return [
        f'{label}=~"{(stable + "-")[:_POD_PREFIX_MAX]}[-a-z0-9]*"',
        f'{label}!~"{(canary + "-")[:_POD_PREFIX_MAX]}.*"',
    ]


def keda_query(llmd: LLMDeployment, config: RenderConfig) -> str:
    """PromQL for the KEDA trigger: waiting requests summed over the stable pods (pods of
    the Deployment are `<name>-<hash>-<suffix>`; the canary's `<name>-canary-...` do not
    match), plus the requests the gateway holds for this model when it reports them."""
    matchers = []
    if llmd.metadata.namespace:
        matchers.append(f'{config.metric_namespace_label}="{llmd.metadata.namespace}"')
    matchers += stable_pod_matchers(llmd, config.metric_pod_label)
    engine = f"sum({VLLM_QUEUE_METRIC}{{{','.join(matchers)}}})"
    if config.gateway_queue_metric is None:
        return engine
    served = llmd.spec.model.effective_served_name
    held = f'sum({config.gateway_queue_metric}{{model="{served}"}})'
    # With no pods (scaled to zero) the engine series vanish: `or vector(0)` keeps the sum.
    return f"({engine} or vector(0)) + ({held} or vector(0))"


def render_scaled_object(llmd: LLMDeployment, config: RenderConfig) -> dict[str, Any]:
    """KEDA ScaledObject with a Prometheus trigger on the same signal; allows minReplicas 0.
    KEDA creates and owns the HPA (named keda-hpa-<name>) and passes the behavior on."""
    autoscaling = llmd.spec.autoscaling
    assert autoscaling is not None
    behavior = scaling_behavior(autoscaling)
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": object_metadata(llmd, object_name(llmd), common_labels(llmd, "autoscaler")),
        "spec": {
            "scaleTargetRef": _target_ref(llmd),
            "minReplicaCount": autoscaling.min_replicas,
            "maxReplicaCount": autoscaling.max_replicas,
            "pollingInterval": KEDA_POLLING_SECONDS,
            # Only the last replica's way to zero waits this long; the HPA behavior rules
            # every other step.
            "cooldownPeriod": behavior["scaleDown"]["stabilizationWindowSeconds"],
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior}},
            "triggers": [
                {
                    "type": "prometheus",
                    "name": "queue-depth",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": autoscaling.prometheus_address
                        or config.keda_prometheus_address,
                        "query": keda_query(llmd, config),
                        "threshold": f"{autoscaling.target_queue_depth:g}",
                        "activationThreshold": "0",
                    },
                }
            ],
        },
    }


def render_autoscaler(llmd: LLMDeployment, config: RenderConfig) -> dict[str, Any] | None:
    """The HPA or ScaledObject the spec asks for, if the installation provides it."""
    autoscaling = llmd.spec.autoscaling
    if autoscaling is None:
        return None
    if autoscaling.provider == "keda":
        if not config.keda_enabled:
            raise RenderError(
                "autoscaling.provider keda, but this operator runs without KEDA "
                "(kedaEnabled: false); use provider: hpa, or install KEDA and enable it"
            )
        return render_scaled_object(llmd, config)
    if not config.hpa_enabled:
        raise RenderError(
            "autoscaling.provider hpa, but this operator runs without queue-depth metrics "
            "for the HPA (hpaEnabled: false); use provider: keda, or install prometheus-adapter "
            "with the rule in docs/autoscaling.md and enable it"
        )
    return render_hpa(llmd, config)
