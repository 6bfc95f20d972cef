"""Why an engine is not turning ready, read from its Deployments' and Pods' status (pure).

A Deployment alone says too little, too late: a crash-looping vLLM leaves it "progressing"
until `progressDeadlineSeconds`, which for big models is most of an hour (the startup budget
plus ten minutes), and a Deployment that had finished rolling out never times out at all when
one of its pods later crash-loops or a scale-up cannot be scheduled. The kubelet and the
scheduler know much sooner, and say so in the pods' status. The rules:

- EngineImagePullFailed, Degraded at once: a container waiting in ImagePullBackOff,
  ErrImagePull, InvalidImageName or ErrImageNeverPull.
- EngineCannotStart, Degraded at once: a container waiting in CreateContainerConfigError
  (a missing Secret or ConfigMap key), CreateContainerError or RunContainerError.
- EngineCrashLoop, Degraded at once: a container not ready that restarted 2 times or more
  and is in its back-off (CrashLoopBackOff) or not started again (startup probe not passed).
- Unschedulable, Progressing until the deadline, then Degraded: PodScheduled=False with
  reason Unschedulable (no node has the GPUs, an unbound claim), with the scheduler's message.
- EngineNotReady, Progressing until the deadline, then Degraded: a container not ready that
  restarted once; or any pod not ready for longer than the deadline (stuck creating its
  container, mounting a volume, loading weights, failing its readiness probe).
- ProgressDeadlineExceeded, Degraded: the Deployment's Progressing=False condition with that
  reason; its message is added to whichever pod problem is reported.

"The deadline" is the owning Deployment's `progressDeadlineSeconds` (600 when unset), counted
per pod so that it also holds where the Deployment controller does not count (a pod that
breaks after the rollout finished). Once the Deployment itself reports
ProgressDeadlineExceeded, every problem a pod shows is Degraded.

One exit is not yet a loop: the kubelet calls the back-off after the very first exit
CrashLoopBackOff too, and a single transient failure (a registry or Hub hiccup, one OOM) then
recovers without anyone acting; reporting it as Degraded would flap. It shows as Progressing
with the exit in the message, and the second exit makes it Degraded. Restart counts never
reset, so a pod that crashed twice, days apart, is Degraded on its next restart until it is
ready again: it is crashing repeatedly, however slowly.

A pod that is still starting within its deadline (pulling, loading weights) is no problem.
Pods being deleted and pods that ended (Succeeded, Failed: the ReplicaSet replaces them) are
not looked at. Messages name the pod, the container, the waiting reason and the kubelet's
message, the last termination (reason, exit code, the last line of its termination message)
and the restart count; they carry times, never durations, so the same state gives the same
message and a re-check writes nothing.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llm_operator import kubeformat
from llm_operator.constants import LABEL_COMPONENT, LABEL_DEPLOYMENT, LABEL_MANAGED_BY, MANAGED_BY
from llm_operator.render.names import label_value

CRASH_LOOP = "EngineCrashLoop"
IMAGE_PULL_FAILED = "EngineImagePullFailed"
CANNOT_START = "EngineCannotStart"
NOT_READY = "EngineNotReady"
UNSCHEDULABLE = "Unschedulable"
DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
PODS_NOT_CREATED = "PodsNotCreated"
#: Every reason this module reports (the controller treats them as the engine's, not the spec's).
REASONS = frozenset(
    {
        CRASH_LOOP,
        IMAGE_PULL_FAILED,
        CANNOT_START,
        NOT_READY,
        UNSCHEDULABLE,
        DEADLINE_EXCEEDED,
        PODS_NOT_CREATED,
    }
)

IMAGE_PULL_WAITING = frozenset(
    {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
)
CANNOT_START_WAITING = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
)
CRASH_LOOP_RESTARTS = 2
DEFAULT_PROGRESS_DEADLINE_SECONDS = 600  # the Deployment API's default
MAX_LISTED = 3  # pods named in one condition message; the rest are counted
MAX_DETAIL = 200  # characters of a kubelet or termination message kept in a condition

# Most telling first: what a person must fix, before what may pass by itself.
_RANK = {
    PODS_NOT_CREATED: -1,
    CRASH_LOOP: 0,
    IMAGE_PULL_FAILED: 1,
    CANNOT_START: 2,
    UNSCHEDULABLE: 3,
    NOT_READY: 4,
    DEADLINE_EXCEEDED: 5,
}


@dataclass(frozen=True)
class EngineProblem:
    """One thing keeping engine replicas from turning ready."""

    reason: str
    message: str
    degraded: bool
    """True: it will not fix itself (Degraded). False: report it, but keep Progressing."""
    pod: str = ""


def pod_selector(llmd_name: str) -> str:
    """The label selector of an LLMDeployment's engine pods (stable and canary)."""
    return ",".join(
        [
            f"{LABEL_DEPLOYMENT}={label_value(llmd_name)}",
            f"{LABEL_MANAGED_BY}={MANAGED_BY}",
            f"{LABEL_COMPONENT}=engine",
        ]
    )


