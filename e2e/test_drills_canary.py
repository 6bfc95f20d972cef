"""Drill: the operator SIGKILLed at random moments, again and again, while a canary steps
(issue 17: "no lost status, and no canary restarted from step 0").

A Ready LLMDeployment (2 replicas of engines that answer) serves OpenAI SDK load through the
chart's gateway; it is edited to a new revision under `rollout.strategy: Canary` with four
steps and an analysis (the local Prometheus scraping the gateway) that passes. While the canary
steps, is promoted and drains, the operator is killed with SIGKILL every few seconds and
started again at once. When a canary is promoted before the kills are spent, the next revision
starts another one (so `make chaos` can spend 100 kills across several canaries).

How the kill is made: the chart is installed (gateway and RBAC as a user has them) and its
operator Deployment scaled to 0; the operator runs on this host as a subprocess
(`llm-operator run`, e2e/test_operator.py's OperatorProcess) with the cluster's kubeconfig and
a Prometheus URL this host reaches, and is killed by its PID. That works on the local cluster,
kind, or any KUBECONFIG cluster. Killing the operator pod's process would not: on kind a pod's
process is in a node container this host cannot signal, `kubectl exec ... kill -9 1` is
ignored by a container's PID 1, and the kubelet restarts a killed container with a growing
back-off (10 s doubling to 5 minutes), so the drill would measure the kubelet, not the
operator.

What the design says a restart does: the state of a canary is only what status.canary holds
(rollout/machine.py), so a new process resumes the same step with the same stepStartedAt; the
pause counts from the step's first traffic and is neither restarted nor cut short; Promoting
and Draining keep their start too (the 30 s drain is not restarted).

Checked from status and the Deployments, sampled every 0.5 s, for each canary: phase and step
never go backwards (never to step 0 once past it); one stepStartedAt per step and phase, never
reset or dropped; every step lasts at least its pause and at most its pause + 2 analysis
intervals + 5 s (two analyses may be Inconclusive on a cold window, one restart lands in it);
the canary ends Promoted with its revision as the stable one; never more than one canary
Deployment, never a Deployment without its owner, none left after the drain. Besides: no
failed client request (as test_canary), no traceback in any operator log, no Event posted
twice. Each kill is printed with its moment, the canary's phase and step, and the recovery:
kill to the new process' first reconcile, and kill to the next status write.

`make test` runs LLMOP_DRILL_CANARY_KILLS=8 (one canary: 256 s measured with the chart install);
`make chaos` runs 100.
"""

from __future__ import annotations

import datetime
import itertools
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from harness import kube
from harness.providers import Cluster
from harness.serving import Serving, host_prometheus_url, installed, llmd
from llm_operator.constants import LABEL_DEPLOYMENT, LABEL_TRACK
from test_canary import ENGINE_ENV, canary_pods, edit_env, events, under_load
from test_operator import OperatorProcess

pytestmark = pytest.mark.drill

KILLS = int(os.environ.get("LLMOP_DRILL_CANARY_KILLS", "8"))
PAUSE = 15.0
STEPS = [{"weight": w, "pause": f"{PAUSE:.0f}s"} for w in (20, 40, 60, 80)]
INTERVAL = 10.0
ANALYSIS = {
    "interval": f"{INTERVAL:.0f}s",
    "minRequests": 5,
    "failureLimit": 2,
    "maxErrorRate": 0.05,
    "maxTTFTp95Ratio": 1.5,
}
# Seconds an operator lives between its start and its kill: from before its first reconcile
# (its start-up takes 1-3 s here) to past a step's pause.
LIFETIME = (0.5, 15.0)
DRAIN_SECONDS = 30.0  # rollout/machine.py DRAIN_SECONDS
NAME = "cankill"
# Phases in the order a canary goes through them; "" is no canary any more (promoted).
RANK = {"Progressing": 0, "Paused": 0, "Promoting": 1, "Draining": 2, "": 3}


@pytest.fixture
def serving(
    cluster: Cluster, api_client: client.ApiClient, crd_names: list[str], tmp_path_factory: Any
) -> Iterator[Serving]:
    if host_prometheus_url(cluster) is None:
        pytest.skip("the drill's operator runs on this host: set LLMOP_PROMETHEUS_URL to a "
                    "Prometheus that scrapes the gateway, reachable from here")  # fmt: skip
    home = tmp_path_factory.mktemp("helm-home")
    with installed(cluster, api_client, home, "cankill") as s:
        # The chart's operator steps aside for the one this test kills.
        apps = client.AppsV1Api(api_client)
        apps.patch_namespaced_deployment_scale(s.fullname, s.namespace, {"spec": {"replicas": 0}})
        selector = f"app.kubernetes.io/instance={s.release},app.kubernetes.io/component=operator"
        core = client.CoreV1Api(api_client)
        kube.wait_until(
            "the chart's operator pod gone",
            lambda: not core.list_namespaced_pod(s.namespace, label_selector=selector).items,
            timeout=60,
        )
        yield s


