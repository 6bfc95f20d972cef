"""Serving-pod benchmark (not a test): N engine pods on the local cluster's pod runner.

Creates one Deployment of N simulator pods (the vLLM image, a readiness probe on /health, as
the renderer emits them, without GPUs so that they spread over every node) and reports: the
time from create to each pod Ready (p50, p99, all), pods turned Ready per second, and the
memory of the pods' processes (RSS and PSS, summed over every process of every pod: PSS
counts shared pages once, RSS counts them in every process), then deletes them and reports
how long the graceful deletion of all of them took.

    .venv/bin/llm-operator dev cluster up
    KUBECONFIG=~/.cache/llm-operator/cluster/kubeconfig .venv/bin/python bench/pods_bench.py \
        --pods 100 --output bench/results/pods.md
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

MARKER = "LLMOP_POD_CLUSTER"


def deployment(name: str, replicas: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                    "terminationGracePeriodSeconds": 10,
                    "containers": [
                        {
                            "name": "vllm",
                            "image": "vllm/vllm-openai:v0.11.0",
                            "args": ["bench-model", "--port", "8000", "--max-num-seqs", "8"],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "readinessProbe": {
                                "httpGet": {"path": "/health", "port": "http"},
                                "periodSeconds": 1,
                            },
                        }
                    ],
                },
            },
        },
    }


def pod_processes(cluster_dir: str, pod_ips: set[str]) -> list[int]:
    """The processes of the benchmark's pods (by the cluster marker and the pod IP that the
    runner puts in every pod process's environment), not of other pods."""
    marker = f"{MARKER}={cluster_dir}".encode()
    ips = {f"LLMOP_POD_IP={ip}".encode() for ip in pod_ips}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
            if marker in environ and environ & ips:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def memory_kib(pids: list[int]) -> tuple[int, int]:
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pods", type=int, default=100)
    p.add_argument("--output", type=Path, default=None)
    p.add_argument(
        "--cluster-dir", default=str(Path.home() / ".cache" / "llm-operator" / "cluster")
    )
    args = p.parse_args()
    config.load_kube_config()
    api = client.ApiClient()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    namespace = f"bench-pods-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": namespace}})
    name = "sims"
    ready_at: dict[str, float] = {}
    pod_ips: set[str] = set()
    created = time.monotonic()
    apps.create_namespaced_deployment(namespace, deployment(name, args.pods))
    stream = watch.Watch()
    for event in stream.stream(core.list_namespaced_pod, namespace, timeout_seconds=300):
        pod = event["object"]
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        if ready and pod.metadata.name not in ready_at:
            ready_at[pod.metadata.name] = time.monotonic() - created
            pod_ips.add(pod.status.pod_ip)
        if len(ready_at) >= args.pods:
            stream.stop()
    all_ready = max(ready_at.values())
    time.sleep(3)  # let start-up allocations settle
    pids = pod_processes(args.cluster_dir, pod_ips)
    rss, pss = memory_kib(pids)
    deleting = time.monotonic()
    apps.delete_namespaced_deployment(name, namespace)
    core.delete_collection_namespaced_pod(namespace)
    while core.list_namespaced_pod(namespace).items:
        time.sleep(0.5)
    deleted = time.monotonic() - deleting
    core.delete_namespace(namespace)
    times = list(ready_at.values())
    lines = [
        f"## {args.pods} serving pods on the local cluster ({time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()})",
        "",
        "| what | value |",
        "| --- | --- |",
        f"| pods Ready | {len(ready_at)} of {args.pods} |",
        f"| create to Ready: p50 / p99 / all | {percentile(times, 50):.1f} s / "
        f"{percentile(times, 99):.1f} s / {all_ready:.1f} s |",
        f"| pods turned Ready per second | {args.pods / all_ready:.1f} |",
        f"| processes | {len(pids)} |",
        f"| RSS, summed | {rss / 1024:.0f} MiB ({rss / 1024 / args.pods:.1f} MiB per pod) |",
        f"| PSS, summed (shared pages once) | {pss / 1024:.0f} MiB "
        f"({pss / 1024 / args.pods:.1f} MiB per pod) |",
        f"| graceful deletion of all pods | {deleted:.1f} s |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        previous = args.output.read_text() if args.output.exists() else ""
        args.output.write_text(previous + ("\n" if previous else "") + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
