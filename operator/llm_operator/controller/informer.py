"""A list+watch of one kind with a server-side label selector (issue 18).

kopf watches a resource type whole and filters labels in the operator, so every unrelated
Deployment, Service and ConfigMap in scope was parsed and queued. The API server filters
these watches: an object that is not ours is never sent. An object that loses the label
arrives as DELETED (it left the selection), one that gains it as ADDED.

One thread per (namespace, kind), with its own connection: a watch holds its connection for
minutes and must not take one of the reconcilers'. Events are handed to the event loop by
`deliver`; the cache is only ever changed there.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import urllib3

from llm_operator.kube.resources import Kind
from llm_operator.kube.transport import ApiError, Connection, compact, error_of

log = logging.getLogger("llm_operator.controller.informer")

#: Seconds between attempts after a failure, the last one repeated.
BACKOFF_SECONDS = (1.0, 2.0, 5.0)  # 5 s at most: back soon after an outage, still no storm
#: How long the API server keeps one watch open; a new one resumes from the last version.
WATCH_SECONDS = 300
LIST_PAGE_SIZE = 250

Deliver = Callable[[str, dict[str, Any]], None]


class Gone(Exception):
    """410: the resourceVersion to resume from is older than the API server keeps."""


class Transport(Protocol):
    def list_page(
        self, kind: Kind, namespace: str | None, selector: str, token: str | None
    ) -> tuple[list[dict[str, Any]], str | None, str]:
        """Items, the continue token (None at the end), the list's resourceVersion."""

    def watch(
        self, kind: Kind, namespace: str | None, selector: str, resource_version: str
    ) -> Iterator[dict[str, Any]]:
        """Raw watch events from resource_version until the server ends the watch."""


class ApiTransport:
    """Raw JSON over the operator's own transport (kube/transport.py): no model classes,
    so an event costs one json.loads and nothing else."""

    def __init__(self, api: Connection) -> None:
        self.api = api

    def _get(
        self, path: str, query: list[tuple[str, str]], read_timeout: float
    ) -> urllib3.BaseHTTPResponse:
        response = self.api.request(
            "GET", path, query=query, timeout=(10, read_timeout), stream=True
        )
        if 200 <= response.status < 300:
            return response
        try:
            if response.status == 410:
                raise Gone()
            raise error_of(response, response.read())
        finally:
            response.release_conn()

    def list_page(
        self, kind: Kind, namespace: str | None, selector: str, token: str | None
    ) -> tuple[list[dict[str, Any]], str | None, str]:
        query = [("labelSelector", selector), ("limit", str(LIST_PAGE_SIZE))]
        if token:
            query.append(("continue", token))
        response = self._get(kind.collection_path(namespace), query, 60)
        try:
            result = json.loads(response.read())
        finally:
            response.release_conn()
        metadata = result.get("metadata") or {}
        items: list[dict[str, Any]] = result.get("items") or []
        for item in items:  # list items carry neither
            item.setdefault("kind", kind.kind)
            item.setdefault("apiVersion", kind.api_version)
        return items, metadata.get("continue") or None, str(metadata.get("resourceVersion", ""))

    def watch(
        self, kind: Kind, namespace: str | None, selector: str, resource_version: str
    ) -> Iterator[dict[str, Any]]:
        query = [
            ("labelSelector", selector),
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(WATCH_SECONDS)),
        ]
        response = self._get(kind.collection_path(namespace), query, WATCH_SECONDS + 30)
        # One line is one event; the connection is released when the stream ends or stops.
        for line in self.api.lines(response):
            if line.strip():
                yield json.loads(line)


def _tombstone(obj: dict[str, Any]) -> dict[str, Any]:
    """What a DELETED event needs after a relist missed the deletion: kind, name, namespace
    and whatever names the owner."""
    metadata = obj.get("metadata") or {}
    return {
        "kind": obj.get("kind"),
        "apiVersion": obj.get("apiVersion"),
        "metadata": {
            k: metadata[k]
            for k in ("name", "namespace", "labels", "ownerReferences", "resourceVersion")
            if k in metadata
        },
    }


