"""The engines' NetworkPolicy in a real install (the chart's ServiceAccount and RBAC):
`networkPolicy.enabled=true` makes the operator create one per LLMDeployment, which the real API
server accepts, owned by the LLMDeployment and selecting exactly its engine pods and, as peers,
exactly the release's gateway pods; a `helm upgrade` that turns it off makes the restarted
operator delete it, and the model keeps answering through the gateway. The chart's own policies
(`networkPolicy.chartPods`) are accepted too and select exactly the release's pods.

What this does NOT prove: that traffic is blocked. The local cluster has no network plugin
(every pod is a process on a loopback address), so nothing enforces NetworkPolicy here; the
test checks the objects and their selectors against the live pods, not packets. Enforcement
needs a CNI that implements NetworkPolicy (Calico, Cilium, ...), on kind with one of them or on
a real cluster (`LLMOP_CLUSTER=existing`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from openai import OpenAI

from harness import kube
from harness.providers import Cluster
from harness.serving import (
    CHART,
    GATEWAY_PORT,
    Helm,
    Serving,
    installed,
    llmd,
    reach,
    ready_pods,
)

ENGINE_PORT = 8000


@pytest.fixture(scope="module")
def helm_home(tmp_path_factory: Any) -> Path:
    path: Path = tmp_path_factory.mktemp("helm-home")
    return path


@pytest.fixture(scope="module")
def serving(
    cluster: Cluster, api_client: client.ApiClient, crd_names: list[str], helm_home: Path
) -> Iterator[Serving]:
    values = ("networkPolicy.enabled=true", "networkPolicy.chartPods.enabled=true")
    with installed(cluster, api_client, helm_home, "netpol", *values) as s:
        yield s


def selector_text(selector: dict[str, Any]) -> str:
    """A LabelSelector as the list API's labelSelector parameter, so the API server itself
    says which pods it selects."""
    terms = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for term in selector.get("matchExpressions") or []:
        assert term["operator"] == "In", term
        terms.append(f"{term['key']} in ({','.join(term['values'])})")
    return ",".join(terms)


def pod_names(api: client.ApiClient, namespace: str, selector: str) -> set[str]:
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items
    return {p.metadata.name for p in pods if p.metadata.deletion_timestamp is None}


def policy_of(serving: Serving, name: str) -> dict[str, Any] | None:
    try:
        obj = client.NetworkingV1Api(serving.api).read_namespaced_network_policy(
            name, serving.namespace
        )
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    body: dict[str, Any] = serving.api.sanitize_for_serialization(obj)
    return body


def ask(base: str, model: str) -> str:
    sdk = OpenAI(base_url=f"{base}/v1", api_key="e2e", max_retries=0, timeout=30)
    reply = sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    return reply.choices[0].message.content or ""


def test_the_policy_is_created_with_the_right_selectors_and_deleted_when_turned_off(
    serving: Serving, cluster: Cluster, helm_home: Path
) -> None:
    name = "fenced"
    serving.apply(llmd(name, replicas=2))
    body = serving.wait_ready(name)
    policy = kube.wait_until("the NetworkPolicy", lambda: policy_of(serving, name), 60)

    # Owned by the LLMDeployment (garbage-collected with it), applied by the operator.
    [owner] = policy["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "LLMDeployment",
        name,
        body["metadata"]["uid"],
    )
    assert owner["controller"] is True
    managers = {m["manager"] for m in policy["metadata"]["managedFields"]}
    assert managers == {"llm-operator"}, managers

    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    # The API server's own reading of the selector: exactly this model's engine pods.
    engines = {p.metadata.name for p in serving.engines(name)}
    assert len(engines) == 2
    assert pod_names(serving.api, serving.namespace, selector_text(spec["podSelector"])) == engines

    [rule] = spec["ingress"]
    assert rule["ports"] == [{"port": ENGINE_PORT, "protocol": "TCP"}]
    gateway_peer, prometheus_peer = rule["from"]
    assert gateway_peer["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": serving.namespace}
    }
    # The namespace label the peer relies on is there (the API server sets it).
    namespace = client.CoreV1Api(serving.api).read_namespace(serving.namespace)
    assert namespace.metadata.labels["kubernetes.io/metadata.name"] == serving.namespace
    # The peer's pods are exactly the release's gateway pods, and nothing else here.
    gateway_selector = (
        f"app.kubernetes.io/instance={serving.release},app.kubernetes.io/component=gateway"
    )
    gateways = {
        p.metadata.name for p in ready_pods(serving.api, serving.namespace, gateway_selector)
    }
    assert pod_names(serving.api, serving.namespace, gateway_selector) == gateways
    assert len(gateways) == 2
    peers = pod_names(serving.api, serving.namespace, selector_text(gateway_peer["podSelector"]))
    assert peers == gateways
    assert prometheus_peer == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }

    deployment_uid = (
        client.AppsV1Api(serving.api)
        .read_namespaced_deployment(name, serving.namespace)
        .metadata.uid
    )
    with reach(serving.cluster, serving.gateway_pod(), GATEWAY_PORT) as base:
        serving.wait_routed(base, name)
        assert ask(base, name)

    # Off again: the operator restarts without the setting and deletes what it made.
    helm = Helm(cluster, helm_home)
    helm("upgrade", serving.release, str(CHART), "--namespace", serving.namespace,
         "--reuse-values", "--set", "networkPolicy.enabled=false", "--wait", "--timeout",
         "180s")  # fmt: skip
    kube.wait_until("the NetworkPolicy deleted", lambda: policy_of(serving, name) is None, 90)
    assert (
        client.AppsV1Api(serving.api)
        .read_namespaced_deployment(name, serving.namespace)
        .metadata.uid
        == deployment_uid
    ), "the engines were recreated"
    serving.wait_ready(name)
    with reach(serving.cluster, serving.gateway_pod(), GATEWAY_PORT) as base:
        serving.wait_routed(base, name)
        assert ask(base, name)


def test_the_charts_own_policies_select_the_releases_pods(serving: Serving) -> None:
    for component, name in (
        ("operator", serving.fullname),
        ("gateway", f"{serving.fullname}-gateway"),
    ):
        policy = policy_of(serving, name)
        assert policy is not None, name
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        selected = pod_names(
            serving.api, serving.namespace, selector_text(policy["spec"]["podSelector"])
        )
        wanted = (
            f"app.kubernetes.io/instance={serving.release},app.kubernetes.io/component={component}"
        )
        assert selected == pod_names(serving.api, serving.namespace, wanted) != set(), component
        [rule] = policy["spec"]["ingress"]
        if component == "gateway":
            assert rule["ports"] == [{"port": GATEWAY_PORT, "protocol": "TCP"}]
            assert not rule.get("from"), "the gateway is open to every client"
        else:
            assert rule["ports"] == [{"port": 9090, "protocol": "TCP"}]
            assert len(rule["from"]) == 1
