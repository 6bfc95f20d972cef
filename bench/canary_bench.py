"""Canary benchmark (not a test): how fast a bad canary is stopped, and how much of the traffic
it answered, on the serving local cluster.

One Helm install (operator and gateway as pods, canary analysis on the local Prometheus), one
LLMDeployment with 2 stable replicas under continuous OpenAI SDK load; each run edits it to a
revision whose engines answer 30% of requests with 500, and measures, from the gateway's own
counters (polled every 0.2 s) and the LLMDeployment's status:

- first canary request: the first attempt the gateway sent to the canary track;
- weight 0: status.canary.weight is 0 (the operator's rollback);
- last canary request: the canary's counters stop moving (the table reached the gateway);
- the canary's share of all requests between its first and last request, and how many client
  requests failed (the gateway retries a canary's 500 on the stable).

Between runs the spec is reverted to the stable revision, which clears the rollback.

    .venv/bin/llm-operator dev cluster up
    .venv/bin/python bench/canary_bench.py --runs 3 --output bench/results/canary.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "e2e"))
sys.path.insert(0, str(REPO))

import urllib3  # noqa: E402
from kubernetes import client, config  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from harness import kube  # noqa: E402
from harness.providers import Cluster  # noqa: E402
from harness.serving import GATEWAY_PORT, LOCAL_PROMETHEUS_POD_URL, Load, installed, reach  # noqa: E402

NAME = "bench-canary"
STEPS = [{"weight": 20, "pause": "60s"}, {"weight": 50, "pause": "60s"}]
ANALYSIS = {"interval": "10s", "minRequests": 10, "failureLimit": 2, "maxErrorRate": 0.05}
GOOD_ENV = [{"name": "LLMOP_SIM_TTFT_BASE", "value": "0.1"}]
BAD_ENV = [*GOOD_ENV, {"name": "LLMOP_SIM_ERROR_RATE_500", "value": "0.3"}]


def llmd(env: list[dict[str, str]]) -> dict[str, Any]:
    from harness.serving import llmd as base

    body = base(NAME, replicas=2, env=env)
    body["spec"]["rollout"] = {
        "strategy": "Canary",
        "canary": {"steps": STEPS, "analysis": ANALYSIS},
    }
    return body


def counters(http: urllib3.PoolManager, base: str) -> dict[str, float]:
    """Attempts per track (answered requests plus failed attempts), from /metrics."""
    text = http.request("GET", f"{base}/metrics", timeout=5).data.decode()
    out = {"canary": 0.0, "stable": 0.0, "answered": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name not in ("llm_gateway_requests", "llm_gateway_attempt_failures"):
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total") or sample.labels.get("model") != NAME:
                continue
            track = sample.labels.get("track", "")
            out[track] = out.get(track, 0.0) + sample.value
            if family.name == "llm_gateway_requests":
                out["answered"] += sample.value
    return out


def one_run(objects: Any, namespace: str, base: str, load: Load) -> dict[str, float]:
    http = urllib3.PoolManager()
    get = lambda: objects.get_namespaced_custom_object(  # noqa: E731
        "llmoperator.io", "v1alpha1", namespace, "llmdeployments", NAME
    )
    start = counters(http, base)
    failures_before = len(load.failures)
    objects.patch_namespaced_custom_object(
        "llmoperator.io", "v1alpha1", namespace, "llmdeployments", NAME,
        {"spec": {"engine": {"env": BAD_ENV}}},
    )  # fmt: skip
    first = weight0 = last = None
    first_counts: dict[str, float] = {}
    last_canary = start["canary"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        now = time.monotonic()
        counts = counters(http, base)
        if first is None and counts["canary"] > start["canary"]:
            first, first_counts = now, start
        if counts["canary"] > last_canary:
            last_canary, last = counts["canary"], now
            last_counts = counts
        canary = (get().get("status") or {}).get("canary") or {}
        if weight0 is None and canary.get("phase") == "RolledBack":
            weight0 = now
        if weight0 is not None and last is not None and now - last > 10:
            break
        time.sleep(0.2)
    assert first is not None and weight0 is not None and last is not None, "no rollback seen"
    canary_share = (last_counts["canary"] - first_counts["canary"]) / max(
        1.0,
        last_counts["canary"]
        - first_counts["canary"]
        + last_counts["stable"]
        - first_counts["stable"],
    )
    result = {
        "to_weight0": weight0 - first,
        "to_last_request": last - first,
        "canary_share": 100 * canary_share,
        "client_failures": len(load.failures) - failures_before,
        "canary_attempts": last_counts["canary"] - first_counts["canary"],
    }
    # Revert: clears the rollback, ready for the next run.
    objects.patch_namespaced_custom_object(
        "llmoperator.io", "v1alpha1", namespace, "llmdeployments", NAME,
        {"spec": {"engine": {"env": GOOD_ENV}}},
    )  # fmt: skip
    kube.wait_until(
        "the rollback cleared", lambda: not (get().get("status") or {}).get("canary"), 120
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    kubeconfig = Path.home() / ".cache/llm-operator/cluster/kubeconfig"
    cluster = Cluster(
        "local", kubeconfig, [p for p in (Path.home() / ".cache/llm-operator").glob("*/bin")]
    )
    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    kube.apply_crds(api, REPO / "crds")
    home = Path("/tmp") / f"canary-bench-helm-{time.time_ns()}"
    home.mkdir()
    results = []
    with installed(
        cluster, api, home, "cbench", f"operator.prometheusUrl={LOCAL_PROMETHEUS_POD_URL}"
    ) as serving:
        serving.apply(llmd(GOOD_ENV))
        serving.wait_ready(NAME, timeout=180)
        with reach(cluster, serving.gateway_pod(), GATEWAY_PORT) as base:
            serving.wait_routed(base, NAME)
            with Load(base, NAME, clients=4) as load:
                load.wait_for_requests(20)
                for run in range(args.runs):
                    result = one_run(client.CustomObjectsApi(api), serving.namespace, base, load)
                    print(f"run {run + 1}: {result}", flush=True)
                    results.append(result)
                total_ok, total_failed = load.ok, len(load.failures)
    report = render(results, total_ok, total_failed)
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0


def render(results: list[dict[str, float]], ok: int, failed: int) -> str:
    def col(key: str, fmt: str) -> str:
        values = [r[key] for r in results]
        cells = " / ".join(format(v, fmt) for v in values)
        return f"{cells} (median {format(statistics.median(values), fmt)})"

    return f"""# Canary: how fast a bad canary is stopped

