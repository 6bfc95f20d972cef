"""Simulators shared by the tests of one module (a subprocess start costs ~0.5 s)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.support.sim import SimProcess, run_sims

# Fast and deterministic: a few milliseconds per request, no jitter, fixed seed.
FAST_ARGS = [
    "--max-model-len", "512",
    "--max-num-seqs", "8",
    "--sim-ttft-base", "0.002",
    "--sim-prefill-per-token", "0.00001",
    "--sim-itl", "0.001",
    "--sim-jitter", "0",
    "--sim-output-tokens", "8",
    "--sim-seed", "7",
]  # fmt: skip
SERVED = ["sim-llama", "llama-alias"]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    """One fast simulator serving two names; failure settings reset after each test."""
    with run_sims(1, MODEL, served_name=SERVED, args=FAST_ARGS) as sims:
        yield sims[0]


@pytest.fixture
def fresh_sim(sim: SimProcess) -> Iterator[SimProcess]:
    """The module's simulator, with every runtime fault switched off again afterwards."""
    yield sim
    sim.admin(error_rate_500=0, error_rate_429=0, hang=False, health_status=None, ready=True)


@pytest.fixture
def client(sim: SimProcess) -> openai.OpenAI:
    # No retries: a test must see the answer the simulator gave, not a retried one.
    return openai.OpenAI(base_url=sim.openai_url, api_key="unused", max_retries=0, timeout=10)
