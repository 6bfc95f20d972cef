"""The canary through the reconcile loop, without a cluster: what is applied, deleted and
written as a canary starts, steps, rolls back and is promoted."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest

from llm_operator.constants import ANNOTATION_POD_TEMPLATE_HASH, ANNOTATION_ROLLOUT_COMMAND
from llm_operator.controller.reconciler import Controller
from llm_operator.render import RenderConfig
from llm_operator.rollout import Sample, TrackSample
from tests.controller.test_reconciler import (
    BASE,
    FakeKube,
    body,
    make_ready,
    make_unavailable,
    run,
)

CANARY = {
    **BASE,
    "replicas": 4,
    "rollout": {
        "strategy": "Canary",
        "canary": {
            "steps": [{"weight": 25, "pause": "60s"}, {"weight": 50, "pause": "60s"}],
            "analysis": {"interval": "30s", "minRequests": 10, "failureLimit": 2},
        },
    },
}
T0 = 1_800_000_000.0


class FakeAnalyst:
    def __init__(self) -> None:
        self.result: tuple[Sample | None, str] = (None, "unset")
        self.asked: list[tuple[str, float]] = []

    def sample(self, served_name: str, interval: float) -> tuple[Sample | None, str]:
        self.asked.append((served_name, interval))
        return self.result


def samples(canary_errors: float = 0, canary_ttft: float = 0.2) -> Sample:
    return Sample(
        canary=TrackSample(requests=100, errors=canary_errors, ttft_p95=canary_ttft),
        stable=TrackSample(requests=300, errors=0, ttft_p95=0.2),
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake() -> FakeKube:
    return FakeKube()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def analyst() -> FakeAnalyst:
    return FakeAnalyst()


@pytest.fixture
def controller(fake: FakeKube, clock: Clock, analyst: FakeAnalyst) -> Controller:
    c = Controller(
        client=fake,  # type: ignore[arg-type]
        config=RenderConfig(),
        clock=lambda: "2026-01-01T00:00:00Z",
        epoch=clock,
    )
    c.analyst = analyst  # type: ignore[assignment]
    return c


def image(obj: dict[str, Any]) -> str:
    return str(obj["spec"]["template"]["spec"]["containers"][0]["image"])


def edit(llmd: dict[str, Any], spec: dict[str, Any], generation: int) -> dict[str, Any]:
    edited = {**copy.deepcopy(llmd), "spec": spec}
    edited["metadata"]["generation"] = generation
    return edited


def with_image(tag: str) -> dict[str, Any]:
    return {**CANARY, "engine": {**CANARY["engine"], "image": f"vllm/vllm-openai:{tag}"}}


def started(controller: Controller, fake: FakeKube) -> dict[str, Any]:
    """A ready stable on v0.10.0, then an edit to v0.11.0 with its canary pods ready."""
    llmd = run(controller, fake, body(with_image("v0.10.0")))
    make_ready(fake, controller)
    llmd = run(controller, fake, llmd)
    llmd = run(controller, fake, edit(llmd, with_image("v0.11.0"), 2))
    make_ready(fake, controller)
    return run(controller, fake, llmd)


def test_an_edit_starts_a_canary_and_leaves_the_stable(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = started(controller, fake)
    stable, canary = fake.objects[("Deployment", "m")], fake.objects[("Deployment", "m-canary")]
    assert image(stable).endswith("v0.10.0") and image(canary).endswith("v0.11.0")
    assert canary["spec"]["replicas"] == 1  # ceil(25% of 4)
    assert stable["spec"]["replicas"] == 4
    status = llmd["status"]
    assert status["canary"]["phase"] == "Progressing"
    assert status["canary"]["weight"] == 25
    assert (
        status["canary"]["revision"]
        == canary["metadata"]["annotations"][ANNOTATION_POD_TEMPLATE_HASH]
    )
    assert status["canary"]["stableRevision"] == status["revision"]
    assert status["revision"] == stable["metadata"]["annotations"][ANNOTATION_POD_TEMPLATE_HASH]
    assert "stepStartedAt" in status["canary"]
    condition = next(c for c in status["conditions"] if c["type"] == "CanaryProgressing")
    assert condition["status"] == "True"
    assert ("Normal", "CanaryStarted") in [e[:2] for e in fake.events]
    assert controller.rechecks  # woken for the first analysis


def test_steps_then_promotion_then_drain(
    controller: Controller, fake: FakeKube, clock: Clock, analyst: FakeAnalyst
) -> None:
    llmd = started(controller, fake)
    analyst.result = (samples(), "")
    for at in (30, 60):
        clock.now = T0 + at
        llmd = run(controller, fake, llmd)
    assert llmd["status"]["canary"]["step"] == 1
    assert fake.objects[("Deployment", "m-canary")]["spec"]["replicas"] == 2
    for at in (90, 120):
        clock.now = T0 + at
        llmd = run(controller, fake, llmd)
    assert llmd["status"]["canary"]["phase"] == "Promoting"
    stable = fake.objects[("Deployment", "m")]
    assert image(stable).endswith("v0.11.0")  # the stable takes the new template
    assert ("Deployment", "m-canary") in fake.objects  # still serving
    make_ready(fake, controller)
    clock.now = T0 + 125
    llmd = run(controller, fake, llmd)
    assert llmd["status"]["canary"]["phase"] == "Draining"
    assert llmd["status"]["canary"]["weight"] == 0
    clock.now = T0 + 160
    llmd = run(controller, fake, llmd)
    assert "canary" not in llmd["status"]
    assert ("Deployment", "m-canary") not in fake.objects
    condition = next(c for c in llmd["status"]["conditions"] if c["type"] == "CanaryProgressing")
    assert (condition["status"], condition["reason"]) == ("False", "Promoted")
    assert llmd["status"]["phase"] == "Ready"


def test_errors_roll_back_with_the_numbers_and_stay_rolled_back(
    controller: Controller, fake: FakeKube, clock: Clock, analyst: FakeAnalyst
) -> None:
    llmd = started(controller, fake)
    analyst.result = (samples(canary_errors=20), "")
    for at in (30, 60):
        clock.now = T0 + at
        llmd = run(controller, fake, llmd)
    status = llmd["status"]
    assert status["canary"]["phase"] == "RolledBack"
    assert status["canary"]["weight"] == 0
    assert status["canary"]["lastAnalysis"]["errorRate"] == pytest.approx(0.2)
    assert ("Deployment", "m-canary") not in fake.objects
    assert image(fake.objects[("Deployment", "m")]).endswith("v0.10.0")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "CanaryRolledBack")
    assert status["phase"] == "Degraded"
    warnings = [e for e in fake.events if e[1] == "CanaryRolledBack"]
    assert len(warnings) == 1 and "20.00%" in warnings[0][2]
    fake.writes.clear()
    clock.now = T0 + 600
    llmd = run(controller, fake, llmd)
    assert fake.writes == []  # not restarted, nothing rewritten
    # Reverting the spec clears it.
    llmd = run(controller, fake, edit(llmd, with_image("v0.10.0"), 3))
    assert "canary" not in llmd["status"]
    degraded = next(c for c in llmd["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "False"


def test_prometheus_down_holds_the_step_and_says_why(
    controller: Controller, fake: FakeKube, clock: Clock, analyst: FakeAnalyst
) -> None:
    llmd = started(controller, fake)
    analyst.result = (None, "Prometheus at http://127.0.0.1:1 did not answer: refused")
    for at in (30, 60, 90, 120, 150):
        clock.now = T0 + at
        llmd = run(controller, fake, llmd)
    canary = llmd["status"]["canary"]
    assert (canary["phase"], canary["step"], canary["weight"]) == ("Progressing", 0, 25)
    assert canary["lastAnalysis"]["verdict"] == "Inconclusive"
    assert "did not answer" in canary["message"]


def test_abort_by_annotation_leaves_the_spec_and_spends_the_annotation(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = started(controller, fake)
    annotated = copy.deepcopy(llmd)
    annotated["metadata"]["annotations"] = {ANNOTATION_ROLLOUT_COMMAND: "abort"}
    fake.writes.clear()
    llmd = run(controller, fake, annotated)
    assert llmd["status"]["canary"]["phase"] == "Aborted"
    assert ("Deployment", "m-canary") not in fake.objects
    assert ("unannotate", "LLMDeployment", f"m:{ANNOTATION_ROLLOUT_COMMAND}") in fake.writes
    assert not [w for w in fake.writes if w[0] == "apply" and w[1] == "LLMDeployment"]


def test_leaving_the_canary_strategy_clears_its_status(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = started(controller, fake)
    plain = {k: v for k, v in with_image("v0.11.0").items() if k != "rollout"}
    llmd = run(controller, fake, edit(llmd, plain, 3))
    assert "canary" not in llmd["status"]
    assert ("Deployment", "m-canary") not in fake.objects
    assert image(fake.objects[("Deployment", "m")]).endswith("v0.11.0")
    assert not [c for c in llmd["status"]["conditions"] if c["type"] == "CanaryProgressing"]


def test_a_canary_analysis_comes_due_on_time_while_pods_are_missing(
    controller: Controller, fake: FakeKube
) -> None:
    """The 30 s look at missing pods does not postpone an analysis due sooner (it did: a
    canary pod not ready yet held every step for 30-36 s whatever its pause)."""
    spec = copy.deepcopy(with_image("v0.11.0"))
    spec["rollout"]["canary"]["analysis"]["interval"] = "5s"
    llmd = run(controller, fake, body(with_image("v0.10.0")))
    make_ready(fake, controller)
    llmd = run(controller, fake, llmd)
    llmd = run(controller, fake, edit(llmd, spec, 2))
    make_ready(fake, controller)
    llmd = run(controller, fake, llmd)
    assert llmd["status"]["canary"]["stepStartedAt"]
    make_unavailable(fake, controller)  # a stable pod restarts: replicas missing
    lists = len(fake.pod_lists)
    llmd = run(controller, fake, llmd)
    assert len(fake.pod_lists) > lists  # the missing replicas were looked at
    (timer,) = controller.rechecks.values()
    assert timer.when() - time.monotonic() <= 5.0
    assert controller.recheck_seconds > 5.0


def test_a_canary_between_analyses_writes_nothing(
    controller: Controller, fake: FakeKube, clock: Clock, analyst: FakeAnalyst
) -> None:
    """Status changes only with the state: reconciles within a step (child events, wakes
    before the next analysis) write nothing and ask Prometheus nothing."""
    llmd = started(controller, fake)
    fake.writes.clear()
    for at in (1, 5, 12, 29):
        clock.now = T0 + at
        llmd = run(controller, fake, llmd)
    assert fake.writes == []
    assert analyst.asked == []


def test_with_autoscaling_the_canary_follows_the_stable_the_autoscaler_sized(
    controller: Controller, fake: FakeKube
) -> None:
    spec = {
        **{k: v for k, v in with_image("v0.10.0").items() if k != "replicas"},
        "autoscaling": {"minReplicas": 2, "maxReplicas": 8},
    }
    llmd = run(controller, fake, body(spec))
    stable = fake.objects[("Deployment", "m")]
    assert "replicas" not in stable["spec"]  # the HPA's
    stable["spec"]["replicas"] = 6  # what the HPA asked for
    make_ready(fake, controller)
    llmd = run(controller, fake, llmd)
    edited = {**spec, "engine": {**spec["engine"], "image": "vllm/vllm-openai:v0.11.0"}}
    llmd = run(controller, fake, edit(llmd, edited, 2))
    assert fake.objects[("Deployment", "m-canary")]["spec"]["replicas"] == 2  # ceil(25% of 6)
    assert image(fake.objects[("Deployment", "m")]).endswith("v0.10.0")  # stable untouched
    assert ("HorizontalPodAutoscaler", "m") in fake.objects
