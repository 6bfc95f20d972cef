"""Every transition of the canary state machine, table-driven where the shape allows."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llm_operator.api.v1alpha1 import CanaryAnalysis, CanarySpec, CanaryStep
from llm_operator.rollout import CanaryState, Observed, Sample, TrackSample, decide, parse_state
from llm_operator.rollout.machine import (
    ABORTED,
    DRAIN_SECONDS,
    DRAINING,
    PAUSED,
    PROGRESSING,
    PROMOTING,
    ROLLED_BACK,
    analysis_due,
    canary_replicas,
    to_status,
)

SPEC = CanarySpec(
    steps=[CanaryStep(weight=10, pause="60s"), CanaryStep(weight=50, pause="60s")],
    analysis=CanaryAnalysis(interval="30s", min_requests=20, failure_limit=2),
)
T0 = 1_800_000_000.0
OLD, NEW, NEWER = "aaaa1111", "bbbb2222", "cccc3333"


def observed(now: float = T0, **overrides: object) -> Observed:
    values: dict[str, object] = {
        "now": now,
        "desired_revision": NEW,
        "stable_revision": OLD,
        "stable_replicas": 4,
        "canary_ready": 1,
    }
    values.update(overrides)
    return Observed(**values)  # type: ignore[arg-type]


def track(requests: float, errors: float = 0.0, ttft: float | None = 0.2) -> TrackSample:
    return TrackSample(requests=requests, errors=errors, ttft_p95=ttft)


GOOD = Sample(canary=track(100), stable=track(900))
ERRORS = Sample(canary=track(100, errors=10), stable=track(900))
SLOW = Sample(canary=track(100, ttft=0.4), stable=track(900, ttft=0.2))
THIN = Sample(canary=track(5), stable=track(900))


def running(**overrides: object) -> CanaryState:
    values: dict[str, object] = {
        "phase": PROGRESSING,
        "revision": NEW,
        "stable_revision": OLD,
        "step": 0,
        "weight": 10,
        "step_started_at": T0,
    }
    values.update(overrides)
    return CanaryState(**values)  # type: ignore[arg-type]


def analysed(state: CanaryState, sample: Sample | None, at: float, error: str = "") -> Observed:
    assert analysis_due(SPEC, state, at)
    return observed(at, analysis_ran=True, sample=sample, sample_error=error)


# -- starting ------------------------------------------------------------------------------


def test_no_canary_while_the_stable_runs_the_spec() -> None:
    decision = decide(SPEC, None, observed(desired_revision=OLD))
    assert decision.state is None
    assert decision.stable_template == "desired"
    assert decision.canary_replicas is None and decision.weight == 0


def test_first_creation_is_not_a_canary() -> None:
    decision = decide(SPEC, None, observed(stable_revision=None))
    assert decision.state is None and decision.stable_template == "desired"


def test_a_template_change_starts_a_canary_beside_the_untouched_stable() -> None:
    decision = decide(SPEC, None, observed(canary_ready=0))
    assert decision.state is not None
    assert decision.state.phase == PROGRESSING
    assert (decision.state.revision, decision.state.stable_revision) == (NEW, OLD)
    assert decision.stable_template == "live"
    assert decision.canary_replicas == 1  # ceil(10% of 4)
    assert decision.weight == 10
    assert decision.state.step_started_at is None  # the pause counts from first traffic
    assert [e.reason for e in decision.events] == ["CanaryStarted"]
    assert decision.progressing is not None and decision.progressing[1] == "WaitingForCanary"


def test_the_step_begins_with_the_first_ready_canary_pod() -> None:
    waiting = running(step_started_at=None)
    decision = decide(SPEC, waiting, observed(T0 + 5, canary_ready=1))
    assert decision.state is not None and decision.state.step_started_at == T0 + 5
    assert decision.wake_after == pytest.approx(30)


@pytest.mark.parametrize(
    ("weight", "stable", "expected"),
    [(10, 4, 1), (50, 4, 2), (30, 10, 3), (1, 100, 1), (99, 3, 3), (100, 2, 2), (25, 0, 1)],
)
def test_canary_size_follows_the_weight(weight: int, stable: int, expected: int) -> None:
    assert canary_replicas(weight, stable) == expected


# -- analysis --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "error", "verdict", "failed"),
    [
        (GOOD, "", "Pass", 0),
        (ERRORS, "", "Fail", 1),
        (SLOW, "", "Fail", 1),
        (THIN, "", "Inconclusive", 0),
        (None, "Prometheus at http://p:9090 did not answer: refused", "Inconclusive", 0),
        (Sample(canary=track(100, ttft=None), stable=track(900)), "", "Inconclusive", 0),
    ],
    ids=["pass", "errors", "ttft-ratio", "too-few-requests", "prometheus-down", "no-ttft"],
)
def test_one_analysis(sample: Sample | None, error: str, verdict: str, failed: int) -> None:
    state = running()
    decision = decide(SPEC, state, analysed(state, sample, T0 + 30, error))
    assert decision.state is not None
    assert decision.state.last_analysis is not None
    assert decision.state.last_analysis["verdict"] == verdict
    assert decision.state.failed_analyses == failed
    assert decision.state.phase == PROGRESSING
    assert decision.weight == 10
    if error:
        assert "did not answer" in decision.state.last_analysis["message"]


def test_no_analysis_before_the_interval() -> None:
    state = running()
    assert not analysis_due(SPEC, state, T0 + 29)
    decision = decide(SPEC, state, observed(T0 + 29))
    assert decision.state is not None and decision.state.last_analysis is None


def test_failure_limit_rolls_back_at_once_with_the_numbers() -> None:
    state = running()
    first = decide(SPEC, state, analysed(state, ERRORS, T0 + 30))
    assert first.state is not None and first.state.failed_analyses == 1
    assert [e.reason for e in first.events] == ["CanaryAnalysisFailed"]
    second = decide(SPEC, first.state, analysed(first.state, ERRORS, T0 + 60))
    assert second.state is not None
    assert second.state.phase == ROLLED_BACK
    assert second.weight == 0 and second.canary_replicas is None
    assert second.stable_template == "live"
    assert second.state.last_analysis is not None
    assert second.state.last_analysis["errorRate"] == pytest.approx(0.1)
    assert second.state.last_analysis["failedCheck"] == "error-rate"
    assert second.progressing == (False, ROLLED_BACK, second.state.message)
    assert second.degraded is not None and second.degraded[0] == "CanaryRolledBack"
    assert "10.00%" in second.degraded[1]
    assert [e.reason for e in second.events] == ["CanaryAnalysisFailed", "CanaryRolledBack"]
    assert all(e.type == "Warning" for e in second.events)


def test_a_slow_canary_fails_on_the_ratio() -> None:
    state = running(failed_analyses=1)
    decision = decide(SPEC, state, analysed(state, SLOW, T0 + 30))
    assert decision.state is not None and decision.state.phase == ROLLED_BACK
    assert decision.state.last_analysis is not None
    assert decision.state.last_analysis["failedCheck"] == "ttft-ratio"
    assert decision.state.last_analysis["ttftP95Ratio"] == pytest.approx(2.0)


def test_inconclusive_never_advances_a_step() -> None:
    state = running(last_analysis={"verdict": "Inconclusive", "message": "x", "time": "t"})
    state = replace(state, last_analysis_at=T0 + 30)
    decision = decide(SPEC, state, analysed(state, None, T0 + 61, "down"))
    assert decision.state is not None
    assert decision.state.step == 0 and decision.weight == 10
    assert "held, last analysis Inconclusive" in decision.state.message


def test_a_passing_step_moves_on_after_its_pause() -> None:
    state = running()
    passed = decide(SPEC, state, analysed(state, GOOD, T0 + 30)).state
    assert passed is not None and passed.step == 0  # pause not over
    moved = decide(SPEC, passed, analysed(passed, GOOD, T0 + 60))
    assert moved.state is not None
    assert (moved.state.step, moved.weight, moved.canary_replicas) == (1, 50, 2)
    assert moved.state.step_started_at == T0 + 60
    assert [e.reason for e in moved.events] == ["CanaryStep"]


def test_the_last_step_passing_promotes() -> None:
    state = running(step=1, weight=50)
    decision = decide(SPEC, state, analysed(state, GOOD, T0 + 60))
    assert decision.state is not None and decision.state.phase == PROMOTING
    assert decision.stable_template == "desired"  # the stable takes the new template
    assert decision.weight == 50 and decision.canary_replicas == 2  # the canary keeps serving


# -- promotion -------------------------------------------------------------------------------


def test_promotion_drains_the_canary_only_after_the_stable_rolled_out() -> None:
    promoting = running(phase=PROMOTING, step=1, weight=50)
    still = decide(SPEC, promoting, observed(T0, stable_revision=OLD))
    assert still.state is not None and still.state.phase == PROMOTING and still.weight == 50
    half = decide(SPEC, promoting, observed(T0, stable_revision=NEW, stable_rolled_out=False))
    assert half.state is not None and half.state.phase == PROMOTING
    done = decide(SPEC, promoting, observed(T0 + 5, stable_revision=NEW, stable_rolled_out=True))
    assert done.state is not None and done.state.phase == DRAINING
    assert done.weight == 0 and done.canary_replicas == 2  # pods stay while the table moves
    assert done.wake_after == pytest.approx(DRAIN_SECONDS)
    gone = decide(
        SPEC, done.state, observed(T0 + 5 + DRAIN_SECONDS, stable_revision=NEW, canary_ready=2)
    )
    assert gone.state is None and gone.canary_replicas is None
    assert gone.progressing is not None and gone.progressing[:2] == (False, "Promoted")
    assert [e.reason for e in gone.events] == ["CanaryPromoted"]


def test_a_spec_edit_during_promotion_waits_for_it() -> None:
    promoting = running(phase=PROMOTING, step=1, weight=50)
    decision = decide(SPEC, promoting, observed(desired_revision=NEWER, stable_revision=NEW))
    assert decision.stable_template == "live"
    assert decision.state is not None and decision.state.revision == NEW


# -- spec changes ----------------------------------------------------------------------------


def test_a_newer_revision_replaces_the_canary_and_leaves_the_stable() -> None:
    state = running(step=1, weight=50, failed_analyses=1)
    decision = decide(SPEC, state, observed(desired_revision=NEWER, canary_ready=0))
    assert decision.state is not None
    assert (decision.state.revision, decision.state.stable_revision) == (NEWER, OLD)
    assert (decision.state.step, decision.state.failed_analyses) == (0, 0)
    assert decision.stable_template == "live"
    assert [e.reason for e in decision.events] == ["CanaryReplaced"]


def test_reverting_the_spec_mid_canary_removes_it() -> None:
    decision = decide(SPEC, running(), observed(desired_revision=OLD))
    assert decision.state is None and decision.canary_replicas is None
    assert decision.stable_template == "desired"
    assert decision.progressing is not None and decision.progressing[1] == "Reverted"


@pytest.mark.parametrize("phase", [ROLLED_BACK, ABORTED])
def test_an_ended_canary_is_not_restarted_in_a_loop(phase: str) -> None:
    ended = running(phase=phase, weight=0, message="why")
    decision = decide(SPEC, ended, observed())
    assert decision.state == ended
    assert decision.canary_replicas is None and decision.weight == 0
    assert decision.stable_template == "live"
    assert decision.degraded is not None
    assert decision.events == ()


@pytest.mark.parametrize("phase", [ROLLED_BACK, ABORTED])
def test_reverting_after_an_ended_canary_clears_it(phase: str) -> None:
    decision = decide(SPEC, running(phase=phase, weight=0), observed(desired_revision=OLD))
    assert decision.state is None and decision.degraded is None
    assert decision.progressing is not None and decision.progressing[1] == "Reverted"


def test_a_new_edit_after_a_rollback_starts_a_new_canary() -> None:
    ended = running(phase=ROLLED_BACK, weight=0)
    decision = decide(SPEC, ended, observed(desired_revision=NEWER))
    assert decision.state is not None and decision.state.phase == PROGRESSING
    assert decision.state.revision == NEWER and decision.degraded is None


# -- commands ----------------------------------------------------------------------------------


def test_pause_holds_the_weight_and_the_clock() -> None:
    paused = decide(SPEC, running(), observed(T0 + 10, command="pause"))
    assert paused.state is not None and paused.state.phase == PAUSED
    assert paused.weight == 10 and paused.canary_replicas == 1
    assert paused.progressing is not None and paused.progressing[1] == "Paused"
    assert not analysis_due(SPEC, paused.state, T0 + 1000)
    later = decide(SPEC, paused.state, observed(T0 + 1000))
    assert later.state == paused.state
    resumed = decide(SPEC, paused.state, observed(T0 + 1000, command="resume"))
    assert resumed.state is not None and resumed.state.phase == PROGRESSING
    # 990 s paused: the step started at T0 now counts as started at T0 + 990.
    assert resumed.state.step_started_at == pytest.approx(T0 + 990)


def test_abort_rolls_back_and_remembers() -> None:
    decision = decide(SPEC, running(step=1, weight=50), observed(command="abort"))
    assert decision.state is not None and decision.state.phase == ABORTED
    assert decision.weight == 0 and decision.canary_replicas is None
    assert decision.degraded is not None and decision.degraded[0] == "CanaryAborted"
    assert [e.reason for e in decision.events] == ["CanaryAborted"]


def test_promote_skips_the_remaining_steps() -> None:
    decision = decide(SPEC, running(), observed(command="promote"))
    assert decision.state is not None and decision.state.phase == PROMOTING
    assert decision.stable_template == "desired"


def test_promote_while_paused() -> None:
    paused = running(phase=PAUSED, paused_at=T0)
    decision = decide(SPEC, paused, observed(command="promote"))
    assert decision.state is not None and decision.state.phase == PROMOTING


def test_commands_without_a_canary_do_nothing() -> None:
    for command in ("promote", "abort", "pause", "resume"):
        decision = decide(SPEC, None, observed(desired_revision=OLD, command=command))
        assert decision.state is None and decision.canary_replicas is None


# -- restart -----------------------------------------------------------------------------------


def test_status_round_trip_resumes_mid_step_with_the_analysis_count() -> None:
    """An operator restart sees only status.canary: the same decision follows from it."""
    state = running(step=1, weight=50, failed_analyses=1)
    first = decide(SPEC, state, analysed(state, GOOD, T0 + 30))
    assert first.state is not None
    restored = parse_state(to_status(first.state))
    assert restored == first.state
    again = decide(SPEC, restored, observed(T0 + 45))
    assert again.state is not None
    assert (again.state.step, again.state.failed_analyses) == (1, 1)
    assert again.events == ()
    assert again.wake_after == pytest.approx(15)


def test_parse_state_of_nothing() -> None:
    assert parse_state(None) is None
    assert parse_state({}) is None
    assert parse_state({"weight": 10}) is None
