"""The scheduler and latency model: max-num-seqs, FIFO queue, KV usage, timing."""

from __future__ import annotations

import asyncio
import random
import time

import openai
import pytest

from llm_operator.sim.engine import Engine, Sequence
from llm_operator.sim.latency import LatencyModel
from llm_operator.sim.metrics import SimMetrics
from tests.sim.conftest import MODEL
from tests.support.sim import SimProcess, metric_value, run_sims


class Recorder:
    """A sink that remembers when each token came out."""

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        self.name = name
        self.log = log
        self.times: list[float] = []
        self.done = asyncio.get_running_loop().create_future()

    def on_token(self, seq: Sequence) -> None:
        self.times.append(time.monotonic())
        if seq.generated == 1:
            self.log.append(("first", self.name))

    def on_finish(self, seq: Sequence) -> None:
        self.log.append(("finish", self.name))
        self.done.set_result(seq.finish_reason)


def make_engine(
    max_num_seqs: int = 2,
    kv_capacity: int = 10_000,
    *,
    ttft_base: float = 0.01,
    prefill_per_token: float = 0.0,
    itl: float = 0.005,
    jitter: float = 0.0,
    load_slowdown: float = 0.0,
) -> tuple[Engine, SimMetrics]:
    model = LatencyModel(ttft_base, prefill_per_token, itl, jitter, load_slowdown, max_num_seqs)
    holder: list[Engine] = []
    metrics = SimMetrics("m", 4096, lambda: holder[0].gauges())
    engine = Engine(model, max_num_seqs, kv_capacity, metrics, random.Random(1))
    holder.append(engine)
    return engine, metrics


def gauge(metrics: SimMetrics, name: str) -> float:
    return metric_value(metrics.exposition().decode(), name)


async def test_at_most_max_num_seqs_run_and_the_rest_wait_in_fifo_order() -> None:
    engine, metrics = make_engine(max_num_seqs=2)
    log: list[tuple[str, str]] = []
    sinks = [Recorder(str(i), log) for i in range(5)]
    for sink in sinks:
        engine.submit(Sequence(10, 3, False, sink))
    assert engine.gauges()[:2] == (2, 3)
    assert gauge(metrics, "vllm:num_requests_running") == 2
    assert gauge(metrics, "vllm:num_requests_waiting") == 3
    await asyncio.wait_for(asyncio.gather(*(s.done for s in sinks)), 5)
    firsts = [name for kind, name in log if kind == "first"]
    assert firsts == ["0", "1", "2", "3", "4"]
    assert engine.gauges() == (0, 0, 0.0)
    assert gauge(metrics, "vllm:request_success_total") == 5
    assert metric_value(metrics.exposition().decode(), "vllm:generation_tokens_total") == 15


async def test_kv_cache_usage_follows_running_tokens() -> None:
    engine, _ = make_engine(max_num_seqs=4, kv_capacity=1000, ttft_base=0.0, itl=0.05)
    log: list[tuple[str, str]] = []
    a, b = Recorder("a", log), Recorder("b", log)
    engine.submit(Sequence(100, 5, False, a))
    engine.submit(Sequence(300, 5, False, b))
    assert engine.gauges()[2] == pytest.approx(0.4)  # prompts held in the cache
    await asyncio.sleep(0.025)  # first token out for both (+1 each), second due at 0.05
    assert engine.kv_used == 402
    await asyncio.wait_for(asyncio.gather(a.done, b.done), 5)
    assert engine.gauges()[2] == 0.0


async def test_a_prompt_that_does_not_fit_the_kv_cache_waits() -> None:
    engine, _ = make_engine(max_num_seqs=4, kv_capacity=500)
    log: list[tuple[str, str]] = []
    a, b = Recorder("a", log), Recorder("b", log)
    engine.submit(Sequence(400, 2, False, a))
    engine.submit(Sequence(400, 2, False, b))
    assert engine.gauges()[:2] == (1, 1)  # slots free, cache full
    await asyncio.wait_for(asyncio.gather(a.done, b.done), 5)


