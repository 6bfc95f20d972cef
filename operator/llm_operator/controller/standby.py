"""Which watched namespaces this replica acts in, for the loops beside kopf's handlers.

Standalone (no --peering): all of them. With peering, kopf's own rule (llm_operator.peering)
on the peering object kopf uses; a namespace whose peering object cannot be read is skipped for
this round (two replicas restarting the same pods is worse than a round missed), and a missing
one counts as standalone, as kopf falls back to standalone then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llm_operator.kube.client import KubeClient
from llm_operator.kube.transport import ApiError
from llm_operator.peering import outranked, peering_path

log = logging.getLogger(__name__)


@dataclass
class Standby:
    client: KubeClient | None
    peering_name: str | None = None
    identity: str = ""
    priority: int = 0
    clusterwide: bool = True
    epoch: Callable[[], float] = time.time
    _paused: set[str | None] = field(default_factory=set)

    def active(self, namespaces: Iterable[str]) -> set[str]:
        """The namespaces, of these, where this replica is the active peer (blocking: reads
        the peering objects, one per round when cluster-wide)."""
        wanted = set(namespaces)
        if not self.peering_name or self.client is None:
            return wanted
        if self.clusterwide:
            return wanted if self._leads(None) else set()
        return {namespace for namespace in wanted if self._leads(namespace)}

    def _leads(self, namespace: str | None) -> bool:
        assert self.client is not None and self.peering_name is not None
        try:
            peering = self.client.get_path(peering_path(self.peering_name, namespace))
        except ApiError as error:
            log.info("peering %s unreadable (API %s): this round skipped", namespace, error.status)
            return False
        if peering is None:
            return True
        paused = outranked(peering.get("status"), self.identity, self.priority, self.epoch())
        if paused != (namespace in self._paused):  # say it once per change, not every round
            state = "paused: another replica is" if paused else "resumed: this replica is"
            log.info("day-2 loop %s the active peer in %s", state, namespace or "the cluster")
            (self._paused.add if paused else self._paused.discard)(namespace)
        return not paused
