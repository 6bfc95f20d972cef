"""The reconcile loop without a cluster: a fake API that records every write."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from llm_operator.handlers.controller import Controller
from llm_operator.render import RenderConfig


class FakeKube:
    """Just enough of KubeClient: objects by (kind, name), resourceVersions, status, events."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.writes: list[tuple[str, str, str]] = []
        self.versions = itertools.count(100)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(("apply", obj["kind"], obj["metadata"]["name"]))
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(next(self.versions))
        stored["metadata"].setdefault("uid", f"uid-{obj['kind']}")
        self.objects[(obj["kind"], obj["metadata"]["name"])] = stored
        return copy.deepcopy(stored)

    def delete(self, obj: dict[str, Any]) -> None:
        self.writes.append(("delete", obj["kind"], obj["metadata"]["name"]))
        self.objects.pop((obj["kind"], obj["metadata"]["name"]), None)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.writes.append(("status", "LLMDeployment", name))
        self.statuses.append(status)

    def post_event(self, owner: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


def body(spec: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "llmoperator.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "m", "namespace": "ns", "uid": "owner-uid", "generation": generation},
        "spec": spec,
    }


BASE = {
    "model": {"name": "Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen"},
    "engine": {"maxModelLen": 8192},
    "parallelism": {"tensor": 1},
}


@pytest.fixture
def fake() -> FakeKube:
    return FakeKube()


@pytest.fixture
def controller(fake: FakeKube) -> Controller:
    return Controller(client=fake, config=RenderConfig(), clock=lambda: "2026-01-01T00:00:00Z")  # type: ignore[arg-type]


def run(controller: Controller, fake: FakeKube, llmd: dict[str, Any]) -> dict[str, Any]:
    """One reconcile, then hand the written status back as the watch would."""
    controller.reconcile_sync(llmd)
    if fake.statuses:
        merged = {**(llmd.get("status") or {}), **fake.statuses[-1]}
        llmd = {**llmd, "status": {k: v for k, v in merged.items() if v is not None}}
    return llmd


def make_ready(fake: FakeKube, controller: Controller) -> None:
    """What the Deployment controller and kwok would report once pods run."""
    for (kind, _), obj in fake.objects.items():
        if kind == "Deployment":
            replicas = obj["spec"].get("replicas", 1)
            obj["metadata"]["generation"] = 1
            obj["status"] = {
                "observedGeneration": 1,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
            }
            obj["metadata"]["resourceVersion"] = str(next(fake.versions))
            controller.remember_child(copy.deepcopy(obj))


def test_first_reconcile_creates_children_then_a_steady_state_writes_nothing(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = run(controller, fake, body(BASE))
    assert [w[:2] for w in fake.writes] == [
        ("apply", "Deployment"),
        ("apply", "Service"),
        ("status", "LLMDeployment"),
    ]
    for obj in fake.objects.values():
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "owner-uid"
    assert llmd["status"]["phase"] == "Pending"  # the Deployment exists, no pod yet
    make_ready(fake, controller)
    llmd = run(controller, fake, llmd)
    assert llmd["status"]["phase"] == "Ready"
    fake.writes.clear()
    run(controller, fake, llmd)
    run(controller, fake, llmd)
    assert fake.writes == []


def test_an_invalid_spec_fails_with_its_message_and_one_event(
    controller: Controller, fake: FakeKube
) -> None:
    bad = body({**BASE, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}})
    llmd = run(controller, fake, bad)
    assert fake.objects == {}
    assert llmd["status"]["phase"] == "Failed"
    degraded = next(c for c in llmd["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert "autoscaling: autoscaling.minReplicas must not exceed" in degraded["message"]
    assert len(fake.events) == 1 and fake.events[0][:2] == ("Warning", "InvalidSpec")
    fake.writes.clear()
    run(controller, fake, llmd)
    assert fake.writes == [] and len(fake.events) == 1


def test_an_unplannable_edit_keeps_the_running_children(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = run(controller, fake, body(BASE))
    make_ready(fake, controller)
    llmd = run(controller, fake, llmd)
    before = copy.deepcopy(fake.objects)
    fake.writes.clear()
    edited = {**llmd, "spec": {**BASE, "parallelism": {"tensor": 8}}}
    edited["metadata"] = {**llmd["metadata"], "generation": 2}
    edited = run(controller, fake, edited)
    assert [w[0] for w in fake.writes] == ["status"]
    assert fake.objects == before
    assert edited["status"]["phase"] == "Degraded"
    assert edited["status"]["observedGeneration"] == 2
    degraded = next(c for c in edited["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "CannotPlan" and "28" in degraded["message"]


def test_autoscaling_leaves_replicas_to_the_hpa_and_turning_it_off_prunes_the_hpa(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = run(
        controller, fake, body({**BASE, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}})
    )
    deployment = fake.objects[("Deployment", "m")]
    assert "replicas" not in deployment["spec"]
    assert ("HorizontalPodAutoscaler", "m") in fake.objects
    assert ("PodDisruptionBudget", "m") in fake.objects
    fake.writes.clear()
    fixed = {**llmd, "spec": {**BASE, "replicas": 1}}
    fixed["metadata"] = {**llmd["metadata"], "generation": 2}
    run(controller, fake, fixed)
    deleted = sorted(w[1] for w in fake.writes if w[0] == "delete")
    assert deleted == ["HorizontalPodAutoscaler", "PodDisruptionBudget"]
    assert fake.objects[("Deployment", "m")]["spec"]["replicas"] == 1


def test_a_hand_edited_child_is_restored(controller: Controller, fake: FakeKube) -> None:
    llmd = run(controller, fake, body(BASE))
    edited = copy.deepcopy(fake.objects[("Deployment", "m")])
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    edited["metadata"]["resourceVersion"] = str(next(fake.versions))
    controller.remember_child(edited)
    fake.writes.clear()
    run(controller, fake, llmd)
    assert ("apply", "Deployment", "m") in fake.writes
    restored = fake.objects[("Deployment", "m")]["spec"]["template"]["spec"]["containers"][0]
    assert restored["image"] == "vllm/vllm-openai:v0.11.0"
