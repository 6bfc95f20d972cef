"""Scale from zero: requests for a model with no ready backend wait here for one.

Per model a FIFO queue of held requests, bounded by the model's `hold.maxQueue`; each
request waits at most `hold.timeout`. Every table swap (a file reload, or the Pod watch
seeing a pod turn Ready) calls `on_table`: the held requests of each model that now has a
backend are released in arrival order and go on with the new table's state of their model.
A request whose client disconnects is taken out of the queue and never sent.

Each held request is one future and one timer; both are gone when it leaves the queue
(released, expired, client gone), and an empty queue is removed, so nothing piles up for
models that come and go.

The `llm_gateway_requests_held{model}` gauge, which the KEDA trigger adds to the engines'
queue, is the queue's length plus, for a model that sends cold requests down its fallback
chain (`fallbackWhileCold`), the ones the fallback is answering, and at least 1 for
`hold.timeout` after the last of them while the model is still cold: a short answer from the
fallback between two scrapes must still wake the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from enum import StrEnum

from llm_operator.gateway.connection import ClientConnection
from llm_operator.gateway.metrics import Histogram, Metrics
from llm_operator.gateway.request import Call
from llm_operator.gateway.routing import ModelState, RoutingTable


class Held(StrEnum):
    """How a request that found its model cold went on (the `result` label)."""

    RELEASED = "released"
    """A backend turned ready: sent to it."""
    EXPIRED = "expired"
    """No backend within `hold.timeout` (or the gateway is draining)."""
    FULL = "full"
    """The queue was full on arrival: never held."""
    CLIENT_CLOSED = "client_closed"
    """The client disconnected while held: never sent."""
    FALLBACK = "fallback"
    """`fallbackWhileCold`: down the fallback chain at once."""
    REMOVED = "removed"
    """The model left the routing table while the request was held."""


def _settle(fut: asyncio.Future[Held], result: Held) -> None:
    if not fut.done():
        fut.set_result(result)


class HoldQueues:
    """The hold queues of every model; one per gateway, outliving table swaps."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics) -> None:
        self.loop = loop
        self.metrics = metrics
        self.queues: dict[str, deque[asyncio.Future[Held]]] = {}
        """Model name -> its held requests, oldest first; no entry when empty."""
        self.timers: dict[asyncio.Future[Held], asyncio.TimerHandle] = {}
        self.fallback_in_flight: dict[str, int] = {}
        self.demand_until: dict[str, float] = {}
        """Model name -> until when a cold request answered by the fallback keeps the gauge
        at 1 or more."""
        self.table: RoutingTable | None = None

    def held(self) -> list[tuple[str, int]]:
        """(model, requests_held) for every model of the table in use (0 when none). Held
        means waiting at the gateway for capacity: for a cold model's first ready backend,
        and for a free slot when every backend is at maxConcurrency (the saturation queue).
        Both are demand the engines' own queue never sees, so the autoscaler adds this."""
        if self.table is None:
            return []
        now = time.monotonic()
        return [(name, self._held(name, m, now)) for name, m in self.table.models.items()]

    def _held(self, name: str, model: ModelState, now: float) -> int:
        n = len(self.queues.get(name, ()))
        f = self.fallback_in_flight.get(name, 0)
        until = self.demand_until.get(name)
        if until is not None:
            if model.cold and now < until:
                f = max(f, 1)
            elif not f:
                del self.demand_until[name]
        return n + f + model.waiting

    async def wait(self, conn: ClientConnection, call: Call) -> Held:
        """Hold `call` (whose model is cold) until a backend of its model is ready, the wait
        expires, or the client leaves; on release `call.model` is the model's new state."""
        model = call.model
        hold = model.route.hold
        if hold.fallback_while_cold and model.fallbacks:
            return Held.FALLBACK
        queue = self.queues.get(model.name)
        if hold.max_queue == 0 or (queue is not None and len(queue) >= hold.max_queue):
            call.note = (
                f"the model {model.name!r} has no ready backend and its hold queue is full "
                f"({hold.max_queue} requests are waiting for it to start)"
                if hold.max_queue
                else f"the model {model.name!r} has no ready backend (it holds no requests)"
            )
            return Held.FULL
        if queue is None:
            queue = self.queues[model.name] = deque()
        fut: asyncio.Future[Held] = self.loop.create_future()
        self.timers[fut] = self.loop.call_later(hold.timeout, _settle, fut, Held.EXPIRED)
        queue.append(fut)
        conn.on_lost = lambda: _settle(fut, Held.CLIENT_CLOSED)
        since = time.monotonic()
        result = Held.CLIENT_CLOSED
        try:
            result = await fut
        finally:
            self._forget(model.name, fut, conn)
            h = self.metrics.hold_seconds.get(model.name)
            if h is None:
                h = self.metrics.hold_seconds[model.name] = Histogram()
            h.observe(time.monotonic() - since)
        if result == Held.RELEASED and self.table is not None:
            call.model = self.table.models.get(model.name, model)
        elif result == Held.EXPIRED:
            call.note = (
                f"the model {model.name!r} has no ready backend: none became ready within "
                f"{hold.timeout:g} s"
            )
        return result

    def _forget(self, name: str, fut: asyncio.Future[Held], conn: ClientConnection) -> None:
        timer = self.timers.pop(fut, None)
        if timer is not None:
            timer.cancel()
        conn.on_lost = None
        if not fut.done():
            fut.cancel()  # the waiting task itself was cancelled
        queue = self.queues.get(name)
        if queue is None:
            return
        with contextlib.suppress(ValueError):  # released: `on_table` took it out
            queue.remove(fut)
        if not queue:
            del self.queues[name]

    def on_table(self, table: RoutingTable) -> None:
        """A new table is in use: release, oldest first, whatever can now be answered."""
        self.table = table
        for name in list(self.queues):
            model = table.models.get(name)
            if model is not None and model.cold:
                continue
            result = Held.REMOVED if model is None else Held.RELEASED
            for fut in self.queues.pop(name):
                _settle(fut, result)
        for name in list(self.demand_until):
            model = table.models.get(name)
            if model is None or not model.cold:
                del self.demand_until[name]

    def expire_all(self) -> None:
        """Draining: nothing held will be answered by this gateway; say so at once."""
        for name in list(self.queues):
            for fut in self.queues[name]:
                _settle(fut, Held.EXPIRED)

    def begin_fallback(self, model: ModelState) -> None:
        name = model.name
        self.fallback_in_flight[name] = self.fallback_in_flight.get(name, 0) + 1
        self.demand_until[name] = time.monotonic() + model.route.hold.timeout

    def end_fallback(self, model: ModelState) -> None:
        name = model.name
        n = self.fallback_in_flight.get(name, 0) - 1
        if n > 0:
            self.fallback_in_flight[name] = n
        else:
            self.fallback_in_flight.pop(name, None)
