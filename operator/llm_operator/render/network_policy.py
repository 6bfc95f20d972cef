"""The NetworkPolicy that keeps everything but the gateway and Prometheus off the engine pods.

Without it any pod in the cluster can call an engine directly and skip the gateway's keys,
budgets and limits. Choices, and why:

- One policy per LLMDeployment, selecting both tracks: the canary's pods serve the same model
  and need the same fence. The selector is the Deployments' own (the deployment label, and
  the track label limited to stable and canary), so it can never drift from the pods.
- Ingress only: what an engine calls (the Hugging Face Hub, object storage for weights) is
  the platform's egress policy, and blocking it here would stop models from loading.
- One port: vLLM serves the OpenAI API and /metrics on the same port, so the gateway and
  Prometheus are admitted to it and to nothing else.
- No engine-to-engine rule: every replica is one pod (tensor and pipeline parallel stay inside
  it), so engines never talk to each other. A multi-node topology (LeaderWorkerSet) would
  need one.
- Kubelet probes keep working: NetworkPolicy never blocks traffic from a pod's own node.
- Only enforced by a network plugin that implements NetworkPolicy (Calico, Cilium, ...);
  elsewhere the API server stores it and nothing changes.
"""

from __future__ import annotations

from typing import Any

from llm_operator.api.v1alpha1 import LLMDeployment
from llm_operator.constants import LABEL_TRACK
from llm_operator.render.config import RenderConfig
from llm_operator.render.label_selector import parse_label_selector
from llm_operator.render.names import common_labels, object_metadata, object_name, selector_labels
from llm_operator.render.vllm_deployment import ENGINE_PORT

#: The label every namespace carries with its own name (Kubernetes 1.21 and later).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
TRACKS = ("stable", "canary")


def engine_pod_selector(llmd: LLMDeployment) -> dict[str, Any]:
    """The pods of both tracks: the labels the two Deployments' selectors share, and the
    track label limited to the tracks they select."""
    shared = {k: v for k, v in selector_labels(llmd).items() if k != LABEL_TRACK}
    return {
        "matchLabels": shared,
        "matchExpressions": [{"key": LABEL_TRACK, "operator": "In", "values": list(TRACKS)}],
    }


def _peers(config: RenderConfig) -> list[dict[str, Any]]:
    peers: list[dict[str, Any]] = []
    if config.gateway_namespace is not None:
        peers.append(
            {
                "namespaceSelector": {
                    "matchLabels": {NAMESPACE_NAME_LABEL: config.gateway_namespace}
                },
                "podSelector": parse_label_selector(config.network_policy_gateway_pod_selector),
            }
        )
    peers.append(
        {
            "namespaceSelector": parse_label_selector(
                config.network_policy_prometheus_namespace_selector
            ),
            "podSelector": parse_label_selector(config.network_policy_prometheus_pod_selector),
        }
    )
    return peers


def render_network_policy(llmd: LLMDeployment, config: RenderConfig) -> dict[str, Any] | None:
    """Ingress to the engine port from the gateway's pods (in the gateway's namespace) and
    Prometheus' pods only; None unless the installation turns policies on."""
    if not config.network_policy_enabled:
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_metadata(llmd, object_name(llmd), common_labels(llmd, "network-policy")),
        "spec": {
            "podSelector": engine_pod_selector(llmd),
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": _peers(config),
                    "ports": [{"protocol": "TCP", "port": ENGINE_PORT}],
                }
            ],
        },
    }
