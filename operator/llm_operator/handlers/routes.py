"""Keeps the gateway's routing table (a ConfigMap the gateway mounts) in step with every
LLMDeployment the operator sees. One table for the installation, written only when its
content changes, a moment after the last change so a burst of edits costs one write."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from llm_operator.api import LLMDeployment
from llm_operator.handlers import metrics
from llm_operator.kube.client import KubeClient
from llm_operator.render.routes import ROUTES_KEY, render_routes, render_routes_configmap

log = logging.getLogger("llm_operator.routes")


@dataclass
class RoutesWriter:
    client: KubeClient
    namespace: str
    name: str
    delay: float = 0.5
    applied: str | None = None
    reported: set[str] = field(default_factory=set)
    pending: asyncio.TimerHandle | None = None

    def prime(self) -> None:
        """Read what the gateway has now, so a restart writes nothing when nothing changed."""
        live = self.client.get_configmap(self.namespace, self.name)
        self.applied = None if live is None else (live.get("data") or {}).get(ROUTES_KEY)

    def schedule(self, bodies: dict[Any, dict[str, Any]]) -> None:
        if self.pending is not None:
            self.pending.cancel()
        loop = asyncio.get_running_loop()
        self.pending = loop.call_later(
            self.delay, lambda: asyncio.ensure_future(self.write(dict(bodies)))
        )

    async def write(self, bodies: dict[Any, dict[str, Any]]) -> None:
        llmds = []
        for body in bodies.values():
            try:
                llmds.append(LLMDeployment.model_validate(body))
            except ValidationError:
                continue  # its own status says why; the gateway keeps the other models
        table, problems = render_routes(llmds)
        for problem in set(problems) - self.reported:
            log.warning("routing table: %s", problem)
        self.reported = set(problems)
        configmap = render_routes_configmap(table, self.namespace, self.name)
        text = configmap["data"][ROUTES_KEY]
        if text == self.applied:
            return
        try:
            await asyncio.to_thread(self.client.apply, configmap)
        except (ApiException, OSError) as error:
            log.warning("could not write the routing table, will retry: %s", error)
            self.schedule(bodies)
            return
        metrics.WRITES.labels(verb="apply", kind="ConfigMap/routes").inc()
        self.applied = text
        log.info("routing table: %d models", len(table.models))
