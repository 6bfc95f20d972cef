"""The cluster behaves like a production one where the operator depends on it.

Scheduling onto GPU nodes (extended resources, taints and tolerations), pods reaching Running,
garbage collection through ownerReferences, ServiceAccount tokens from TokenRequest, RBAC, and
for the local control plane: the pinned version and an idempotent ``up``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube
from harness.providers import Cluster

GPU = "nvidia.com/gpu"
REPO = Path(__file__).resolve().parents[1]


def _gpu_nodes(api: client.ApiClient) -> list[dict[str, Any]]:
    nodes = [kube.as_dict(api, n) for n in client.CoreV1Api(api).list_node().items]
    return [n for n in nodes if int(n["status"].get("capacity", {}).get(GPU, "0")) > 0]


@pytest.fixture
def gpu_nodes(api_client: client.ApiClient) -> list[dict[str, Any]]:
    nodes = _gpu_nodes(api_client)
    if not nodes:
        pytest.skip(f"no node advertises {GPU} capacity (LLMOP_CLUSTER=local has fake GPU nodes)")
    return nodes


def _deployment(name: str, gpus: int, tolerate: bool = True, replicas: int = 1) -> dict[str, Any]:
    labels = {"app": name}
    container: dict[str, Any] = {"name": "server", "image": "vllm/vllm-openai:v0.11.0"}
    if gpus:
        container["resources"] = {"limits": {GPU: str(gpus)}}
    pod_spec: dict[str, Any] = {"containers": [container]}
    if tolerate:
        # What the operator renders for GPU pods: tolerate the GPU taint whatever its value.
        pod_spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def _pods(api: client.ApiClient, namespace: str, app: str) -> list[dict[str, Any]]:
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"app={app}")
    return [kube.as_dict(api, p) for p in pods.items]


def _condition(obj: dict[str, Any], kind: str) -> bool:
    conditions = obj.get("status", {}).get("conditions") or []
    return any(c["type"] == kind and c["status"] == "True" for c in conditions)


def _ready(pod: dict[str, Any]) -> bool:
    return pod["status"].get("phase") == "Running" and _condition(pod, "Ready")


def test_nodes_are_ready_and_gpu_nodes_look_like_the_gpu_operator_made_them(
    api_client: client.ApiClient, gpu_nodes: list[dict[str, Any]]
) -> None:
    for node in gpu_nodes:
        name, labels = node["metadata"]["name"], node["metadata"]["labels"]
        assert labels.get("nvidia.com/gpu.product"), name
        assert labels.get("nvidia.com/gpu.memory"), name
        assert labels.get("nvidia.com/gpu.count") == node["status"]["capacity"][GPU], name
        assert _condition(node, "Ready"), name


def test_a_gpu_deployment_is_scheduled_onto_a_gpu_node_and_runs(
    api_client: client.ApiClient, namespace: str, gpu_nodes: list[dict[str, Any]]
) -> None:
    kube.apply(api_client, _deployment("gpu-app", gpus=4, replicas=2), namespace)

    def both_ready() -> list[dict[str, Any]] | None:
        pods = _pods(api_client, namespace, "gpu-app")
        return pods if len(pods) == 2 and all(_ready(p) for p in pods) else None

    pods = kube.wait_until("2 Running and Ready pods", both_ready, timeout=90)
    gpu_names = {n["metadata"]["name"] for n in gpu_nodes}
    for pod in pods:
        assert pod["spec"]["nodeName"] in gpu_names
        assert pod["status"]["containerStatuses"][0]["ready"]

    def deployment_ready() -> bool:
        got = client.AppsV1Api(api_client).read_namespaced_deployment_status("gpu-app", namespace)
        return bool(kube.as_dict(api_client, got)["status"].get("readyReplicas") == 2)

    kube.wait_until("the Deployment to report readyReplicas=2", deployment_ready)


def _pending_reason(api: client.ApiClient, namespace: str, app: str) -> str:
    """Wait for the scheduler's FailedScheduling event on the only pod of ``app``."""
    pod = kube.wait_until("the pod to exist", lambda: _pods(api, namespace, app), timeout=60)[0]
    name = pod["metadata"]["name"]

    def failed() -> str | None:
        events = [kube.as_dict(api, e) for e in kube.events_for(api, namespace, name)]
        messages = [str(e["message"]) for e in events if e["reason"] == "FailedScheduling"]
        return messages[-1] if messages else None

    message = kube.wait_until("a FailedScheduling event", failed, timeout=60)
    current = kube.as_dict(api, client.CoreV1Api(api).read_namespaced_pod(name, namespace))
    assert current["status"]["phase"] == "Pending"
    assert not current["spec"].get("nodeName")
    return message


def test_asking_for_more_gpus_than_any_node_has_stays_pending(
    api_client: client.ApiClient, namespace: str, gpu_nodes: list[dict[str, Any]]
) -> None:
    most = max(int(n["status"]["capacity"][GPU]) for n in gpu_nodes)
    kube.apply(api_client, _deployment("too-big", gpus=most + 1), namespace)
    message = _pending_reason(api_client, namespace, "too-big")
    assert f"Insufficient {GPU}" in message


