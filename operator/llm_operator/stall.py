"""Progress-based liveness (pure): which engine pods are stalled and may be restarted now.

A hung engine keeps answering `/health` (vLLM's check is the HTTP server, not the GPU), so
Kubernetes' probes never see it. Progress does: requests running or waiting while the
generated-token counter stands still. The operator samples each engine pod's counters from
Prometheus every CHECK_SECONDS (controller/day2.py) and this module keeps, per pod, since when
it has made no progress while busy; the controller deletes the pods `decide` returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

RUNNING_METRIC = "vllm:num_requests_running"
WAITING_METRIC = "vllm:num_requests_waiting"
GENERATION_METRIC = "vllm:generation_tokens_total"
PROMPT_METRIC = "vllm:prompt_tokens_total"
#: How often the operator samples; a stall is seen at most this much after its timeout.
CHECK_SECONDS = 15.0
#: Cluster-wide restarts are counted over this window (the cap is per minute).
CAP_WINDOW_SECONDS = 60.0


def per_pod_query(metric: str, namespace_label: str, pod_label: str) -> str:
    """One series per engine pod (summed over whatever other labels a scrape adds)."""
    return f"sum by ({namespace_label}, {pod_label}) ({metric})"


@dataclass(frozen=True)
class Sample:
    """What one engine pod's metrics say now."""

    running: float
    waiting: float
    tokens: float
    """The generated-token counter."""


@dataclass(frozen=True)
class PodView:
    """What the pod object says: which LLMDeployment, and whether it has finished loading."""

    namespace: str
    name: str
    uid: str
    owner: str
    ready_since: float | None
    """When its Ready condition last turned True (Unix time); None while not Ready (still
    loading weights, or failing its readiness check)."""


@dataclass(frozen=True)
class Restart:
    pod: PodView
    running: float
    waiting: float
    tokens: float
    stalled_seconds: float

    @property
    def message(self) -> str:
        return (
            f"engine pod {self.pod.name} restarted: {self.running:g} requests running and "
            f"{self.waiting:g} waiting, generated-token counter stuck at {self.tokens:g} for "
            f"{self.stalled_seconds:.0f}s"
        )


@dataclass
class _Progress:
    tokens: float
    since: float
    """Since when the pod has been busy with the counter at `tokens`."""


@dataclass
class StallTracker:
    """Per-pod progress, and the restarts done lately (for the rate limits)."""

    timeout_seconds: float
    max_per_minute: int = 1
    progress: dict[str, _Progress] = field(default_factory=dict)
    restarted_at: dict[tuple[str, str], float] = field(default_factory=dict)
    """Last restart per LLMDeployment (namespace, name)."""
    recent: list[float] = field(default_factory=list)
    """Times of the restarts of the last CAP_WINDOW_SECONDS, cluster-wide."""

    def observe(
        self, pods: Iterable[PodView], samples: Mapping[tuple[str, str], Sample], now: float
    ) -> list[Restart]:
        """Update every pod's progress and return the restarts due now, within the limits.
        A pod with no sample (not scraped yet, or Prometheus lost it) is left alone: no
        data is never a reason to restart."""
        stalled: list[Restart] = []
        seen: set[str] = set()
        for pod in pods:
            seen.add(pod.uid)
            sample = samples.get((pod.namespace, pod.name))
            if sample is None or pod.ready_since is None:
                self.progress.pop(pod.uid, None)
                continue
            busy = sample.running + sample.waiting > 0
            known = self.progress.get(pod.uid)
            if not busy or known is None or sample.tokens != known.tokens:
                # Idle, or it moved: the clock starts again (not before the pod was Ready,
                # so loading time never counts).
                self.progress[pod.uid] = _Progress(sample.tokens, max(now, pod.ready_since))
                continue
            # Busy since `known.since` without a token; only counted from its Ready time.
            since = max(known.since, pod.ready_since)
            if self.timeout_seconds > 0 and now - since >= self.timeout_seconds:
                stalled.append(
                    Restart(pod, sample.running, sample.waiting, sample.tokens, now - since)
                )
        for uid in set(self.progress) - seen:
            del self.progress[uid]
        return self._limit(stalled, now)

    def _limit(self, stalled: list[Restart], now: float) -> list[Restart]:
        """At most one restart per LLMDeployment per timeout, and max_per_minute in the
        cluster: a stall everywhere (Prometheus serving stale data, a shared storage hang)
        must not take every replica down at once. The longest stalled go first."""
        self.recent = [t for t in self.recent if now - t < CAP_WINDOW_SECONDS]
        chosen: list[Restart] = []
        for restart in sorted(stalled, key=lambda r: -r.stalled_seconds):
            owner = (restart.pod.namespace, restart.pod.owner)
            last = self.restarted_at.get(owner)
            if last is not None and now - last < self.timeout_seconds:
                continue
            if len(self.recent) >= self.max_per_minute:
                break
            self.restarted_at[owner] = now
            self.recent.append(now)
            self.progress.pop(restart.pod.uid, None)
            chosen.append(restart)
        return chosen
