"""Canary rollouts end to end: the chart's operator and gateway as pods, engines that answer,
the real Prometheus scraping the gateway, and continuous OpenAI SDK load through the gateway.

Each test edits a running LLMDeployment under `rollout.strategy: Canary` and follows what the
operator does from status, the cluster and the gateway's own counters.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families
from tests.chart.test_argocd_health import health

from harness import kube
from harness.providers import Cluster
from harness.serving import (
    GATEWAY_PORT,
    Load,
    Serving,
    installed,
    llmd,
    pod_prometheus_url,
    reach,
)
from llm_operator.constants import ANNOTATION_ROLLOUT_COMMAND, LABEL_TRACK

STEPS = [{"weight": 20, "pause": "20s"}, {"weight": 50, "pause": "20s"}]
ANALYSIS = {
    "interval": "10s",
    "minRequests": 10,
    "failureLimit": 2,
    "maxErrorRate": 0.05,
    "maxTTFTp95Ratio": 1.5,
}
# Every engine: 20 ms a token, and a TTFT high enough that twice it lands in another bucket.
ENGINE_ENV = [{"name": "LLMOP_SIM_TTFT_BASE", "value": "0.3"}]


def canary_llmd(name: str, extra_env: list[dict[str, str]] | None = None) -> dict[str, Any]:
    body = llmd(name, replicas=2, env=ENGINE_ENV + (extra_env or []))
    body["spec"]["rollout"] = {
        "strategy": "Canary",
        "canary": {"steps": STEPS, "analysis": ANALYSIS},
    }
    return body


@pytest.fixture(scope="module")
def serving(
    cluster: Cluster, api_client: client.ApiClient, crd_names: list[str], tmp_path_factory: Any
) -> Iterator[Serving]:
    url = pod_prometheus_url(cluster)
    if url is None:
        pytest.skip("canary tests need a Prometheus that scrapes the gateway, reachable from "
                    "the operator's pod: set LLMOP_E2E_PROMETHEUS_POD_URL")  # fmt: skip
    home = tmp_path_factory.mktemp("helm-home")
    with installed(cluster, api_client, home, "canary", f"operator.prometheusUrl={url}") as s:
        yield s


@dataclass
class Watch:
    """Status, canary pods and the gateway's per-track counters, sampled every half second."""

    serving: Serving
    name: str
    base_url: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    http: urllib3.PoolManager = field(default_factory=urllib3.PoolManager)

    def counts(self) -> dict[str, float]:
        """Requests answered per track, from the gateway's /metrics."""
        text = self.http.request("GET", f"{self.base_url}/metrics", timeout=5).data.decode()
        totals: dict[str, float] = {"stable": 0.0, "canary": 0.0}
        for family in text_string_to_metric_families(text):
            if family.name != "llm_gateway_requests":
                continue
            for sample in family.samples:
                labels = sample.labels
                if sample.name.endswith("_total") and labels.get("model") == self.name:
                    totals[labels["track"]] = totals.get(labels["track"], 0.0) + sample.value
        return totals

    def sample(self) -> dict[str, Any]:
        obj = self.serving.get(self.name)
        canary = (obj.get("status") or {}).get("canary") or {}
        counts = self.counts()
        entry = {"t": time.monotonic(), "obj": obj, "canary": canary, "answered": counts}
        self.samples.append(entry)
        return entry

    def until(self, what: str, check: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.sample()
            if check(entry):
                return entry
            time.sleep(0.5)
        last = self.samples[-1]["obj"].get("status") if self.samples else None
        raise AssertionError(f"timed out waiting for {what}; status: {json.dumps(last)[:3000]}")

    def share_per_step(self, settle: float = 5.0) -> dict[int, tuple[float, float]]:
        """The canary's share of answered requests while each step held, from `settle`
        seconds after the step began (the table's way to the gateway) to its end."""
        spans: dict[int, list[dict[str, Any]]] = {}
        for entry in self.samples:
            canary = entry["canary"]
            if canary.get("phase") == "Progressing" and canary.get("stepStartedAt"):
                spans.setdefault(int(canary["step"]), []).append(entry)
        shares: dict[int, tuple[float, float]] = {}
        for step, entries in spans.items():
            inside = [e for e in entries if e["t"] >= entries[0]["t"] + settle]
            if len(inside) < 2:
                continue
            first, last = inside[0], inside[-1]
            canary = last["answered"]["canary"] - first["answered"]["canary"]
            total = canary + last["answered"]["stable"] - first["answered"]["stable"]
            shares[step] = (100 * canary / total if total else 0.0, total)
        return shares


@contextlib.contextmanager
def under_load(
    serving: Serving, name: str, clients: int = 4, streams: bool | None = None
) -> Iterator[tuple[Load, Watch]]:
    """Continuous OpenAI SDK load on `name` through the gateway, and a Watch of it."""
    with reach(serving.cluster, serving.gateway_pod(), GATEWAY_PORT) as base:
        serving.wait_routed(base, name)
        with Load(base, name, clients=clients, streams=streams) as load:
            load.wait_for_requests(10)
            yield load, Watch(serving, name, base)


def canary_pods(serving: Serving, name: str) -> list[Any]:
    core = client.CoreV1Api(serving.api)
    return core.list_namespaced_pod(
        serving.namespace, label_selector=f"llmoperator.io/deployment={name},{LABEL_TRACK}=canary"
    ).items


def events(serving: Serving, name: str) -> list[Any]:
    return kube.events_for(serving.api, serving.namespace, name, kind="LLMDeployment")


def edit_env(serving: Serving, name: str, env: list[dict[str, str]]) -> None:
    """A new pod template: engine.env replaced by `env`."""
    serving.objects().patch_namespaced_custom_object(
        "llmoperator.io", "v1alpha1", serving.namespace, "llmdeployments", name,
        {"spec": {"engine": {"env": env}}},
    )  # fmt: skip


NEXT_REVISION = [*ENGINE_ENV, {"name": "REVISION", "value": "2"}]


def start(serving: Serving, name: str) -> str:
    serving.apply(canary_llmd(name))
    obj = serving.wait_ready(name, timeout=180)
    return str(obj["status"]["revision"])


def test_a_good_revision_steps_through_and_is_promoted_with_no_failed_request(
    serving: Serving,
) -> None:
    name = "canary-good"
    old = start(serving, name)
    with under_load(serving, name, clients=4) as (load, watch):
        edit_env(serving, name, NEXT_REVISION)
        started = watch.until("a canary", lambda e: e["canary"].get("phase"), 60)
        new = started["canary"]["revision"]
        assert new != old and started["canary"]["stableRevision"] == old
        watch.until("the last step", lambda e: e["canary"].get("step") == 1, 120)
        watch.until("promotion", lambda e: e["canary"].get("phase") == "Promoting", 120)
        done = watch.until("the canary to finish", lambda e: not e["canary"], 240)
        load.wait_for_requests(20)
    assert load.failures == [], load.failures[:5]
    status = done["obj"]["status"]
    assert status["revision"] == new
    condition = next(c for c in status["conditions"] if c["type"] == "CanaryProgressing")
    assert (condition["status"], condition["reason"]) == ("False", "Promoted")
    kube.wait_until("the canary pods to go", lambda: not canary_pods(serving, name), 60)
    shares = watch.share_per_step()
    assert set(shares) == {0, 1}, shares
    for step, (share, total) in shares.items():
        assert total >= 50, (step, total)
        assert abs(share - STEPS[step]["weight"]) <= 2, (step, share, total)
    reasons = [e.reason for e in events(serving, name)]
    assert {"CanaryStarted", "CanaryStep", "CanaryPromoted"} <= set(reasons), reasons
    print(f"per-step canary share: {shares}")


@pytest.mark.parametrize(
    ("name", "bad_env", "streams", "check"),
    [
        (
            "canary-errors",
            [*ENGINE_ENV, {"name": "LLMOP_SIM_ERROR_RATE_500", "value": "0.3"}],
            None,
            "error-rate",
        ),
        # Twice the TTFT; streamed answers only, so TTFT is the first token's time alone.
        ("canary-slow", [{"name": "LLMOP_SIM_TTFT_BASE", "value": "0.6"}], True, "ttft-ratio"),
    ],
)
def test_a_bad_revision_is_rolled_back_with_the_numbers(
    serving: Serving, name: str, bad_env: list[dict[str, str]], streams: bool | None, check: str
) -> None:
    old = start(serving, name)
    interval = 10.0
    with under_load(serving, name, clients=4, streams=streams) as (_load, watch):
        edit_env(serving, name, bad_env)
        first = watch.until(
            "the canary's first traffic", lambda e: e["canary"].get("stepStartedAt"), 120
        )
        rolled = watch.until("a rollback", lambda e: e["canary"].get("phase") == "RolledBack", 120)
    elapsed = rolled["t"] - first["t"]
    limit = ANALYSIS["failureLimit"]
    assert elapsed <= (limit + 1) * interval + 5, elapsed  # + the status' way back to us
    canary = rolled["canary"]
    assert canary["weight"] == 0 and canary["failedAnalyses"] >= limit
    assert canary["lastAnalysis"]["failedCheck"] == check
    assert canary["lastAnalysis"]["verdict"] == "Fail"
    obj = rolled["obj"]
    assert obj["status"]["revision"] == old
    assert health(obj)[0] == "Degraded"
    kube.wait_until("the canary pods to go", lambda: not canary_pods(serving, name), 60)
    warnings = [e for e in events(serving, name) if e.reason == "CanaryRolledBack"]
    assert len(warnings) == 1 and warnings[0].type == "Warning"
    number = "%" if check == "error-rate" else "x the stable"
    assert number in warnings[0].message, warnings[0].message
    # Not restarted in a loop: the failed revision stays rolled back.
    time.sleep(2 * interval)
    assert serving.get(name)["status"]["canary"]["phase"] == "RolledBack"
    assert not canary_pods(serving, name)
    print(f"{name}: rolled back {elapsed:.1f}s after first traffic; {canary['lastAnalysis']}")


def _prometheus_pid(cluster: Cluster) -> int:
    run = Path(cluster.kubeconfig).parent / "run" / "prometheus.pid"
    return int(json.loads(run.read_text())["pid"])


def test_without_prometheus_nothing_is_promoted_and_status_says_why(serving: Serving) -> None:
    if serving.cluster.provider != "local":
        pytest.skip("stops the local cluster's Prometheus by its pid")
    import os
    import signal

    from harness.providers import _devcluster

    name = "canary-blind"
    start(serving, name)
    with under_load(serving, name, clients=2) as (load, watch):
        os.kill(_prometheus_pid(serving.cluster), signal.SIGTERM)
        try:
            edit_env(serving, name, NEXT_REVISION)
            watch.until(
                "an inconclusive analysis",
                lambda e: (e["canary"].get("lastAnalysis") or {}).get("verdict") == "Inconclusive",
                90,
            )
            # Well past the first step's pause: still at step 1, weight 20.
            time.sleep(30)
            entry = watch.sample()
        finally:
            _devcluster("up")  # Prometheus back for everyone else
    assert load.failures == [], load.failures[:5]
    canary = entry["canary"]
    assert (canary["phase"], canary["step"], canary["weight"]) == ("Progressing", 0, 20)
    assert "did not answer" in canary["lastAnalysis"]["message"]
    assert "Inconclusive" in canary["message"]


def test_abort_and_promote_by_command_leave_the_spec_untouched(serving: Serving) -> None:
    import subprocess
    import sys

    cli = [sys.executable, "-m", "llm_operator.cli", "rollout"]
    env = serving.cluster.env()

    def rollout(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args, "-n", serving.namespace],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    for name, action, expected in (
        ("canary-abort", "abort", "Aborted"),
        ("canary-promote", "promote", None),
    ):
        start(serving, name)
        with under_load(serving, name, clients=2) as (load, watch):
            edit_env(serving, name, NEXT_REVISION)
            running = watch.until("a canary", lambda e: e["canary"].get("stepStartedAt"), 120)
            spec_before = serving.get(name)["spec"]
            generation = serving.get(name)["metadata"]["generation"]
            done = rollout(action, name)
            assert done.returncode == 0, done.stderr
            if expected:
                entry = watch.until(
                    expected, lambda e, want=expected: e["canary"].get("phase") == want, 60
                )
                assert entry["canary"]["weight"] == 0
            else:
                entry = watch.until("promoted", lambda e: not e["canary"], 180)
                assert entry["obj"]["status"]["revision"] == running["canary"]["revision"]
        assert load.failures == [], load.failures[:5]
        after = serving.get(name)
        assert after["spec"] == spec_before
        assert after["metadata"]["generation"] == generation
        assert ANNOTATION_ROLLOUT_COMMAND not in (after["metadata"].get("annotations") or {})
        status = rollout("status", name)
        assert status.returncode == 0 and name in status.stdout, status.stderr
        refused = rollout("resume", name)
        assert refused.returncode == 1 and "cannot resume" in refused.stderr