`bench/canary_bench.py`, {len(results)} runs on the serving local cluster (2 cores): the chart's
operator and gateway as pods, 2 stable simulator replicas, continuous OpenAI SDK load (4 clients,
half of them streaming). Each run edits the LLMDeployment to a revision whose engines answer 30%
of requests with 500. Steps {STEPS}; analysis every 10 s, minRequests 10, maxErrorRate 5%,
failureLimit 2.

| measured | runs |
| --- | --- |
| first canary request to weight 0 (status), s | {col("to_weight0", ".1f")} |
| first to last canary request at the gateway, s | {col("to_last_request", ".1f")} |
| canary's share of attempts while it ran, % | {col("canary_share", ".1f")} |
| attempts the canary got | {col("canary_attempts", ".0f")} |
| client requests failed | {col("client_failures", ".0f")} (of {ok + failed} answered during the whole bench) |

The canary's 500s never reached a client: the gateway retried each on the stable (a trigger of
`routing.fallbackOn`), and analysis still counted them against the canary (failed attempts by
track, docs/canary.md).

## Beside the anchors, at their defaults

| | analysis interval | failures before rollback | first bad request to rollback |
| --- | --- | --- | --- |
| llm-operator (this bench) | 10 s (default 30 s) | failureLimit 2 (default 3) | the row above; with the defaults about 3 x 30 s = 90 s |
| Flagger | `analysis.interval` default 60 s | `threshold` (its docs' examples: 5) | at least 5 x 60 s = 5 min with those examples |
| Argo Rollouts | AnalysisTemplate `interval`, no default (one measurement if unset) | `failureLimit` (its docs' examples: 3) | with its docs' example (5 m interval, failureLimit 3) about 15 min |

Flagger and Argo Rollouts need the user to write the PromQL and a mesh or ingress for the
weights; here the gateway measures TTFT and errors per track and the operator asks for them.
"""


if __name__ == "__main__":
    sys.exit(main())
