"""The reconcile loop: parse, plan, render, apply, prune, write status.

Level-based: every event (the LLMDeployment's own, or one of its children's) leads to the same
`reconcile(namespace, name)`, which compares what the spec wants with what the cluster has
(a watch-fed cache, so a steady cluster costs no API calls) and writes only differences.

While an engine Deployment is not fully rolled out, the reconcile also lists its pods (by label,
read only) to say why (engine_health), and looks again every RECHECK_SECONDS until it is. Pods
change state without their Deployment changing (a crash loop moves restart counts and back-off
states, and the Deployment's status stays "1 unavailable"), so something must look again; a
timer only while replicas are missing is the cheapest thing that does. A pods watch was the
alternative: it would stream every status change of every engine pod in the cluster to the
operator, settled or not (probe flips, restarts, node moves), need a cache of them and `watch`
rights, to save at most RECHECK_SECONDS on a state the kubelet itself backs off in steps of
10 s to 5 min. A settled LLMDeployment costs nothing; an unsettled one one cached LIST per
interval; neither writes unless the status changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import urllib3
from pydantic import ValidationError

from llm_operator.api import LLMDeployment
from llm_operator.constants import ANNOTATION_ROLLOUT_COMMAND, FIELD_MANAGER, LABEL_DEPLOYMENT
from llm_operator.controller import metrics
from llm_operator.controller.canary import (
    Analyst,
    CanaryStep,
    canary_status,
    clear_canary,
    command_of,
    plan_canary,
)
from llm_operator.controller.routes import RoutesWriter
from llm_operator.controller.slots import PrioritySlots
from llm_operator.engine_health import REASONS as ENGINE_REASONS
from llm_operator.engine_health import EngineProblem, engine_problems, pod_selector
from llm_operator.fallback_health import CHECK_SECONDS, fallback_condition, fallback_queries
from llm_operator.kube.client import RETRYABLE_STATUSES, KubeClient
from llm_operator.kube.transport import ApiError
from llm_operator.kubeformat import rfc3339_now
from llm_operator.planner import plan
from llm_operator.preflight import cannot_start, needs, replaces_serving_template
from llm_operator.reconcile import (
    Problem,
    Scaling,
    compute_status,
    deployment_counts,
    key,
    owned,
    plan_actions,
    set_condition,
    status_changed,
)
from llm_operator.render import RenderConfig, render_all, status_extras
from llm_operator.render.names import object_name

log = logging.getLogger("llm_operator.controller")
FALLBACK = "FallbackActive"
# A new revision that could never start (llm_operator/preflight.py): the old one keeps serving.
REVISION_CANNOT_START = "RevisionCannotStart"

OwnerKey = tuple[str, str]  # (namespace, name)
BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
#: How often an LLMDeployment whose replicas are not all ready is looked at again (its pods
#: re-read), give or take a fifth so that many of them do not poll in step. The kubelet's
#: restart back-off starts at 10 s, so a crash loop (two restarts) shows within about a minute.
RECHECK_SECONDS = 30.0
#: Reconciles that read the cache and run at once: the default executor's worker threads
#: (ThreadPoolExecutor's own default), so a reconcile takes its snapshot when a thread is
#: free for it, not when it is queued.
RECONCILE_SLOTS = min(32, (os.cpu_count() or 1) + 4)


def describe_validation_error(error: ValidationError) -> str:
    """One line per mistake, with the field path a person would look for."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"] if part not in {"spec"})
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


