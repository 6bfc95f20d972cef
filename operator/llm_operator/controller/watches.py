"""kopf registrations. The handlers only feed the cache and schedule reconciles.

LLMDeployments come through kopf; children through informers of our own (informer.py) that
watch with a server-side label selector, so unrelated objects never reach the operator.

Only watch-event handlers are used: kopf's create/update handlers persist progress in
annotations of the LLMDeployment, and the operator wants a steady cluster to see no writes.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable
from contextvars import Context
from typing import Any

import kopf

from llm_operator.api import GROUP, PLURAL, VERSION
from llm_operator.constants import MANAGED_BY_SELECTOR
from llm_operator.controller.informer import ApiTransport, Informer
from llm_operator.controller.reconciler import Controller, OwnerKey
from llm_operator.kube.client import load_config
from llm_operator.kube.resources import CHILD_KINDS, LLMDEPLOYMENT

log = logging.getLogger("llm_operator.controller")


#: Seconds between looks at whether the heap should be trimmed.
TRIM_SECONDS = 5.0


class HeapTrimmer:
    """After a burst of events, frees what waits for the cycle collector and hands the
    allocator's free pages back to the kernel.

    kopf wraps every event in objects that refer to each other (Body and its Meta, Spec and
    Status views, Patch and its parts), so they are freed only by a collection of the oldest
    generation, and CPython runs one only when that generation has grown by a quarter: while
    1,000 LLMDeployments filled the cache, ~1,100 events' worth (17,000 dicts) waited, and the
    arenas they held stayed after (bench/results/operator.md). So a full collection every
    TRIM_SECONDS while busy. glibc keeps what a burst freed in its arenas, one per thread that
    allocated; malloc_trim(0) releases the free pages of every arena. Only after activity, so
    a quiet operator does no work.
    """

    def __init__(self) -> None:
        self.busy = False
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        # musl and other libcs have no malloc_trim: nothing to do there.
        self.trim: Callable[[int], int] | None = getattr(libc, "malloc_trim", None)
        self.collect: Callable[[], int] = gc.collect

    def touch(self) -> None:
        self.busy = True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TRIM_SECONDS)
            if self.busy:
                self.busy = False
                self.collect()
                if self.trim is not None:
                    await asyncio.to_thread(self.trim, 0)


def reconcile_scheduler(controller: Controller) -> Callable[[OwnerKey], None]:
    """Schedule a reconcile of an owner, coalesced: while one is queued for it and has not
    yet read the cache, a further event only updates the cache, which that reconcile will
    read. A burst of events (an apply, then the Deployment controller's status updates; an
    LLMDeployment and the status patches that answer it) costs one reconcile per owner
    instead of one per event.

    Nothing waits for it: kopf's handler returns at once, so a burst of a thousand
    LLMDeployments does not hold a thousand kopf workers, each with its event, while their
    reconciles queue for the worker threads (with the handler's context that each task kept,
    below, ~24 MiB of RSS after a burst of 1,000, since the arenas they took stayed:
    bench/results/operator.md).
    """
    pending: set[OwnerKey] = set()

    async def run(owner_key: OwnerKey) -> None:
        # Pending until the reconcile reads the cache (after any reconcile in progress, which
        # read it before this event, and once a worker thread is free): events until then are
        # read by it.
        await controller.reconcile(owner_key, lambda: pending.discard(owner_key))

    def ended(task: asyncio.Future[None]) -> None:
        controller.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.error("reconcile failed: %r", error, exc_info=error)

    def schedule(owner_key: OwnerKey) -> None:
        if owner_key in pending:
            return
        pending.add(owner_key)
        # An empty context, not the caller's: a task copies the context it is made in, and
        # in kopf's handler that holds kopf's cause (the event's body, patch and logger)
        # until the task ends, which in a burst is after every queued reconcile before it.
        task = asyncio.get_running_loop().create_task(run(owner_key), context=Context())
        controller.tasks.add(task)  # keep a reference until it ends
        task.add_done_callback(ended)

    return schedule


def child_dispatcher(
    controller: Controller,
    trimmer: HeapTrimmer | None = None,
    schedule: Callable[[OwnerKey], None] | None = None,
) -> Callable[[str, dict[str, Any]], None]:
    """The loop's side of the child watches: cache the event, then reconcile the owner."""
    schedule = schedule or reconcile_scheduler(controller)

    def on_child(type_: str, obj: dict[str, Any]) -> None:
        if trimmer is not None:
            trimmer.touch()
        owner_key = controller.remember_child(obj, deleted=type_ == "DELETED")
        if owner_key is not None and owner_key in controller.bodies:
            schedule(owner_key)

    return on_child


