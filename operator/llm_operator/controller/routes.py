"""Keeps the gateway's routing table (a ConfigMap the gateway mounts) in step with every
LLMDeployment the operator sees. One table for the installation, written only when its
content changes, a moment after the last change so a burst of edits costs one write."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from llm_operator.api import LLMDeployment
from llm_operator.controller import metrics
from llm_operator.kube.client import KubeClient
from llm_operator.kube.transport import ApiError
from llm_operator.render.routes import (
    KEYS_SECRET_SUFFIX,
    ROUTES_KEY,
    api_key_file,
    key_references,
    render_keys_secret,
    render_routes,
    render_routes_configmap,
)

log = logging.getLogger("llm_operator.routes")
RETRY_SECONDS = 5.0
#: How often the fallback keys LLMDeployments reference are read again while any are: a
#: rotated key reaches the keys Secret within this, and the gateway's mounted file a kubelet
#: sync later. GETs of the named Secrets only; no watch, so no Secret list rights.
KEY_REFRESH_SECONDS = 20.0


@dataclass
class RoutesWriter:
    client: KubeClient
    namespace: str
    name: str
    delay: float = 0.5
    bodies: dict[Any, dict[str, Any]] = field(default_factory=dict)
    """The controller's live map of LLMDeployment bodies (read at write time, not copied)."""
    applied: str | None = None
    reported: set[str] = field(default_factory=set)
    last_valid: dict[Any, LLMDeployment] = field(default_factory=dict)
    pending: asyncio.TimerHandle | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: set[asyncio.Future[None]] = field(default_factory=set)
    keys_applied: dict[str, str] | None = None
    """The keys Secret's data as last written (None: not known yet)."""

    @property
    def keys_secret(self) -> str:
        return self.name + KEYS_SECRET_SUFFIX

    def prime(self) -> None:
        """Read what the gateway has now, so a restart writes nothing when nothing changed."""
        live = self.client.get_configmap(self.namespace, self.name)
        self.applied = None if live is None else (live.get("data") or {}).get(ROUTES_KEY)
        keys = self.client.get_secret(self.namespace, self.keys_secret)
        self.keys_applied = None if keys is None else dict(keys.get("data") or {})

    def schedule(self, delay: float | None = None) -> None:
        if self.pending is not None:
            self.pending.cancel()
        loop = asyncio.get_running_loop()
        self.pending = loop.call_later(self.delay if delay is None else delay, self._spawn)

    def _spawn(self) -> None:
        self.pending = None
        task = asyncio.ensure_future(self.write())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def current_llmdeployments(self) -> list[LLMDeployment]:
        """Every LLMDeployment as last valid: a bad edit keeps the model routed while its
        pods keep running (the operator leaves them alone too)."""
        llmds = []
        for owner_key, body in self.bodies.items():
            with contextlib.suppress(ValidationError):  # its own status says why
                self.last_valid[owner_key] = LLMDeployment.model_validate(body)
            if owner_key in self.last_valid:
                llmds.append(self.last_valid[owner_key])
        for gone in set(self.last_valid) - set(self.bodies):
            del self.last_valid[gone]
        return llmds

    def read_keys(self, refs: set[tuple[str, str, str]]) -> tuple[dict[str, str], list[str]]:
        """The referenced keys (base64, as the API holds them), and what could not be read.
        Never logs a key."""
        data: dict[str, str] = {}
        problems: list[str] = []
        for namespace, secret_name in sorted({(ns, name) for ns, name, _ in refs}):
            try:
                secret = self.client.get_secret(namespace, secret_name)
            except ApiError as error:
                problems.append(
                    f"fallback key Secret {namespace}/{secret_name}: API {error.status} "
                    "(the operator needs `get` on Secrets in this namespace)"
                )
                continue
            for ns, name, key in sorted(refs):
                if (ns, name) != (namespace, secret_name):
                    continue
                value = ((secret or {}).get("data") or {}).get(key)
                if value is None:
                    where = "not found" if secret is None else f"has no key {key!r}"
                    problems.append(f"fallback key Secret {namespace}/{secret_name} {where}")
                    continue
                data[api_key_file(ns, name, key)] = value
        return data, problems

    async def write_keys(self, llmds: list[LLMDeployment]) -> list[str]:
        refs = key_references(llmds)
        if not refs and not self.keys_applied:
            return []
        data, problems = await asyncio.to_thread(self.read_keys, refs)
        if data != self.keys_applied:
            secret = render_keys_secret(data, self.namespace, self.keys_secret)
            await asyncio.to_thread(self.client.apply, secret)
            metrics.WRITES.labels(verb="apply", kind="Secret/keys").inc()
            self.keys_applied = data
            log.info("fallback keys: %d keys for the gateway", len(data))
        if refs:
            self.refresh_later()
        return problems

    def refresh_later(self) -> None:
        """Look at the referenced Secrets again (rotation), unless a write comes sooner."""
        if self.pending is None:
            self.schedule(KEY_REFRESH_SECONDS)

    async def write(self) -> None:
        async with self.lock:  # one write at a time, always of the newest state
            llmds = self.current_llmdeployments()
            table, problems = render_routes(llmds)
            try:
                problems += await self.write_keys(llmds)
            except Exception as error:  # the table must still follow; keys retry later
                log.warning("could not write the fallback keys, will retry: %s", error)
                self.schedule(RETRY_SECONDS)
            for problem in set(problems) - self.reported:
                log.warning("routing table: %s", problem)
            self.reported = set(problems)
            configmap = render_routes_configmap(table, self.namespace, self.name)
            text = configmap["data"][ROUTES_KEY]
            if text == self.applied:
                return
            try:
                await asyncio.to_thread(self.client.apply, configmap)
            except Exception as error:  # whatever failed, the table must follow: retry
                log.warning("could not write the routing table, will retry: %s", error)
                self.schedule(RETRY_SECONDS)
                return
            metrics.WRITES.labels(verb="apply", kind="ConfigMap/routes").inc()
            self.applied = text
            log.info("routing table: %d models", len(table.models))
