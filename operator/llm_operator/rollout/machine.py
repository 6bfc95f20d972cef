"""The canary state machine: from where a canary stands (status.canary) and what the cluster
and Prometheus show now, what to run, what weight to route, and what to say.

Phases: Progressing (a step holds its weight while analysis runs), Paused, Promoting (the
stable Deployment takes the new template while the canary keeps serving), Draining (weight 0,
the canary's pods stay until the gateway has the new table and answers in flight finish),
then no canary. RolledBack and Aborted remember the revision, so the same canary is not
started again in a loop; a new spec edit starts a new canary, and reverting the spec to the
stable revision clears them.

Every input is in `Observed` and every output in `Decision`; the state is only ever what
status.canary holds, so an operator restart resumes where it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from llm_operator.api.v1alpha1 import CanarySpec, parse_duration_seconds
from llm_operator.kubeformat import parse_rfc3339, rfc3339
from llm_operator.rollout.analysis import Result, Sample, Verdict, evaluate

PROGRESSING = "Progressing"
PAUSED = "Paused"
PROMOTING = "Promoting"
DRAINING = "Draining"
ROLLED_BACK = "RolledBack"
ABORTED = "Aborted"
ACTIVE = (PROGRESSING, PAUSED, PROMOTING, DRAINING)
ENDED = (ROLLED_BACK, ABORTED)

COMMANDS = ("promote", "abort", "pause", "resume")
# After the weight goes to 0 the canary's pods stay this long: the routing table reaches the
# gateway (a debounce, a ConfigMap volume refresh, a file poll) and answers in flight finish.
DRAIN_SECONDS = 30.0
# Never wake more often than this for time-based steps: analysis intervals are seconds long.
MIN_WAKE_SECONDS = 1.0

StableTemplate = Literal["desired", "live"]


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class CanaryState:
    """status.canary, parsed. Times are Unix seconds."""

    phase: str
    revision: str
    stable_revision: str
    step: int = 0
    weight: int = 0
    step_started_at: float | None = None
    """When the current step (or phase, while Promoting/Draining) began; None while the
    canary has no ready pod yet: a step's pause counts from its first traffic."""
    failed_analyses: int = 0
    last_analysis: Mapping[str, Any] | None = None
    last_analysis_at: float | None = None
    paused_at: float | None = None
    message: str = ""

    def verdict_in_step(self) -> str | None:
        """The verdict of the latest analysis of this step, if one ran."""
        if self.last_analysis is None or self.last_analysis_at is None:
            return None
        if self.step_started_at is None or self.last_analysis_at < self.step_started_at:
            return None
        verdict = self.last_analysis.get("verdict")
        return verdict if isinstance(verdict, str) else None


@dataclass(frozen=True)
class Observed:
    now: float
    desired_revision: str
    """Pod-template hash of what the spec asks for now."""
    stable_revision: str | None
    """Pod-template hash of the live stable Deployment; None while there is none."""
    stable_replicas: int
    """Replicas the stable track runs (the autoscaler's count when it owns it)."""
    stable_rolled_out: bool = False
    """The live stable Deployment runs its template on every replica, all ready."""
    canary_ready: int = 0
    command: str | None = None
    """promote, abort, pause or resume, from the rollout-command annotation."""
    analysis_ran: bool = False
    """The controller asked Prometheus this round (because `analysis_due` said so)."""
    sample: Sample | None = None
    sample_error: str = ""


@dataclass(frozen=True)
class Decision:
    state: CanaryState | None
    """The new status.canary; None clears it."""
    stable_template: StableTemplate = "desired"
    """Apply the stable Deployment with the spec's template, or keep the live one."""
    canary_replicas: int | None = None
    """Replicas of the canary Deployment; None: there is none (delete it)."""
    weight: int = 0
    """Percent of the model's requests the routing table sends to the canary track."""
    progressing: tuple[bool, str, str] | None = None
    """The CanaryProgressing condition (status, reason, message); None: leave it as is."""
    degraded: tuple[str, str] | None = None
    """A canary that ended badly keeps the LLMDeployment Degraded (reason, message)."""
    events: tuple[Event, ...] = field(default_factory=tuple)
    wake_after: float | None = None
    """Seconds until time alone changes the decision (an analysis, a step's end)."""


# -- status <-> state ---------------------------------------------------------------------