def body() -> dict[str, Any]:
    obj = llmd(NAME, replicas=2, env=ENGINE_ENV)
    obj["spec"]["rollout"] = {
        "strategy": "Canary",
        "canary": {"steps": STEPS, "analysis": ANALYSIS},
    }
    return obj


@dataclass
class Sample:
    t: float
    wall: float
    resource_version: str
    generation: int
    status: dict[str, Any]
    canary: dict[str, Any]
    deployments: list[tuple[str, str, bool]]
    """(name, track, owned by this LLMDeployment) of every live Deployment in the namespace."""


@dataclass
class Sampler:
    """status and the namespace's Deployments every half second, in a thread of its own."""

    serving: Serving
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> Sample:
        obj = self.serving.get(NAME)
        uid = obj["metadata"]["uid"]
        apps = client.AppsV1Api(self.serving.api)
        deployments = []
        for d in apps.list_namespaced_deployment(
            self.serving.namespace, label_selector=f"{LABEL_DEPLOYMENT}={NAME}"
        ).items:
            meta = d.metadata
            assert meta is not None
            if meta.deletion_timestamp is not None:
                continue
            refs = [r for r in meta.owner_references or [] if r.controller]
            track = str((meta.labels or {}).get(LABEL_TRACK, ""))
            deployments.append((str(meta.name), track, [r.uid for r in refs] == [uid]))
        status = obj.get("status") or {}
        return Sample(
            t=time.monotonic(),
            wall=time.time(),
            resource_version=obj["metadata"]["resourceVersion"],
            generation=int(obj["metadata"]["generation"]),
            status=status,
            canary=status.get("canary") or {},
            deployments=deployments,
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample())
            except Exception as error:  # every failure is a finding: keep it
                self.errors.append(f"{time.strftime('%H:%M:%S')} {type(error).__name__}: {error}")
            self._stop.wait(0.5)

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None


@dataclass
class Round:
    """One canary: the revision the spec moved to, from its edit to its promotion."""

    index: int
    old_revision: str
    began: float
    revision: str = ""
    ended: float | None = None


@dataclass
class Kill:
    at: float
    wall: str
    round: int
    phase: str
    step: int | None
    up: float | None = None
    """Seconds from the kill until the new process served /metrics."""
    reconciled: float | None = None
    """Seconds from the kill until the new process finished its first reconcile."""
    written: float | None = None
    """Seconds from the kill until the next change of the object (a status write)."""


