#!/usr/bin/env python3
"""The API server's floor for the operator's writes at N LLMDeployments (not a test).

Issue 18 asks for 1,000 LLMDeployments converged within 10 s (p99 create-to-children 2 s).
What the operator cannot beat is the API server doing the same writes with no operator
logic in between, on the same machine: this measures that. One run:

  1. a fresh namespace (crds/ applied), N LLMDeployments created as bench/operator_bench.py
     creates them, 16 at a time (the operator's own API concurrency): how long the creates
     alone take;
  2. the operator's own renderer (`plan`, `render_all`, `owned`) makes each LLMDeployment's
     children up front, outside the timing;
  3. the writes a converging operator makes per LLMDeployment (with --create, the children
     are created with POST instead, to see what server-side apply costs), with its own client
     (`kube/client.py`, raw JSON over urllib3, 16 connections) from 16 threads: server-side
     apply of the Deployment and of the Service, and two status patches (Pending, then Ready;
     the operator wrote 2 to 3 per LLMDeployment in bench/results/operator.md). Nothing is
     read back, rendered or compared;
  4. wall time and the CPU seconds of kube-apiserver and etcd over each phase (from /proc, so
     run it on the machine of the local control plane), then the namespace is deleted.

    KUBECONFIG=~/.cache/llm-operator/cluster/kubeconfig .venv/bin/python bench/operator_floor.py \
      --count 1000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import operator_bench as bench
from kubernetes import client, config

from llm_operator.api import LLMDeployment
from llm_operator.constants import FIELD_MANAGER
from llm_operator.kube.client import API_CONCURRENCY, KubeClient
from llm_operator.kube.resources import kind_of
from llm_operator.planner import plan
from llm_operator.reconcile import owned
from llm_operator.render import RenderConfig, render_all

GROUP, VERSION, PLURAL = "llmoperator.io", "v1alpha1", "llmdeployments"


def cpu_of(command: str) -> float:
    """CPU seconds (user + system) of the processes whose argv[0] ends with `command`."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv0 = Path(entry.path, "cmdline").read_bytes().split(b"\0", 1)[0].decode()
            if not argv0.endswith("/" + command):
                continue
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def timed(name: str, work: list[Any], fn: Any, phases: dict[str, Any]) -> list[Any]:
    before = {c: cpu_of(c) for c in ("kube-apiserver", "etcd")}
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(API_CONCURRENCY) as pool:
        results = list(pool.map(fn, work))
    seconds = time.monotonic() - started
    phases[name] = {
        "requests": len(work),
        "seconds": round(seconds, 2),
        "per_second": round(len(work) / seconds, 1),
        "cpu_seconds": {c: round(cpu_of(c) - t, 2) for c, t in before.items()},
    }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--create",
        action="store_true",
        help="create the children with POST instead of server-side apply (what SSA costs)",
    )
    args = parser.parse_args()
    config.load_kube_config()
    api = client.ApiClient()
    bench.ensure_crds(api)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    namespace = f"bench-floor-{args.count}-{int(time.time())}"
    core.create_namespace({"metadata": {"name": namespace}})
    kube = KubeClient()
    phases: dict[str, Any] = {}
    load = os.getloadavg()
    try:
        names = [f"m-{i:04d}" for i in range(args.count)]

        def create(name: str) -> dict[str, Any]:
            made: dict[str, Any] = custom.create_namespaced_custom_object(  # type: ignore[assignment]
                GROUP, VERSION, namespace, PLURAL, bench.body(name)
            )
            return made

        bodies = timed("create LLMDeployments", names, create, phases)
        config_ = RenderConfig()
        children = []
        for made in bodies:
            llmd = LLMDeployment.model_validate(made)
            children += owned(render_all(llmd, config_, sizing=plan(llmd.spec)), made)
        kinds = sorted({c["kind"] for c in children})

        def create_child(obj: dict[str, Any]) -> Any:
            return kube.api.call(
                "POST",
                kind_of(obj).collection_path(namespace),
                obj,
                query=[("fieldManager", FIELD_MANAGER)],
            )

        verb, write = ("create", create_child) if args.create else ("apply", kube.apply)
        timed(f"{verb} children ({', '.join(kinds)})", children, write, phases)

        def status(phase: str) -> Any:
            return lambda name: kube.patch_status(namespace, name, {"phase": phase})

        timed("patch status (Pending)", names, status("Pending"), phases)
        timed("patch status (Ready)", names, status("Ready"), phases)
    finally:
        bench.delete_namespace_and_wait(core, namespace, 600)
    writes = [p for name, p in phases.items() if name != "create LLMDeployments"]
    result = {
        "count": args.count,
        "concurrency": API_CONCURRENCY,
        "load_average_before": [round(x, 2) for x in load],
        "phases": phases,
        "writes_seconds": round(sum(p["seconds"] for p in writes), 2),
        "writes": sum(p["requests"] for p in writes),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
