"""EndpointSlice discovery for tracks that name a Service (in-cluster only).

One list-then-watch loop per Service, with plain aiohttp against the API server using the
pod's service-account token: the `kubernetes` client's sync watch would need a thread, and
kopf is the operator's, not the gateway's. Off the hot path: a change rebuilds the routing
table (the same swap a file reload does) and requests keep flowing on the old one meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger("llm_operator.gateway")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


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


def ready_endpoints(slices: dict[str, dict[str, Any]], port: int | str) -> list[tuple[str, int]]:
    """Ready addresses with the wanted port, from EndpointSlice objects (pure)."""
    out: list[tuple[str, int]] = []
    for s in slices.values():
        number: int | None = None
        for p in s.get("ports") or []:
            if isinstance(port, int) and p.get("port") == port:
                number = port
            elif isinstance(port, str) and p.get("name") == port:
                number = p.get("port")
        if number is None and isinstance(port, int) and not s.get("ports"):
            number = port
        if number is None:
            continue
        for ep in s.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            # ready unset means ready (the API's documented default); terminating ones go.
            if cond.get("ready") is False or cond.get("terminating") is True:
                continue
            for addr in ep.get("addresses") or []:
                out.append((addr, number))
    return sorted(set(out))


class EndpointSliceWatcher:
    """Keeps the ready EndpointSlices of the Services the table names."""

    def __init__(self, cluster: Cluster, on_change: Callable[[], None]) -> None:
        self.cluster = cluster
        self.on_change = on_change
        self.slices: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self.tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.synced: set[tuple[str, str]] = set()
        """Services whose first list has finished (their endpoints are known)."""
        self._session: aiohttp.ClientSession | None = None

    def resolve(self, namespace: str, name: str, port: int | str) -> list[tuple[str, int]]:
        return ready_endpoints(self.slices.get((namespace, name), {}), port)

    def ready(self) -> bool:
        """Every watched Service has finished its first list (readiness)."""
        return all(key in self.synced for key in self.tasks)

    def want(self, services: set[tuple[str, str]]) -> None:
        """Watch exactly these services."""
        for key in list(self.tasks):
            if key not in services:
                self.tasks.pop(key).cancel()
                self.slices.pop(key, None)
                self.synced.discard(key)
        for key in services:
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

    async def _run(self, namespace: str, name: str) -> None:
        url = (
            f"{self.cluster.base_url}/apis/discovery.k8s.io/v1/namespaces/{namespace}"
            f"/endpointslices"
        )
        selector = f"kubernetes.io/service-name={name}"
        backoff = 1.0
        while True:
            try:
                session = await self._session_()
                async with session.get(
                    url, params={"labelSelector": selector}, headers=self.cluster.headers()
                ) as resp:
                    resp.raise_for_status()
                    listing = await resp.json()
                slices = {i["metadata"]["name"]: i for i in listing.get("items") or []}
                self.slices[(namespace, name)] = slices
                self.synced.add((namespace, name))
                self.on_change()
                version = listing.get("metadata", {}).get("resourceVersion", "")
                params = {
                    "labelSelector": selector,
                    "watch": "1",
                    "resourceVersion": version,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": "300",
                }
                async with session.get(url, params=params, headers=self.cluster.headers()) as resp:
                    resp.raise_for_status()
                    backoff = 1.0
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            break  # usually 410 Gone: list again
                        if kind == "BOOKMARK":
                            continue
                        slice_name = obj.get("metadata", {}).get("name", "")
                        if kind == "DELETED":
                            slices.pop(slice_name, None)
                        else:
                            slices[slice_name] = obj
                        self.on_change()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep the last endpoints; retry with backoff
                log.warning("EndpointSlice watch %s/%s failed: %s", namespace, name, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
