"""An accepted edit whose pods could never start does not replace pods that serve.

With `rollout.maxSurge: 0` (the default) the Deployment controller would stop the old pod
first, so the model would stop serving until the edit was reverted (issue 17's bad-input
drill). The operator checks the new revision's Secrets and node labels before the apply.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llm_operator.controller.reconciler import Controller
from llm_operator.render import RenderConfig
from tests.controller.test_reconciler import BASE, FakeKube, body, make_ready, run

PRODUCT = "NVIDIA-H100-80GB-HBM3"
SPEC = {**BASE, "resources": {"gpu": {"product": PRODUCT, "memoryGiB": 80}}}


class Cluster(FakeKube):
    """FakeKube with the Secrets and node labels a preflight reads."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: dict[str, dict[str, str]] = {}
        self.node_labels: list[dict[str, str]] = [{"nvidia.com/gpu.product": PRODUCT}]
        self.reads: list[tuple[str, str]] = []

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads.append(("secret", name))
        data = self.secrets.get(name)
        return None if data is None else {"metadata": {"name": name}, "data": data}

    def any_node(self, label_selector: str) -> bool:
        self.reads.append(("nodes", label_selector))
        wanted = dict(pair.split("=", 1) for pair in label_selector.split(","))
        return any(wanted.items() <= labels.items() for labels in self.node_labels)


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def serving(cluster: Cluster, nodes: bool = True) -> tuple[Controller, dict[str, Any]]:
    controller = Controller(
        client=cluster,  # type: ignore[arg-type]
        config=RenderConfig(),
        clock=lambda: "2026-01-01T00:00:00Z",
        preflight_nodes=nodes,
    )
    llmd = run(controller, cluster, body(SPEC))
    make_ready(cluster, controller)
    for (kind, _), obj in cluster.objects.items():
        if kind == "Deployment":
            obj["status"]["availableReplicas"] = obj["status"]["readyReplicas"]
            controller.remember_child(copy.deepcopy(obj))
    llmd = run(controller, cluster, llmd)
    assert llmd["status"]["phase"] == "Ready"
    cluster.writes.clear()
    cluster.reads.clear()
    return controller, llmd


def edit(llmd: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    metadata = {**llmd["metadata"], "generation": llmd["metadata"]["generation"] + 1}
    return {**llmd, "metadata": metadata, "spec": spec}


def condition(llmd: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in llmd["status"]["conditions"] if c["type"] == type_)


TOKEN = {"tokenSecretRef": {"name": "hf-token", "key": "token"}}


def test_a_missing_token_secret_keeps_the_running_revision_and_says_so(cluster: Cluster) -> None:
    controller, llmd = serving(cluster)
    before = copy.deepcopy(cluster.objects)
    edited = run(controller, cluster, edit(llmd, {**SPEC, "model": {**SPEC["model"], **TOKEN}}))
    assert [w[0] for w in cluster.writes] == ["status"]  # no apply: the old pods keep serving
    assert cluster.objects == before
    assert edited["status"]["phase"] == "Degraded"
    degraded = condition(edited, "Degraded")
    assert degraded["reason"] == "RevisionCannotStart"
    assert "Secret hf-token does not exist" in degraded["message"]
    assert "keeps serving" in degraded["message"]
    assert condition(edited, "Ready")["status"] == "True"  # still serving, and routed
    assert [e[1] for e in cluster.events] == ["RevisionCannotStart"]
    # Looked at again (a Secret created later sends no event); no new write, no new Event.
    cluster.writes.clear()
    run(controller, cluster, edited)
    assert cluster.writes == [] and len(cluster.events) == 1
    # The Secret appears, with its key: the rollout starts.
    cluster.secrets["hf-token"] = {"token": "aGY="}
    run(controller, cluster, edited)
    assert ("apply", "Deployment", "m") in cluster.writes


def test_a_secret_without_the_key_is_said(cluster: Cluster) -> None:
    controller, llmd = serving(cluster)
    cluster.secrets["hf-token"] = {"other": "eA=="}
    edited = run(controller, cluster, edit(llmd, {**SPEC, "model": {**SPEC["model"], **TOKEN}}))
    assert "Secret hf-token has no key token" in condition(edited, "Degraded")["message"]
    assert not [w for w in cluster.writes if w[0] == "apply"]


def test_a_gpu_product_no_node_has_keeps_the_running_revision(cluster: Cluster) -> None:
    controller, llmd = serving(cluster)
    other = {**SPEC, "resources": {"gpu": {"product": "NVIDIA-B300", "memoryGiB": 80}}}
    edited = run(controller, cluster, edit(llmd, other))
    assert not [w for w in cluster.writes if w[0] == "apply"]
    message = condition(edited, "Degraded")["message"]
    assert "no node has the labels nvidia.com/gpu.product=NVIDIA-B300" in message
    assert ("nodes", "nvidia.com/gpu.product=NVIDIA-B300") in cluster.reads


def test_with_the_node_check_off_the_edit_rolls(cluster: Cluster) -> None:
    controller, llmd = serving(cluster, nodes=False)
    other = {**SPEC, "resources": {"gpu": {"product": "NVIDIA-B300", "memoryGiB": 80}}}
    run(controller, cluster, edit(llmd, other))
    assert ("apply", "Deployment", "m") in cluster.writes
    assert not [r for r in cluster.reads if r[0] == "nodes"]


def test_an_edit_that_can_start_rolls_with_no_node_read_when_the_selector_is_unchanged(
    cluster: Cluster,
) -> None:
    controller, llmd = serving(cluster)
    cluster.secrets["hf-token"] = {"token": "aGY="}
    run(controller, cluster, edit(llmd, {**SPEC, "model": {**SPEC["model"], **TOKEN}}))
    assert ("apply", "Deployment", "m") in cluster.writes
    assert cluster.reads == [("secret", "hf-token")]  # the old pods' nodes still fit


def test_a_model_that_serves_nothing_yet_is_not_held(cluster: Cluster) -> None:
    controller = Controller(
        client=cluster,  # type: ignore[arg-type]
        config=RenderConfig(),
        clock=lambda: "2026-01-01T00:00:00Z",
    )
    run(controller, cluster, body({**SPEC, "model": {**SPEC["model"], **TOKEN}}))
    assert ("apply", "Deployment", "m") in cluster.writes  # the pods say why they wait
    assert cluster.reads == []
