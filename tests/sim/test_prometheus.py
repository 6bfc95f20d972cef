"""A real Prometheus scrapes the simulator and sees the queue rise under a burst and drain."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.sim.conftest import MODEL
from tests.support.prometheus import run_prometheus
from tests.support.sim import run_sims

pytestmark = pytest.mark.prometheus

MAX_NUM_SEQS = 2
BURST = 10
# 10 requests, 2 at a time, ~0.8 s each: the queue stays non-empty for ~3 s, so at
# least two 1 s scrapes land while requests wait.
SIM_ARGS = [
    "--max-num-seqs", str(MAX_NUM_SEQS),
    "--sim-ttft-base", "0.02",
    "--sim-itl", "0.01",
    "--sim-jitter", "0",
    "--sim-seed", "3",
]  # fmt: skip
WAITING = 'max(vllm:num_requests_waiting{model_name="sim-prom",engine="0"})'


async def _burst(base_url: str) -> list[str | None]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=30)

    async def one() -> str | None:
        stream = await client.chat.completions.create(
            model="sim-prom",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=80,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        finish = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish

    try:
        return await asyncio.gather(*(one() for _ in range(BURST)))
    finally:
        await client.close()


async def test_prometheus_sees_the_queue_rise_and_drain() -> None:
    with (
        run_sims(1, MODEL, served_name="sim-prom", args=SIM_ARGS) as (sim,),
        run_prometheus([f"127.0.0.1:{sim.port}"]) as prom,
    ):
        await asyncio.to_thread(prom.wait_targets_up)
        # Idle: the series exists and says nobody waits.
        idle = await asyncio.to_thread(prom.wait_for, WAITING, lambda v: v is not None)
        assert idle == 0

        burst = asyncio.create_task(_burst(sim.openai_url))
        peak = await asyncio.to_thread(prom.wait_for, WAITING, lambda v: bool(v), 10.0)
        assert peak is not None and 0 < peak <= BURST - MAX_NUM_SEQS

        assert await asyncio.wait_for(burst, 20) == ["length"] * BURST
        drained = await asyncio.to_thread(prom.wait_for, WAITING, lambda v: v == 0, 10.0)
        assert drained == 0
        # The whole story in one range query: it rose above zero and came back.
        rose = await asyncio.to_thread(prom.query_value, f"max_over_time({WAITING}[1m:1s])")
        assert rose is not None and 0 < rose <= BURST - MAX_NUM_SEQS
        running = 'max(vllm:num_requests_running{model_name="sim-prom",engine="0"})'
        busiest = await asyncio.to_thread(prom.query_value, f"max_over_time({running}[1m:1s])")
        assert busiest == MAX_NUM_SEQS  # never more than max-num-seqs at once
        total = await asyncio.to_thread(
            prom.wait_for,
            'sum(vllm:request_success_total{model_name="sim-prom",finished_reason="length"})',
            lambda v: v == BURST,
            10.0,
        )
        assert total == BURST
