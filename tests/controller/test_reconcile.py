"""Pure reconcile decisions: drift, apply/prune plans, conditions and status."""

from __future__ import annotations

from typing import Any

from llm_operator.engine_health import EngineProblem
from llm_operator.reconcile import (
    Problem,
    Scaling,
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


def test_a_hash_that_reads_as_a_huge_exponent_is_compared_as_text() -> None:
    # Found by bench/operator_soak.py: a pod-template hash of digits and one "e" made the
    # quantity comparison raise decimal.Overflow, and the edit was never applied.
    assert drifted({"h": "0123456e78901234"}, {"h": "89abcdef01234567"}) == [".h"]
    assert drifted({"h": "89abcdef01234567"}, {"h": "0123456e78901234"}) == [".h"]
    assert drifted({"h": "0123456e78901234"}, {"h": "0123456e78901234"}) == []


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


CRASH_LOOP = EngineProblem(
    "EngineCrashLoop",
    "pod m-7d9c-x2x4z container vllm: CrashLoopBackOff, restarted 3 times, "
    "last exit Error (exit code 1)",
    degraded=True,
    pod="m-7d9c-x2x4z",
)
UNSCHEDULABLE = EngineProblem(
    "Unschedulable",
    "pod m-7d9c-x2x4z: Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    degraded=False,
    pod="m-7d9c-x2x4z",
)


def rolling() -> dict[str, Any]:
    return deployment(
        observedGeneration=2, replicas=2, updatedReplicas=2, readyReplicas=1,
        unavailableReplicas=1,
    )  # fmt: skip


def conditions_of(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_a_crash_looping_engine_is_degraded_with_the_pods_reason() -> None:
    status = compute_status(
        previous=None, generation=3, deployments=[rolling()], problem=None,
        extra={"endpoint": "http://m.ns.svc:8000/v1"}, now="t", engine=[CRASH_LOOP],
    )  # fmt: skip
    assert status["phase"] == "Degraded"
    assert status["endpoint"] == "http://m.ns.svc:8000/v1"  # the spec was applied
    conditions = conditions_of(status)
    assert conditions["Degraded"]["status"] == "True"
    assert conditions["Degraded"]["reason"] == "EngineCrashLoop"
    assert conditions["Degraded"]["message"] == CRASH_LOOP.message
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["reason"] == "EngineCrashLoop"
    assert conditions["Ready"]["message"] == "1/2 replicas ready: EngineCrashLoop"
    # The Deployment controller is still trying (within its deadline).
    assert conditions["Progressing"]["status"] == "True"


def test_a_pod_waiting_for_a_node_explains_progressing_without_degrading() -> None:
    status = compute_status(
        previous=None, generation=3, deployments=[rolling()], problem=None, extra={},
        now="t", engine=[UNSCHEDULABLE],
    )  # fmt: skip
    assert status["phase"] == "Progressing"
    conditions = conditions_of(status)
    assert conditions["Degraded"]["status"] == "False"
    assert conditions["Progressing"]["status"] == "True"
    assert conditions["Progressing"]["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in conditions["Progressing"]["message"]


def test_a_healthy_rollout_stays_progressing() -> None:
    status = compute_status(
        previous=None, generation=3, deployments=[rolling()], problem=None, extra={},
        now="t", engine=[],
    )  # fmt: skip
    assert status["phase"] == "Progressing"
    assert conditions_of(status)["Progressing"]["reason"] == "RollingOut"
    assert conditions_of(status)["Degraded"]["status"] == "False"


def test_a_timed_out_rollout_is_no_longer_progressing() -> None:
    timed_out = rolling()
    timed_out["status"]["conditions"] = [
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": 'ReplicaSet "m-7d9c" has timed out progressing.',
        }
    ]
    engine = [EngineProblem("ProgressDeadlineExceeded", "Deployment m: timed out", True)]
    status = compute_status(
        previous=None, generation=3, deployments=[timed_out], problem=None, extra={},
        now="t", engine=engine,
    )  # fmt: skip
    conditions = conditions_of(status)
    assert status["phase"] == "Degraded"
    assert conditions["Progressing"]["status"] == "False"
    assert conditions["Progressing"]["reason"] == "ProgressDeadlineExceeded"
    assert conditions["Progressing"]["message"] == 'ReplicaSet "m-7d9c" has timed out progressing.'
    assert conditions["Degraded"]["reason"] == "ProgressDeadlineExceeded"


def test_a_recovered_engine_is_ready_again_and_not_degraded() -> None:
    broken = compute_status(
        previous=None, generation=3, deployments=[rolling()], problem=None, extra={},
        now="t1", engine=[CRASH_LOOP],
    )  # fmt: skip
    fixed = compute_status(
        previous=broken, generation=3, deployments=[settled()], problem=None, extra={},
        now="t2", engine=[],
    )  # fmt: skip
    assert fixed["phase"] == "Ready"
    conditions = conditions_of(fixed)
    assert conditions["Degraded"]["status"] == "False"
    assert conditions["Degraded"]["lastTransitionTime"] == "t2"
    assert conditions["Ready"]["status"] == "True"


def test_a_spec_problem_wins_over_what_the_pods_show() -> None:
    status = compute_status(
        previous=None, generation=3, deployments=[rolling()],
        problem=Problem("CannotPlan", "tensor 3 does not divide 64 heads"), extra={},
        now="t", engine=[CRASH_LOOP],
    )  # fmt: skip
    assert conditions_of(status)["Degraded"]["reason"] == "CannotPlan"


def condition(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def hpa(name: str = "m", *conditions: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name},
        "status": {"desiredReplicas": 2, "conditions": list(conditions)},
    }


def scaled_object(*conditions: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "m"},
        "status": {"conditions": list(conditions)},
    }


ABLE = condition("AbleToScale", "True", "ReadyForNewScale", "recommended size matches")
ACTIVE = condition("ScalingActive", "True", "ValidMetricFound", "the HPA was able to ...")


def scaling_condition(
    scaling: Scaling | None, autoscalers: list[dict[str, Any]], previous: Any = None
) -> dict[str, Any] | None:
    status = compute_status(
        previous=previous, generation=3, deployments=[settled()], problem=None, extra={},
        now="t", scaling=scaling, autoscalers=autoscalers,
    )  # fmt: skip
    return next((c for c in status["conditions"] if c["type"] == "ScalingReady"), None)


def test_scaling_ready_when_the_hpa_reads_its_metric() -> None:
    found = scaling_condition(Scaling("hpa", "m"), [hpa("m", ABLE, ACTIVE)])
    assert found is not None
    assert (found["status"], found["reason"]) == ("True", "MetricRead")
    assert "ValidMetricFound" in found["message"]


def test_scaling_not_ready_says_why_the_hpa_cannot_read_its_metric() -> None:
    failing = condition(
        "ScalingActive", "False", "FailedGetPodsMetric",
        'unable to get metric vllm_num_requests_waiting: no metrics returned',
    )  # fmt: skip
    found = scaling_condition(Scaling("hpa", "m"), [hpa("m", ABLE, failing)])
    assert found is not None
    assert (found["status"], found["reason"]) == ("False", "FailedGetPodsMetric")
    assert "cannot read its metric" in found["message"]
    assert "vllm_num_requests_waiting" in found["message"]
    stuck = condition("AbleToScale", "False", "FailedGetScale", "no scale subresource")
    found = scaling_condition(Scaling("hpa", "m"), [hpa("m", stuck, ACTIVE)])
    assert found is not None and (found["status"], found["reason"]) == ("False", "FailedGetScale")


def test_scaling_not_ready_while_the_autoscaler_is_missing_or_unevaluated() -> None:
    missing = scaling_condition(Scaling("hpa", "m"), [hpa("other", ABLE, ACTIVE)])
    assert missing is not None
    assert (missing["status"], missing["reason"]) == ("False", "AutoscalerMissing")
    fresh = scaling_condition(Scaling("hpa", "m"), [hpa("m")])
    assert fresh is not None
    assert (fresh["status"], fresh["reason"]) == ("False", "AwaitingAutoscaler")
    keda = scaling_condition(Scaling("keda", "m"), [])
    assert keda is not None and keda["reason"] == "AutoscalerMissing"
    assert "ScaledObject m" in keda["message"]


def test_scaling_ready_for_keda_follows_the_scaled_objects_ready_condition() -> None:
    ready = condition("Ready", "True", "ScaledObjectReady", "ScaledObject is defined correctly")
    idle = condition("Active", "False", "ScalerNotActive", "triggers are not active")
    # Scaled to zero: KEDA's HPA says ScalingDisabled, which is what scale to zero looks like.
    disabled = condition("ScalingActive", "False", "ScalingDisabled", "replica count is zero")
    found = scaling_condition(
        Scaling("keda", "m"), [scaled_object(ready, idle), hpa("keda-hpa-m", ABLE, disabled)]
    )
    assert found is not None
    assert (found["status"], found["reason"]) == ("True", "MetricRead")
    assert "idle" in found["message"]
    active = condition("Active", "True", "ScalerActive", "triggers are active")
    found = scaling_condition(Scaling("keda", "m"), [scaled_object(ready, active)])
    assert found is not None and "active" in found["message"]
    broken = condition(
        "Ready", "False", "TriggerError", "Triggers defined in ScaledObject are not working"
    )
    found = scaling_condition(Scaling("keda", "m"), [scaled_object(broken, idle)])
    assert found is not None
    assert (found["status"], found["reason"]) == ("False", "TriggerError")
    # KEDA ready, but the HPA it made cannot read KEDA's metrics API.
    failing = condition("ScalingActive", "False", "FailedGetExternalMetric", "no metrics API")
    found = scaling_condition(
        Scaling("keda", "m"), [scaled_object(ready, active), hpa("keda-hpa-m", ABLE, failing)]
    )
    assert found is not None
    assert (found["status"], found["reason"]) == ("False", "FailedGetExternalMetric")
    unset = scaling_condition(Scaling("keda", "m"), [scaled_object()])
    assert unset is not None and unset["reason"] == "AwaitingAutoscaler"


def test_without_autoscaling_there_is_no_scaling_ready_condition() -> None:
    with_it = compute_status(
        previous=None, generation=3, deployments=[settled()], problem=None, extra={},
        now="t", scaling=Scaling("hpa", "m"), autoscalers=[hpa("m", ABLE, ACTIVE)],
    )  # fmt: skip
    assert scaling_condition(None, [], previous=with_it) is None


def test_desired_replicas_is_what_the_deployments_ask_for() -> None:
    asked = settled()
    asked["spec"]["replicas"] = 3  # the autoscaler asked for one more; it is not there yet
    status = compute_status(
        previous=None, generation=3, deployments=[asked], problem=None, extra={}, now="t"
    )
    assert (status["desiredReplicas"], status["replicas"]) == (3, 2)
    none = compute_status(
        previous=None, generation=3, deployments=[], problem=None, extra={}, now="t"
    )
    assert "desiredReplicas" not in none


def test_an_unchanged_scaling_condition_changes_nothing() -> None:
    kwargs: dict[str, Any] = {
        "generation": 3, "deployments": [settled()], "problem": None, "extra": {},
        "scaling": Scaling("hpa", "m"), "autoscalers": [hpa("m", ABLE, ACTIVE)],
    }  # fmt: skip
    first = compute_status(previous=None, now="t1", **kwargs)
    again = compute_status(previous=first, now="t2", **kwargs)
    assert not status_changed(first, again)