def parse_state(status_canary: Mapping[str, Any] | None) -> CanaryState | None:
    if not status_canary or not status_canary.get("phase") or not status_canary.get("revision"):
        return None
    last = status_canary.get("lastAnalysis")
    return CanaryState(
        phase=str(status_canary["phase"]),
        revision=str(status_canary["revision"]),
        stable_revision=str(status_canary.get("stableRevision") or ""),
        step=int(status_canary.get("step") or 0),
        weight=int(status_canary.get("weight") or 0),
        step_started_at=parse_rfc3339(status_canary.get("stepStartedAt")),
        failed_analyses=int(status_canary.get("failedAnalyses") or 0),
        last_analysis=dict(last) if isinstance(last, Mapping) else None,
        last_analysis_at=parse_rfc3339(last.get("time")) if isinstance(last, Mapping) else None,
        paused_at=parse_rfc3339(status_canary.get("pausedAt")),
        message=str(status_canary.get("message") or ""),
    )


def to_status(state: CanaryState) -> dict[str, Any]:
    """status.canary on the wire (camelCase, no nulls)."""
    out: dict[str, Any] = {
        "phase": state.phase,
        "revision": state.revision,
        "stableRevision": state.stable_revision,
        "step": state.step,
        "weight": state.weight,
        "failedAnalyses": state.failed_analyses,
    }
    if state.step_started_at is not None:
        out["stepStartedAt"] = rfc3339(state.step_started_at)
    if state.paused_at is not None:
        out["pausedAt"] = rfc3339(state.paused_at)
    if state.last_analysis is not None:
        out["lastAnalysis"] = dict(state.last_analysis)
    if state.message:
        out["message"] = state.message
    return out


def analysis_record(result: Result, now: float) -> dict[str, Any]:
    record: dict[str, Any] = {
        "time": rfc3339(now),
        "verdict": result.verdict.value,
        "message": result.message,
        "requests": result.requests,
        "errorRate": _round(result.error_rate),
        "stableErrorRate": _round(result.stable_error_rate),
        "ttftP95Ratio": _round(result.ttft_p95_ratio),
        "ttftP95Seconds": _round(result.ttft_p95_seconds),
        "stableTtftP95Seconds": _round(result.stable_ttft_p95_seconds),
        "failedCheck": result.failed_check,
    }
    return {k: v for k, v in record.items() if v is not None}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# -- decisions ------------------------------------------------------------------------------


def canary_replicas(weight: int, stable_replicas: int) -> int:
    """ceil(weight x stable replicas), at least 1."""
    return max(1, math.ceil(weight * max(stable_replicas, 0) / 100))


def analysis_due(spec: CanarySpec, state: CanaryState | None, now: float) -> bool:
    """Whether the controller should ask Prometheus before deciding."""
    if state is None or state.phase != PROGRESSING or state.step_started_at is None:
        return False
    since = max(state.step_started_at, state.last_analysis_at or state.step_started_at)
    return now >= since + parse_duration_seconds(spec.analysis.interval)


def decide(spec: CanarySpec, state: CanaryState | None, obs: Observed) -> Decision:
    if state is not None and state.phase in ENDED:
        ended = _ended(state, obs)
        if ended is not None:
            return ended
        state = None  # a new revision: a new canary
    if state is None:
        if obs.stable_revision is None or obs.stable_revision == obs.desired_revision:
            return Decision(state=None)
        return _start(spec, obs, reason="CanaryStarted")
    if state.phase in (PROMOTING, DRAINING):
        return _promotion(state, obs)
    if obs.command == "abort":
        return _end(state, obs, ABORTED, "Aborted", "aborted by request")
    if obs.desired_revision != state.revision:
        return _spec_changed(spec, state, obs)
    if obs.command == "promote":
        return _promotion(_enter_promotion(state, obs.now, "promotion requested"), obs)
    if state.phase == PAUSED:
        return _paused(spec, state, obs)
    if obs.command == "pause":
        paused = replace(state, phase=PAUSED, paused_at=obs.now, message="paused by request")
        return _paused(spec, paused, obs)
    return _progress(spec, state, obs)


def _ended(state: CanaryState, obs: Observed) -> Decision | None:
    """A rolled back or aborted canary: hold the stable until the spec moves."""
    if obs.desired_revision in (state.stable_revision, obs.stable_revision):
        return Decision(
            state=None,
            progressing=(
                False,
                "Reverted",
                f"spec is back at the stable revision {state.stable_revision}",
            ),
        )
    if obs.desired_revision != state.revision:
        return None
    return _holding_stable(state)


