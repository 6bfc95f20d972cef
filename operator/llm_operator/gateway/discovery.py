"""Pod discovery for tracks that name a pod selector (in-cluster only).

Backends come from Pods and their Ready condition, not from EndpointSlices, as KubeAI's proxy
and the Gateway API inference extension's endpoint picker do: EndpointSlices refuse some
addresses a pod can have (loopback, for one), and the Pods are what the kubelet's readiness
is written on anyway. One list-then-watch loop per (namespace, selector), with plain aiohttp
against the API server using the pod's service-account token: the `kubernetes` client's sync
watch would need a thread, and kopf is the operator's, not the gateway's. Off the hot path: a
change rebuilds the routing table (the same swap a file reload does) and requests keep
flowing on the old one meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger("llm_operator.gateway")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_SECONDS = 300


class Cluster:
    """How to reach the API server from inside a pod."""

    def __init__(self, base_url: str, token_path: Path, ca_path: Path | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_path = token_path
        self.ca_path = ca_path

    @classmethod
    def in_cluster(cls) -> Cluster | None:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (SA_DIR / "token").exists():
            return None
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", SA_DIR / "token", SA_DIR / "ca.crt")

    def headers(self) -> dict[str, str]:
        # Bound tokens rotate: read the file on every (re)connect.
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def ssl_context(self) -> ssl.SSLContext | bool:
        if self.ca_path is None:
            return True
        return ssl.create_default_context(cafile=str(self.ca_path))


def pod_backends(pods: Iterable[dict[str, Any]], port: int | str) -> list[tuple[str, int]]:
    """(pod IP, port) of every pod that may take requests, from Pod objects (pure).

    A pod counts while it has a pod IP, is Running with the condition Ready=True, and has no
    deletionTimestamp (a terminating pod is draining: it may still be Ready for a moment).
    A numeric `port` is used as is; a named one is the TCP container port of that name in
    spec.containers[].ports[], and a pod that has none is left out.
    """
    out: set[tuple[str, int]] = set()
    for pod in pods:
        status = pod.get("status") or {}
        ip = status.get("podIP")
        if not ip or status.get("phase") != "Running":
            continue
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        conditions = status.get("conditions") or []
        if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            continue
        number = port if isinstance(port, int) else _named_port(pod, port)
        if number is not None:
            out.add((ip, number))
    return sorted(out)


def _named_port(pod: dict[str, Any], name: str) -> int | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == name and p.get("protocol", "TCP") == "TCP":
                number = p.get("containerPort")
                return number if isinstance(number, int) else None
    return None


def _slim(pod: dict[str, Any]) -> dict[str, Any]:
    """Only what `pod_backends` reads. A whole Pod is kilobytes of spec the gateway never
    looks at, kept per pod for as long as it lives; and comparing slim pods lets an update
    that changes nothing routing reads (an annotation, a restart count) skip the rebuild."""
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return {
        "metadata": {
            k: metadata[k] for k in ("name", "deletionTimestamp") if metadata.get(k) is not None
        },
        "status": {
            "podIP": status.get("podIP"),
            "phase": status.get("phase"),
            "conditions": [
                {"type": c.get("type"), "status": c.get("status")}
                for c in status.get("conditions") or []
                if c.get("type") == "Ready"
            ],
        },
        "spec": {
            "containers": [
                {"ports": c.get("ports") or []}
                for c in (pod.get("spec") or {}).get("containers") or []
            ]
        },
    }


class Relist(Exception):
    """The watch cannot go on from its resourceVersion (410 Gone, or an ERROR event)."""


class PodWatcher:
    """Keeps the Pods of every (namespace, label selector) the table names."""

    def __init__(self, cluster: Cluster, on_change: Callable[[], None]) -> None:
        self.cluster = cluster
        self.on_change = on_change
        self.pods: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        """Per (namespace, selector): slim pods by name."""
        self.tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.synced: set[tuple[str, str]] = set()
        """Selectors whose first list has finished (their pods are known)."""
        self._session: aiohttp.ClientSession | None = None

    def resolve(self, namespace: str, selector: str, port: int | str) -> list[tuple[str, int]]:
        return pod_backends(self.pods.get((namespace, selector), {}).values(), port)

    def ready(self) -> bool:
        """Every watched selector has finished its first list (readiness)."""
        return all(key in self.synced for key in self.tasks)

    def want(self, selectors: set[tuple[str, str]]) -> None:
        """Watch exactly these (namespace, label selector) pairs."""
        for key in list(self.tasks):
            if key not in selectors:
                self.tasks.pop(key).cancel()
                self.pods.pop(key, None)
                self.synced.discard(key)
        for key in selectors:
            if key not in self.tasks:
                self.tasks[key] = asyncio.get_running_loop().create_task(self._run(*key))

    async def close(self) -> None:
        for t in self.tasks.values():
            t.cancel()
        self.tasks.clear()
        self.synced.clear()
        if self._session is not None:
            await self._session.close()

    async def _session_(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.cluster.ssl_context()),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        return self._session

    async def _list(self, url: str, namespace: str, selector: str) -> str:
        session = await self._session_()
        async with session.get(
            url, params={"labelSelector": selector}, headers=self.cluster.headers()
        ) as resp:
            if resp.status in (401, 403, 404):
                # Waiting will not make these pods readable (a namespace outside the RBAC, a
                # table from an earlier install): route nothing there, and do not hold the
                # gateway's readiness, and with it every other model, hostage. Retried.
                self.pods.setdefault((namespace, selector), {})
                self.synced.add((namespace, selector))
                self.on_change()
            resp.raise_for_status()
            listing = await resp.json()
        self.pods[(namespace, selector)] = {
            p["metadata"]["name"]: _slim(p) for p in listing.get("items") or []
        }
        self.synced.add((namespace, selector))
        self.on_change()
        return str(listing.get("metadata", {}).get("resourceVersion", ""))

    async def _watch(self, url: str, namespace: str, selector: str, version: str) -> str:
        """Follow changes from `version` until the server ends the watch; returns the last
        resourceVersion seen (events and bookmarks), to go on from."""
        session = await self._session_()
        params = {
            "labelSelector": selector,
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        # A connection that died without a FIN would otherwise hang here forever.
        timeout = aiohttp.ClientTimeout(total=WATCH_SECONDS + 30, sock_connect=10)
        pods = self.pods[(namespace, selector)]
        async with session.get(
            url, params=params, headers=self.cluster.headers(), timeout=timeout
        ) as resp:
            if resp.status == 410:
                raise Relist("410 Gone")
            resp.raise_for_status()
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # usually 410 Gone: the version is too old
                    raise Relist(str(obj.get("message") or obj))
                version = obj.get("metadata", {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                name = obj.get("metadata", {}).get("name", "")
                if kind == "DELETED":
                    changed = pods.pop(name, None) is not None
                else:
                    slim = _slim(obj)
                    changed = pods.get(name) != slim
                    pods[name] = slim
                if changed:
                    self.on_change()
        return version

    async def _run(self, namespace: str, selector: str) -> None:
        url = f"{self.cluster.base_url}/api/v1/namespaces/{namespace}/pods"
        backoff = 1.0
        version = ""
        while True:
            try:
                if not version:
                    version = await self._list(url, namespace, selector)
                version = await self._watch(url, namespace, selector, version)
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Relist as e:
                log.info("pod watch %s %s: %s; listing again", namespace, selector, e)
                version = ""
            except Exception as e:  # keep the last pods; retry with backoff
                log.warning("pod watch %s %s failed: %s", namespace, selector, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
