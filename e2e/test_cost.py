"""GPU cost through a real install: the operator's GPU-seconds for an LLMDeployment equal its
engine pods' run time (status.startTime on) x the GPUs in their limits within 5%, in the
operator's metric and in status.cost; tokens served are counted; `llm-operator cost` prints
the table, the CSV and the JSON (the output docs/operations.md shows)."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client

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

CLI = Path(sys.executable).parent / "llm-operator"
METRICS_PORT = 9090
PRICE = 2.5
GPUS = 2


@pytest.fixture(scope="module")
def serving(
    cluster: Cluster, api_client: client.ApiClient, crd_names: list[str], tmp_path_factory: Any
) -> Iterator[Serving]:
    url = pod_prometheus_url(cluster)
    values = [f"operator.prometheusUrl={url}"] if url else []
    values += [f"operator.gpuHourPrice={PRICE}", "operator.costStatusIntervalSeconds=10"]
    home = tmp_path_factory.mktemp("helm-home")
    with installed(cluster, api_client, home, "cost", *values) as s:
        yield s


def epoch(stamp: Any) -> float:
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()


def scrape(serving: Serving, name: str) -> tuple[float, float]:
    """The operator's llm_operator_gpu_seconds for `name`, and when it was read."""
    selector = f"app.kubernetes.io/instance={serving.release},app.kubernetes.io/component=operator"
    [pod] = (
        client.CoreV1Api(serving.api)
        .list_namespaced_pod(serving.namespace, label_selector=selector)
        .items
    )
    with reach(serving.cluster, pod, METRICS_PORT) as base:
        text = urllib3.request("GET", f"{base}/metrics", timeout=10).data.decode()
    read = time.time()
    pattern = (
        rf'^llm_operator_gpu_seconds\{{[^}}]*llmoperator_io_deployment="{name}"[^}}]*\}} (\S+)$'
    )
    match = re.search(pattern, text, re.M)
    assert match, [line for line in text.splitlines() if "gpu_seconds" in line]
    return float(match.group(1)), read


def cost_cli(serving: Serving, *args: str) -> str:
    done = subprocess.run(
        [str(CLI), "cost", "-n", serving.namespace, *args],
        env=serving.cluster.env(), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def test_gpu_seconds_are_pod_run_time_times_gpus_and_the_cli_prints_them(serving: Serving) -> None:
    body = llmd("costed")
    body["spec"]["parallelism"] = {"tensor": GPUS}
    serving.apply(body)
    serving.wait_ready("costed")
    [pod] = serving.engines("costed")
    limits = pod.spec.containers[0].resources.limits
    assert int(limits["nvidia.com/gpu"]) == GPUS
    start = epoch(pod.status.start_time)
    if serving.cluster.provider == "local":
        gateway = serving.gateway_pod()
        with reach(serving.cluster, gateway, GATEWAY_PORT) as base:
            serving.wait_routed(base, "costed")
            with Load(base, "costed", clients=2) as load:
                load.wait_for_requests(20, timeout=90)
    time.sleep(max(0.0, start + 60 - time.time()))  # a minute of run time at least
    # The metric, continuously: run time so far x GPUs.
    seconds, read = scrape(serving, "costed")
    expected = (read - start) * GPUS
    print(f"metric {seconds:.1f} GPU-s, pod run time x GPUs {expected:.1f}")
    assert abs(seconds - expected) <= 0.05 * expected, (seconds, expected)

    # status.cost, written every costStatusIntervalSeconds while the seconds grow.
    def fresh() -> dict[str, Any] | None:
        cost = (serving.get("costed").get("status") or {}).get("cost") or {}
        updated = cost.get("updatedAt")
        return cost if updated and epoch(updated) >= start + 60 else None

    cost = kube.wait_until("status.cost after a minute of run time", fresh, timeout=60)
    expected = (epoch(cost["updatedAt"]) - start) * GPUS
    assert abs(cost["gpuSeconds"] - expected) <= 0.05 * expected, (cost, expected)
    assert cost["gpuHourPrice"] == PRICE
    if serving.cluster.provider == "local":
        # Tokens come from the engines' counters through Prometheus.
        assert cost["tokens"] > 0, cost
        per_million = cost["gpuSeconds"] / 3600 * PRICE / cost["tokens"] * 1e6
        assert cost["perMillionTokens"] == pytest.approx(per_million, rel=1e-3)
    table = cost_cli(serving)
    print(table)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["NAMESPACE", "NAME", "GPUS", "GPU-HOURS", "TOKENS"]
    row = next(line.split() for line in lines if " costed " in line)
    assert row[:3] == [serving.namespace, "costed", str(GPUS)]
    assert float(row[3]) == pytest.approx(cost["gpuSeconds"] / 3600, abs=0.01)
    [parsed] = json.loads(cost_cli(serving, "-o", "json"))
    assert parsed["name"] == "costed" and parsed["gpuHourPrice"] == PRICE
    [csv_row] = list(csv.DictReader(io.StringIO(cost_cli(serving, "--output", "csv"))))
    assert csv_row["name"] == "costed" and csv_row["gpus"] == str(GPUS)
    print(cost_cli(serving, "-o", "csv"))