def _holding_stable(state: CanaryState) -> Decision:
    reason = "CanaryRolledBack" if state.phase == ROLLED_BACK else "CanaryAborted"
    return Decision(
        state=state,
        stable_template="live",
        progressing=(False, state.phase, state.message),
        degraded=(
            reason,
            f"revision {state.revision} was {state.phase.lower()}: {state.message}; "
            "the stable revision keeps serving. Edit the spec to try another revision, or "
            "revert it to clear this",
        ),
    )


def _start(spec: CanarySpec, obs: Observed, *, reason: str) -> Decision:
    assert obs.stable_revision is not None
    weight = spec.steps[0].weight
    state = CanaryState(
        phase=PROGRESSING,
        revision=obs.desired_revision,
        stable_revision=obs.stable_revision,
        step=0,
        weight=weight,
        message=f"step 1/{len(spec.steps)}: waiting for the canary's first ready pod",
    )
    event = Event(
        "Normal",
        reason,
        f"canary of revision {obs.desired_revision} beside stable {obs.stable_revision}, "
        f"step 1/{len(spec.steps)} at {weight}%",
    )
    decision = _progress(spec, state, replace(obs, analysis_ran=False, command=None))
    return replace(decision, events=(event, *decision.events))


def _spec_changed(spec: CanarySpec, state: CanaryState, obs: Observed) -> Decision:
    if obs.desired_revision == state.stable_revision:
        return Decision(
            state=None,
            progressing=(
                False,
                "Reverted",
                f"spec reverted to the stable revision {state.stable_revision}; canary removed",
            ),
            events=(
                Event("Normal", "CanaryReverted", f"canary {state.revision} removed: reverted"),
            ),
        )
    # The stable is untouched; the canary restarts with the newer revision.
    return _start(
        spec, replace(obs, stable_revision=state.stable_revision), reason="CanaryReplaced"
    )


def _enter_promotion(state: CanaryState, now: float, why: str) -> CanaryState:
    return replace(
        state,
        phase=PROMOTING,
        step_started_at=now,
        paused_at=None,
        message=f"promoting revision {state.revision}: {why}",
    )


def _promotion(state: CanaryState, obs: Observed) -> Decision:
    """Promoting: the stable rolls to the new template while the canary keeps its weight.
    Draining: weight 0 for DRAIN_SECONDS, then the canary goes."""
    replicas = canary_replicas(max(state.weight, 1), obs.stable_replicas)
    # A spec edit during promotion waits: the stable keeps what it is rolling to.
    template: StableTemplate = "desired" if obs.desired_revision == state.revision else "live"
    if state.phase == PROMOTING:
        if obs.stable_revision == state.revision and obs.stable_rolled_out:
            draining = replace(
                state,
                phase=DRAINING,
                step_started_at=obs.now,
                message=f"revision {state.revision} promoted; draining the canary",
            )
            return _promotion(draining, obs)
        return Decision(
            state=state,
            stable_template=template,
            canary_replicas=replicas,
            weight=state.weight,
            progressing=(True, PROMOTING, state.message),
        )
    started = state.step_started_at if state.step_started_at is not None else obs.now
    remaining = started + DRAIN_SECONDS - obs.now
    if remaining > 0:
        return Decision(
            state=replace(state, weight=0),
            stable_template=template,
            canary_replicas=replicas,
            weight=0,
            progressing=(True, DRAINING, state.message),
            wake_after=max(MIN_WAKE_SECONDS, remaining),
        )
    return Decision(
        state=None,
        stable_template=template,
        progressing=(False, "Promoted", f"revision {state.revision} is the stable revision"),
        events=(Event("Normal", "CanaryPromoted", f"revision {state.revision} promoted"),),
    )


def _paused(spec: CanarySpec, state: CanaryState, obs: Observed) -> Decision:
    if obs.command == "resume":
        held = obs.now - (state.paused_at if state.paused_at is not None else obs.now)
        resumed = replace(
            state,
            phase=PROGRESSING,
            paused_at=None,
            # The pause does not count towards the step's time or the next analysis.
            step_started_at=None if state.step_started_at is None else state.step_started_at + held,
            last_analysis_at=None
            if state.last_analysis_at is None
            else state.last_analysis_at + held,
            message="resumed",
        )
        return _progress(spec, resumed, replace(obs, command=None, analysis_ran=False))
    return Decision(
        state=state,
        stable_template="live",
        canary_replicas=canary_replicas(state.weight, obs.stable_replicas),
        weight=state.weight,
        progressing=(
            True,
            PAUSED,
            f"paused at step {state.step + 1}/{len(spec.steps)}, weight {state.weight}%",
        ),
    )


