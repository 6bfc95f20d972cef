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
from llm_operator.render.routes import ROUTES_KEY, render_routes, render_routes_configmap

log = logging.getLogger("llm_operator.routes")
RETRY_SECONDS = 5.0


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

    def prime(self) -> None:
        """Read what the gateway has now, so a restart writes nothing when nothing changed."""
        live = self.client.get_configmap(self.namespace, self.name)
        self.applied = None if live is None else (live.get("data") or {}).get(ROUTES_KEY)

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

    async def write(self) -> None:
        async with self.lock:  # one write at a time, always of the newest state
            table, problems = render_routes(self.current_llmdeployments())
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
