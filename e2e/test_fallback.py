"""Fallbacks in a real install (the chart's ServiceAccounts and RBAC): an external fallback's API
key from a Secret in the LLMDeployment's namespace and its rotation with no restart; a model
that loses every pod answered by its fallback model, with FallbackActive while it lasts.

The "provider" is a simulator pod that requires a bearer key (vLLM's `--api-key`); the model's
own engine answers every request with 500, so every request takes the fallback.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from openai import APIStatusError, OpenAI

from harness import kube
from harness.providers import Cluster
from harness.serving import (
    GATEWAY_PORT,
    Load,
    Serving,
    installed,
    llmd,
    pod_prometheus_url,
    reach,
    ready_pods,
)

PROVIDER_KEY = "sk-provider-e2e-1"
ENGINE_PORT = 8000


@pytest.fixture(scope="module")
def serving(
    cluster: Cluster, api_client: client.ApiClient, crd_names: list[str], tmp_path_factory: Any
) -> Iterator[Serving]:
    url = pod_prometheus_url(cluster)
    values = [f"operator.prometheusUrl={url}"] if url else []
    home = tmp_path_factory.mktemp("helm-home")
    with installed(cluster, api_client, home, "fallback", *values) as s:
        yield s


def provider_pod(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "provider", "namespace": namespace, "labels": {"app": "provider"}},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "engine",
                    "image": "vllm/vllm-openai:v0.11.0",
                    "args": [
                        "meta-llama/Llama-3.1-8B-Instruct",
                        "--served-model-name",
                        "ext-model",
                        "--port",
                        str(ENGINE_PORT),
                        "--api-key",
                        PROVIDER_KEY,
                    ],
                    "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
                    "readinessProbe": {
                        "httpGet": {"path": "/health", "port": ENGINE_PORT},
                        "periodSeconds": 1,
                    },
                }
            ],
        },
    }


def secret(name: str, token: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "stringData": {"token": token}}


def test_a_fallback_key_from_a_secret_reaches_the_gateway_and_rotates(serving: Serving) -> None:
    if serving.cluster.provider != "local":
        pytest.skip("the provider pod runs the simulator image, which only the local cluster has")
    core = client.CoreV1Api(serving.api)
    ns = serving.namespace
    core.create_namespaced_pod(ns, provider_pod(ns))
    [provider] = kube.wait_until(
        "the provider Ready", lambda: ready_pods(serving.api, ns, "app=provider"), 90
    )
    core.create_namespaced_secret(ns, secret("provider-key", "sk-wrong"))
    body = llmd("keyed", env=[{"name": "LLMOP_SIM_ERROR_RATE_500", "value": "1.0"}])
    body["spec"]["routing"] = {
        "fallbacks": [
            {
                "url": f"http://{provider.status.pod_ip}:{ENGINE_PORT}/v1",
                "model": "ext-model",
                "apiKeySecretRef": {"name": "provider-key", "key": "token"},
            }
        ]
    }
    serving.apply(body)
    serving.wait_ready("keyed")
    gateway = serving.gateway_pod()
    with reach(serving.cluster, gateway, GATEWAY_PORT) as base:
        serving.wait_routed(base, "keyed")
        sdk = OpenAI(base_url=f"{base}/v1", api_key="e2e", max_retries=0, timeout=30)

        def ask() -> Any:
            return sdk.chat.completions.create(
                model="keyed", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )

        # The wrong key, copied from the Secret: the provider refuses it.
        def refused() -> bool:
            try:
                ask()
            except APIStatusError as error:
                return error.status_code == 401
            return False

        kube.wait_until("the provider to refuse the wrong key", refused, timeout=60)
        # Rotate the Secret in the LLMDeployment's namespace to the right key.
        core.patch_namespaced_secret("provider-key", ns, {"stringData": {"token": PROVIDER_KEY}})
        rotated = time.monotonic()

        def answered() -> Any:
            try:
                return ask()
            except APIStatusError:
                return None

        reply = kube.wait_until("the rotated key to work", answered, timeout=90, interval=1)
        took = time.monotonic() - rotated
    assert reply.model == "ext-model"
    assert took <= 60, took
    print(f"rotated key in use after {took:.1f}s")
    # No restart: the same gateway pod, never restarted.
    now = core.read_namespaced_pod(gateway.metadata.name, ns)
    assert now.metadata.uid == gateway.metadata.uid
    assert all(s.restart_count == 0 for s in now.status.container_statuses)
    # The gateway's copy holds exactly the referenced key, nothing else of the Secret's
    # namespace.
    [keys] = core.list_namespaced_secret(
        ns, label_selector="app.kubernetes.io/component=gateway-keys"
    ).items
    assert set(keys.data) == {f"{ns}_provider-key_token"}
    assert base64.b64decode(keys.data[f"{ns}_provider-key_token"]).decode() == PROVIDER_KEY


def fallback_active(serving: Serving, name: str) -> dict[str, Any] | None:
    conditions = (serving.get(name).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "FallbackActive"), None)


def test_a_model_that_loses_every_pod_is_answered_by_its_fallback(serving: Serving) -> None:
    if serving.cluster.provider != "local":
        pytest.skip("needs the local cluster's Prometheus (or LLMOP_E2E_PROMETHEUS_POD_URL)")
    serving.apply(llmd("backup"))
    # Restarted pods take 30 s to turn ready, so the outage lasts long enough to watch.
    primary = llmd("primary", env=[{"name": "LLMOP_SIM_STARTUP_DELAY", "value": "30"}])
    primary["spec"]["routing"] = {
        "fallbacks": [{"llmDeployment": "backup"}],
        "hold": {"fallbackWhileCold": True},
    }
    serving.apply(primary)
    serving.wait_ready("backup")
    serving.wait_ready("primary", timeout=240)
    core = client.CoreV1Api(serving.api)
    with reach(serving.cluster, serving.gateway_pod(), GATEWAY_PORT) as base:
        serving.wait_routed(base, "primary")
        with Load(base, "primary", clients=2) as load:
            load.wait_for_requests(10)
            quiet = kube.wait_until(
                "FallbackActive False", lambda: fallback_active(serving, "primary"), 90
            )
            assert quiet["status"] == "False", quiet
            for pod in core.list_namespaced_pod(
                serving.namespace, label_selector="llmoperator.io/deployment=primary"
            ).items:
                core.delete_namespaced_pod(pod.metadata.name, serving.namespace)
            active = kube.wait_until(
                "FallbackActive True",
                lambda: (c := fallback_active(serving, "primary")) and c["status"] == "True" and c,
                90,
            )
            load.wait_for_requests(20)
            serving.wait_ready("primary", timeout=120)
            load.wait_for_requests(20)
        assert load.failures == [], load.failures[:5]
    assert "fell back" in active["message"], active
    print(f"FallbackActive: {active['message']}")
    # The window (120 s) passes with no fallback: False again.
    over = kube.wait_until(
        "FallbackActive False again",
        lambda: (c := fallback_active(serving, "primary")) and c["status"] == "False" and c,
        240,
        interval=5,
    )
    assert over["reason"] == "NoFallback"