async def test_ttft_follows_prompt_length_and_itl_the_model() -> None:
    engine, _ = make_engine(max_num_seqs=4, ttft_base=0.02, prefill_per_token=0.0001, itl=0.01)
    log: list[tuple[str, str]] = []
    short, long_ = Recorder("short", log), Recorder("long", log)
    t0 = time.monotonic()
    engine.submit(Sequence(10, 6, False, short))
    engine.submit(Sequence(1000, 6, False, long_))
    await asyncio.wait_for(asyncio.gather(short.done, long_.done), 5)
    model = engine.model
    # Loop timers have ~1 ms resolution, and a busy CI machine adds lateness: the
    # margins are a tenth of the 100 ms the prompt length adds.
    assert short.times[0] - t0 == pytest.approx(model.mean_ttft(10, 1), abs=0.01)
    assert long_.times[0] - t0 == pytest.approx(model.mean_ttft(1000, 2), abs=0.01)
    gaps = [b - a for a, b in zip(long_.times, long_.times[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(model.mean_itl(2), abs=0.003)


def test_load_factor_grows_linearly_to_one_plus_slowdown() -> None:
    model = LatencyModel(0.1, 0.001, 0.02, 0.0, 0.5, max_num_seqs=11)
    assert model.load_factor(1) == 1.0
    assert model.load_factor(6) == pytest.approx(1.25)
    assert model.load_factor(11) == pytest.approx(1.5)
    assert model.mean_ttft(100, 11) == pytest.approx((0.1 + 0.1) * 1.5)
    assert model.mean_itl(1) == 0.02


def test_jitter_stays_in_its_band_and_averages_out() -> None:
    model = LatencyModel(0.0, 0.0, 0.02, 0.2, 0.0, max_num_seqs=1)
    rng = random.Random(3)
    draws = [model.draw_itl(rng, 1) for _ in range(20_000)]
    assert min(draws) >= 0.016 and max(draws) <= 0.024
    assert sum(draws) / len(draws) == pytest.approx(0.02, rel=0.01)


async def test_abort_frees_the_slot_for_the_next_in_line() -> None:
    engine, metrics = make_engine(max_num_seqs=1, itl=0.01)
    log: list[tuple[str, str]] = []
    first, second = Recorder("1", log), Recorder("2", log)
    seq1 = Sequence(10, 1000, False, first)
    engine.submit(seq1)
    engine.submit(Sequence(10, 2, False, second))
    assert engine.gauges()[:2] == (1, 1)
    engine.abort(seq1)
    assert engine.gauges()[:2] == (1, 0)
    await asyncio.wait_for(second.done, 5)
    text = metrics.exposition().decode()
    assert metric_value(text, "vllm:request_success_total", {"finished_reason": "abort"}) == 1


@pytest.fixture(scope="module")
def small_sim() -> SimProcess:  # type: ignore[misc]
    args = [
        "--max-num-seqs", "2",
        "--sim-ttft-base", "0.01",
        "--sim-itl", "0.01",
        "--sim-jitter", "0",
        "--sim-seed", "1",
    ]  # fmt: skip
    with run_sims(1, MODEL, served_name="m", args=args) as sims:
        yield sims[0]


async def test_queue_is_visible_in_metrics_and_drains(small_sim: SimProcess) -> None:
    client = openai.AsyncOpenAI(base_url=small_sim.openai_url, api_key="x", max_retries=0)

    async def one() -> str | None:
        resp = await client.completions.create(
            model="m", prompt="x" * 40, max_tokens=50, extra_body={"ignore_eos": True}
        )
        return resp.choices[0].finish_reason

    tasks = [asyncio.create_task(one()) for _ in range(6)]
    # Each request runs ~0.5 s, so all six are in before the first leaves; poll
    # until they have arrived (the async client takes ~0.5 s to send its first request).
    deadline = time.monotonic() + 3
    while True:
        text = await asyncio.to_thread(small_sim.metrics_text)
        if metric_value(text, "vllm:num_requests_waiting") == 4 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    assert metric_value(text, "vllm:num_requests_running") == 2
    assert metric_value(text, "vllm:num_requests_waiting") == 4
    assert metric_value(text, "vllm:kv_cache_usage_perc") > 0
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert results == ["length"] * 6
    text = await asyncio.to_thread(small_sim.metrics_text)
    assert metric_value(text, "vllm:num_requests_running") == 0
    assert metric_value(text, "vllm:num_requests_waiting") == 0
    assert metric_value(text, "vllm:kv_cache_usage_perc") == 0
    assert metric_value(text, "vllm:request_success_total", {"finished_reason": "length"}) == 6
    assert metric_value(text, "vllm:request_queue_time_seconds_count") == 6
    # Four of the six waited at least one full request (~0.5 s) for a slot.
    assert metric_value(text, "vllm:request_queue_time_seconds_sum") > 4 * 0.4
    labels = {"model_name": "m", "engine": "0"}
    assert metric_value(text, "vllm:time_to_first_token_seconds_count", labels) == 6
    assert metric_value(text, "vllm:inter_token_latency_seconds_count", labels) == 6 * 49
    assert metric_value(text, "vllm:prompt_tokens_total", labels) == 6 * 10
    assert metric_value(text, "vllm:generation_tokens_total", labels) == 6 * 50
    await client.close()
