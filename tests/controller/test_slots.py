"""PrioritySlots: waiters by priority, then by arrival; a cancelled waiter loses no slot."""

from __future__ import annotations

import asyncio

from llm_operator.controller.slots import PrioritySlots


async def test_waiters_go_by_priority_then_by_arrival() -> None:
    slots = PrioritySlots(1)
    order: list[str] = []

    async def work(name: str, priority: int) -> None:
        async with slots.held(priority):
            order.append(name)
            await asyncio.sleep(0.01)

    first = asyncio.create_task(work("running", 1))
    await asyncio.sleep(0)
    waiters = [
        asyncio.create_task(work(name, priority))
        for name, priority in (("status-a", 1), ("new-a", 0), ("status-b", 1), ("new-b", 0))
    ]
    await asyncio.gather(first, *waiters)
    assert order == ["running", "new-a", "new-b", "status-a", "status-b"]
    assert slots.free == 1 and slots.waiting == []


async def test_a_cancelled_waiter_keeps_no_slot_and_loses_none() -> None:
    slots = PrioritySlots(1)
    await slots.acquire(0)
    cancelled = asyncio.create_task(slots.acquire(0))
    waiting = asyncio.create_task(slots.acquire(1))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    slots.release()
    await asyncio.wait_for(waiting, 1)  # the slot went to the one still waiting
    slots.release()
    assert slots.free == 1 and slots.waiting == []
    # Handed the slot and cancelled in the same turn: the slot is passed on, not lost.
    await slots.acquire(0)
    racing = asyncio.create_task(slots.acquire(0))
    await asyncio.sleep(0)
    slots.release()
    racing.cancel()
    await asyncio.gather(racing, return_exceptions=True)
    assert slots.free == 1 and slots.waiting == []