def _condition(conditions: Any, type_: str) -> Mapping[str, Any] | None:
    for condition in conditions or []:
        if isinstance(condition, Mapping) and condition.get("type") == type_:
            return condition
    return None


def _short(text: Any) -> str:
    """The last non-empty line of a kubelet or termination message (with
    FallbackToLogsOnError that is the log's last line, usually the exception), trimmed."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    if not lines:
        return ""
    last = lines[-1]
    return last if len(last) <= MAX_DETAIL else last[: MAX_DETAIL - 3] + "..."


def deadline_exceeded(deployment: Mapping[str, Any]) -> str | None:
    """The Deployment controller's message when the rollout timed out, else None."""
    progressing = _condition((deployment.get("status") or {}).get("conditions"), "Progressing")
    if (
        progressing is not None
        and progressing.get("status") == "False"
        and progressing.get("reason") == DEADLINE_EXCEEDED
    ):
        return str(progressing.get("message") or "the rollout timed out")
    return None


def pods_not_created(deployment: Mapping[str, Any]) -> str | None:
    """Why the ReplicaSet cannot create pods (a missing ServiceAccount or PriorityClass, a
    quota, an admission webhook): the Deployment controller copies the ReplicaSet's
    ReplicaFailure condition onto the Deployment. None when pods can be created."""
    failure = _condition((deployment.get("status") or {}).get("conditions"), "ReplicaFailure")
    if failure is None or failure.get("status") != "True":
        return None
    return str(failure.get("message") or failure.get("reason") or "pods cannot be created")


def _owning_deployment(
    pod: Mapping[str, Any], deployments: Sequence[Mapping[str, Any]]
) -> Mapping[str, Any] | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    for deployment in deployments:
        selector = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            return deployment
    return None


def _deadline_seconds(deployment: Mapping[str, Any] | None) -> int:
    value = ((deployment or {}).get("spec") or {}).get("progressDeadlineSeconds")
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_PROGRESS_DEADLINE_SECONDS


def _restarts(count: int) -> str:
    return f"restarted {count} time{'' if count == 1 else 's'}"


def _last_exit(status: Mapping[str, Any]) -> str:
    terminated = (status.get("lastState") or {}).get("terminated") or (
        (status.get("state") or {}).get("terminated")
    )
    if not terminated:
        return ""
    text = f"last exit {terminated.get('reason') or 'unknown'}"
    if terminated.get("exitCode") is not None:
        text += f" (exit code {terminated['exitCode']})"
    detail = _short(terminated.get("message"))
    return f"{text}: {detail}" if detail else text


def _container_problem(
    pod_name: str,
    status: Mapping[str, Any],
    *,
    init: bool,
    overdue: bool,
    unready_since: str,
) -> EngineProblem | None:
    if status.get("ready"):
        return None
    what = f"pod {pod_name} {'init container' if init else 'container'} {status.get('name')}"
    state = status.get("state") or {}
    waiting = state.get("waiting") or {}
    waiting_reason = str(waiting.get("reason") or "")
    restarts = int(status.get("restartCount") or 0)
    parts: list[str] = []
    if waiting_reason:
        # The back-off's own message ("back-off 40s restarting failed container=...") only
        # grows its delay: the restart count and the last exit say more, and stay put.
        detail = "" if waiting_reason == "CrashLoopBackOff" else _short(waiting.get("message"))
        parts.append(f"{waiting_reason}: {detail}" if detail else waiting_reason)
    elif state.get("running"):
        started_at = state["running"].get("startedAt")
        parts.append(f"running since {started_at}" if started_at else "running")
    if restarts:
        parts.append(_restarts(restarts))
    last_exit = _last_exit(status)
    if last_exit:
        parts.append(last_exit)
    if waiting_reason in IMAGE_PULL_WAITING:
        return EngineProblem(IMAGE_PULL_FAILED, f"{what}: {', '.join(parts)}", True, pod_name)
    if waiting_reason in CANNOT_START_WAITING:
        return EngineProblem(CANNOT_START, f"{what}: {', '.join(parts)}", True, pod_name)
    # An init container that finished is not "ready" but done.
    terminated = state.get("terminated") or {}
    if init and terminated and terminated.get("exitCode") == 0:
        return None
    restarting = waiting_reason == "CrashLoopBackOff" or not status.get("started")
    if restarts >= CRASH_LOOP_RESTARTS and restarting:
        return EngineProblem(CRASH_LOOP, f"{what}: {', '.join(parts)}", True, pod_name)
    if restarts or overdue:
        if unready_since:
            parts.append(f"not ready since {unready_since}")
        else:
            parts.append("not ready")
        return EngineProblem(NOT_READY, f"{what}: {', '.join(parts)}", overdue, pod_name)
    return None


