"""Pure reconcile decisions: which children to apply or delete, and what status to write.

No kopf, no client: plain dicts in, plain dicts out, so every decision is unit-tested.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_operator import kubeformat
from llm_operator.engine_health import (
    DEADLINE_EXCEEDED,
    EngineProblem,
    deadline_exceeded,
    summarize,
)


def _same_scalar(desired: Any, live: Any) -> bool:
    if isinstance(desired, bool) or isinstance(live, bool):
        return desired is live  # True == 1 in Python, but not in a manifest
    if desired == live:
        return True
    a, b = kubeformat.quantity(desired), kubeformat.quantity(live)
    return a is not None and a == b


def drifted(desired: Any, live: Any) -> list[str]:
    """Paths where `live` does not carry what `desired` says. Fields only in `live`
    (defaults, status, other managers' fields) are not drift."""
    if isinstance(desired, Mapping):
        if live is None and not desired:
            return []  # an empty object the API server did not keep
        if not isinstance(live, Mapping):
            return [""]
        return [
            f".{key}{sub}"
            for key, value in desired.items()
            for sub in drifted(value, live.get(key))
        ]
    if isinstance(desired, list):
        if live is None and not desired:
            return []  # an empty list the API server did not keep
        if not isinstance(live, list) or len(live) != len(desired):
            return [""]
        return [
            f"[{i}]{sub}"
            for i, (d, v) in enumerate(zip(desired, live, strict=True))
            for sub in drifted(d, v)
        ]
    if desired is None:
        return []
    if live is None and (desired == "" or desired is False):
        return []  # the API server omits empty strings and false booleans it stores
    return [] if _same_scalar(desired, live) else [""]


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    meta = owner["metadata"]
    return kubeformat.owner_reference(owner["apiVersion"], owner["kind"], meta["name"], meta["uid"])


def owned(objects: Iterable[dict[str, Any]], owner: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rendered objects with the owner's namespace and controller reference set."""
    reference = owner_reference(owner)
    namespace = owner["metadata"]["namespace"]
    result = []
    for obj in objects:
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        metadata["namespace"] = namespace
        metadata["ownerReferences"] = [reference]
        result.append(obj)
    return result


def key(obj: Mapping[str, Any]) -> tuple[str, str]:
    return str(obj["kind"]), str(obj["metadata"]["name"])


@dataclass
class Actions:
    apply: list[dict[str, Any]] = field(default_factory=list)
    delete: list[dict[str, Any]] = field(default_factory=list)
    drift: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def plan_actions(
    desired: list[dict[str, Any]], live: Iterable[dict[str, Any]], owner_uid: str
) -> Actions:
    """Apply what is missing or drifted; delete children of this owner the spec no longer
    wants. Never touch objects another owner controls."""
    live_by_key = {key(obj): obj for obj in live}
    actions = Actions()
    for obj in desired:
        current = live_by_key.get(key(obj))
        if current is None:
            actions.apply.append(obj)
            continue
        paths = drifted(obj, current)
        if paths:
            actions.apply.append(obj)
            actions.drift[key(obj)] = paths
    wanted = {key(obj) for obj in desired}
    for obj_key, obj in live_by_key.items():
        refs = obj.get("metadata", {}).get("ownerReferences") or []
        if obj_key not in wanted and any(r.get("uid") == owner_uid for r in refs):
            actions.delete.append(obj)
    return actions


CONDITION_TYPES = ("Ready", "Progressing", "Degraded")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """Conditions with one set; lastTransitionTime moves only when status flips."""
    value = "True" if status else "False"
    previous = next((c for c in conditions if c.get("type") == type_), None)
    transition = (
        previous["lastTransitionTime"]
        if previous and previous.get("status") == value and previous.get("lastTransitionTime")
        else now
    )
    updated = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": transition,
    }
    return [c for c in conditions if c.get("type") != type_] + [updated]


@dataclass(frozen=True)
class Problem:
    """Why the spec cannot be reconciled as written."""

    reason: str
    message: str


def deployment_counts(deployments: Iterable[Mapping[str, Any]]) -> tuple[int, int, bool]:
    """Replicas, ready replicas, and whether every Deployment finished rolling out."""
    replicas = ready = 0
    settled = True
    for deployment in deployments:
        status = deployment.get("status") or {}
        spec_replicas = (deployment.get("spec") or {}).get("replicas", 1)
        replicas += int(status.get("replicas") or 0)
        ready += int(status.get("readyReplicas") or 0)
        generation = deployment.get("metadata", {}).get("generation")
        settled = settled and (
            status.get("observedGeneration") == generation
            and int(status.get("updatedReplicas") or 0) >= spec_replicas
            and int(status.get("readyReplicas") or 0) >= spec_replicas
            and not status.get("unavailableReplicas")
        )
    return replicas, ready, settled


@dataclass(frozen=True)
class Scaling:
    """The autoscaler the spec asks for: provider (hpa or keda) and the name of its object
    (the stable Deployment's name; KEDA's own HPA is keda-hpa-<name>)."""

    provider: str
    name: str


def _conditions_of(obj: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    return {
        str(c.get("type")): c
        for c in ((obj or {}).get("status") or {}).get("conditions") or []
        if isinstance(c, Mapping)
    }


def _said(condition: Mapping[str, Any]) -> str:
    reason, message = condition.get("reason") or "", condition.get("message") or ""
    return f"{condition.get('type')} {condition.get('status')} ({reason}): {message}".rstrip(": ")


def _find(
    autoscalers: Iterable[Mapping[str, Any]], kind: str, name: str
) -> Mapping[str, Any] | None:
    return next(
        (
            obj
            for obj in autoscalers
            if obj.get("kind") == kind and (obj.get("metadata") or {}).get("name") == name
        ),
        None,
    )


def _hpa_verdict(hpa: Mapping[str, Any], name: str) -> tuple[bool, str, str] | None:
    """From an HPA's own conditions: None while it has not written any yet."""
    conditions = _conditions_of(hpa)
    able, active = conditions.get("AbleToScale"), conditions.get("ScalingActive")
    if able is None and active is None:
        return None
    if able is not None and able.get("status") != "True":
        return False, str(able.get("reason") or "HPANotAbleToScale"), f"HPA {name}: {_said(able)}"
    if active is not None and active.get("status") != "True":
        if active.get("reason") == "ScalingDisabled":
            # The target is at 0 replicas: for KEDA that is scale to zero, which KEDA itself
            # watches; for a plain HPA someone set the Deployment to 0 by hand.
            return False, "ScalingDisabled", f"HPA {name}: {_said(active)}"
        return (
            False,
            str(active.get("reason") or "MetricUnavailable"),
            f"HPA {name} cannot read its metric: {_said(active)}",
        )
    return True, "MetricRead", f"HPA {name}: {_said(active)}" if active else f"HPA {name}"


def scaling_ready(
    scaling: Scaling, autoscalers: Sequence[Mapping[str, Any]]
) -> tuple[bool, str, str]:
    """ScalingReady: the autoscaler exists and reads its metric, or why not. An HPA says so
    in AbleToScale and ScalingActive; a ScaledObject in Ready (KEDA reached Prometheus and
    the trigger parsed), and the HPA KEDA made in its own conditions while replicas run."""
    if scaling.provider == "keda":
        scaled_object = _find(autoscalers, "ScaledObject", scaling.name)
        if scaled_object is None:
            return False, "AutoscalerMissing", f"ScaledObject {scaling.name} does not exist yet"
        ready = _conditions_of(scaled_object).get("Ready")
        if ready is None:
            return (
                False,
                "AwaitingAutoscaler",
                f"ScaledObject {scaling.name} has no Ready condition yet (is KEDA running?)",
            )
        if ready.get("status") != "True":
            return (
                False,
                str(ready.get("reason") or "ScaledObjectNotReady"),
                f"ScaledObject {scaling.name}: {_said(ready)}",
            )
        active = _conditions_of(scaled_object).get("Active")
        state = (
            "active (the trigger is above its activation threshold)"
            if active is not None and active.get("status") == "True"
            else "idle (the trigger is at or below its activation threshold)"
        )
        hpa_name = f"keda-hpa-{scaling.name}"
        hpa = _find(autoscalers, "HorizontalPodAutoscaler", hpa_name)
        verdict = _hpa_verdict(hpa, hpa_name) if hpa is not None else None
        if verdict is not None and not verdict[0] and verdict[1] != "ScalingDisabled":
            return verdict
        return True, "MetricRead", f"ScaledObject {scaling.name} is Ready and {state}"
    hpa = _find(autoscalers, "HorizontalPodAutoscaler", scaling.name)
    if hpa is None:
        return False, "AutoscalerMissing", f"HPA {scaling.name} does not exist yet"
    verdict = _hpa_verdict(hpa, scaling.name)
    if verdict is None:
        return (
            False,
            "AwaitingAutoscaler",
            f"HPA {scaling.name} has not been evaluated yet (no conditions)",
        )
    return verdict


def desired_replicas(deployments: Iterable[Mapping[str, Any]]) -> int:
    """What the Deployments ask for (spec.replicas; the autoscaler sets it when it owns it)."""
    return sum(int((d.get("spec") or {}).get("replicas", 1)) for d in deployments)


def compute_status(
    *,
    previous: Mapping[str, Any] | None,
    generation: int | None,
    deployments: Sequence[Mapping[str, Any]],
    problem: Problem | None,
    extra: Mapping[str, Any],
    now: str,
    engine: Sequence[EngineProblem] = (),
    scaling: Scaling | None = None,
    autoscalers: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The status to write. `extra` carries plan, endpoint and the like; with a problem the
    previous values stay (they still describe what is running).

    `engine` is what the pods show (engine_health): a Degraded one makes the phase Degraded
    and Ready False with its reason, one that may pass by itself (a pod waiting for a node)
    only explains Progressing. A spec problem wins over both: it is what a person must fix
    first, and the spec is not applied until then.

    `scaling` is the autoscaler the spec asks for and `autoscalers` the live HPAs and
    ScaledObjects: ScalingReady says whether it reads its metric (scaling_ready); without
    autoscaling the condition is left out."""
    previous = previous or {}
    conditions = [dict(c) for c in previous.get("conditions") or []]
    replicas, ready, settled = deployment_counts(deployments)
    status: dict[str, Any] = {
        key_: value
        for key_, value in previous.items()
        if key_
        not in {
            "conditions",
            "phase",
            "observedGeneration",
            "replicas",
            "readyReplicas",
            "desiredReplicas",
        }
    }
    if problem is None:
        for key_, value in extra.items():
            if value is None:
                status.pop(key_, None)
            else:
                status[key_] = value
    status["observedGeneration"] = generation
    status["replicas"] = replicas
    status["readyReplicas"] = ready
    if deployments:
        status["desiredReplicas"] = desired_replicas(deployments)

    health = summarize(engine) if problem is None else None
    broken = health if health is not None and health.degraded else None
    timeouts = (
        [] if problem is not None else [m for d in deployments if (m := deadline_exceeded(d))]
    )
    serving = ready > 0
    is_ready = problem is None and broken is None and bool(deployments) and settled and ready > 0
    rolling = problem is None and bool(deployments) and not settled
    if problem is not None:
        phase = "Degraded" if deployments else "Failed"
    elif broken is not None:
        phase = "Degraded"
    elif is_ready:
        phase = "Ready"
    elif rolling and replicas > 0:
        phase = "Progressing"
    else:
        phase = "Pending"
    if problem is None and broken is None and bool(deployments) and settled and ready == 0:
        # Scaled to zero on purpose: nothing to wait for.
        phase = "Ready"
        is_ready = True

    ready_message = (
        f"{ready}/{replicas} replicas ready" if deployments else "no replicas created yet"
    )
    if problem is not None:
        ready_message = f"{ready_message}; spec not applied: {problem.reason}"
    elif broken is not None:
        ready_message = f"{ready_message}: {broken.reason}"
    if is_ready:
        ready_reason = "ReplicasReady"
    elif broken is not None:
        ready_reason = broken.reason
    else:
        ready_reason = "StillServing" if serving else "ReplicasNotReady"
    conditions = set_condition(
        conditions,
        "Ready",
        is_ready or (problem is not None and serving),
        ready_reason,
        ready_message,
        generation,
        now,
    )
    if timeouts:
        # The Deployment controller gave up waiting; it no longer calls this progress.
        progressing = (False, DEADLINE_EXCEEDED, "; ".join(timeouts))
    elif rolling and health is not None and not health.degraded:
        progressing = (True, health.reason, health.message)
    elif rolling:
        progressing = (True, "RollingOut", "replicas are being created or replaced")
    else:
        progressing = (False, "Settled", "")
    conditions = set_condition(conditions, "Progressing", *progressing, generation, now)
    if problem is not None:
        degraded = (True, problem.reason, problem.message)
    elif broken is not None:
        degraded = (True, broken.reason, broken.message)
    else:
        degraded = (False, "AsExpected", "")
    conditions = set_condition(conditions, "Degraded", *degraded, generation, now)
    if scaling is not None:
        conditions = set_condition(
            conditions, "ScalingReady", *scaling_ready(scaling, autoscalers), generation, now
        )
    elif problem is None:
        conditions = [c for c in conditions if c.get("type") != "ScalingReady"]
    status["conditions"] = sorted(conditions, key=lambda c: str(c["type"]))
    status["phase"] = phase
    return status


def status_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing `new` would change anything (transition times carry over)."""
    return dict(old or {}) != dict(new)
