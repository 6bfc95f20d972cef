"""FallbackActive: the gateway's counters turned into a condition, and its place in the loop."""

from __future__ import annotations

from typing import Any

import pytest

from llm_operator.controller.reconciler import Controller
from llm_operator.fallback_health import fallback_condition, fallback_queries
from llm_operator.render import RenderConfig
from tests.controller.test_reconciler import BASE, FakeKube, body, make_ready, run


def test_queries_name_the_model() -> None:
    q = fallback_queries("org/m:1")
    assert q.fallbacks == (
        'sum(increase(llm_gateway_fallbacks_total{model="org/m:1"}[120s])) or vector(0)'
    )
    assert q.requests == (
        'sum(increase(llm_gateway_requests_total{model="org/m:1"}[120s])) or vector(0)'
    )


@pytest.mark.parametrize(
    ("fallbacks", "requests", "expected"),
    [
        (0.0, 100.0, (False, "NoFallback")),
        (0.4, 100.0, (False, "NoFallback")),  # increase() extrapolation noise rounds to 0
        (25.0, 100.0, (True, "FallingBack")),
        (300.0, 100.0, (True, "FallingBack")),  # several steps per request: capped at 100%
        (5.0, 0.0, (True, "FallingBack")),
        (None, 100.0, None),
    ],
)
def test_the_condition(
    fallbacks: float | None, requests: float | None, expected: tuple[bool, str] | None
) -> None:
    condition = fallback_condition(fallbacks, requests)
    assert (condition[:2] if condition else None) == expected
    if condition and condition[0]:
        share = min(100, round(100 * (fallbacks or 0) / requests)) if requests else 100
        assert condition[2].startswith(f"{share}% of requests fell back")


class FakeAnalyst:
    prometheus = object()

    def __init__(self) -> None:
        self.values: list[float | None] | None = [0.0, 10.0]
        self.asked = 0

    def scalars(self, *queries: str) -> list[float | None] | None:
        self.asked += 1
        return self.values


class Clock:
    now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def condition(llmd: dict[str, Any]) -> dict[str, Any] | None:
    conditions = (llmd.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "FallbackActive"), None)


def test_fallback_active_follows_the_counters_at_its_pace() -> None:
    fake, clock, analyst = FakeKube(), Clock(), FakeAnalyst()
    controller = Controller(
        client=fake,  # type: ignore[arg-type]
        config=RenderConfig(),
        clock=lambda: "2026-01-01T00:00:00Z",
        epoch=clock,
    )
    controller.analyst = analyst  # type: ignore[assignment]
    spec = {**BASE, "routing": {"fallbacks": [{"url": "https://api.example.com/v1", "model": "x"}]}}
    llmd = run(controller, fake, body(spec))
    make_ready(fake, controller)
    llmd = run(controller, fake, llmd)
    first = condition(llmd)
    assert first is not None and (first["status"], first["reason"]) == ("False", "NoFallback")
    analyst.values = [30.0, 60.0]
    clock.now += 5  # before the next check: not asked again, nothing written
    fake.writes.clear()
    llmd = run(controller, fake, llmd)
    assert fake.writes == [] and analyst.asked == 1
    clock.now += 30
    llmd = run(controller, fake, llmd)
    active = condition(llmd)
    assert active is not None and active["status"] == "True"
    assert active["message"] == "50% of requests fell back in the last 120s"
    analyst.values = None  # Prometheus gone: the condition stays as it was
    clock.now += 30
    llmd = run(controller, fake, llmd)
    assert condition(llmd) == active
    # Fallbacks removed from the spec: the condition goes.
    edited = {**llmd, "spec": BASE, "metadata": {**llmd["metadata"], "generation": 2}}
    assert condition(run(controller, fake, edited)) is None
