"""Autoscaling benchmark (not a test): the closed loop's timings on the serving local cluster.

One Helm install (operator and gateway as pods, KEDA enabled and reading the local Prometheus
at 127.0.0.1:19090); per run, for each provider (keda, hpa), one LLMDeployment with
minReplicas 1, maxReplicas 4, targetQueueDepth 3, a 45 s scale-down window, engines that run
one sequence at a time for about 2 s, under ten closed-loop OpenAI SDK clients through the
gateway (e2e/test_autoscaling.py explains why that settles at 3 replicas), measured with the
same code as the end-to-end test (`measure_loop`, `measure_cold`):

- scale-up reaction: from the first Prometheus sample with the stable pods' queue above the
  target to the first sample (every 0.25 s) where the HPA or the Deployment asks for more
  than one replica;
- changes of the asked-for replicas during `--steady` seconds of steady load (600: the
  issue's "at most one change in 10 minutes");
- scale-down: from the load's stop to the Deployment asking for 1 replica again;
- scale from zero (KEDA, minReplicas 0, 20 s cooldown): one held request's time to first
  byte, split into wake-up (request to pod created), pod start (created to Ready) and the
  rest; twenty concurrent cold requests; the way back to 0.

    .venv/bin/llm-operator dev cluster up
    .venv/bin/python bench/autoscaling_bench.py --runs 3 --steady 600 --output bench/results/autoscaling-runs.md
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

from kubernetes import client, config  # noqa: E402

import test_autoscaling as loop  # noqa: E402
from harness.providers import Cluster  # noqa: E402
from harness.serving import GATEWAY_PORT, GROUP, PLURAL, VERSION, installed, reach  # noqa: E402
from llm_operator_dev.devcluster import prometheus  # noqa: E402

LOOP_KEYS = (
    ("scale_up_reaction_s", "queue above target -> replica asked for (s)"),
    ("load_to_all_ready_s", "load start -> 3 replicas ready (s)"),
    ("steady_changes", "changes during steady load"),
    ("steady_seconds", "steady load observed (s)"),
    ("scale_down_s", "load stop -> 1 replica (s)"),
    ("failures", "failed client requests"),
)
COLD_KEYS = (
    ("one_ttfb_s", "one cold request: time to first byte (s)"),
    ("one_wake_s", "  request -> pod created (s)"),
    ("one_pod_start_s", "  pod created -> Ready (s)"),
    ("one_after_ready_s", "  Ready -> first byte (s)"),
    ("back_to_zero_s", "last answer -> 0 replicas (s)"),
    ("twenty_ttfb_max_s", "20 cold requests: slowest first byte (s)"),
    ("twenty_after_ready_max_s", "20 cold requests: Ready -> last first byte (s)"),
    ("twenty_failed", "20 cold requests: failed"),
)


def table(title: str, keys: tuple[tuple[str, str], ...], runs: list[dict[str, Any]]) -> str:
    head = "| " + title + " | " + " | ".join(f"run {i + 1}" for i in range(len(runs)))
    lines = [head + " | median |", "|---" * (len(runs) + 2) + "|"]
    for key, label in keys:
        values = [r.get(key) for r in runs]
        numbers = [float(v) for v in values if isinstance(v, (int, float))]
        cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in values]
        median = f"{statistics.median(numbers):.1f}" if numbers else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {median} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steady", type=float, default=600.0)
    parser.add_argument("--providers", default="keda,hpa")
    parser.add_argument("--no-cold", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    kubeconfig = Path.home() / ".cache/llm-operator/cluster/kubeconfig"
    cluster = Cluster(
        "local", kubeconfig, [p for p in (Path.home() / ".cache/llm-operator").glob("*/bin")]
    )
    config.load_kube_config(str(kubeconfig))
    api = client.ApiClient()
    home = Path("/tmp") / f"autoscaling-bench-helm-{time.time_ns()}"
    home.mkdir()
    results: dict[str, list[dict[str, Any]]] = {}
    cold: list[dict[str, Any]] = []
    with (
        installed(
            cluster,
            api,
            home,
            "asbench",
            "keda.enabled=true",
            f"operator.kedaPrometheusAddress={prometheus.url()}",
        ) as serving,  # fmt: skip
        reach(cluster, serving.gateway_pod(), GATEWAY_PORT) as gateway,
    ):
        for run in range(args.runs):
            for provider in args.providers.split(","):
                name = loop.unique(f"bench-{provider}")
                try:
                    figures, _ = loop.measure_loop(
                        cluster, serving, gateway, provider, name, steady_seconds=args.steady
                    )
                except AssertionError as err:  # written down, not hidden
                    figures = {"error": str(err)[:300]}
                    print(f"run {run + 1} {provider}: {err}", file=sys.stderr)
                results.setdefault(provider, []).append(figures)
                serving.objects().delete_namespaced_custom_object(
                    GROUP, VERSION, serving.namespace, PLURAL, name
                )
            if not args.no_cold:
                try:
                    figures = loop.measure_cold(serving, gateway, loop.unique("bench-cold"))
                    figures["twenty_failed"] = len(figures.pop("twenty_errors"))
                except AssertionError as err:
                    figures = {"error": str(err)[:300]}
                cold.append(figures)
    out = [f"Runs: {args.runs}; steady load observed for {args.steady:.0f} s per run.", ""]
    for provider, runs in results.items():
        out += [table(f"provider {provider}", LOOP_KEYS, runs), ""]
    if cold:
        out += [table("scale from zero (keda)", COLD_KEYS, cold), ""]
    errors = [r["error"] for rs in [*results.values(), cold] for r in rs if "error" in r]
    out += [f"- error: {e}" for e in errors]
    text = "\n".join(out)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