def _pod_problems(
    pod: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    now: datetime.datetime | None,
    timed_out: bool,
) -> list[EngineProblem]:
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if metadata.get("deletionTimestamp") or status.get("phase") in {"Succeeded", "Failed"}:
        return []
    name = str(metadata.get("name") or "?")
    conditions = status.get("conditions")
    ready = _condition(conditions, "Ready")
    if ready is not None and ready.get("status") == "True":
        return []
    # The deadline runs from when the pod last became unready (or was created).
    since_text = str((ready or {}).get("lastTransitionTime") or "")
    since = kubeformat.parse_time(since_text) or kubeformat.parse_time(
        metadata.get("creationTimestamp")
    )
    overdue = timed_out or (
        now is not None
        and since is not None
        and (now - since).total_seconds() > _deadline_seconds(deployment)
    )
    scheduled = _condition(conditions, "PodScheduled")
    if (
        scheduled is not None
        and scheduled.get("status") == "False"
        and scheduled.get("reason") == "Unschedulable"
    ):
        detail = _short(scheduled.get("message"))
        message = f"pod {name}: Unschedulable" + (f": {detail}" if detail else "")
        return [EngineProblem(UNSCHEDULABLE, message, overdue, name)]
    problems = []
    for key, init in (("initContainerStatuses", True), ("containerStatuses", False)):
        for container in status.get(key) or []:
            problem = _container_problem(
                name, container, init=init, overdue=overdue, unready_since=since_text
            )
            if problem is not None:
                problems.append(problem)
    if not problems and overdue:
        phase = status.get("phase") or "Pending"
        message = f"pod {name}: {phase}, not ready" + (f" since {since_text}" if since_text else "")
        problems.append(EngineProblem(NOT_READY, message, True, name))
    # One per pod: its most telling container.
    return sorted(problems, key=_order)[:1]


def _order(problem: EngineProblem) -> tuple[bool, int, str]:
    return (not problem.degraded, _RANK.get(problem.reason, len(_RANK)), problem.pod)


def engine_problems(
    deployments: Sequence[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    *,
    now: str,
) -> list[EngineProblem]:
    """What keeps the engine replicas from turning ready, most telling first (Degraded ones,
    then by kind, then by pod name). `now` is RFC 3339, like the conditions' times."""
    current = kubeformat.parse_time(now)
    problems: list[EngineProblem] = []
    timed_out: set[str] = set()
    for deployment in deployments:
        name = str((deployment.get("metadata") or {}).get("name"))
        refused = pods_not_created(deployment)
        if refused is not None:
            # No pod will appear to say anything: this is the whole story, and it will not
            # pass by itself (the issue: "replicas are being created", Pending, forever).
            detail = refused[:MAX_DETAIL]
            problems.append(EngineProblem(PODS_NOT_CREATED, f"Deployment {name}: {detail}", True))
        message = deadline_exceeded(deployment)
        if message is not None:
            timed_out.add(name)
            problems.append(EngineProblem(DEADLINE_EXCEEDED, f"Deployment {name}: {message}", True))
    for pod in pods:
        owner = _owning_deployment(pod, deployments)
        owner_name = str(((owner or {}).get("metadata") or {}).get("name"))
        problems += _pod_problems(
            pod, owner, current, owner is not None and owner_name in timed_out
        )
    return sorted(problems, key=_order)


def summarize(problems: Sequence[EngineProblem]) -> EngineProblem | None:
    """One problem for a condition: the most telling reason, up to MAX_LISTED pods named (the
    rest counted), and the Deployment controller's timeout message whenever there is one."""
    if not problems:
        return None
    ordered = sorted(problems, key=_order)
    first = ordered[0]
    degraded = [p for p in ordered if p.degraded == first.degraded]
    pods = [p for p in degraded if p.reason != DEADLINE_EXCEEDED]
    deadlines = [p for p in ordered if p.reason == DEADLINE_EXCEEDED]
    parts = [p.message for p in pods[:MAX_LISTED]]
    if len(pods) > MAX_LISTED:
        parts.append(f"and {len(pods) - MAX_LISTED} more pods")
    parts += [p.message for p in deadlines]
    return EngineProblem(first.reason, "; ".join(parts), first.degraded, first.pod)
