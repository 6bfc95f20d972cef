"""The engines' NetworkPolicy in the reconcile loop: applied with the other children when the
setting is on, and deleted by an operator restarted with it off (no orphan left blocking)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llm_operator.controller import main as run_main
from llm_operator.controller.reconciler import Controller
from llm_operator.render import RenderConfig
from tests.controller.test_reconciler import BASE, FakeKube, body, make_ready, run
from tests.controller.test_settings import Started

ON = RenderConfig(network_policy_enabled=True, gateway_namespace="gw")


def operator(fake: FakeKube, config: RenderConfig) -> Controller:
    """An operator process as it starts: its cache primed with what the cluster holds."""
    controller = Controller(client=fake, config=config, clock=lambda: "2026-01-01T00:00:00Z")  # type: ignore[arg-type]
    for obj in fake.objects.values():
        controller.remember_child(copy.deepcopy(obj))
    return controller


def test_on_the_policy_is_applied_first_owned_and_then_left_alone() -> None:
    fake = FakeKube()
    controller = operator(fake, ON)
    llmd = run(controller, fake, body(BASE))
    assert [w[:2] for w in fake.writes][:3] == [
        ("apply", "NetworkPolicy"),
        ("apply", "Deployment"),
        ("apply", "Service"),
    ]
    policy = fake.objects[("NetworkPolicy", "m")]
    assert policy["metadata"]["namespace"] == "ns"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "owner-uid"
    [rule] = policy["spec"]["ingress"]
    assert rule["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "gw"}
    }
    make_ready(fake, controller)
    llmd = run(controller, fake, llmd)
    fake.writes.clear()
    run(controller, fake, llmd)
    assert fake.writes == []


def test_a_hand_edited_policy_is_restored() -> None:
    fake = FakeKube()
    controller = operator(fake, ON)
    llmd = run(controller, fake, body(BASE))
    edited = copy.deepcopy(fake.objects[("NetworkPolicy", "m")])
    edited["spec"]["ingress"] = [{}]  # someone opened it to everything
    edited["metadata"]["resourceVersion"] = "9999"
    controller.remember_child(edited)
    fake.writes.clear()
    run(controller, fake, llmd)
    assert ("apply", "NetworkPolicy", "m") in fake.writes
    assert fake.objects[("NetworkPolicy", "m")]["spec"]["ingress"][0]["from"]


def test_restarted_with_the_setting_off_the_operator_deletes_only_its_policies() -> None:
    fake = FakeKube()
    llmd = run(operator(fake, ON), fake, body(BASE))
    # A policy someone else owns, with the operator's labels: not the operator's to delete.
    foreign = copy.deepcopy(fake.objects[("NetworkPolicy", "m")])
    foreign["metadata"].update(name="team-policy", uid="uid-team")
    foreign["metadata"]["ownerReferences"] = [
        {**foreign["metadata"]["ownerReferences"][0], "uid": "other"}
    ]
    fake.objects[("NetworkPolicy", "team-policy")] = foreign
    fake.writes.clear()
    restarted = operator(fake, RenderConfig(gateway_namespace="gw"))
    run(restarted, fake, llmd)
    assert [w for w in fake.writes if w[0] == "delete"] == [("delete", "NetworkPolicy", "m")]
    assert ("NetworkPolicy", "m") not in fake.objects
    assert ("NetworkPolicy", "team-policy") in fake.objects
    assert ("Deployment", "m") in fake.objects


@pytest.mark.parametrize("enabled", [False, True])
def test_network_policies_are_watched_whether_the_setting_is_on_or_off(
    monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    # Off must still watch them: that is how the ones made while it was on are found and pruned.
    started = Started(monkeypatch)
    monkeypatch.setenv("LLMOP_NETWORK_POLICY_ENABLED", str(enabled).lower())
    assert run_main.main(["--metrics-port=0", "--liveness-port=0"]) == 0
    assert "NetworkPolicy" in started.child_kinds
    assert started.controller.config.network_policy_enabled is enabled


def test_the_kube_client_knows_where_network_policies_live() -> None:
    from llm_operator.kube.resources import kind_of

    kind = kind_of({"kind": "NetworkPolicy"})
    path: Any = kind.object_path("ns", "m")
    assert path == "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/m"