class Informer:
    """The objects of one kind matching a label selector, kept in step with the API server
    by list, then watch from the list's resourceVersion; relist on 410 Gone."""

    def __init__(
        self,
        transport: Transport,
        kind: Kind,
        namespace: str | None,
        selector: str,
        deliver: Deliver,
        *,
        backoffs: tuple[float, ...] = BACKOFF_SECONDS,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        self.transport = transport
        self.kind = kind
        self.namespace = namespace
        self.selector = selector
        self.deliver = deliver
        self.backoffs = backoffs
        self.stopped = threading.Event()
        # Waits end early on stop; returns True when stopped.
        self.sleep = sleep or self.stopped.wait
        self.known: dict[tuple[str, str], dict[str, Any]] = {}
        """Tombstones of what the last list and the watch since have delivered, by
        (namespace, name): a relist delivers deletions it missed, and skips what it has."""
        self.resource_version: str | None = None
        self.missing = False
        """The kind is not served (an optional CRD not installed)."""

    # -- list -------------------------------------------------------------------------------

    def relist(self) -> None:
        """List everything matching (a page at a time); deliver what is new or changed and,
        as DELETED, what has gone since. Raises what the API server answered."""
        token: str | None = None
        seen: set[tuple[str, str]] = set()
        version = ""
        try:
            while True:
                page, token, version = self.transport.list_page(
                    self.kind, self.namespace, self.selector, token
                )
                for obj in page:
                    obj = compact(obj)
                    at = _at(obj)
                    seen.add(at)
                    known = self.known.get(at)
                    if known is not None and _version(known) == _version(obj):
                        continue  # unchanged since it was delivered
                    self.known[at] = _tombstone(obj)
                    self.deliver("ADDED" if known is None else "MODIFIED", obj)
                if not token:
                    break
        except ApiError as error:
            if error.status != 404:
                raise
            # An optional CRD (KEDA) that is not installed: nothing to watch, look again later.
            self.missing = True
            seen, version = set(), ""
        else:
            self.missing = False
        for at in [at for at in self.known if at not in seen]:
            self.deliver("DELETED", self.known.pop(at))
        self.resource_version = version or None

    # -- watch ------------------------------------------------------------------------------

    def watch_once(self) -> None:
        """One watch from the last resourceVersion until the server ends it; on 410 the
        version is dropped, so the next round relists."""
        assert self.resource_version is not None
        try:
            for event in self.transport.watch(
                self.kind, self.namespace, self.selector, self.resource_version
            ):
                if self.stopped.is_set():
                    return
                self.handle(event)
                if self.resource_version is None:
                    return
        except Gone:
            self.resource_version = None

    def handle(self, event: dict[str, Any]) -> None:
        type_ = event.get("type")
        obj = event.get("object") or {}
        if type_ == "ERROR":
            if obj.get("code") == 410:
                self.resource_version = None  # relist
                return
            raise RuntimeError(f"watch of {self.kind.plural}: {obj.get('message')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if type_ == "BOOKMARK":
            if version:
                self.resource_version = str(version)
            return
        if type_ not in ("ADDED", "MODIFIED", "DELETED"):
            return
        obj.setdefault("kind", self.kind.kind)
        obj.setdefault("apiVersion", self.kind.api_version)
        at = _at(obj)
        if version:
            self.resource_version = str(version)
        if type_ == "DELETED":
            # The last copy we delivered names the owner even when the labels and owner
            # references that did were just removed (the object left the selection).
            self.deliver("DELETED", self.known.pop(at, obj))
            return
        obj = compact(obj)  # in this thread: the event loop only stores it
        self.known[at] = _tombstone(obj)
        self.deliver(str(type_), obj)

    # -- the thread -------------------------------------------------------------------------

    def run(self) -> None:
        """Watch until stopped; list again when there is no version to resume from. Failures
        wait a bounded backoff, reset by a watch that worked."""
        failures = 0
        while not self.stopped.is_set():
            try:
                if self.resource_version is None:
                    self.relist()
                    if self.missing:
                        if self.sleep(self.backoffs[-1]):
                            return
                        continue
                started = time.monotonic()
                self.watch_once()
                # A watch the server ended on time counts as working; one that breaks at
                # once again and again (a proxy cutting it) still backs off.
                if time.monotonic() - started > 1:
                    failures = 0
                    continue
                failures += 1
            except Exception as error:  # any failure: wait, then go on
                failures += 1
                log.warning(
                    "watch of %s in %s failed (%s); again in %.0fs",
                    self.kind.plural,
                    self.namespace or "all namespaces",
                    error,
                    self.backoffs[min(failures - 1, len(self.backoffs) - 1)],
                )
            if failures and self.sleep(self.backoffs[min(failures - 1, len(self.backoffs) - 1)]):
                return

    def start(self) -> threading.Thread:
        thread = threading.Thread(
            target=self.run, name=f"watch-{self.kind.plural}-{self.namespace or 'all'}", daemon=True
        )
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopped.set()


def _at(obj: dict[str, Any]) -> tuple[str, str]:
    metadata = obj.get("metadata") or {}
    return (str(metadata.get("namespace", "")), str(metadata.get("name", "")))


def _version(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))
