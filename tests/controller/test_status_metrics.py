"""The per-LLMDeployment gauges the alerts and dashboards read: set from the status the
reconciler writes, gone when the LLMDeployment is."""

from __future__ import annotations

import tracemalloc

import pytest
from prometheus_client import REGISTRY, generate_latest

from llm_operator.controller import metrics
from llm_operator.controller.reconciler import Controller
from llm_operator.render import RenderConfig
from tests.controller.test_reconciler import BASE, FakeKube, body, make_ready, run


@pytest.fixture
def fake() -> FakeKube:
    return FakeKube()


@pytest.fixture
def controller(fake: FakeKube) -> Controller:
    return Controller(client=fake, config=RenderConfig(), clock=lambda: "2026-01-01T00:00:00Z")  # type: ignore[arg-type]


OWNER = {"llmdeployment_namespace": "ns", "llmoperator_io_deployment": "m"}


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, {**OWNER, **labels})


def test_replicas_gpus_and_conditions_follow_status(controller: Controller, fake: FakeKube) -> None:
    llmd = run(controller, fake, body({**BASE, "replicas": 2}))
    assert value("llm_operator_desired_replicas") == 2
    assert value("llm_operator_ready_replicas") == 0
    assert value("llm_operator_max_replicas") == 2
    assert value("llm_operator_target_queue_depth") is None  # no autoscaling
    assert value("llm_operator_gpus_per_replica") == llmd["status"]["gpusPerReplica"] >= 1
    assert value("llm_operator_llmdeployment_info", model="qwen") == 1
    assert value("llm_operator_condition", type="Ready") == 0
    assert value("llm_operator_canary_weight") == 0
    make_ready(fake, controller)
    run(controller, fake, llmd)
    assert value("llm_operator_ready_replicas") == 2
    assert value("llm_operator_condition", type="Ready") == 1


def test_autoscaling_exports_its_ceiling_and_target(controller: Controller, fake: FakeKube) -> None:
    spec = {**BASE, "autoscaling": {"minReplicas": 1, "maxReplicas": 5, "targetQueueDepth": 3}}
    run(controller, fake, body(spec))
    assert value("llm_operator_max_replicas") == 5
    assert value("llm_operator_target_queue_depth") == 3


def test_canary_phase_is_one_series_for_the_current_phase() -> None:
    status = {"canary": {"phase": "Progressing", "weight": 20}}
    metrics.observe_status("ns", "m", body(BASE), status)
    assert value("llm_operator_canary_phase", phase="Progressing") == 1
    assert value("llm_operator_canary_weight") == 20
    metrics.observe_status("ns", "m", body(BASE), {"canary": {"phase": "RolledBack"}})
    assert value("llm_operator_canary_phase", phase="Progressing") is None
    assert value("llm_operator_canary_phase", phase="RolledBack") == 1
    assert value("llm_operator_canary_weight") == 0


def test_a_deleted_llmdeployment_leaves_no_series(controller: Controller, fake: FakeKube) -> None:
    llmd = body(BASE)
    run(controller, fake, llmd)
    assert value("llm_operator_desired_replicas") is not None
    controller.remember_owner(llmd, deleted=True)
    for name in ("llm_operator_desired_replicas", "llm_operator_gpus_per_replica"):
        assert value(name) is None
    assert value("llm_operator_llmdeployment_info", model="qwen") is None


def test_the_scrape_shows_each_series_once_in_the_exposition_format() -> None:
    status = {"desiredReplicas": 3, "conditions": [{"type": "Ready", "status": "True"}]}
    metrics.observe_status("ns", "m", body(BASE), status)
    metrics.observe_status("ns", "m", body(BASE), status)  # a repeat replaces, adds nothing
    text = generate_latest(REGISTRY).decode()
    owner = 'llmdeployment_namespace="ns",llmoperator_io_deployment="m"'
    assert text.count(f"llm_operator_desired_replicas{{{owner}}} 3.0") == 1
    assert f'llm_operator_condition{{{owner},type="Ready"}} 1.0' in text
    assert "# TYPE llm_operator_desired_replicas gauge" in text


def test_a_thousand_llmdeployments_series_take_little_memory() -> None:
    # A labelled prometheus_client Gauge keeps an object and a lock per series: 12 series per
    # LLMDeployment held 10 MiB at 1,000 (bench/results/operator.md, 2026-12-03).
    status = {
        "desiredReplicas": 1,
        "readyReplicas": 1,
        "gpusPerReplica": 1,
        "conditions": [{"type": t, "status": "True"} for t in ("Ready", "Available", "Degraded")],
    }
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            metrics.observe_status("bench", f"m-{i:04d}", body(BASE), status)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        for i in range(1000):
            metrics.forget("bench", f"m-{i:04d}")
    assert held < 1.5 * 2**20, held