@dataclass
class Controller:
    client: KubeClient
    config: RenderConfig
    clock: Callable[[], str] = rfc3339_now
    epoch: Callable[[], float] = time.time
    """Now as a Unix time, for the canary's steps and analyses (tests move it)."""
    bodies: dict[OwnerKey, dict[str, Any]] = field(default_factory=dict)
    children: dict[OwnerKey, dict[tuple[str, str], dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    """Children by owner, without managedFields. Compact JSON was tried: the Python heap
    shrank but RSS at 1000 LLMDeployments did not (bench/results/operator.md)."""
    locks: dict[OwnerKey, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    failures: dict[OwnerKey, int] = field(default_factory=lambda: defaultdict(int))
    retries: dict[OwnerKey, asyncio.TimerHandle] = field(default_factory=dict)
    rechecks: dict[OwnerKey, asyncio.TimerHandle] = field(default_factory=dict)
    """Pending looks at LLMDeployments whose engine replicas are not all ready."""
    recheck_seconds: float = RECHECK_SECONDS
    pods_forbidden_logged: bool = False
    tasks: set[asyncio.Future[None]] = field(default_factory=set)
    routes: RoutesWriter | None = None
    prometheus_url: str | None = None
    """Prometheus that canary analysis queries (the gateway's per-track metrics). None:
    every analysis is Inconclusive, so no canary is ever promoted on missing data."""
    analyst: Analyst = field(init=False)
    fallback_checked: dict[OwnerKey, float] = field(default_factory=dict)
    """When FallbackActive was last looked at, per LLMDeployment with fallbacks."""
    preflight_nodes: bool = True
    """Before a new revision replaces pods that serve, check that some node has its
    nodeSelector labels (list on nodes); the Secrets it reads are checked always."""
    slots: PrioritySlots = field(default_factory=lambda: PrioritySlots(RECONCILE_SLOTS))
    """Held from the snapshot to the end of the worker thread's run. Without it a burst of
    1,000 queued for the threads with 1,000 snapshots taken at once: each kept the body and
    children it read alive, superseded or not, until its turn (~25 MiB at the burst's peak,
    bench/results/operator.md), and ran on what was stale by then."""
    reconciled_generation: dict[OwnerKey, int] = field(default_factory=dict)
    """The spec generation each LLMDeployment was last reconciled at: one that is new or
    edited since waits for a thread ahead of ones whose status or children moved."""

    def __post_init__(self) -> None:
        self.analyst = Analyst(self.prometheus_url)
        if self.routes is not None:
            self.routes.bodies = self.bodies

    # -- the cache, fed by watches (touched only on the event loop) ----------------------

    replicas_owned: dict[tuple[str, str], bool] = field(default_factory=dict)
    foreign: dict[tuple[str, str], dict[str, list[str]]] = field(default_factory=dict)
    """Pod template fields of Deployments that only other field managers set, by manager."""

    def live_children(self, owner_key: OwnerKey) -> list[dict[str, Any]]:
        """A snapshot for a worker thread; the objects themselves are never mutated."""
        return list(self.children.get(owner_key, {}).values())

    def remember_child(self, obj: dict[str, Any], deleted: bool = False) -> OwnerKey | None:
        metadata = obj.get("metadata", {})
        owner = controller_owner(metadata) or (metadata.get("labels") or {}).get(LABEL_DEPLOYMENT)
        if not owner:
            return None
        owner_key = (metadata["namespace"], owner)
        children = self.children[owner_key]
        child_key = key(obj)
        if deleted:
            children.pop(child_key, None)
            self.replicas_owned.pop((metadata["namespace"], metadata["name"]), None)
            self.foreign.pop((metadata["namespace"], metadata["name"]), None)
            return owner_key
        known = children.get(child_key)
        version = _resource_version(obj)
        if known is None or version >= _resource_version(known):
            if obj.get("kind") == "Deployment" and "managedFields" in metadata:
                at = (metadata["namespace"], metadata["name"])
                self.replicas_owned[at] = owns_replicas(metadata["managedFields"])
                foreign = foreign_template_fields(metadata["managedFields"])
                if foreign:
                    self.foreign[at] = foreign
                else:
                    self.foreign.pop(at, None)
            slim = {**obj, "metadata": {k: v for k, v in metadata.items() if k != "managedFields"}}
            children[child_key] = slim
        return owner_key

    def remember_owner(self, body: dict[str, Any], deleted: bool = False) -> OwnerKey:
        owner_key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if deleted:
            # Children go with garbage collection; forget them here too.
            self.bodies.pop(owner_key, None)
            self.children.pop(owner_key, None)
            self.failures.pop(owner_key, None)
            self.locks.pop(owner_key, None)
            self.reconciled_generation.pop(owner_key, None)
            metrics.forget(*owner_key)
            for timers in (self.retries, self.rechecks):
                handle = timers.pop(owner_key, None)
                if handle:
                    handle.cancel()
        else:
            previous = self.bodies.get(owner_key)
            # managedFields is most of an object's size and nothing here reads it.
            metadata = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
            body = {**body, "metadata": metadata}
            if previous is not None and _resource_version(body) < _resource_version(previous):
                return owner_key  # an older copy than the one the status patch returned
            self.bodies[owner_key] = body
            if previous is not None and routing_inputs(previous) == routing_inputs(body):
                return owner_key  # a status change: the routes stay as they are
        if self.routes is not None:
            self.routes.schedule()
        return owner_key

    # -- reconcile -----------------------------------------------------------------------

    async def reconcile(
        self, owner_key: OwnerKey, reading: Callable[[], None] | None = None
    ) -> None:
        """Reconcile one LLMDeployment from the cache; `reading` is called just before the
        cache is read, so a caller coalescing events knows which ones this run will see."""
        async with self.locks[owner_key], self.slots.held(self.priority(owner_key)):
            if reading is not None:
                reading()
            body = self.bodies.get(owner_key)
            if body is None:
                return
            generation = body["metadata"].get("generation")
            # The worker thread gets copies: the cache is only ever changed on this loop.
            live = self.live_children(owner_key)
            # Only this owner's Deployments are looked up in these (a desired one not yet live
            # needs neither): a copy of the whole namespace's, per queued reconcile, was a set
            # of up to N names held by each of the N reconciles a burst queues.
            namespace = owner_key[0]
            deployments = [c["metadata"]["name"] for c in live if c.get("kind") == "Deployment"]
            owned_replicas = {n for n in deployments if self.replicas_owned.get((namespace, n))}
            foreign = {
                n: dict(self.foreign[(namespace, n)])
                for n in deployments
                if (namespace, n) in self.foreign
            }
            started = time.perf_counter()
            try:
                outcome = await asyncio.to_thread(
                    self.reconcile_sync, body, live, owned_replicas, foreign
                )
            except ApiError as error:
                metrics.RECONCILES.labels(result="error").inc()
                self.retry_later(owner_key, f"API {error.status}: {error.reason}")
                return
            except (OSError, TimeoutError, urllib3.exceptions.HTTPError) as error:
                # Connection trouble: the API server may be restarting.
                metrics.RECONCILES.labels(result="error").inc()
                self.retry_later(owner_key, str(error))
                return
            finally:
                metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
            for obj in outcome.applied:
                self.remember_child(obj)
            for obj in outcome.deleted:
                self.remember_child(obj, deleted=True)
            if outcome.problem is not None and outcome.problem.reason == "ApplyFailed":
                # Refused by admission or a missing CRD: may be fixed out of band; look again.
                self.retry_later(owner_key, outcome.problem.message, delay=SLOW_RETRY_SECONDS)
            else:
                self.failures.pop(owner_key, None)
            if isinstance(generation, int):
                self.reconciled_generation[owner_key] = generation
            if outcome.status is not None:
                # The next reconcile must see the state just written (a canary's step and
                # analysis count), not wait for the watch to bring it.
                self.remember_owner(outcome.status)
            delay = self.next_look(outcome)
            if delay is not None:
                self.recheck_later(owner_key, delay)
            else:
                handle = self.rechecks.pop(owner_key, None)
                if handle:
                    handle.cancel()
            metrics.RECONCILES.labels(result="ok").inc()

    def priority(self, owner_key: OwnerKey) -> int:
        """0 for an LLMDeployment not yet reconciled at its spec's generation, else 1."""
        body = self.bodies.get(owner_key)
        generation = body["metadata"].get("generation") if body else None
        return 1 if self.reconciled_generation.get(owner_key) == generation else 0

    def retry_later(self, owner_key: OwnerKey, why: str, delay: float | None = None) -> None:
        attempt = self.failures[owner_key]
        self.failures[owner_key] = attempt + 1
        if delay is None:
            delay = BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)]
        log.warning("reconcile %s/%s will retry in %.0fs: %s", *owner_key, delay, why)
        loop = asyncio.get_running_loop()
        previous = self.retries.pop(owner_key, None)
        if previous:
            previous.cancel()
        self.retries[owner_key] = loop.call_later(delay, self._spawn_reconcile, owner_key)

    def next_look(self, outcome: Outcome) -> float | None:
        """Seconds until the next look, the earliest of what is due: a canary step or
        analysis (or a fallback probe) comes due at its time even while pods are missing."""
        due = [] if outcome.wake_after is None else [outcome.wake_after]
        if outcome.recheck:
            due.append(self.recheck_seconds * random.uniform(1.0, 1.2))  # spread, not secret
        return min(due) if due else None

    def recheck_later(self, owner_key: OwnerKey, delay: float) -> None:
        """Look again later: pods change state without an event the operator watches, and a
        canary's steps and analyses come due with time alone. Every reconcile moves the
        timer, since each one already looked."""
        previous = self.rechecks.pop(owner_key, None)
        if previous:
            previous.cancel()
        loop = asyncio.get_running_loop()
        self.rechecks[owner_key] = loop.call_later(delay, self._spawn_recheck, owner_key)

    def _spawn_recheck(self, owner_key: OwnerKey) -> None:
        self.rechecks.pop(owner_key, None)
        self._start_reconcile(owner_key)

    def _spawn_reconcile(self, owner_key: OwnerKey) -> None:
        self.retries.pop(owner_key, None)
        self._start_reconcile(owner_key)

    def _start_reconcile(self, owner_key: OwnerKey) -> None:
        task = asyncio.ensure_future(self.reconcile(owner_key))
        self.tasks.add(task)  # keep a reference until it ends
        task.add_done_callback(self.tasks.discard)

    def reconcile_sync(
        self,
        body: dict[str, Any],
        live: list[dict[str, Any]],
        owned_replicas: set[str],
        foreign: dict[str, dict[str, list[str]]] | None = None,
    ) -> Outcome:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        generation = body["metadata"].get("generation")
        outcome = Outcome()
        extra: dict[str, Any] = {}
        scaling: Scaling | None = None
        try:
            llmd = LLMDeployment.model_validate(body)
        except ValidationError as error:
            outcome.problem = Problem("InvalidSpec", describe_validation_error(error))
        else:
            if llmd.spec.autoscaling is not None:
                scaling = Scaling(llmd.spec.autoscaling.provider, object_name(llmd))
            try:
                sizing = plan(llmd.spec)
                desired = owned(render_all(llmd, self.config, sizing=sizing), body)
                extra = status_extras(llmd, self.config, sizing=sizing)
            except ValueError as error:  # the planner's and renderers' own errors
                outcome.problem = Problem("CannotPlan", str(error))
            else:
                if body["metadata"].get("deletionTimestamp"):
                    # Being deleted (foreground): garbage collection removes the children;
                    # re-creating them would fight it.
                    return outcome
                if llmd.spec.rollout.canary is not None:
                    outcome.canary = plan_canary(
                        llmd=llmd,
                        body=body,
                        config=self.config,
                        sizing=sizing,
                        desired=desired,
                        live=live,
                        analyst=self.analyst,
                        now=self.epoch(),
                    )
                    desired = outcome.canary.desired
                self.converge(
                    (namespace, name),
                    body["metadata"]["uid"],
                    desired,
                    live,
                    owned_replicas,
                    outcome,
                    foreign or {},
                )
                for message in outcome.foreign_removed:
                    self.client.post_event(body, "Warning", FOREIGN_REASON, message)
                    log.warning("%s/%s: %s: %s", namespace, name, FOREIGN_REASON, message)
        current = {key(obj): obj for obj in live}
        current.update((key(obj), obj) for obj in outcome.applied)
        for obj in outcome.deleted:
            current.pop(key(obj), None)
        deployments = [obj for (kind, _), obj in current.items() if kind == "Deployment"]
        previous = body.get("status") or {}
        now = self.clock()
        engine: list[EngineProblem] = []
        if outcome.problem is None and deployments and not deployment_counts(deployments)[2]:
            # Only while replicas are missing: a settled Deployment has nothing to explain,
            # and a steady cluster must cost no API calls.
            engine = self.engine_health(namespace, name, deployments, now)
            outcome.recheck = True
        status = compute_status(
            previous=previous,
            generation=generation,
            deployments=deployments,
            problem=outcome.problem,
            extra=extra,
            now=now,
            engine=engine,
            scaling=scaling,
            autoscalers=[
                obj
                for (kind, _), obj in current.items()
                if kind in {"HorizontalPodAutoscaler", "ScaledObject"}
            ],
        )
        if outcome.canary is not None and outcome.problem is None:
            status = canary_status(status, outcome.canary, generation, now)
        elif outcome.problem is None:
            status = clear_canary(status)
        if outcome.problem is None:
            status = self.fallback_status(body, status, generation, now, outcome)
        metrics.observe_status(namespace, name, body, status)
        if status_changed(previous, status):
            outcome.status = self.client.patch_status(
                namespace, name, merge_patch(previous, status)
            )
            metrics.WRITES.labels(verb="patch", kind="LLMDeployment/status").inc()
            if previous.get("phase") != status.get("phase"):
                log.info(
                    "%s/%s: %s -> %s", namespace, name, previous.get("phase"), status.get("phase")
                )
            self.announce_canary(body, outcome)
            problem = outcome.problem
            was_degraded = _condition(previous, "Degraded")
            if problem and (not was_degraded or was_degraded.get("message") != problem.message):
                self.client.post_event(body, "Warning", problem.reason, problem.message)
                log.warning("%s/%s: %s: %s", namespace, name, problem.reason, problem.message)
            degraded = _condition(status, "Degraded")
            if (
                problem is None
                and degraded is not None
                and degraded.get("reason") in ENGINE_REASONS
                and (not was_degraded or was_degraded.get("reason") != degraded.get("reason"))
            ):
                # One Event when the engine breaks (or breaks differently), not one per
                # restart: the condition's message, with its restart count, says the rest.
                reason, message = str(degraded["reason"]), str(degraded.get("message") or "")
                self.client.post_event(body, "Warning", reason, message)
                log.warning("%s/%s: %s: %s", namespace, name, reason, message)
        if command_of(body) is not None and outcome.problem is None:
            # Acted on (or not applicable): the request is spent.
            self.client.clear_annotation(namespace, name, ANNOTATION_ROLLOUT_COMMAND)
        return outcome

    def fallback_status(
        self,
        body: dict[str, Any],
        status: dict[str, Any],
        generation: int | None,
        now: str,
        outcome: Outcome,
    ) -> dict[str, Any]:
        """FallbackActive, from the gateway's counters, for an LLMDeployment with fallbacks;
        looked at every CHECK_SECONDS while it has them."""
        fallbacks = ((body.get("spec") or {}).get("routing") or {}).get("fallbacks")
        owner_key = key_of(body)
        if not fallbacks or self.analyst.prometheus is None:
            self.fallback_checked.pop(owner_key, None)
            conditions = [c for c in status.get("conditions") or [] if c["type"] != FALLBACK]
            return {**status, "conditions": conditions}
        outcome.fallback_wake = CHECK_SECONDS
        moment = self.epoch()
        if moment - self.fallback_checked.get(owner_key, 0.0) < CHECK_SECONDS:
            return status
        self.fallback_checked[owner_key] = moment
        served = str(status.get("servedName") or body["spec"]["model"].get("name"))
        queries = fallback_queries(served)
        values = self.analyst.scalars(queries.fallbacks, queries.requests)
        condition = None if values is None else fallback_condition(*values)
        if condition is None:
            return status
        conditions = set_condition(
            list(status.get("conditions") or []), FALLBACK, *condition, generation, now
        )
        return {**status, "conditions": sorted(conditions, key=lambda c: str(c["type"]))}

    def announce_canary(self, body: dict[str, Any], outcome: Outcome) -> None:
        """The canary's Events, once per transition: they come only with a status change."""
        if outcome.canary is None:
            return
        for event in outcome.canary.decision.events:
            self.client.post_event(body, event.type, event.reason, event.message)
            log_at = logging.WARNING if event.type == "Warning" else logging.INFO
            log.log(log_at, "%s/%s: %s: %s", *key_of(body), event.reason, event.message)

    def engine_health(
        self, namespace: str, name: str, deployments: list[dict[str, Any]], now: str
    ) -> list[EngineProblem]:
        """What the engine pods say about missing replicas (read only: never a pod write)."""
        try:
            pods = self.client.list_pods(namespace, pod_selector(name))
        except ApiError as error:
            if error.status in RETRYABLE_STATUSES:
                raise
            # Say what the Deployments say; RBAC from an older chart lacks `list pods`.
            if not self.pods_forbidden_logged:
                log.warning(
                    "cannot list pods in %s (API %s): status without pod detail",
                    namespace,
                    error.status,
                )
                self.pods_forbidden_logged = True
            pods = []
        return engine_problems(deployments, pods, now=now)

    def converge(
        self,
        owner_key: OwnerKey,
        owner_uid: str,
        desired: list[dict[str, Any]],
        live: list[dict[str, Any]],
        owned_replicas: set[str],
        outcome: Outcome,
        foreign: dict[str, dict[str, list[str]]] | None = None,
    ) -> None:
        actions = plan_actions(desired, live, owner_uid)
        live_by_key = {key(obj): obj for obj in live}
        blocked = self.preflight(owner_key[0], actions.apply, live_by_key)
        if blocked:
            # The running revision keeps serving; look again, since creating the missing
            # Secret (or a node) sends the operator no event.
            outcome.problem = Problem(REVISION_CANNOT_START, blocked)
            outcome.recheck = True
            return
        # Owning a field the spec no longer sets is drift too: release it (with a handover).
        actions.apply += [
            obj
            for obj in desired
            if obj not in actions.apply
            and replicas_handover_needed(obj, live_by_key.get(key(obj)), owned_replicas)
        ]
        for obj in actions.apply:
            drift = actions.drift.get(key(obj))
            if drift:
                log.info("%s/%s %s %s drifted at %s: applying", *owner_key, *key(obj), drift[:5])
            elif key(obj) not in live_by_key:
                log.info("%s/%s %s %s: creating", *owner_key, *key(obj))
            try:
                current = live_by_key.get(key(obj))
                if replicas_handover_needed(obj, current, owned_replicas):
                    assert current is not None
                    self.client.apply(replicas_handover(current), field_manager=HANDOVER_MANAGER)
                    metrics.WRITES.labels(verb="apply", kind="Deployment/replicas").inc()
                applied = self.client.apply(obj)
            except ApiError as error:
                if error.status in RETRYABLE_STATUSES:
                    raise
                outcome.problem = apply_failed(obj, error)
                return
            metrics.WRITES.labels(verb="apply", kind=obj["kind"]).inc()
            outcome.applied.append(applied)
        for obj in desired:
            added = (foreign or {}).get(obj["metadata"]["name"])
            if obj["kind"] != "Deployment" or not added or key(obj) not in live_by_key:
                continue
            # The pod template is wholly the operator's: an apply keeps what another manager
            # added (an env var, a nodeSelector), so replace it whole and say who added what.
            try:
                replaced = self.client.replace_pod_template(
                    keep_restart(obj, live_by_key[key(obj)])
                )
            except ApiError as error:
                if error.status in RETRYABLE_STATUSES:
                    raise
                outcome.problem = apply_failed(obj, error)
                return
            metrics.WRITES.labels(verb="patch", kind="Deployment/template").inc()
            outcome.applied.append(replaced)
            said = "; ".join(f"{m}: {', '.join(f)}" for m, f in sorted(added.items()))
            outcome.foreign_removed.append(
                f"Deployment {obj['metadata']['name']}: removed from the pod template what "
                f"other field managers set ({said}); the pod template is the operator's: "
                "change the LLMDeployment's spec instead"
            )
        for obj in actions.delete:
            self.client.delete(obj)
            metrics.WRITES.labels(verb="delete", kind=obj["kind"]).inc()
            outcome.deleted.append(obj)

    def preflight(
        self,
        namespace: str,
        to_apply: list[dict[str, Any]],
        live_by_key: dict[tuple[str, str], dict[str, Any]],
    ) -> str | None:
        """Why a new revision about to replace pods that serve could never start, or None
        (llm_operator/preflight.py); only then does it cost API calls."""
        for obj in to_apply:
            current = live_by_key.get(key(obj))
            if not replaces_serving_template(obj, current):
                continue
            wanted = needs(obj)
            found: dict[str, frozenset[str] | None] = {}
            for name in wanted.secrets:
                secret = self.client.get_secret(namespace, name)
                found[name] = None if secret is None else frozenset(secret.get("data") or {})
            nodes_match = None
            assert current is not None
            old_selector = (current["spec"]["template"]["spec"].get("nodeSelector")) or {}
            # Pods run on the nodes the old selector picks: only a changed one needs a look.
            if (
                self.preflight_nodes
                and wanted.node_selector
                and dict(wanted.node_selector) != old_selector
            ):
                selector = ",".join(f"{k}={v}" for k, v in wanted.node_selector)
                nodes_match = self.client.any_node(selector)
            why = cannot_start(wanted, found, nodes_match)
            if why:
                return f"Deployment {obj['metadata']['name']}: {why}"
        return None


def apply_failed(obj: dict[str, Any], error: ApiError) -> Problem:
    """The API server refused what was rendered: said with its message; what runs is kept."""
    return Problem("ApplyFailed", f"{obj['kind']} {obj['metadata']['name']}: {error.body}")


HANDOVER_MANAGER = "llm-operator-replicas-handover"
#: `kubectl rollout restart` sets this in the pod template: a restart asked for, not drift.
RESTART_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
_RESTART_PATH = f"spec.template.metadata.annotations.{RESTART_ANNOTATION}"


def keep_restart(desired: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """`desired` with the live pod template's restart annotation, so that replacing the
    template does not undo a `kubectl rollout restart` (and roll the pods a second time)."""
    template = (live.get("spec") or {}).get("template") or {}
    restarted = ((template.get("metadata") or {}).get("annotations") or {}).get(RESTART_ANNOTATION)
    if restarted is None:
        return desired
    spec = desired["spec"]
    metadata = spec["template"].get("metadata") or {}
    annotations = {**(metadata.get("annotations") or {}), RESTART_ANNOTATION: restarted}
    template = {**spec["template"], "metadata": {**metadata, "annotations": annotations}}
    return {**desired, "spec": {**spec, "template": template}}


FOREIGN_REASON = "ForeignFieldsRemoved"
#: At most this many field paths per manager in the Event.
FOREIGN_FIELDS_SHOWN = 10
SLOW_RETRY_SECONDS = 300.0


@dataclass
class Outcome:
    """What one reconcile did, handed back to the event loop to update the cache."""

    problem: Problem | None = None
    applied: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[dict[str, Any]] = field(default_factory=list)
    recheck: bool = False
    """Replicas are missing: look at the pods again in a while."""
    canary: CanaryStep | None = None
    status: dict[str, Any] | None = None
    """The LLMDeployment as the status patch returned it."""

    fallback_wake: float | None = None
    foreign_removed: list[str] = field(default_factory=list)
    """One message per Deployment whose pod template lost other managers' fields."""

    @property
    def wake_after(self) -> float | None:
        wakes = [self.fallback_wake]
        if self.canary is not None:
            wakes.append(self.canary.decision.wake_after)
        due = [w for w in wakes if w is not None]
        return min(due) if due else None


def key_of(body: dict[str, Any]) -> OwnerKey:
    return body["metadata"]["namespace"], body["metadata"]["name"]


def routing_inputs(body: dict[str, Any]) -> tuple[Any, Any, bool]:
    """What the routing table reads of an LLMDeployment: its spec, its canary's weight and
    whether it is Failed (not routed)."""
    status = body.get("status") or {}
    canary = status.get("canary") or {}
    return body.get("spec"), canary.get("weight"), status.get("phase") == "Failed"


def owns_replicas(managed_fields: list[dict[str, Any]]) -> bool:
    """Whether the operator's own apply set `spec.replicas` (so dropping it would reset it)."""
    for entry in managed_fields:
        if entry.get("manager") == FIELD_MANAGER and entry.get("operation") == "Apply":
            spec = (entry.get("fieldsV1") or {}).get("f:spec") or {}
            if "f:replicas" in spec:
                return True
    return False


def foreign_template_fields(managed_fields: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The pod template fields (spec.template...) that field managers other than the
    operator's own set and the operator does not, by manager: the outermost path of each."""
    ours: set[str] = set()
    theirs: dict[str, set[str]] = defaultdict(set)
    for entry in managed_fields:
        template = ((entry.get("fieldsV1") or {}).get("f:spec") or {}).get("f:template")
        if not isinstance(template, dict):
            continue
        paths = set(_field_paths(template, "spec.template")) - {_RESTART_PATH}
        manager = str(entry.get("manager") or "?")
        if manager in {FIELD_MANAGER, HANDOVER_MANAGER}:
            ours |= paths
        else:
            theirs[manager] |= paths
    out = {}
    for manager, paths in theirs.items():
        added = paths - ours
        outer = sorted(p for p in added if not any(_inside(p, q) for q in added))
        if outer:
            shown = outer[:FOREIGN_FIELDS_SHOWN]
            more = len(outer) - len(shown)
            out[manager] = shown + ([f"and {more} more"] if more else [])
    return out


def _inside(path: str, outer: str) -> bool:
    return path != outer and path.startswith(outer) and path[len(outer)] in ".["


def _field_paths(fields: dict[str, Any], prefix: str) -> list[str]:
    """Every path a fieldsV1 tree names ("." marks a node owned as a whole)."""
    paths = []
    for name, sub in fields.items():
        if name == ".":
            paths.append(prefix)
            continue
        kind, _, rest = name.partition(":")
        if kind == "f":
            path = f"{prefix}.{rest}"
        elif kind == "k":
            try:
                keys = json.loads(rest)
                path = prefix + "[" + ",".join(f"{k}={v}" for k, v in keys.items()) + "]"
            except (ValueError, AttributeError):
                path = f"{prefix}[{rest}]"
        else:
            path = f"{prefix}[{rest}]"
        if isinstance(sub, dict) and sub:
            paths.extend(_field_paths(sub, path))
        else:
            paths.append(path)
    return paths


def replicas_handover_needed(
    desired: dict[str, Any], live: dict[str, Any] | None, owned_replicas: set[str]
) -> bool:
    """Autoscaling was just turned on: the apply drops replicas the operator owned, which
    the API server would reset to 1 (killing GPU pods) before the HPA acts."""
    return (
        desired["kind"] == "Deployment"
        and live is not None
        and "replicas" not in desired.get("spec", {})
        and desired["metadata"]["name"] in owned_replicas
        and (live.get("spec") or {}).get("replicas") is not None
    )


def replicas_handover(live: dict[str, Any]) -> dict[str, Any]:
    """Another field manager keeps the current replica count when the operator lets go
    (server-side apply's documented way to transfer ownership)."""
    return {
        "apiVersion": live["apiVersion"],
        "kind": live["kind"],
        "metadata": {"name": live["metadata"]["name"], "namespace": live["metadata"]["namespace"]},
        "spec": {"replicas": live["spec"]["replicas"]},
    }


def merge_patch(old: Any, new: Any) -> Any:
    """An RFC 7386 merge patch from `old` to `new`: keys gone at any depth become null."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch = {k: merge_patch(old.get(k), v) for k, v in new.items()}
    patch.update({k: None for k in old if k not in new})
    return patch


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


def _resource_version(obj: dict[str, Any]) -> int:
    """etcd's resourceVersions are integers; anything else sorts first."""
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, ValueError):
        return -1
