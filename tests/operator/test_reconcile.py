"""Pure reconcile decisions: drift, apply/prune plans, conditions and status."""

from __future__ import annotations

from typing import Any

from llm_operator.reconcile import (
    Problem,
    compute_status,
    drifted,
    owned,
    plan_actions,
    set_condition,
    status_changed,
)

OWNER = {
    "apiVersion": "llmoperator.io/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": "m", "namespace": "ns", "uid": "uid-1", "generation": 3},
}


def deployment(name: str = "m", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "generation": 2, "resourceVersion": "10"},
        "spec": {
            "replicas": 2,
            "template": {"spec": {"containers": [{"name": "vllm", "image": "a"}]}},
        },
        "status": status,
    }


def test_fields_only_the_cluster_added_are_not_drift() -> None:
    desired = {"spec": {"ports": [{"port": 8000, "name": "http"}]}}
    live = {
        "spec": {
            "ports": [{"port": 8000, "name": "http", "protocol": "TCP"}],
            "clusterIP": "10.0.0.1",
        }
    }
    assert drifted(desired, live) == []


def test_quantities_the_api_server_rewrote_are_not_drift() -> None:
    desired = {"limits": {"nvidia.com/gpu": 4, "cpu": 0.5, "memory": "1Gi"}}
    live = {"limits": {"nvidia.com/gpu": "4", "cpu": "500m", "memory": "1073741824"}}
    assert drifted(desired, live) == []


def test_a_hand_edit_is_drift_with_its_path() -> None:
    desired = {"spec": {"template": {"spec": {"containers": [{"image": "vllm:1"}]}}}}
    live = {"spec": {"template": {"spec": {"containers": [{"image": "vllm:2", "name": "x"}]}}}}
    assert drifted(desired, live) == [".spec.template.spec.containers[0].image"]


def test_a_removed_list_entry_or_changed_bool_is_drift() -> None:
    assert drifted({"a": [1, 2]}, {"a": [1]}) == [".a"]
    assert drifted({"a": True}, {"a": "true"}) == [".a"]
    assert drifted({"a": 1}, {"a": True}) == [".a"]


def test_owned_sets_namespace_and_controller_reference() -> None:
    [obj] = owned([{"kind": "Service", "metadata": {"name": "m"}}], OWNER)
    assert obj["metadata"]["namespace"] == "ns"
    assert obj["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "llmoperator.io/v1alpha1",
            "kind": "LLMDeployment",
            "name": "m",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def test_plan_applies_missing_and_drifted_and_prunes_only_own_children() -> None:
    desired = owned(
        [
            {"kind": "Service", "metadata": {"name": "m"}, "spec": {"type": "ClusterIP"}},
            {"kind": "Deployment", "metadata": {"name": "m"}, "spec": {"replicas": 2}},
        ],
        OWNER,
    )
    mine = desired[1]["metadata"]
    live = [
        {"kind": "Deployment", "metadata": mine, "spec": {"replicas": 3}},
        {"kind": "PodDisruptionBudget", "metadata": mine},
        {
            "kind": "ConfigMap",
            "metadata": {"name": "theirs", "ownerReferences": [{"uid": "other"}]},
        },
    ]
    actions = plan_actions(desired, live, "uid-1")
    assert [o["kind"] for o in actions.apply] == ["Service", "Deployment"]
    assert actions.drift == {("Deployment", "m"): [".spec.replicas"]}
    assert [o["kind"] for o in actions.delete] == ["PodDisruptionBudget"]


def test_plan_is_empty_when_the_cluster_matches() -> None:
    desired = owned(
        [{"kind": "Service", "metadata": {"name": "m"}, "spec": {"type": "ClusterIP"}}], OWNER
    )
    live = [
        {**desired[0], "metadata": {**desired[0]["metadata"], "uid": "x", "resourceVersion": "5"}}
    ]
    actions = plan_actions(desired, live, "uid-1")
    assert actions.apply == [] and actions.delete == []


def test_transition_time_moves_only_when_status_flips() -> None:
    first = set_condition([], "Ready", False, "ReplicasNotReady", "", 1, "t1")
    same = set_condition(first, "Ready", False, "ReplicasNotReady", "0/1", 2, "t2")
    flipped = set_condition(same, "Ready", True, "ReplicasReady", "1/1", 2, "t3")
    assert same[0]["lastTransitionTime"] == "t1"
    assert flipped[0]["lastTransitionTime"] == "t3"


def settled() -> dict[str, Any]:
    return deployment(observedGeneration=2, replicas=2, updatedReplicas=2, readyReplicas=2)


def test_ready_when_every_replica_is_ready_and_rolled_out() -> None:
    status = compute_status(
        previous=None, generation=3, deployments=[settled()], problem=None,
        extra={"endpoint": "http://m.ns.svc:8000/v1"}, now="t",
    )  # fmt: skip
    assert status["phase"] == "Ready"
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert status["observedGeneration"] == 3
    assert status["endpoint"] == "http://m.ns.svc:8000/v1"
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "True", "Progressing": "False", "Degraded": "False"}


def test_progressing_while_rolling_and_pending_before_pods() -> None:
    rolling = deployment(observedGeneration=2, replicas=2, updatedReplicas=1, readyReplicas=1)
    status = compute_status(
        previous=None, generation=1, deployments=[rolling], problem=None, extra={}, now="t"
    )
    assert status["phase"] == "Progressing"
    pending = compute_status(
        previous=None, generation=1, deployments=[], problem=None, extra={}, now="t"
    )
    assert pending["phase"] == "Pending"


def test_a_problem_keeps_what_runs_and_says_why() -> None:
    good = compute_status(
        previous=None, generation=3, deployments=[settled()], problem=None,
        extra={"gpusPerReplica": 4}, now="t",
    )  # fmt: skip
    bad = compute_status(
        previous=good, generation=4, deployments=[settled()],
        problem=Problem("CannotPlan", "tensor 3 does not divide 64 heads"),
        extra={"gpusPerReplica": 3}, now="t2",
    )  # fmt: skip
    assert bad["phase"] == "Degraded"
    assert bad["gpusPerReplica"] == 4  # still describes the running replicas
    degraded = next(c for c in bad["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True"
    assert degraded["reason"] == "CannotPlan"
    assert "does not divide" in degraded["message"]
    ready = next(c for c in bad["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"  # still serving


def test_a_problem_with_nothing_running_is_failed() -> None:
    status = compute_status(
        previous=None, generation=1, deployments=[], problem=Problem("InvalidSpec", "x"),
        extra={}, now="t",
    )  # fmt: skip
    assert status["phase"] == "Failed"


def test_recomputing_an_unchanged_status_changes_nothing() -> None:
    first = compute_status(
        previous=None, generation=3, deployments=[settled()], problem=None, extra={}, now="t1"
    )
    again = compute_status(
        previous=first, generation=3, deployments=[settled()], problem=None, extra={}, now="t2"
    )
    assert not status_changed(first, again)


def test_values_the_api_server_omits_when_empty_or_false_are_not_drift() -> None:
    desired = {"env": [{"name": "A", "value": ""}], "mount": {"readOnly": False}, "extra": {}}
    live = {"env": [{"name": "A"}], "mount": {}}
    assert drifted(desired, live) == []
    assert drifted({"replicas": 0}, {}) == [".replicas"]  # zero is a value, not an omission
