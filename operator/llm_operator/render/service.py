"""The stable track's Service: what status.endpoint names and the routing table falls back on."""

from __future__ import annotations

from typing import Any

from llm_operator.api.v1alpha1 import LLMDeployment
from llm_operator.render.config import RenderConfig
from llm_operator.render.names import common_labels, object_metadata, object_name, selector_labels
from llm_operator.render.vllm_deployment import ENGINE_PORT, PORT_NAME


def render_service(llmd: LLMDeployment) -> dict[str, Any]:
    """ClusterIP Service on port 8000 (`http`) in front of the stable track only: the gateway
    reaches a canary through its own weights, never through this Service."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(llmd, object_name(llmd), common_labels(llmd, "service")),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(llmd, "stable"),
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": ENGINE_PORT,
                    "targetPort": PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }


def service_endpoint(llmd: LLMDeployment, config: RenderConfig) -> str:
    """The in-cluster OpenAI base URL of the stable track (status.endpoint)."""
    namespace = llmd.metadata.namespace or "default"
    host = f"{object_name(llmd)}.{namespace}.svc.{config.cluster_domain}"
    return f"http://{host}:{ENGINE_PORT}/v1"
