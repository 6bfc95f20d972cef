"""The reconcile loop: parse, plan, render, apply, prune, write status.

Level-based: every event (the LLMDeployment's own, or one of its children's) leads to the same
`reconcile(namespace, name)`, which compares what the spec wants with what the cluster has
(a watch-fed cache, so a steady cluster costs no API calls) and writes only differences.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from llm_operator.api import LLMDeployment
from llm_operator.handlers import metrics
from llm_operator.handlers.routes import RoutesWriter
from llm_operator.kube.client import RETRYABLE_STATUSES, KubeClient
from llm_operator.planner import plan
from llm_operator.reconcile import (
    DEPLOYMENT_LABEL,
    Problem,
    compute_status,
    key,
    owned,
    plan_actions,
    status_changed,
)
from llm_operator.render import RenderConfig, render_all, status_extras

log = logging.getLogger("llm_operator.controller")

OwnerKey = tuple[str, str]  # (namespace, name)
BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def describe_validation_error(error: ValidationError) -> str:
    """One line per mistake, with the field path a person would look for."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"] if part not in {"spec"})
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Controller:
    client: KubeClient
    config: RenderConfig
    clock: Callable[[], str] = now_rfc3339
    bodies: dict[OwnerKey, dict[str, Any]] = field(default_factory=dict)
    children: dict[OwnerKey, dict[tuple[str, str], dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    locks: dict[OwnerKey, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    failures: dict[OwnerKey, int] = field(default_factory=lambda: defaultdict(int))
    retries: dict[OwnerKey, asyncio.TimerHandle] = field(default_factory=dict)
    routes: RoutesWriter | None = None

    # -- the cache, fed by watches -------------------------------------------------------

    def remember_child(self, obj: dict[str, Any], deleted: bool = False) -> OwnerKey | None:
        metadata = obj.get("metadata", {})
        owner = controller_owner(metadata) or (metadata.get("labels") or {}).get(DEPLOYMENT_LABEL)
        if not owner:
            return None
        owner_key = (metadata["namespace"], owner)
        children = self.children[owner_key]
        child_key = key(obj)
        if deleted:
            children.pop(child_key, None)
            return owner_key
        known = children.get(child_key)
        if known is None or _newer(obj, known):
            obj = {k: v for k, v in obj.items()}
            obj["metadata"] = {k: v for k, v in metadata.items() if k != "managedFields"}
            children[child_key] = obj
        return owner_key

    def remember_owner(self, body: dict[str, Any], deleted: bool = False) -> OwnerKey:
        owner_key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if deleted:
            # Children go with garbage collection; forget them here too.
            self.bodies.pop(owner_key, None)
            self.children.pop(owner_key, None)
            self.failures.pop(owner_key, None)
            handle = self.retries.pop(owner_key, None)
            if handle:
                handle.cancel()
        else:
            previous = self.bodies.get(owner_key)
            # managedFields is most of an object's size and nothing here reads it.
            metadata = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
            body = {**body, "metadata": metadata}
            self.bodies[owner_key] = body
            if previous is not None and previous.get("spec") == body.get("spec"):
                return owner_key  # a status change: the routes stay as they are
        if self.routes is not None:
            self.routes.schedule(self.bodies)
        return owner_key

    # -- reconcile -----------------------------------------------------------------------

    async def reconcile(self, owner_key: OwnerKey) -> None:
        async with self.locks[owner_key]:
            body = self.bodies.get(owner_key)
            if body is None:
                return
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self.reconcile_sync, body)
            except ApiException as error:
                metrics.RECONCILES.labels(result="error").inc()
                if error.status in RETRYABLE_STATUSES:
                    self.retry_later(owner_key, f"API {error.status}: {error.reason}")
                else:
                    log.error("reconcile %s/%s failed: %s", *owner_key, error)
                    self.retry_later(owner_key, f"API {error.status}: {error.reason}")
                return
            except (OSError, TimeoutError) as error:  # connection trouble: the API may be back soon
                metrics.RECONCILES.labels(result="error").inc()
                self.retry_later(owner_key, str(error))
                return
            finally:
                metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
            self.failures.pop(owner_key, None)
            metrics.RECONCILES.labels(result="ok").inc()

    def retry_later(self, owner_key: OwnerKey, why: str) -> None:
        attempt = self.failures[owner_key]
        self.failures[owner_key] = attempt + 1
        delay = BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)]
        log.warning("reconcile %s/%s will retry in %.0fs: %s", *owner_key, delay, why)
        loop = asyncio.get_running_loop()
        previous = self.retries.pop(owner_key, None)
        if previous:
            previous.cancel()
        self.retries[owner_key] = loop.call_later(
            delay, lambda: asyncio.ensure_future(self.reconcile(owner_key))
        )

    def reconcile_sync(self, body: dict[str, Any]) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        owner_key = (namespace, name)
        generation = body["metadata"].get("generation")
        problem: Problem | None = None
        extra: dict[str, Any] = {}
        try:
            llmd = LLMDeployment.model_validate(body)
        except ValidationError as error:
            problem = Problem("InvalidSpec", describe_validation_error(error))
        else:
            try:
                sizing = plan(llmd.spec)
                desired = owned(render_all(llmd, self.config, sizing=sizing), body)
                extra = status_extras(llmd, self.config, sizing=sizing)
            except ValueError as error:  # the planner's and renderers' own errors
                problem = Problem("CannotPlan", str(error))
            else:
                problem = self.converge(owner_key, desired, body["metadata"]["uid"])
        deployments = [
            obj
            for (kind, _), obj in self.children.get(owner_key, {}).items()
            if kind == "Deployment"
        ]
        previous = body.get("status") or {}
        status = compute_status(
            previous=previous,
            generation=generation,
            deployments=deployments,
            problem=problem,
            extra=extra,
            now=self.clock(),
        )
        if status_changed(previous, status):
            # A merge patch keeps keys it does not mention: null out the ones that went away.
            removed = {key_: None for key_ in previous if key_ not in status}
            self.client.patch_status(namespace, name, {**status, **removed})
            metrics.WRITES.labels(verb="patch", kind="LLMDeployment/status").inc()
            was_degraded = _condition(previous, "Degraded")
            if problem and (not was_degraded or was_degraded.get("message") != problem.message):
                self.client.post_event(body, "Warning", problem.reason, problem.message)
                log.warning("%s/%s: %s: %s", namespace, name, problem.reason, problem.message)

    def converge(
        self, owner_key: OwnerKey, desired: list[dict[str, Any]], owner_uid: str
    ) -> Problem | None:
        live = list(self.children.get(owner_key, {}).values())
        actions = plan_actions(desired, live, owner_uid)
        for obj in actions.apply:
            drift = actions.drift.get(key(obj))
            if drift:
                log.info("%s/%s %s %s drifted at %s: applying", *owner_key, *key(obj), drift[:5])
            try:
                applied = self.client.apply(obj)
            except ApiException as error:
                if error.status in RETRYABLE_STATUSES:
                    raise
                # The API server refused what we rendered: report it, keep what runs.
                return Problem(
                    "ApplyFailed", f"{obj['kind']} {obj['metadata']['name']}: {error.body}"
                )
            metrics.WRITES.labels(verb="apply", kind=obj["kind"]).inc()
            self.remember_child(applied)
        for obj in actions.delete:
            self.client.delete(obj)
            metrics.WRITES.labels(verb="delete", kind=obj["kind"]).inc()
            self.remember_child(obj, deleted=True)
        return None


def controller_owner(metadata: dict[str, Any]) -> str | None:
    """The LLMDeployment that controls an object. Labels are trimmed for names over 63
    characters; ownerReferences carry the full name."""
    for reference in metadata.get("ownerReferences") or []:
        if reference.get("kind") == "LLMDeployment" and reference.get("controller"):
            return str(reference["name"])
    return None


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return dict(condition)
    return None


def _newer(candidate: dict[str, Any], known: dict[str, Any]) -> bool:
    """Whether `candidate` is at least as new as `known` (etcd resourceVersions are integers)."""
    try:
        return int(candidate["metadata"]["resourceVersion"]) >= int(
            known["metadata"]["resourceVersion"]
        )
    except (KeyError, ValueError):
        return True
