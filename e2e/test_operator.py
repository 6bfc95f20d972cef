"""The operator against a real API server: create, roll, refuse, repair, delete, restart.

The operator runs as a subprocess (`llm-operator run`), exactly as a person would start it,
watching only the test's namespace; kwok runs the pods, so Deployments really become ready.
"""

from __future__ import annotations

import copy
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube
from harness.providers import Cluster

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "llmoperator.io", "v1alpha1", "llmdeployments"

SPEC: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "LLMDeployment",
    "metadata": {"name": "qwen"},
    "spec": {
        "model": {"name": "Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen-7b"},
        "engine": {"maxModelLen": 8192},
        "resources": {"gpu": {"product": "NVIDIA-H100-80GB-HBM3", "memoryGiB": 80}},
        "parallelism": {"tensor": 1},
        "replicas": 1,
    },
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OperatorProcess:
    """`llm-operator run` in a subprocess, with its metrics endpoint for counting writes."""

    def __init__(
        self, cluster: Cluster, namespace: str, log_path: Path, extra: tuple[str, ...] = ()
    ) -> None:
        self.metrics_port = free_port()
        self.log_path = log_path
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "llm_operator.cli", "run", "--namespace", namespace,
                "--liveness-port", "0", "--metrics-port", str(self.metrics_port),
                *extra,
            ],
            env={**cluster.env(), "PYTHONUNBUFFERED": "1"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        kube.wait_until("the operator's metrics endpoint", self._metrics_up, timeout=30)

    def _metrics_up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the operator exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            self.metrics()
        except OSError:
            return False
        return True

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return str(r.read().decode())

    def writes(self) -> float:
        return sum(
            float(m.group(1))
            for m in re.finditer(
                r"^llm_operator_api_writes_total\{[^}]*\} (\S+)$", self.metrics(), re.M
            )
        )

    def stop(self) -> None:
        kube.stop_process(self.process)
        self.log.close()


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster, namespace, tmp_path / "operator.log")
    yield process
    process.stop()
    log = process.log_path.read_text()
    assert "Traceback" not in log, log[-4000:]


