"""Progress-based liveness decisions (llm_operator.stall): a busy engine whose token counter
stands still for the timeout is restarted; idle, loading and moving engines never are; the
per-LLMDeployment and cluster-wide limits hold."""

from __future__ import annotations

from llm_operator.stall import PodView, Restart, Sample, StallTracker, per_pod_query

BUSY = Sample(running=2, waiting=3, tokens=100)
IDLE = Sample(running=0, waiting=0, tokens=100)


def pod(name: str, owner: str = "m", ready_since: float | None = 0.0) -> PodView:
    return PodView(
        namespace="ns", name=name, uid=f"uid-{name}", owner=owner, ready_since=ready_since
    )


def run(tracker: StallTracker, pods: list[PodView], samples: dict[str, Sample], until: float,
        step: float = 15.0) -> list[tuple[float, Restart]]:  # fmt: skip
    out = []
    now = 0.0
    while now <= until:
        keyed = {("ns", name): s for name, s in samples.items()}
        out += [(now, r) for r in tracker.observe(pods, keyed, now)]
        now += step
    return out


def test_a_busy_engine_without_tokens_is_restarted_after_the_timeout_with_the_numbers() -> None:
    tracker = StallTracker(timeout_seconds=60)
    restarts = run(tracker, [pod("a")], {"a": BUSY}, until=120)
    [(when, restart)] = restarts
    assert when == 60
    assert restart.pod.name == "a" and restart.stalled_seconds == 60
    assert restart.message == (
        "engine pod a restarted: 2 requests running and 3 waiting, generated-token counter "
        "stuck at 100 for 60s"
    )


def test_an_idle_engine_is_never_restarted() -> None:
    assert run(StallTracker(timeout_seconds=60), [pod("a")], {"a": IDLE}, until=600) == []


def test_a_loading_engine_is_never_restarted_and_its_clock_starts_when_ready() -> None:
    tracker = StallTracker(timeout_seconds=60)
    # Not Ready (weights loading): never, however long.
    assert run(tracker, [pod("a", ready_since=None)], {"a": BUSY}, until=600) == []
    # Ready at 500: counted from then (due at 560, seen at the next look, 570), not from
    # the first busy sample.
    tracker = StallTracker(timeout_seconds=60)
    restarts = run(tracker, [pod("a", ready_since=500)], {"a": BUSY}, until=600)
    assert [when for when, _ in restarts] == [570]


def test_moving_tokens_or_a_pause_reset_the_clock() -> None:
    tracker = StallTracker(timeout_seconds=60)
    p = [pod("a")]
    for now, sample in [(0, BUSY), (45, BUSY), (50, IDLE), (60, BUSY), (105, BUSY)]:
        assert tracker.observe(p, {("ns", "a"): sample}, now) == []
    moved = Sample(running=2, waiting=0, tokens=101)
    assert tracker.observe(p, {("ns", "a"): moved}, 115) == []
    assert tracker.observe(p, {("ns", "a"): moved}, 170) == []
    assert len(tracker.observe(p, {("ns", "a"): moved}, 175)) == 1


def test_no_sample_is_no_reason_to_restart() -> None:
    tracker = StallTracker(timeout_seconds=60)
    run(tracker, [pod("a")], {"a": BUSY}, until=45)
    assert tracker.observe([pod("a")], {}, 60) == []
    # The clock starts again once data is back.
    assert tracker.observe([pod("a")], {("ns", "a"): BUSY}, 75) == []


def test_one_restart_per_llmdeployment_per_timeout() -> None:
    tracker = StallTracker(timeout_seconds=60, max_per_minute=10)
    pods = [pod("a"), pod("b")]
    restarts = run(tracker, pods, {"a": BUSY, "b": BUSY}, until=120)
    assert [(when, r.pod.name) for when, r in restarts] == [(60, "a"), (120, "b")]


def test_the_cluster_wide_cap_per_minute() -> None:
    tracker = StallTracker(timeout_seconds=30, max_per_minute=2)
    pods = [pod(f"p{i}", owner=f"m{i}") for i in range(5)]
    restarts = run(tracker, pods, {f"p{i}": BUSY for i in range(5)}, until=150)
    times = [when for when, _ in restarts]
    assert times[:2] == [30, 30]
    assert all(sum(1 for t in times if s <= t < s + 60) <= 2 for s in times)
    # Everyone in turn, two a minute.
    assert {r.pod.name for _, r in restarts[:5]} == {f"p{i}" for i in range(5)}


def test_the_timeout_zero_turns_it_off() -> None:
    assert run(StallTracker(timeout_seconds=0), [pod("a")], {"a": BUSY}, until=600) == []


def test_the_per_pod_query_keeps_the_configured_labels() -> None:
    query = per_pod_query("vllm:num_requests_running", "kubernetes_namespace", "pod_name")
    assert query == "sum by (kubernetes_namespace, pod_name) (vllm:num_requests_running)"
