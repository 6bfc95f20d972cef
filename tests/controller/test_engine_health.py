"""Engine health from pod status: which states make an LLMDeployment Degraded, and what the
message says. The pod statuses are shaped as the kubelet and the scheduler write them."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llm_operator.engine_health import (
    EngineProblem,
    engine_problems,
    pod_selector,
    summarize,
)

NOW = "2026-01-01T01:00:00Z"
CREATED = "2026-01-01T00:50:00Z"  # ten minutes before NOW: within the 1680 s deadline
LONG_AGO = "2026-01-01T00:20:00Z"  # forty minutes before NOW: past it

SELECTOR = {"llmoperator.io/deployment": "m", "llmoperator.io/track": "stable"}
CANARY_SELECTOR = {"llmoperator.io/deployment": "m", "llmoperator.io/track": "canary"}


def deployment(
    name: str = "m", selector: dict[str, str] = SELECTOR, timed_out: bool = False
) -> dict[str, Any]:
    conditions = [
        {
            "type": "Available",
            "status": "False",
            "reason": "MinimumReplicasUnavailable",
            "message": "Deployment does not have minimum availability.",
        },
        {
            "type": "Progressing",
            "status": "True",
            "reason": "ReplicaSetUpdated",
            "message": f'ReplicaSet "{name}-7d9c" is progressing.',
        },
    ]
    if timed_out:
        conditions[1] = {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": f'ReplicaSet "{name}-7d9c" has timed out progressing.',
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "ns", "generation": 1},
        "spec": {
            "replicas": 1,
            "progressDeadlineSeconds": 1680,
            "selector": {"matchLabels": selector},
        },
        "status": {
            "observedGeneration": 1,
            "replicas": 1,
            "updatedReplicas": 1,
            "unavailableReplicas": 1,
            "conditions": conditions,
        },
    }


def pod(
    name: str = "m-7d9c-x2x4z",
    *,
    labels: dict[str, str] = SELECTOR,
    created: str = CREATED,
    phase: str = "Running",
    containers: list[dict[str, Any]] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    if conditions is None:
        conditions = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": created},
            {"type": "Initialized", "status": "True", "lastTransitionTime": created},
            {
                "type": "Ready",
                "status": "False",
                "reason": "ContainersNotReady",
                "message": "containers with unready status: [vllm]",
                "lastTransitionTime": created,
            },
        ]
    status: dict[str, Any] = {"phase": phase, "conditions": conditions, **extra}
    if containers is not None:
        status["containerStatuses"] = containers
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "creationTimestamp": created,
            "labels": {**labels, "app.kubernetes.io/component": "engine"},
        },
        "status": status,
    }


def container(
    *,
    ready: bool = False,
    started: bool | None = False,
    restarts: int = 0,
    state: dict[str, Any] | None = None,
    last: dict[str, Any] | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "name": "vllm",
        "image": "vllm/vllm-openai:v0.11.0",
        "imageID": "",
        "ready": ready,
        "restartCount": restarts,
        "state": state or {"running": {"startedAt": CREATED}},
        "lastState": last or {},
    }
    if started is not None:
        status["started"] = started
    return status


def crashed(exit_code: int = 1, reason: str = "Error", message: str = "") -> dict[str, Any]:
    terminated: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": "2026-01-01T00:58:00Z",
        "finishedAt": "2026-01-01T00:58:03Z",
        "containerID": "containerd://4f1e",
    }
    if message:
        terminated["message"] = message
    return {"terminated": terminated}


def waiting(reason: str, message: str = "") -> dict[str, Any]:
    return {"waiting": {"reason": reason, **({"message": message} if message else {})}}


TIMED_OUT = 'Deployment m: ReplicaSet "m-7d9c" has timed out progressing.'
BACK_OFF = {
    "waiting": {
        "reason": "CrashLoopBackOff",
        "message": "back-off 40s restarting failed container=vllm pod=m-7d9c-x2x4z_ns(0f3a)",
    }
}
TRACEBACK = (
    "INFO 01-01 00:58:01 api_server.py:585] vLLM API server version 0.11.0\n"
    "Traceback (most recent call last):\n"
    "ValueError: The model's max seq len (131072) is larger than the maximum number of tokens "
    "that can be stored in KV cache (65536).\n"
)
READY_CONDITIONS = [
    {"type": "PodScheduled", "status": "True", "lastTransitionTime": CREATED},
    {"type": "Ready", "status": "True", "lastTransitionTime": CREATED},
]
UNSCHEDULABLE = [
    {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 "
        "nodes are available: 3 No preemption victims found for incoming pod.",
        "lastTransitionTime": CREATED,
    }
]


def only(problems: list[EngineProblem]) -> EngineProblem:
    assert len(problems) == 1, problems
    return problems[0]


# (id, pods, deployment timed out, expected reason or None, degraded, message fragments)
CASES: list[tuple[str, list[dict[str, Any]], bool, str | None, bool, list[str]]] = [
    (
        "serving",
        [pod(containers=[container(ready=True, started=True)], conditions=READY_CONDITIONS)],
        False, None, False, [],
    ),
    (
        "still-loading-within-the-deadline",
        [pod(containers=[container()])],
        False, None, False, [],
    ),
    (
        "pulling-within-the-deadline",
        [pod(phase="Pending", containers=[container(state=waiting("ContainerCreating"))])],
        False, None, False, [],
    ),
    (
        "crash-loop-back-off",
        [pod(containers=[
            container(restarts=3, state=BACK_OFF, last=crashed(1, message=TRACEBACK))])],
        False, "EngineCrashLoop", True,
        ["pod m-7d9c-x2x4z container vllm", "CrashLoopBackOff", "restarted 3 times",
         "last exit Error (exit code 1)", "ValueError: The model's max seq len (131072)"],
    ),
    (
        "restarted-twice-and-starting-again",
        [pod(containers=[container(restarts=2, last=crashed(137, "OOMKilled"))])],
        False, "EngineCrashLoop", True,
        ["running since", "restarted 2 times", "last exit OOMKilled (exit code 137)"],
    ),
    (
        "restarted-twice-without-a-started-field",
        [pod(containers=[container(restarts=2, started=None, last=crashed())])],
        False, "EngineCrashLoop", True, ["restarted 2 times"],
    ),
    (
        "one-exit-is-not-yet-a-loop",
        [pod(containers=[container(restarts=1, state=BACK_OFF, last=crashed(1))])],
        False, "EngineNotReady", False,
        ["CrashLoopBackOff", "restarted 1 time,", "last exit Error (exit code 1)"],
    ),
    (
        "restarted-long-ago-and-only-briefly-unready",
        [pod(containers=[container(restarts=4, started=True, last=crashed())])],
        False, "EngineNotReady", False, ["restarted 4 times", "not ready since"],
    ),
    (
        "image-pull-back-off",
        [pod(phase="Pending", containers=[container(state={"waiting": {
            "reason": "ImagePullBackOff",
            "message": 'Back-off pulling image "vllm/vllm-openai:v9.9.9"'}})])],
        False, "EngineImagePullFailed", True,
        ["ImagePullBackOff: Back-off pulling image \"vllm/vllm-openai:v9.9.9\""],
    ),
    (
        "err-image-pull",
        [pod(phase="Pending", containers=[container(state={"waiting": {
            "reason": "ErrImagePull",
            "message": "rpc error: code = NotFound desc = failed to pull and unpack image"}})])],
        False, "EngineImagePullFailed", True, ["ErrImagePull: rpc error: code = NotFound"],
    ),
    (
        "invalid-image-name",
        [pod(phase="Pending", containers=[container(state={"waiting": {
            "reason": "InvalidImageName",
            "message": 'Failed to apply default image tag "vllm/VLLM:x"'}})])],
        False, "EngineImagePullFailed", True, ["InvalidImageName"],
    ),
    (
        "missing-secret",
        [pod(phase="Pending", containers=[container(state={"waiting": {
            "reason": "CreateContainerConfigError",
            "message": 'secret "hf-token" not found'}})])],
        False, "EngineCannotStart", True,
        ['CreateContainerConfigError: secret "hf-token" not found'],
    ),
    (
        "create-container-error",
        [pod(phase="Pending", containers=[container(state={"waiting": {
            "reason": "CreateContainerError",
            "message": "failed to generate container spec: no such file"}})])],
        False, "EngineCannotStart", True, ["CreateContainerError"],
    ),
    (
        "unschedulable-within-the-deadline",
        [pod(phase="Pending", conditions=UNSCHEDULABLE)],
        False, "Unschedulable", False,
        ["pod m-7d9c-x2x4z: Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu"],
    ),
    (
        "unschedulable-past-the-pods-deadline",
        [pod(phase="Pending", created=LONG_AGO, conditions=UNSCHEDULABLE)],
        False, "Unschedulable", True, ["Insufficient nvidia.com/gpu"],
    ),
    (
        "unschedulable-when-the-deployment-timed-out",
        [pod(phase="Pending", conditions=UNSCHEDULABLE)],
        True, "Unschedulable", True,
        ["Insufficient nvidia.com/gpu", TIMED_OUT],
    ),
    (
        "never-ready-past-the-deadline",
        [pod(created=LONG_AGO, containers=[container()])],
        False, "EngineNotReady", True,
        ["pod m-7d9c-x2x4z container vllm: running since", f"not ready since {LONG_AGO}"],
    ),
    (
        "started-but-failing-readiness-past-the-deadline",
        [pod(created=LONG_AGO, containers=[container(started=True)])],
        False, "EngineNotReady", True, ["not ready since"],
    ),
    (
        "stuck-creating-past-the-deadline",
        [pod(phase="Pending", created=LONG_AGO, containers=[container(state={"waiting": {
            "reason": "ContainerCreating"}})])],
        False, "EngineNotReady", True, ["ContainerCreating", "not ready since"],
    ),
    (
        "timed-out-with-nothing-telling-in-the-pods",
        [],
        True, "ProgressDeadlineExceeded", True,
        [TIMED_OUT],
    ),
    (
        "timed-out-while-loading",
        [pod(containers=[container()])],
        True, "EngineNotReady", True,
        ["not ready since", TIMED_OUT],
    ),
    (
        "init-container-crash-loop",
        [pod(phase="Pending", containers=[container(state=waiting("PodInitializing"))],
             initContainerStatuses=[{**container(restarts=2, state=BACK_OFF, last=crashed(2)),
                                     "name": "download"}])],
        False, "EngineCrashLoop", True, ["init container download", "exit code 2"],
    ),
    (
        "a-finished-init-container-is-not-a-problem",
        [pod(containers=[container()], initContainerStatuses=[{**container(
            state={"terminated": {"exitCode": 0, "reason": "Completed"}}), "name": "download"}])],
        False, None, False, [],
    ),
    (
        "being-deleted",
        [{**pod(containers=[container(restarts=5, state=BACK_OFF)]),
          "metadata": {"name": "old", "deletionTimestamp": NOW, "labels": SELECTOR}}],
        False, None, False, [],
    ),
    (
        "evicted",
        [pod(phase="Failed", reason="Evicted", containers=[container(restarts=5, state=BACK_OFF)])],
        False, None, False, [],
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("pods", "timed_out", "reason", "degraded", "fragments"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_pod_states(
    pods: list[dict[str, Any]],
    timed_out: bool,
    reason: str | None,
    degraded: bool,
    fragments: list[str],
) -> None:
    problems = engine_problems([deployment(timed_out=timed_out)], pods, now=NOW)
    summary = summarize(problems)
    if reason is None:
        assert problems == [] and summary is None
        return
    assert summary is not None
    assert (summary.reason, summary.degraded) == (reason, degraded)
    for fragment in fragments:
        assert fragment in summary.message


def test_the_same_state_gives_the_same_message_later() -> None:
    """Messages carry times, not durations: a re-check of an unchanged pod writes nothing."""
    pods = [pod(created=LONG_AGO, containers=[container()])]
    first = engine_problems([deployment()], pods, now=NOW)
    later = engine_problems([deployment()], pods, now="2026-01-01T05:00:00Z")
    assert first == later


def test_the_deadline_is_the_owning_deployments() -> None:
    stable = deployment()
    canary = deployment("m-canary", CANARY_SELECTOR)
    canary["spec"]["progressDeadlineSeconds"] = 300
    pods = [
        pod("m-7d9c-aaaaa", containers=[container()]),
        pod("m-canary-5b8f-bbbbb", labels=CANARY_SELECTOR, containers=[container()]),
    ]
    problem = only(engine_problems([stable, canary], pods, now=NOW))
    assert problem.pod == "m-canary-5b8f-bbbbb" and problem.degraded


def test_the_worst_problem_leads_and_many_pods_are_counted() -> None:
    loop = container(restarts=3, state=BACK_OFF, last=crashed(1))
    pods = [pod(f"m-7d9c-{i}", containers=[copy.deepcopy(loop)]) for i in range(5)]
    pods.append(pod("m-7d9c-pending", phase="Pending", conditions=UNSCHEDULABLE))
    problems = engine_problems([deployment()], pods, now=NOW)
    assert [p.reason for p in problems] == ["EngineCrashLoop"] * 5 + ["Unschedulable"]
    summary = summarize(problems)
    assert summary is not None and summary.reason == "EngineCrashLoop"
    assert summary.message.count("CrashLoopBackOff") == 3
    assert summary.message.endswith("and 2 more pods")
    assert "Unschedulable" not in summary.message  # a degraded summary names degraded pods


def test_one_problem_per_pod() -> None:
    sidecar = {**container(state={"waiting": {"reason": "ImagePullBackOff"}}), "name": "proxy"}
    crashing = container(restarts=2, state=BACK_OFF, last=crashed())
    [problem] = engine_problems([deployment()], [pod(containers=[sidecar, crashing])], now=NOW)
    assert problem.reason == "EngineCrashLoop"


def test_a_long_termination_message_is_cut_to_its_last_line() -> None:
    log = "x" * 5000 + "\n" + "RuntimeError: " + "y" * 500
    pods = [pod(containers=[container(restarts=2, state=BACK_OFF, last=crashed(1, message=log))])]
    summary = summarize(engine_problems([deployment()], pods, now=NOW))
    assert summary is not None
    assert "xxx" not in summary.message and "RuntimeError: yyy" in summary.message
    assert len(summary.message) < 400


def test_pod_selector_names_the_engine_pods_of_one_llmdeployment() -> None:
    assert pod_selector("llama-3.1-8b") == (
        "llmoperator.io/deployment=llama-3.1-8b,"
        "app.kubernetes.io/managed-by=llm-operator,app.kubernetes.io/component=engine"
    )
    long = pod_selector("a" * 80)
    assert len(long.split(",")[0].split("=")[1]) == 63  # the label value, trimmed and hashed


def test_the_back_off_delay_is_left_out_so_the_message_stays_put() -> None:
    pods = [pod(containers=[container(restarts=3, state=BACK_OFF, last=crashed())])]
    summary = summarize(engine_problems([deployment()], pods, now=NOW))
    assert summary is not None and "back-off 40s" not in summary.message


def test_pods_that_cannot_be_created_are_said_at_once() -> None:
    # Issue 17's defect: a missing ServiceAccount (or PriorityClass) stops the ReplicaSet from
    # creating any pod; the status said "replicas are being created", Pending, forever.
    d = deployment()
    d["status"]["conditions"].append(
        {
            "type": "ReplicaFailure",
            "status": "True",
            "reason": "FailedCreate",
            "message": 'pods "m-7d9c-" is forbidden: error looking up service account '
            'ml/llm-engine: serviceaccount "llm-engine" not found',
        }
    )
    [problem] = engine_problems([d], [], now=NOW)
    assert problem.degraded and problem.reason == "PodsNotCreated"
    assert 'serviceaccount "llm-engine" not found' in problem.message
    assert problem.message.startswith("Deployment m: ")
    healthy = deployment()
    assert engine_problems([healthy], [], now=NOW) == []
