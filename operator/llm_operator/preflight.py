"""Whether a new pod template can start at all, checked before it replaces one that serves.

With the default `rollout.maxSurge: 0` (no spare GPU is assumed) and with `Recreate`, a rollout
stops an old pod before a new one starts, so an accepted edit whose pods can never start would
stop the model until someone reverts it. Before replacing the template of a Deployment that
serves, the operator checks what it can see cheaply: the Secrets (and keys) the template reads,
and whether any node carries the labels of its nodeSelector (a GPU product no node has). If one
is missing, the old template stays and the LLMDeployment is Degraded with what to fix. What
cannot be seen beforehand (an image that does not pull, affinity, free capacity) still rolls.

Pure: the controller gathers the facts (`found_secrets`, `nodes_match`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llm_operator.reconcile import drifted


@dataclass(frozen=True)
class Needs:
    """What a pod template needs from the cluster before its containers can start."""

    secret_keys: tuple[tuple[str, str | None], ...]
    """(Secret name, key) pairs that must exist; key None: the whole Secret."""
    node_selector: tuple[tuple[str, str], ...]

    @property
    def secrets(self) -> list[str]:
        return sorted({name for name, _ in self.secret_keys})


def _required(ref: Mapping[str, Any]) -> bool:
    return not ref.get("optional", False)


def _secret_refs(pod: Mapping[str, Any]) -> Iterable[tuple[str, str | None]]:
    containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
    for container in containers:
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref and _required(ref):
                yield ref["name"], ref.get("key")
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef")
            if ref and _required(ref):
                yield ref["name"], None
    for volume in pod.get("volumes") or []:
        secret = volume.get("secret")
        if secret and _required(secret):
            keys = [item["key"] for item in secret.get("items") or []] or [None]
            yield from ((secret["secretName"], k) for k in keys)
        for source in (volume.get("projected") or {}).get("sources") or []:
            secret = source.get("secret")
            if secret and _required(secret):
                keys = [item["key"] for item in secret.get("items") or []] or [None]
                yield from ((secret["name"], k) for k in keys)


def needs(deployment: Mapping[str, Any]) -> Needs:
    pod = deployment.get("spec", {}).get("template", {}).get("spec", {})
    return Needs(
        secret_keys=tuple(sorted(set(_secret_refs(pod)), key=lambda p: (p[0], p[1] or ""))),
        node_selector=tuple(sorted((pod.get("nodeSelector") or {}).items())),
    )


def replaces_serving_template(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> bool:
    """Whether applying `desired` starts a new revision of a Deployment that serves now."""
    if live is None or desired.get("kind") != "Deployment":
        return False
    if not (live.get("status") or {}).get("availableReplicas"):
        return False  # nothing serves: nothing to keep
    template = desired.get("spec", {}).get("template")
    return template is not None and bool(drifted(template, live.get("spec", {}).get("template")))


def cannot_start(
    wanted: Needs,
    found_secrets: Mapping[str, frozenset[str] | None],
    nodes_match: bool | None,
) -> str | None:
    """Why pods of this template could never start, or None. `found_secrets` maps each needed
    Secret to its keys (None: it does not exist); `nodes_match` None: not checked."""
    reasons: list[str] = []
    for name in wanted.secrets:
        if found_secrets.get(name) is None:
            reasons.append(f"Secret {name} does not exist")
    for name, key in wanted.secret_keys:
        keys = found_secrets.get(name)
        if key is not None and keys is not None and key not in keys:
            reasons.append(f"Secret {name} has no key {key}")
    if nodes_match is False:
        labels = ", ".join(f"{k}={v}" for k, v in wanted.node_selector)
        reasons.append(f"no node has the labels {labels}")
    if not reasons:
        return None
    return (
        "the new revision cannot start: "
        + "; ".join(reasons)
        + ". The running revision keeps serving; fix the spec (or create what is missing) "
        "and the rollout starts"
    )
