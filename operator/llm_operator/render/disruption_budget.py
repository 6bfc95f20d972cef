"""The stable track's PodDisruptionBudget."""

from __future__ import annotations

from typing import Any

from llm_operator.api.v1alpha1 import LLMDeployment
from llm_operator.render.names import common_labels, object_metadata, object_name, selector_labels
from llm_operator.render.vllm_deployment import max_replicas


def render_pdb(llmd: LLMDeployment) -> dict[str, Any] | None:
    """At most one stable pod evicted at a time, when more than one can run. maxUnavailable
    (not minAvailable) so a single replica never blocks a node drain, and AlwaysAllow so a
    pod that is still loading its model does not hold the budget either."""
    if max_replicas(llmd) <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_metadata(
            llmd, object_name(llmd), common_labels(llmd, "engine", "stable")
        ),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(llmd, "stable")},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