def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def create(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    return result


def get(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = custom(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return result


def patch_spec(api: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    custom(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}
    )


def phase_is(api: client.ApiClient, namespace: str, name: str, phase: str) -> dict[str, Any] | None:
    body = get(api, namespace, name)
    status = body.get("status") or {}
    generation = body["metadata"]["generation"]
    if status.get("phase") == phase and status.get("observedGeneration") == generation:
        return body
    return None


def children(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    selector = f"llmoperator.io/deployment={name}"
    return {
        "Deployment": client.AppsV1Api(api)
        .list_namespaced_deployment(namespace, label_selector=selector)
        .items,
        "Service": client.CoreV1Api(api)
        .list_namespaced_service(namespace, label_selector=selector)
        .items,
    }


def deployment(api: client.ApiClient, namespace: str, name: str) -> client.V1Deployment:
    return client.AppsV1Api(api).read_namespaced_deployment(name, namespace)


def wait_ready(
    api: client.ApiClient, namespace: str, name: str, timeout: float = 90
) -> dict[str, Any]:
    return kube.wait_until(
        f"{name} to be Ready", lambda: phase_is(api, namespace, name, "Ready"), timeout=timeout
    )


def test_create_makes_every_child_with_owner_and_reaches_ready(
    api_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    created = create(api_client, namespace, copy.deepcopy(SPEC))
    body = wait_ready(api_client, namespace, "qwen")
    found = children(api_client, namespace, "qwen")
    assert len(found["Deployment"]) == 1 and len(found["Service"]) == 1
    for obj in [*found["Deployment"], *found["Service"]]:
        [ref] = obj.metadata.owner_references
        assert (ref.kind, ref.name, ref.uid, ref.controller) == (
            "LLMDeployment",
            "qwen",
            created["metadata"]["uid"],
            True,
        )
    dep = found["Deployment"][0]
    container = dep.spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert "--served-model-name" in container.args and "qwen-7b" in container.args
    status = body["status"]
    assert status["readyReplicas"] == 1 and status["replicas"] == 1
    assert status["gpusPerReplica"] == 1
    assert status["endpoint"].startswith(f"http://qwen.{namespace}.svc")
    assert status["plan"]["tensorParallelSize"] == 1
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Ready"] == "True" and conditions["Degraded"] == "False"
    # The operator never writes into spec: GitOps tools must see no drift.
    assert get(api_client, namespace, "qwen")["spec"] == SPEC["spec"]
    # Its status writes say who made them (issue 17: they said "OpenAPI-Generator").
    managers = {
        (m["manager"], m.get("subresource", ""))
        for m in get(api_client, namespace, "qwen")["metadata"]["managedFields"]
    }
    # (The test itself created the object with the Python client: that entry is its own.)
    assert {m for m, sub in managers if sub == "status"} == {"llm-operator"}, managers


def test_a_new_image_rolls_the_deployment(
    api_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    create(api_client, namespace, copy.deepcopy(SPEC))
    wait_ready(api_client, namespace, "qwen")
    before = deployment(api_client, namespace, "qwen").metadata.generation
    patch_spec(api_client, namespace, "qwen", {"engine": {"image": "vllm/vllm-openai:v0.11.1"}})
    wait_ready(api_client, namespace, "qwen")
    after = deployment(api_client, namespace, "qwen")
    assert after.spec.template.spec.containers[0].image == "vllm/vllm-openai:v0.11.1"
    assert after.metadata.generation > before
    kube.wait_until(
        "only new pods",
        lambda: (
            {
                p.spec.containers[0].image
                for p in client.CoreV1Api(api_client)
                .list_namespaced_pod(namespace, label_selector="llmoperator.io/deployment=qwen")
                .items
            }
            == {"vllm/vllm-openai:v0.11.1"}
        ),
        timeout=60,
    )


def test_an_impossible_edit_degrades_and_leaves_the_running_model_alone(
    api_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    create(api_client, namespace, copy.deepcopy(SPEC))
    wait_ready(api_client, namespace, "qwen")
    before = deployment(api_client, namespace, "qwen")
    # Qwen2.5-7B has 28 attention heads: tensor-parallel size 8 cannot split them.
    patch_spec(api_client, namespace, "qwen", {"parallelism": {"tensor": 8}})
    body = kube.wait_until(
        "Degraded", lambda: phase_is(api_client, namespace, "qwen", "Degraded"), timeout=60
    )
    degraded = next(c for c in body["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True"
    assert "28" in degraded["message"] and "8" in degraded["message"], degraded["message"]
    after = deployment(api_client, namespace, "qwen")
    assert after.metadata.generation == before.metadata.generation
    assert after.spec.template == before.spec.template
    assert body["status"]["readyReplicas"] == 1
    events = kube.events_for(api_client, namespace, "qwen", kind="LLMDeployment")
    assert any(e.type == "Warning" and "28" in e.message for e in events)
    # Fixing the spec clears it.
    patch_spec(api_client, namespace, "qwen", {"parallelism": {"tensor": 2}})
    wait_ready(api_client, namespace, "qwen")
    dep = deployment(api_client, namespace, "qwen")
    assert dep.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "2"


def test_a_deleted_child_is_recreated_and_a_hand_edit_is_restored(
    api_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    create(api_client, namespace, copy.deepcopy(SPEC))
    wait_ready(api_client, namespace, "qwen")
    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    old_uid = core.read_namespaced_service("qwen", namespace).metadata.uid
    core.delete_namespaced_service("qwen", namespace)

    def recreated() -> bool:
        try:
            return bool(core.read_namespaced_service("qwen", namespace).metadata.uid != old_uid)
        except ApiException as error:
            if error.status == 404:
                return False
            raise

    kube.wait_until("the Service to be recreated", recreated, timeout=30)
    apps.patch_namespaced_deployment(
        "qwen",
        namespace,
        {
            "spec": {
                "template": {"spec": {"containers": [{"name": "vllm", "image": "evil:latest"}]}}
            }
        },
    )
    kube.wait_until(
        "the image to be restored",
        lambda: (
            deployment(api_client, namespace, "qwen").spec.template.spec.containers[0].image
            == "vllm/vllm-openai:v0.11.0"
        ),
        timeout=30,
    )


def test_deleting_the_llmdeployment_garbage_collects_children(
    api_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    create(api_client, namespace, copy.deepcopy(SPEC))
    wait_ready(api_client, namespace, "qwen")
    custom(api_client).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "qwen")
    kube.wait_until(
        "children to be gone",
        lambda: not any(children(api_client, namespace, "qwen").values()),
        timeout=60,
    )


def test_a_restarted_operator_makes_no_writes(
    api_client: client.ApiClient, namespace: str, cluster: Cluster, tmp_path: Path
) -> None:
    first = OperatorProcess(cluster, namespace, tmp_path / "first.log")
    try:
        create(api_client, namespace, copy.deepcopy(SPEC))
        wait_ready(api_client, namespace, "qwen")
        time.sleep(2)  # let the last watch events settle
    finally:
        first.stop()
    versions = {
        "llmd": get(api_client, namespace, "qwen")["metadata"]["resourceVersion"],
        "deployment": deployment(api_client, namespace, "qwen").metadata.resource_version,
    }
    second = OperatorProcess(cluster, namespace, tmp_path / "second.log")
    try:
        # Give it time to list, reconcile everything, and settle.
        kube.wait_until(
            "the operator to reconcile",
            lambda: (
                'llm_operator_reconciles_total{result="ok"} ' in second.metrics()
                and float(
                    re.search(
                        r'llm_operator_reconciles_total\{result="ok"\} (\S+)', second.metrics()
                    )[1]  # type: ignore[index]
                )
                >= 1
            ),
            timeout=30,
        )
        time.sleep(3)
        assert second.writes() == 0, second.metrics()
    finally:
        second.stop()
    assert get(api_client, namespace, "qwen")["metadata"]["resourceVersion"] == versions["llmd"]
    assert (
        deployment(api_client, namespace, "qwen").metadata.resource_version
        == versions["deployment"]
    )


def test_samples_reach_ready(
    api_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    # The samples' engines read a Hugging Face token (pods now start only when it exists).
    client.CoreV1Api(api_client).create_namespaced_secret(
        namespace, {"metadata": {"name": "hf-token"}, "stringData": {"token": "hf_e2e"}}
    )
    for name in ("llama-3-8b.yaml", "llama-3-70b-fp8.yaml"):
        body = yaml.safe_load((REPO / "manifests" / "samples" / name).read_text())
        create(api_client, namespace, body)
    for name in ("llama-3-8b", "llama-3-70b"):
        wait_ready(api_client, namespace, name)
    assert get(api_client, namespace, "llama-3-70b")["status"]["plan"]["tensorParallelSize"] == 2


def test_the_gateway_routing_table_follows_the_llmdeployments(
    api_client: client.ApiClient, namespace: str, cluster: Cluster, tmp_path: Path
) -> None:
    from llm_operator.api.gateway_config import GatewayConfig

    operator = OperatorProcess(
        cluster, namespace, tmp_path / "operator.log", ("--gateway-namespace", namespace)
    )
    core = client.CoreV1Api(api_client)

    def table() -> GatewayConfig | None:
        try:
            data = core.read_namespaced_config_map("llm-operator-routes", namespace).data
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return GatewayConfig.model_validate(yaml.safe_load(data["routes.yaml"]))

    try:
        small = copy.deepcopy(SPEC)
        small["metadata"]["name"] = "small"
        small["spec"]["model"]["servedName"] = "small-chat"
        big = copy.deepcopy(SPEC)
        big["spec"]["routing"] = {"fallbacks": [{"llmDeployment": "small"}]}
        create(api_client, namespace, small)
        create(api_client, namespace, big)
        routes = kube.wait_until(
            "both models in the routing table",
            lambda: (t := table()) is not None and len(t.models) == 2 and t,
            timeout=30,
        )
        qwen = routes.model("qwen-7b")
        assert qwen is not None and [f.model for f in qwen.fallbacks] == ["small-chat"]
        assert qwen.tracks[0].pods is not None
        assert qwen.tracks[0].pods.match_labels["llmoperator.io/deployment"] == "qwen"
        custom(api_client).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "small"
        )
        routes = kube.wait_until(
            "the deleted model to leave the table",
            lambda: (t := table()) is not None and len(t.models) == 1 and t,
            timeout=30,
        )
        qwen = routes.model("qwen-7b")
        assert qwen is not None and qwen.fallbacks == []
    finally:
        operator.stop()
