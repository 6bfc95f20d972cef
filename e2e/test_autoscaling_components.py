"""The autoscalers' metrics APIs on the local cluster serve real queue depth from Prometheus.

KEDA (operator and metrics API server) and prometheus-adapter run beside the control plane
(``llm-operator dev cluster up``), registered with the aggregation layer as
``v1beta1.external.metrics.k8s.io`` and ``v1beta1.custom.metrics.k8s.io``. A plain Deployment
of simulator pods with ``--max-num-seqs 1`` and more concurrent requests than that has a
non-zero ``vllm:num_requests_waiting``; these tests read that number back through each API
and through the HPAs the real controller-manager runs: one made by KEDA from a ScaledObject,
one written directly against prometheus-adapter's pods metric.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from harness import kube
from harness.providers import Cluster
from harness.serving import Load, reach, ready_pods
from llm_operator_dev.devcluster import prometheus

MODEL = "sim"
ENGINE_PORT = 8000
METRIC = "vllm_num_requests_waiting"
EXTERNAL = "v1beta1.external.metrics.k8s.io"
CUSTOM = "v1beta1.custom.metrics.k8s.io"


@pytest.fixture(autouse=True)
def _local_only(cluster: Cluster) -> None:
    if cluster.provider != "local":
        pytest.skip("KEDA and prometheus-adapter are part of the local control plane only")


def raw(cluster: Cluster, path: str) -> Any:
    """``kubectl get --raw path``, decoded."""
    kubectl = cluster.which("kubectl") or "kubectl"
    proc = subprocess.run(
        [kubectl, "get", "--raw", path],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl get --raw {path}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def prom_query(query: str) -> list[dict[str, Any]]:
    url = f"{prometheus.url()}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def quantity(value: str) -> float:
    """A metrics API quantity (``3``, ``2500m``) as a number."""
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def sim_deployment(name: str, replicas: int = 1) -> dict[str, Any]:
    """Simulator pods that run one request at a time, each taking about 2 s: more clients than
    replicas keep requests waiting."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(ENGINE_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [
                        {
                            "name": "engine",
                            "image": "vllm/vllm-openai:v0.11.0",
                            "args": [
                                # The image's entrypoint is `vllm serve`.
                                "meta-llama/Llama-3.1-8B-Instruct",
                                "--served-model-name",
                                MODEL,
                                "--port",
                                str(ENGINE_PORT),
                                "--max-num-seqs",
                                "1",
                            ],
                            # max_tokens=8 at 0.25 s a token: about 2 s a request.
                            "env": [
                                {"name": "LLMOP_SIM_ITL", "value": "0.25"},
                                {"name": "LLMOP_SIM_DRAIN_TIMEOUT", "value": "0"},
                            ],
                            "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
                            "readinessProbe": {
                                "httpGet": {"path": "/health", "port": ENGINE_PORT},
                                "periodSeconds": 1,
                            },
                        }
                    ],
                },
            },
        },
    }


def _apiservice_available(api: client.ApiClient, name: str) -> bool:
    svc = client.ApiregistrationV1Api(api).read_api_service(name)
    return any(c.type == "Available" and c.status == "True" for c in svc.status.conditions or [])


@pytest.fixture
def busy_sim(
    cluster: Cluster, api_client: client.ApiClient, namespace: str
) -> Iterator[tuple[str, Any, float]]:
    """One sim replica under four concurrent clients: (Deployment name, pod, load start)."""
    name = "busy"
    kube.apply(api_client, sim_deployment(name), namespace)
    pods = kube.wait_until(
        "the sim pod Ready",
        lambda: ready_pods(api_client, namespace, f"app={name}") or None,
        timeout=60,
    )
    with reach(cluster, pods[0], ENGINE_PORT) as base:
        with Load(base, MODEL, clients=4) as load:
            started = time.monotonic()
            yield name, pods[0], started
        # Counted once the clients have finished what they had in flight: a test that saw the
        # queue quickly can end before the first 2 s request does (CI: ok=0, no failure).
        assert load.ok > 0, load.failures[:3]


def test_metrics_apiservices_are_available(cluster: Cluster, api_client: client.ApiClient) -> None:
    for name in (EXTERNAL, CUSTOM):
        assert _apiservice_available(api_client, name), f"APIService {name} is not Available"
    external = raw(cluster, "/apis/external.metrics.k8s.io/v1beta1")
    assert external["groupVersion"] == "external.metrics.k8s.io/v1beta1"
    assert "externalmetrics" in [r["name"] for r in external["resources"]]
    custom = raw(cluster, "/apis/custom.metrics.k8s.io/v1beta1")
    assert custom["groupVersion"] == "custom.metrics.k8s.io/v1beta1"


