"""Installation settings given to a running operator through its environment, as the Helm chart
gives them: the objects it applies to the real API server carry them.

The operator runs as `llm-operator run` in a subprocess (as in test_operator.py) with a handful
of non-default LLMOP_* variables. ScaledObjects need KEDA's CRD: when the cluster lacks it, the
test applies the one of the pinned KEDA module (the same file KEDA's own install applies, so a
later KEDA install shares it).
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube
from harness.providers import Cluster
from test_operator import SPEC, create, free_port, get, wait_ready

REPO = Path(__file__).resolve().parents[1]
KEDA_MODULE = "github.com/kedacore/keda/v2"
KEDA_CRD = "scaledobjects.keda.sh"
KEDA_CRD_FILE = "config/crd/bases/keda.sh_scaledobjects.yaml"

#: Non-default settings, by environment variable, as the chart's Deployment sets them.
SETTINGS = {
    "LLMOP_RUN_AS_USER": "1000",
    # The repository the local cluster runs (vllm/vllm-openai) at a tag other than the API's.
    "LLMOP_DEFAULT_ENGINE_IMAGE": "docker.io/vllm/vllm-openai:v0.10.2",
    "LLMOP_STARTUP_TIMEOUT_SECONDS": "600",
    "LLMOP_HPA_ENABLED": "false",
    "LLMOP_KEDA": "true",
    "LLMOP_KEDA_PROMETHEUS_ADDRESS": "http://127.0.0.1:19090",
    "LLMOP_GATEWAY_QUEUE_METRIC": "llm_gateway_requests_held",
    "LLMOP_CLUSTER_DOMAIN": "corp.example",
}


def keda_version() -> str:
    """KEDA's version pinned for the local cluster, or the issue's v2.21.0."""
    versions = REPO / "e2e" / "cluster" / "versions.env"
    for line in versions.read_text().splitlines():
        if line.startswith("KEDA_VERSION="):
            return line.split("=", 1)[1].strip()
    return "v2.21.0"


def keda_scaledobject_crd() -> dict[str, Any]:
    """KEDA's ScaledObject CRD from the Go module cache (downloaded through the module proxy
    if missing)."""
    found = subprocess.run(
        ["go", "mod", "download", "-json", f"{KEDA_MODULE}@{keda_version()}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd="/",
    )
    if found.returncode != 0:
        pytest.fail(f"cannot fetch KEDA's CRD from the Go module proxy: {found.stderr[-2000:]}")
    module = Path(json.loads(found.stdout)["Dir"])
    crd: dict[str, Any] = yaml.safe_load((module / KEDA_CRD_FILE).read_text())
    return crd


@pytest.fixture(scope="module")
def keda_crd(api_client: client.ApiClient) -> str:
    extensions = client.ApiextensionsV1Api(api_client)
    try:
        extensions.read_custom_resource_definition(KEDA_CRD)
    except ApiException as err:
        if err.status != 404:
            raise
        kube.apply(api_client, keda_scaledobject_crd())
    kube.wait_until(
        f"CRD {KEDA_CRD} Established", lambda: kube.crd_established(api_client, KEDA_CRD), 60
    )
    return KEDA_CRD


def start_operator(
    cluster: Cluster, namespace: str, log_path: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable, "-m", "llm_operator.cli", "run", "--namespace", namespace,
                "--liveness-port", "0", "--metrics-port", str(free_port()),
            ],
            env={**cluster.env(), "PYTHONUNBUFFERED": "1", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


@pytest.fixture
def operator(
    cluster: Cluster, namespace: str, tmp_path: Path, keda_crd: str
) -> Iterator[subprocess.Popen[bytes]]:
    log_path = tmp_path / "operator.log"
    process = start_operator(cluster, namespace, log_path, SETTINGS)
    yield process
    kube.stop_process(process)
    log = log_path.read_text()
    assert "Traceback" not in log, log[-4000:]


def scaled_object(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
            "keda.sh", "v1alpha1", namespace, "scaledobjects", name
        )
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    return found


def test_settings_from_the_environment_reach_the_applied_objects(
    api_client: client.ApiClient, namespace: str, operator: subprocess.Popen[bytes]
) -> None:
    body = copy.deepcopy(SPEC)
    body["spec"]["autoscaling"] = {"provider": "keda", "minReplicas": 1, "maxReplicas": 2}
    del body["spec"]["replicas"]
    create(api_client, namespace, body)
    found = kube.wait_until(
        "the ScaledObject", lambda: scaled_object(api_client, namespace, "qwen"), timeout=60
    )
    [trigger] = found["spec"]["triggers"]
    assert trigger["metadata"]["serverAddress"] == "http://127.0.0.1:19090"
    assert 'llm_gateway_requests_held{model="qwen-7b"}' in trigger["metadata"]["query"]

    dep = client.AppsV1Api(api_client).read_namespaced_deployment("qwen", namespace)
    pod = dep.spec.template.spec
    assert pod.security_context.run_as_user == 1000
    assert pod.security_context.run_as_group == 1000 and pod.security_context.fs_group == 1000
    assert pod.security_context.run_as_non_root is True
    [container] = pod.containers
    assert container.image == "docker.io/vllm/vllm-openai:v0.10.2"
    assert any(e.name == "HOME" for e in container.env)
    probe = container.startup_probe
    assert probe.failure_threshold == math.ceil(600 / probe.period_seconds)

    # The pods start (the local cluster runs the image's repository) and the status reports
    # the endpoint in the configured cluster domain.
    ready = wait_ready(api_client, namespace, "qwen")
    assert ready["status"]["endpoint"].startswith(f"http://qwen.{namespace}.svc.corp.example")


def test_with_hpa_disabled_provider_hpa_is_refused_and_no_hpa_is_made(
    api_client: client.ApiClient, namespace: str, operator: subprocess.Popen[bytes]
) -> None:
    body = copy.deepcopy(SPEC)
    body["metadata"]["name"] = "qwen-hpa"
    body["spec"]["autoscaling"] = {"provider": "hpa", "minReplicas": 1, "maxReplicas": 2}
    del body["spec"]["replicas"]
    create(api_client, namespace, body)

    def refused() -> dict[str, Any] | None:
        status = get(api_client, namespace, "qwen-hpa").get("status") or {}
        degraded = [c for c in status.get("conditions", []) if c["type"] == "Degraded"]
        if degraded and degraded[0]["status"] == "True":
            return dict(degraded[0])
        return None

    degraded = kube.wait_until("provider hpa refused", refused, timeout=60)
    assert "hpaEnabled: false" in degraded["message"], degraded["message"]
    hpas = client.AutoscalingV2Api(api_client).list_namespaced_horizontal_pod_autoscaler(namespace)
    assert hpas.items == []


def test_a_bad_setting_stops_the_operator_at_start_naming_it(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "operator.log"
    process = start_operator(cluster, namespace, log_path, {"LLMOP_RUN_AS_USER": "0"})
    try:
        code = process.wait(timeout=30)
    finally:
        kube.stop_process(process)
    log = log_path.read_text()
    assert code == 2, log
    assert "--run-as-user (env LLMOP_RUN_AS_USER)" in log and "greater than or equal to 1" in log
