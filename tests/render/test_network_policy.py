"""The engines' NetworkPolicy: off by default, and when on, it selects exactly the pods of both
tracks and admits only the gateway and Prometheus on the engine port."""

from __future__ import annotations

from typing import Any

import pytest

from llm_operator.api import LLMDeployment
from llm_operator.planner import plan
from llm_operator.render import RenderConfig, render_all, render_deployment
from llm_operator.render.label_selector import parse_label_selector
from llm_operator.render.network_policy import render_network_policy
from llm_operator.render.vllm_deployment import ENGINE_PORT
from tests.render.schemas import validate

ON = RenderConfig(network_policy_enabled=True, gateway_namespace="llm-gw")


def llmd(name: str = "llama", **spec: Any) -> LLMDeployment:
    return LLMDeployment.model_validate(
        {
            "metadata": {"name": name, "namespace": "ml"},
            "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, **spec},
        }
    )


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector's meaning, as the API server applies it."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for term in selector.get("matchExpressions") or []:
        present, value = term["key"] in labels, labels.get(term["key"])
        ok = {
            "In": present and value in term.get("values", []),
            "NotIn": not present or value not in term.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[term["operator"]]
        if not ok:
            return False
    return True


def policy(resource: LLMDeployment, config: RenderConfig = ON) -> dict[str, Any]:
    rendered = render_network_policy(resource, config)
    assert rendered is not None
    return rendered


def test_off_by_default_and_nothing_is_rendered() -> None:
    assert RenderConfig().network_policy_enabled is False
    assert render_network_policy(llmd(), RenderConfig()) is None
    assert "NetworkPolicy" not in [o["kind"] for o in render_all(llmd())]


def test_when_on_it_comes_first_and_is_a_valid_networking_v1_object() -> None:
    objects = render_all(llmd(replicas=2), ON)
    assert [o["kind"] for o in objects][:2] == ["NetworkPolicy", "Deployment"]
    validate(objects[0])
    assert objects[0]["metadata"]["name"] == objects[1]["metadata"]["name"] == "llama"
    assert objects[0]["metadata"]["namespace"] == "ml"
    assert objects[0]["spec"]["policyTypes"] == ["Ingress"]


@pytest.mark.parametrize("name", ["llama", "llama-3.1-8b", "x" * 120])
def test_it_selects_the_pods_of_both_tracks_as_their_deployments_do(name: str) -> None:
    resource = llmd(name)
    selector = policy(resource)["spec"]["podSelector"]
    sizing = plan(resource.spec)
    for track in ("stable", "canary"):
        deployment = render_deployment(resource, ON, sizing, track=track)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert matches(selector, pod_labels), track
        # Every pod the Deployment's own selector picks, the policy picks: its selector's
        # labels are enough for the policy.
        assert matches(selector, deployment["spec"]["selector"]["matchLabels"]), track


def test_it_selects_no_pod_of_another_llmdeployment_or_track() -> None:
    selector = policy(llmd("llama"))["spec"]["podSelector"]
    sizing = plan(llmd("other").spec)
    other = render_deployment(llmd("other"), ON, sizing)
    assert not matches(selector, other["spec"]["template"]["metadata"]["labels"])
    mine = render_deployment(llmd("llama"), ON, sizing)["spec"]["template"]["metadata"]["labels"]
    assert not matches(selector, {**mine, "llmoperator.io/track": "shadow"})
    assert not matches(selector, {k: v for k, v in mine.items() if k != "llmoperator.io/track"})


def test_only_the_gateway_and_prometheus_reach_the_engine_port() -> None:
    config = RenderConfig(
        network_policy_enabled=True,
        gateway_namespace="llm-gw",
        network_policy_gateway_pod_selector="app.kubernetes.io/instance=r,app.kubernetes.io/component=gateway",
        network_policy_prometheus_namespace_selector="team=obs",
        network_policy_prometheus_pod_selector="app.kubernetes.io/name=prometheus,!canary",
    )
    [rule] = policy(llmd(), config)["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": ENGINE_PORT}]
    deployment = render_all(llmd(), config)[1]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    # The one port the engine listens on (the API and /metrics): nothing else to admit.
    assert [p["containerPort"] for p in container["ports"]] == [ENGINE_PORT]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ENGINE_PORT)
    gateway, prometheus = rule["from"]
    assert gateway == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llm-gw"}},
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/instance": "r",
                "app.kubernetes.io/component": "gateway",
            }
        },
    }
    assert prometheus == {
        "namespaceSelector": {"matchLabels": {"team": "obs"}},
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/name": "prometheus"},
            "matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}],
        },
    }


def test_the_default_prometheus_is_the_monitoring_namespaces() -> None:
    [rule] = policy(llmd())["spec"]["ingress"]
    assert rule["from"][1] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }


def test_without_a_gateway_namespace_only_prometheus_is_admitted() -> None:
    config = RenderConfig(network_policy_enabled=True)
    [rule] = policy(llmd(), config)["spec"]["ingress"]
    [only] = rule["from"]
    assert only["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}


def test_owned_by_the_llmdeployment_once_it_has_a_uid() -> None:
    owned = policy(
        llmd().model_copy(update={"metadata": llmd().metadata.model_copy(update={"uid": "u-1"})})
    )
    [reference] = owned["metadata"]["ownerReferences"]
    assert reference["uid"] == "u-1" and reference["controller"] is True


# -- label selectors as settings write them --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "selector"),
    [
        ("", {}),
        ("a=1", {"matchLabels": {"a": "1"}}),
        ("a==1, b=2", {"matchLabels": {"a": "1", "b": "2"}}),
        ("example.com/x=", {"matchLabels": {"example.com/x": ""}}),
        (
            "a!=1,b,!c",
            {
                "matchExpressions": [
                    {"key": "a", "operator": "NotIn", "values": ["1"]},
                    {"key": "b", "operator": "Exists"},
                    {"key": "c", "operator": "DoesNotExist"},
                ]
            },
        ),
    ],
)
def test_selectors_are_read_as_kubectl_reads_them(text: str, selector: dict[str, Any]) -> None:
    assert parse_label_selector(text) == selector


@pytest.mark.parametrize(
    "text",
    ["a in (1)", "a=1 b=2", "!a=1", "Example.com/a=1", "a=-x", "a=1,a=2", "=1", "a=" + "x" * 64],
)
def test_selectors_that_are_not_one_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="in '"):
        parse_label_selector(text)
    with pytest.raises(ValueError):
        RenderConfig(network_policy_prometheus_pod_selector=text)