class PerEventLines(logging.Filter):
    """kopf says "Handler 'llmdeployment' succeeded." at INFO for every watch event (1,348 of
    1,391 lines in one drill): those become DEBUG, so INFO says only what changed (applies,
    transitions, problems: the operator's own lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.getMessage().endswith(" succeeded."):
            if record.getMessage().startswith("Activity "):
                return True  # start-up and shutdown steps: once each
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


PER_EVENT_LINES = PerEventLines()


def list_all(controller: Controller, namespace: str | None) -> list[dict[str, Any]]:
    """Every LLMDeployment in scope, a page at a time."""
    bodies: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        page, token = controller.client.list_page(LLMDEPLOYMENT, namespace, "", token)
        bodies += page
        if not token:
            return bodies


def register(
    registry: kopf.OperatorRegistry,
    controller: Controller,
    namespaces: list[str],
    child_kinds: list[str],
) -> None:
    trimmer = HeapTrimmer()
    logging.getLogger("kopf.objects").addFilter(PER_EVENT_LINES)  # once: the same object
    schedule = reconcile_scheduler(controller)
    on_child = child_dispatcher(controller, trimmer, schedule)
    informers: list[Informer] = []
    background: set[asyncio.Task[None]] = set()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same credentials as the `kubernetes` client: in-cluster, else KUBECONFIG.
        info: kopf.ConnectionInfo | None = kopf.login_with_service_account(
            **kwargs
        ) or kopf.login_with_kubeconfig(**kwargs)
        return info

    @kopf.on.startup(registry=registry)
    async def prime_cache(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Children must be known before the first LLMDeployment event, or a restart would
        # re-apply everything. kopf starts its watches only after startup handlers finish.
        settings.posting.enabled = False
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        # At most 5 s between tries: the operator is back within 5 s of an outage's end
        # (e2e/test_drills_api.py), and a handful of watches retrying every 5 s is no storm.
        settings.networking.error_backoffs = [1, 2, 3, 5, 5, 5]
        # With --peering: a keep-alive every 2-7 s that lapses 12 s after the last one, so a
        # standby takes over within 12 s of the active replica's death (kopf's default: 60).
        settings.peering.lifetime = 12
        settings.batching.batch_window = 0.1
        # kopf keeps a worker per object until it has been idle this long, and the worker
        # holds the last raw event it handled (the whole body, managedFields and all). The
        # handler returns at once, so there is nothing to wait for: kopf's 5 s only kept
        # workers and their events through a burst.
        settings.queueing.idle_timeout = 0.5
        loop = asyncio.get_running_loop()

        def deliver(type_: str, obj: dict[str, Any]) -> None:  # from a watch thread
            loop.call_soon_threadsafe(on_child, type_, obj)

        transport = ApiTransport(load_config())  # its own connections (informer.py)
        for namespace in namespaces or [None]:  # type: ignore[list-item]
            for kind in CHILD_KINDS:
                if kind.kind not in child_kinds:
                    continue
                informer = Informer(
                    transport,
                    kind,
                    namespace,
                    MANAGED_BY_SELECTOR,
                    deliver,
                )
                # The first list here, so its errors stop the start-up as before; the
                # watch from its resourceVersion runs in a thread of its own.
                await asyncio.to_thread(informer.relist)
                informer.start()
                informers.append(informer)
        if controller.routes is not None:
            await asyncio.to_thread(controller.routes.prime)
            # The table follows the LLMDeployments that exist now: one deleted while the
            # operator was down sends no event (kopf lists only what exists), so without
            # this list its route stayed until some other change wrote the table.
            for namespace in namespaces or [None]:  # type: ignore[list-item]
                for body in await asyncio.to_thread(list_all, controller, namespace):
                    controller.remember_owner(body)
            controller.routes.schedule()
        trimmer.touch()  # the start-up lists were a burst
        background.add(asyncio.create_task(trimmer.run()))
        log.info("cache primed with %d owners' children", len(controller.children))

    @kopf.on.event(GROUP, VERSION, PLURAL, id="llmdeployment", registry=registry)
    async def llmdeployment_event(event: kopf.RawEvent, **_: Any) -> None:
        trimmer.touch()
        body = dict(event["object"])
        deleted = event["type"] == "DELETED"
        owner_key = controller.remember_owner(body, deleted=deleted)
        if not deleted:
            schedule(owner_key)

    @kopf.on.cleanup(registry=registry)
    async def stop_watches(**_: Any) -> None:
        for informer in informers:
            informer.stop()
        for task in background:
            task.cancel()
