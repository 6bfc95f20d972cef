"""A semaphore that serves its waiters by priority, then in the order they came."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PrioritySlots:
    """`n` slots; a waiter with a lower priority number goes first, equals go first come
    first served. In a burst, an LLMDeployment that is new or whose spec changed gets the
    next free worker thread before ones that only need their status looked at again."""

    def __init__(self, n: int) -> None:
        self.free = n
        self.waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self.arrivals = itertools.count()

    @asynccontextmanager
    async def held(self, priority: int) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, priority: int) -> None:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, (priority, next(self.arrivals), turn))
        try:
            await turn  # release() hands its slot over: `free` is not given back between
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed a slot just as it was cancelled: pass it on
            else:
                self.waiting = [w for w in self.waiting if w[2] is not turn]
                heapq.heapify(self.waiting)
            raise

    def release(self) -> None:
        while self.waiting:
            _, _, turn = heapq.heappop(self.waiting)
            if not turn.done():
                turn.set_result(None)
                return
        self.free += 1