def reconciles(process: OperatorProcess) -> float:
    try:
        text = process.metrics()
    except OSError:
        return 0.0
    match = re.search(r'^llm_operator_reconciles_total\{result="ok"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def promoted(sample: Sample | None, round_: Round) -> bool:
    """The round's canary is over and its revision is the stable one."""
    if sample is None or sample.canary or not round_.revision:
        return False
    conditions = {c["type"]: c for c in sample.status.get("conditions") or []}
    progressing = conditions.get("CanaryProgressing") or {}
    return (
        sample.status.get("revision") == round_.revision
        and progressing.get("reason") == "Promoted"
        and sample.status.get("observedGeneration") == sample.generation
    )


def started_at(text: str) -> float:
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    return moment.replace(tzinfo=datetime.UTC).timestamp()


def check_round(round_: Round, samples: list[Sample]) -> list[str]:
    """What went wrong in one canary, from its samples (empty: nothing was lost)."""
    problems = []
    mine = [s for s in samples if s.canary.get("revision") == round_.revision]
    if not mine:
        return [f"round {round_.index}: its canary was never seen"]
    first = samples.index(mine[0])
    last = max(i for i, s in enumerate(samples) if s.canary.get("revision") == round_.revision)
    span = samples[first : last + 2]  # and the first sample without it
    rank: tuple[int, int] = (-1, -1)
    starts: dict[tuple[str, int], set[str]] = {}
    for s in span:
        phase = str(s.canary.get("phase") or "")
        if s.canary and s.canary.get("revision") != round_.revision:
            problems.append(f"round {round_.index}: another canary {s.canary.get('revision')}")
            continue
        if phase not in RANK:
            problems.append(f"round {round_.index}: phase {phase} ({s.canary.get('message')})")
            continue
        step = int(s.canary.get("step") or 0) if RANK[phase] == 0 else 0
        now = (RANK[phase], step)
        if now < rank:
            problems.append(f"round {round_.index}: went back from {rank} to {now}")
        rank = max(rank, now)
        key = ("Progressing" if RANK[phase] == 0 else phase, step)
        moment = s.canary.get("stepStartedAt")
        if moment:
            starts.setdefault(key, set()).add(moment)
        elif key in starts:
            problems.append(f"round {round_.index}: stepStartedAt of {key} dropped")
    problems += [
        f"round {round_.index}: {key} started at {sorted(values)} (reset)"
        for key, values in starts.items()
        if len(values) > 1
    ]
    if rank != (RANK[""], 0):
        problems.append(f"round {round_.index}: ended at {rank}, not promoted")
    # Each step's length, from one start to the next (whole seconds on the wire: +-1 s).
    order = [("Progressing", i) for i in range(len(STEPS))] + [("Promoting", 0)]
    moments = [started_at(min(starts[k])) for k in order if k in starts]
    if len(moments) != len(order):
        problems.append(f"round {round_.index}: steps seen {sorted(starts)}")
    for i, (a, b) in enumerate(itertools.pairwise(moments)):
        if not PAUSE - 1 <= b - a <= PAUSE + 2 * INTERVAL + 5:
            problems.append(f"round {round_.index}: step {i} lasted {b - a:.0f} s")
    # The drain is not restarted nor cut short by a restart either.
    if ("Draining", 0) in starts:
        drained = span[-1].wall - started_at(min(starts[("Draining", 0)]))
        if not DRAIN_SECONDS - 1 <= drained <= DRAIN_SECONDS + 15:
            problems.append(f"round {round_.index}: drained for {drained:.0f} s")
    return problems


def check_deployments(samples: list[Sample]) -> list[str]:
    problems = []
    for s in samples:
        canaries = [d for d in s.deployments if d[1] == "canary"]
        if len(canaries) > 1 or len(s.deployments) > 2:
            problems.append(f"{len(s.deployments)} Deployments: {s.deployments}")
        problems += [f"not owned by {NAME}: {d[0]}" for d in s.deployments if not d[2]]
    return sorted(set(problems))


def step_lengths(samples: list[Sample], round_: Round) -> list[float]:
    starts: dict[tuple[str, int], str] = {}
    for s in samples:
        if s.canary.get("revision") == round_.revision and s.canary.get("stepStartedAt"):
            phase = str(s.canary["phase"])
            starts.setdefault((phase, int(s.canary.get("step") or 0)), s.canary["stepStartedAt"])
    moments = sorted(started_at(v) for v in starts.values())
    return [b - a for a, b in itertools.pairwise(moments)]


@pytest.mark.timeout(600 + 15 * KILLS)
def test_kill_9_while_a_canary_steps_loses_no_step(
    serving: Serving, cluster: Cluster, tmp_path: Path
) -> None:
    rng = random.Random(int(os.environ.get("LLMOP_DRILL_SEED", "17")))
    prometheus = host_prometheus_url(cluster)
    assert prometheus is not None
    extra = (
        "--gateway-namespace", serving.namespace,
        "--routes-configmap", "llm-operator-routes",
        "--prometheus-url", prometheus,
    )  # fmt: skip
    logs: list[Path] = []

    def start(index: int) -> OperatorProcess:
        logs.append(tmp_path / f"operator-{index}.log")
        return OperatorProcess(cluster, serving.namespace, logs[-1], extra)

    operator = start(0)
    began = time.monotonic()
    kills: list[Kill] = []
    rounds: list[Round] = []
    try:
        serving.apply(body())
        old = str(serving.wait_ready(NAME, timeout=180)["status"]["revision"])
        with under_load(serving, NAME, clients=4) as (load, _), Sampler(serving) as sampler:

            def next_round(old_revision: str) -> Round:
                index = len(rounds) + 1
                edit_env(serving, NAME, [*ENGINE_ENV, {"name": "REVISION", "value": str(index)}])
                rounds.append(Round(index, old_revision, time.monotonic()))
                return rounds[-1]

            def follow(round_: Round) -> Round:
                """Note the round's revision; once promoted, start the next one while kills
                remain."""
                latest = sampler.latest()
                if latest is None:
                    return round_
                seen = latest.canary.get("revision")
                if not round_.revision and seen not in (None, round_.old_revision):
                    round_.revision = str(latest.canary["revision"])
                if promoted(latest, round_):
                    round_.ended = time.monotonic()
                    if len(kills) < KILLS:
                        return next_round(round_.revision)
                return round_

            def note_reconcile() -> None:
                if kills and kills[-1].reconciled is None and reconciles(operator) > 0:
                    kills[-1].reconciled = time.monotonic() - kills[-1].at

            current = next_round(old)
            while len(kills) < KILLS:
                lifetime = time.monotonic() + rng.uniform(*LIFETIME)
                while time.monotonic() < lifetime:
                    note_reconcile()
                    current = follow(current)
                    time.sleep(0.1)
                status = (serving.get(NAME).get("status") or {}).get("canary") or {}
                kill = Kill(
                    at=time.monotonic(),
                    wall=datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S.%f")[:-3],
                    round=current.index,
                    phase=str(status.get("phase") or "-"),
                    step=status.get("step") if status.get("phase") == "Progressing" else None,
                )
                operator.process.kill()  # SIGKILL
                operator.process.wait(10)
                operator.log.close()
                kills.append(kill)
                operator = start(len(kills))
                kill.up = time.monotonic() - kill.at

            def finished() -> bool:
                note_reconcile()
                return follow(current).ended is not None

            # The last operator runs on: the canary it is in finishes.
            kube.wait_until(
                f"round {current.index} promoted",
                finished,
                timeout=PAUSE * len(STEPS) + 4 * INTERVAL + DRAIN_SECONDS + 120,
                interval=0.1,
            )
            kube.wait_until("the canary pods gone", lambda: not canary_pods(serving, NAME), 60)
            load.wait_for_requests(20)
    finally:
        operator.stop()
    took = time.monotonic() - began
    samples = sampler.samples
    for kill in kills:
        before = [s for s in samples if s.t < kill.at]
        after = [
            s
            for s in samples
            if s.t > kill.at and before and s.resource_version != before[-1].resource_version
        ]
        if after:
            kill.written = after[0].t - kill.at

    lines = [
        f"{k.wall} round {k.round} {k.phase:<11} step {'-' if k.step is None else k.step}  "
        f"up {k.up or 0:.1f} s, reconciled {_secs(k.reconciled)}, next write {_secs(k.written)}"
        for k in kills
    ]
    print(f"\ncanary kill drill: {len(kills)} SIGKILLs over {len(rounds)} canaries, {took:.0f} s")
    print("\n".join(lines))
    for round_ in rounds:
        lengths = ", ".join(f"{x:.0f}" for x in step_lengths(samples, round_))
        print(f"round {round_.index} ({round_.revision}): step, promote, drain lengths {lengths} s")
    reconciled = sorted(k.reconciled for k in kills if k.reconciled is not None)
    if reconciled:
        print(
            f"kill to first reconcile: median {reconciled[len(reconciled) // 2]:.1f} s, "
            f"max {reconciled[-1]:.1f} s ({len(reconciled)} of {len(kills)}; the others were "
            f"killed again first); {load.ok} requests answered, {len(load.failures)} failed"
        )

    assert sampler.errors == [], sampler.errors[:5]
    assert load.failures == [], load.failures[:5]
    problems = [p for r in rounds for p in check_round(r, samples)]
    problems += check_deployments(samples)
    assert problems == [], "\n".join(problems + lines)
    final = samples[-1]
    assert final.status.get("revision") == rounds[-1].revision
    assert final.status.get("phase") == "Ready", final.status
    assert [d[1] for d in final.deployments] == ["stable"], final.deployments
    # No Event twice: CanaryStarted and CanaryPromoted name the revision, CanaryStep does not.
    posted = Counter((e.reason, e.message) for e in events(serving, NAME))
    twice = {
        k: n
        for k, n in posted.items()
        if n > (len(rounds) if k[0] == "CanaryStep" else 1) and k[0].startswith("Canary")
    }
    # Events follow the status write they announce (at most once): a kill between the two
    # would lose one, so they are counted here, not asserted.
    reasons = Counter(reason for reason, _ in posted.elements() if reason.startswith("Canary"))
    print(
        f"Events: {dict(sorted(reasons.items()))}; at most once each: {len(rounds)} "
        f"CanaryStarted and CanaryPromoted, {(len(STEPS) - 1) * len(rounds)} CanaryStep"
    )
    assert twice == {}, twice
    tracebacks = [p.name for p in logs if "Traceback" in p.read_text(errors="replace")]
    assert tracebacks == [], [(p, (tmp_path / p).read_text()[-3000:]) for p in tracebacks]


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"