def test_a_gpu_pod_without_the_toleration_is_not_scheduled(
    api_client: client.ApiClient, namespace: str, gpu_nodes: list[dict[str, Any]]
) -> None:
    taints = [t for n in gpu_nodes for t in n["spec"].get("taints") or []]
    if not any(t["key"] == GPU for t in taints):
        pytest.skip(f"the GPU nodes carry no {GPU} taint here")
    kube.apply(api_client, _deployment("no-toleration", gpus=1, tolerate=False), namespace)
    message = _pending_reason(api_client, namespace, "no-toleration")
    assert "untolerated taint" in message and GPU in message


def test_deleting_an_owner_garbage_collects_what_it_owns(
    api_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    uid = kube.as_dict(api_client, owner)["metadata"]["uid"]
    ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=uid)
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="child", owner_references=[ref])),
    )
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="child", owner_references=[ref])),
    )
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def names(listed: Any) -> set[str]:
        return {kube.as_dict(api_client, o)["metadata"]["name"] for o in listed.items}

    def gone() -> bool:
        configmaps = names(core.list_namespaced_config_map(namespace))
        secrets = names(core.list_namespaced_secret(namespace))
        return "child" not in configmaps and "child" not in secrets

    kube.wait_until("the garbage collector to delete the dependents", gone, timeout=60)


def test_deleting_a_deployment_removes_its_replicasets_and_pods(
    api_client: client.ApiClient, namespace: str
) -> None:
    # No GPU and no toleration: only the untainted CPU node can take it.
    kube.apply(api_client, _deployment("cpu-app", gpus=0, tolerate=False), namespace)
    kube.wait_until(
        "a Running pod",
        lambda: any(_ready(p) for p in _pods(api_client, namespace, "cpu-app")),
        timeout=90,
    )
    apps = client.AppsV1Api(api_client)
    apps.delete_namespaced_deployment("cpu-app", namespace, propagation_policy="Background")

    def collected() -> bool:
        replicasets = apps.list_namespaced_replica_set(namespace).items
        return not replicasets and not _pods(api_client, namespace, "cpu-app")

    kube.wait_until("ReplicaSets and pods to be collected", collected, timeout=90)


def _token_client(api: client.ApiClient, token: str) -> client.ApiClient:
    conf = client.Configuration()
    conf.host = api.configuration.host
    conf.ssl_ca_cert = api.configuration.ssl_ca_cert
    conf.verify_ssl = api.configuration.verify_ssl
    conf.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(conf)


def test_a_serviceaccount_token_authenticates_and_rbac_limits_it(
    api_client: client.ApiClient, namespace: str
) -> None:
    core, rbac = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader"))
    )
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="configmap-reader"),
            rules=[
                client.V1PolicyRule(
                    api_groups=[""], resources=["configmaps"], verbs=["get", "list"]
                )
            ],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="reader"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="configmap-reader"
            ),
            subjects=[
                client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)
            ],
        ),
    )
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
    )
    issued = core.create_namespaced_service_account_token("reader", namespace, request)
    token = kube.as_dict(api_client, issued)["status"]["token"]
    assert token

    with _token_client(api_client, token) as as_reader:
        review = client.AuthenticationV1Api(as_reader).create_self_subject_review(
            client.V1SelfSubjectReview()
        )
        username = kube.as_dict(as_reader, review)["status"]["userInfo"]["username"]
        assert username == f"system:serviceaccount:{namespace}:reader"
        reader = client.CoreV1Api(as_reader)
        # Granted: configmaps in its own namespace (kube-root-ca.crt is always there).
        kube.wait_until(
            "RBAC to allow listing configmaps",
            lambda: reader.list_namespaced_config_map(namespace).items,
            timeout=30,
        )
        # Not granted: secrets here, configmaps elsewhere, anything cluster-wide.
        for call in (
            lambda: reader.list_namespaced_secret(namespace),
            lambda: reader.list_namespaced_config_map("default"),
            lambda: reader.list_node(),
        ):
            with pytest.raises(ApiException) as denied:
                call()
            assert denied.value.status == 403


def test_the_api_server_reports_the_pinned_version(
    cluster: Cluster, api_client: client.ApiClient
) -> None:
    if cluster.provider != "local":
        pytest.skip("the pinned version applies to the local control plane")
    from llm_operator_dev.devcluster.layout import read_versions

    pinned = read_versions(REPO / "e2e" / "cluster" / "versions.env").k8s
    version = kube.as_dict(api_client, client.VersionApi(api_client).get_code())
    assert version["gitVersion"] == pinned
    assert (version["major"], version["minor"]) == ("1", pinned.split(".")[1])


def _devcluster(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_operator_dev.devcluster", "cluster", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_second_up_changes_nothing_and_status_reports_it(cluster: Cluster) -> None:
    if cluster.provider != "local":
        pytest.skip("`llm-operator dev cluster` manages the local control plane only")
    before = _devcluster("status", "--json")
    assert before.returncode == 0, before.stdout + before.stderr
    again = _devcluster("up", "--no-build")
    assert again.returncode == 0, again.stderr
    assert "nothing changed" in again.stderr
    after = _devcluster("status", "--json")
    assert after.returncode == 0
    pids = {n: c["pid"] for n, c in json.loads(before.stdout)["components"].items()}
    assert pids == {n: c["pid"] for n, c in json.loads(after.stdout)["components"].items()}
    status = json.loads(after.stdout)
    assert {n["name"] for n in status["nodes"] if n["ready"]} >= {"gpu-0", "cpu-0"}