def test_custom_metrics_api_serves_the_queue_from_prometheus(
    cluster: Cluster, namespace: str, busy_sim: tuple[str, Any, float]
) -> None:
    _, pod, started = busy_sim
    pod_name = pod.metadata.name
    path = f"/apis/custom.metrics.k8s.io/v1beta1/namespaces/{namespace}/pods/*/{METRIC}"

    def waiting_in_prometheus() -> float | None:
        series = prom_query(
            f'sum by (pod) (vllm:num_requests_waiting{{namespace="{namespace}",pod="{pod_name}"}})'
        )
        return float(series[0]["value"][1]) if series and float(series[0]["value"][1]) else None

    def served() -> dict[str, Any] | None:
        try:
            items = raw(cluster, path)["items"]
        except AssertionError:  # not listed yet (the adapter relists every 10 s)
            return None
        mine = [i for i in items if i["describedObject"]["name"] == pod_name]
        return mine[0] if mine and quantity(mine[0]["value"]) > 0 else None

    in_prometheus = kube.wait_until("a queue in Prometheus", waiting_in_prometheus, timeout=60)
    seen_prometheus = time.monotonic() - started
    item = kube.wait_until(f"{METRIC} > 0 from the custom metrics API", served, timeout=60)
    seen_api = time.monotonic() - started
    print(
        f"\nqueue {in_prometheus:g} in Prometheus {seen_prometheus:.1f}s after the load began, "
        f"{item['value']} from custom.metrics.k8s.io after {seen_api:.1f}s"
    )
    assert item["metricName"] == METRIC  # v1beta1 (v1beta2 nests it: metric.name)
    assert item["describedObject"] == {
        "kind": "Pod",
        "namespace": namespace,
        "name": pod_name,
        "apiVersion": "/v1",
    }
    # Three clients wait behind the running one; a reading can fall between a reply and the
    # next request, never above three.
    assert 0 < quantity(item["value"]) <= 3


def _hpa_current(api_client: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        hpa = client.AutoscalingV2Api(api_client).read_namespaced_horizontal_pod_autoscaler(
            name, namespace
        )
    except client.ApiException as err:
        if err.status == 404:
            return None
        raise
    return kube.as_dict(api_client, hpa)


def _metric_value(hpa: dict[str, Any], kind: str) -> float:
    for metric in (hpa.get("status") or {}).get("currentMetrics") or []:
        if metric.get("type") == kind:
            current = metric[kind[0].lower() + kind[1:]]["current"]
            return quantity(str(current.get("averageValue") or current.get("value") or "0"))
    return 0.0


def test_scaled_object_makes_an_hpa_that_reads_the_queue(
    cluster: Cluster,
    api_client: client.ApiClient,
    namespace: str,
    busy_sim: tuple[str, Any, float],
) -> None:
    name, _, started = busy_sim
    query = f'sum(vllm:num_requests_waiting{{namespace="{namespace}"}})'
    scaled_object = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicaCount": 1,
            "maxReplicaCount": 3,
            "pollingInterval": 5,
            "triggers": [
                {
                    "type": "prometheus",
                    "name": "queue-depth",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": prometheus.url(),
                        "query": query,
                        "threshold": "1",
                    },
                }
            ],
        },
    }
    kube.apply(api_client, scaled_object, namespace)
    hpa_name = f"keda-hpa-{name}"

    def reading() -> dict[str, Any] | None:
        hpa = _hpa_current(api_client, namespace, hpa_name)
        return hpa if hpa and _metric_value(hpa, "External") > 0 else None

    hpa = kube.wait_until(f"HPA {hpa_name} reading a queue", reading, timeout=120)
    print(f"\nHPA {hpa_name} read {_metric_value(hpa, 'External'):g} waiting "
          f"{time.monotonic() - started:.1f}s after the load began")  # fmt: skip
    assert hpa["spec"]["scaleTargetRef"]["name"] == name
    assert hpa["spec"]["maxReplicas"] == 3
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    selector = metric["external"]["metric"]["selector"]["matchLabels"]
    assert selector == {"scaledobject.keda.sh/name": name}
    # KEDA's metrics API answers the HPA's question with the value Prometheus holds.
    external = raw(
        cluster,
        f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/"
        f"{metric['external']['metric']['name']}?labelSelector=scaledobject.keda.sh%2Fname%3D{name}",
    )
    assert external["items"] and quantity(external["items"][0]["value"]) >= 0
    # The queue is above the target of 1 per replica, so the HPA asks for more replicas.
    kube.wait_until(
        f"HPA {hpa_name} asking for more than one replica",
        lambda: (
            (_hpa_current(api_client, namespace, hpa_name) or {})
            .get("status", {})
            .get("desiredReplicas", 0)
            > 1
        ),
        timeout=60,
    )


def test_hpa_reads_the_pods_metric_through_prometheus_adapter(
    api_client: client.ApiClient, namespace: str, busy_sim: tuple[str, Any, float]
) -> None:
    name, _, started = busy_sim
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": 1,
            "maxReplicas": 3,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": METRIC},
                        "target": {"type": "AverageValue", "averageValue": "1"},
                    },
                }
            ],
        },
    }
    kube.apply(api_client, hpa, namespace)

    def reading() -> dict[str, Any] | None:
        live = _hpa_current(api_client, namespace, name)
        return live if live and _metric_value(live, "Pods") > 0 else None

    live = kube.wait_until(f"HPA {name} reading {METRIC}", reading, timeout=120)
    print(f"\nHPA {name} read {_metric_value(live, 'Pods'):g} waiting per pod "
          f"{time.monotonic() - started:.1f}s after the load began")  # fmt: skip
    conditions = {c["type"]: c for c in live["status"].get("conditions") or []}
    assert conditions["ScalingActive"]["status"] == "True", conditions["ScalingActive"]