def _progress(spec: CanarySpec, state: CanaryState, obs: Observed) -> Decision:
    steps = spec.steps
    events: list[Event] = []
    if state.step_started_at is None:
        if obs.canary_ready <= 0:
            return _holding(spec, state, obs, events)
        state = replace(state, step_started_at=obs.now, message=_step_message(spec, state))
    if obs.analysis_ran and analysis_due(spec, state, obs.now):
        result = evaluate(spec.analysis, obs.sample, obs.sample_error)
        state = replace(
            state, last_analysis=analysis_record(result, obs.now), last_analysis_at=obs.now
        )
        if result.verdict is Verdict.FAIL:
            state = replace(state, failed_analyses=state.failed_analyses + 1)
            limit = spec.analysis.failure_limit
            events.append(
                Event(
                    "Warning",
                    "CanaryAnalysisFailed",
                    f"{result.message} ({state.failed_analyses}/{limit} failed analyses)",
                )
            )
            if state.failed_analyses >= limit:
                return _end(state, obs, ROLLED_BACK, "RolledBack", result.message, events)
    started = state.step_started_at
    assert started is not None
    pause = parse_duration_seconds(steps[state.step].pause)
    step_ends = started + pause
    if obs.now >= step_ends and state.verdict_in_step() == Verdict.PASS.value:
        if state.step + 1 < len(steps):
            state = replace(
                state,
                step=state.step + 1,
                weight=steps[state.step + 1].weight,
                step_started_at=obs.now,
            )
            state = replace(state, message=_step_message(spec, state))
            events.append(
                Event(
                    "Normal",
                    "CanaryStep",
                    f"step {state.step + 1}/{len(steps)}: weight {state.weight}%",
                )
            )
            step_ends = obs.now + parse_duration_seconds(steps[state.step].pause)
        else:
            promoting = _enter_promotion(state, obs.now, "every step passed its analysis")
            decision = _promotion(promoting, replace(obs, command=None))
            return replace(decision, events=(*events, *decision.events))
    else:
        state = replace(state, message=_hold_reason(spec, state, obs.now, step_ends))
    interval = parse_duration_seconds(spec.analysis.interval)
    next_analysis = max(state.step_started_at or obs.now, state.last_analysis_at or 0.0) + interval
    wake = min(next_analysis, step_ends) if obs.now < step_ends else next_analysis
    return Decision(
        state=state,
        stable_template="live",
        canary_replicas=canary_replicas(state.weight, obs.stable_replicas),
        weight=state.weight,
        progressing=(True, PROGRESSING, state.message),
        events=tuple(events),
        wake_after=max(MIN_WAKE_SECONDS, wake - obs.now),
    )


def _holding(spec: CanarySpec, state: CanaryState, obs: Observed, events: list[Event]) -> Decision:
    """No canary pod is ready yet: the weight is routed (the gateway sends a track without
    ready backends' share to the others) but the step's time has not begun."""
    return Decision(
        state=state,
        stable_template="live",
        canary_replicas=canary_replicas(state.weight, obs.stable_replicas),
        weight=state.weight,
        progressing=(True, "WaitingForCanary", state.message),
        events=tuple(events),
    )


def _step_message(spec: CanarySpec, state: CanaryState) -> str:
    return f"step {state.step + 1}/{len(spec.steps)} at weight {state.weight}%"


def _hold_reason(spec: CanarySpec, state: CanaryState, now: float, step_ends: float) -> str:
    base = _step_message(spec, state)
    verdict = state.verdict_in_step()
    if now < step_ends:
        # A fixed time, not a countdown: the message (and so status) changes only when the
        # state does, not at every reconcile.
        tail = f"; last analysis {verdict}" if verdict else ""
        return f"{base}: paused until {rfc3339(step_ends)}{tail}"
    if verdict is None:
        return f"{base}: pause over, waiting for a passing analysis"
    message = (state.last_analysis or {}).get("message", "")
    return f"{base}: held, last analysis {verdict}: {message}"


def _end(
    state: CanaryState,
    obs: Observed,
    phase: str,
    reason: str,
    why: str,
    events: list[Event] | None = None,
) -> Decision:
    """Rollback or abort: weight 0 at once, the canary Deployment goes, the revision is
    remembered."""
    ended = replace(state, phase=phase, weight=0, paused_at=None, message=why)
    warning = Event(
        "Warning",
        "CanaryRolledBack" if phase == ROLLED_BACK else "CanaryAborted",
        f"revision {state.revision} {reason.lower()} at step {state.step + 1}, weight "
        f"{state.weight}%: {why}",
    )
    return replace(_holding_stable(ended), events=(*(events or []), warning))
