"""Operator benchmark (not a test): N LLMDeployments on the local control plane.

For each N it reports the time from create to all children present (p50, p99), API writes
per LLMDeployment while converging and at steady state (from the API server's own
`apiserver_request_total`, by verb and resource, and from the operator's counter), and the
operator's RSS and CPU. The operator runs as `llm-operator run` in a subprocess watching one
namespace; LLMDeployments ask for `replicas: 0`, so the numbers are the operator's, not the
scheduler's or kwok's.

    .venv/bin/llm-operator dev cluster up
    KUBECONFIG=~/.cache/llm-operator/cluster/kubeconfig .venv/bin/python bench/operator_bench.py \
        --counts 1,100,1000 --output bench/results/operator.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "e2e"))
from harness import kube  # noqa: E402

GROUP, VERSION, PLURAL = "llmoperator.io", "v1alpha1", "llmdeployments"
WRITE_VERBS = {"POST", "PATCH", "PUT", "DELETE", "APPLY", "CREATE", "UPDATE"}
OPERATOR_RESOURCES = {
    ("llmdeployments", "status"), ("deployments", ""), ("services", ""),
    ("horizontalpodautoscalers", ""), ("poddisruptionbudgets", ""), ("events", ""),
}  # fmt: skip


def ensure_crds(api: client.ApiClient) -> None:
    """Apply crds/ and wait until Established: a freshly started cluster has none, and every
    create would be a bare 404."""
    kube.apply_crds(api, REPO / "crds")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def apiserver_writes(api: client.ApiClient) -> Counter[tuple[str, str, str]]:
    """Write requests the API server has served, by (verb, resource, subresource)."""
    raw = urllib_get(api, "/metrics")
    counts: Counter[tuple[str, str, str]] = Counter()
    for line in raw.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if labels.get("verb") in WRITE_VERBS and labels.get("dry_run", "") == "":
            key = (labels["verb"], labels.get("resource", ""), labels.get("subresource", ""))
            counts[key] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def urllib_get(api: client.ApiClient, path: str) -> str:
    method, url, headers, body, post = api.param_serialize(
        "GET", path, header_params={"Accept": "text/plain"}, auth_settings=["BearerToken"]
    )
    response = api.call_api(method, url, headers, body, post, _request_timeout=30)
    return str(response.read().decode())


def operator_writes(delta: Counter[tuple[str, str, str]]) -> int:
    return sum(n for (verb, res, sub), n in delta.items() if (res, sub) in OPERATOR_RESOURCES)


def proc_stats(pid: int) -> tuple[float, float, float]:
    """(RSS MiB, peak RSS MiB, CPU seconds) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, hwm, cpu


def body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
            "engine": {"maxModelLen": 8192},
            "replicas": 0,
        },
    }


class ChildWatcher:
    """Records when each owner's Deployment and Service first appear."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.seen: dict[str, dict[str, float]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(api, namespace, kind), daemon=True)
            for kind in ("Deployment", "Service")
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, api: client.ApiClient, namespace: str, kind: str) -> None:
        lister = (
            client.AppsV1Api(api).list_namespaced_deployment
            if kind == "Deployment"
            else client.CoreV1Api(api).list_namespaced_service
        )
        while not self.stop.is_set():
            stream = watch.Watch()
            for event in stream.stream(
                lister, namespace, label_selector="app.kubernetes.io/managed-by=llm-operator",
                timeout_seconds=5,
            ):  # fmt: skip
                owner = (event["object"].metadata.labels or {}).get("llmoperator.io/deployment")
                if owner:
                    with self.lock:
                        self.seen.setdefault(owner, {}).setdefault(kind, time.monotonic())
                if self.stop.is_set():
                    break

    def complete(self, names: list[str]) -> dict[str, float] | None:
        with self.lock:
            if all(len(self.seen.get(n, {})) == 2 for n in names):
                return {n: max(self.seen[n].values()) for n in names}
        return None


def own_counter(port: int, name: str) -> float:
    """A counter of the operator's own /metrics, summed over its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(m[1]) for m in re.finditer(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def wait_settled(
    api: client.ApiClient, namespace: str, metrics_port: int, started: float, count: int
) -> float:
    """Seconds from the first create until every Deployment is observed by its controller
    and the operator's writes have not moved for 10 s (bounded)."""
    apps = client.AppsV1Api(api)
    deadline = time.monotonic() + max(300, count * 0.6)
    last, still_since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        writes = own_counter(metrics_port, "llm_operator_api_writes_total")
        if writes != last:
            last, still_since = writes, time.monotonic()
        elif time.monotonic() - still_since >= 10:
            items = apps.list_namespaced_deployment(namespace).items
            if all(
                d.status and d.status.observed_generation == d.metadata.generation for d in items
            ):
                return still_since - started
        time.sleep(1)
    raise TimeoutError(f"{count} LLMDeployments did not settle")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def start_operator(
    namespace: str,
    source: Path | None,
    log: Any,
    prefix: list[str] | None = None,
    env: dict[str, str] | None = None,
    ready_within: float = 60.0,
) -> tuple[subprocess.Popen[bytes], int]:
    """`llm-operator run` over one namespace, from `source` (a checkout's operator/ directory,
    e.g. a git worktree of an earlier commit) or the installed package; waits up to
    `ready_within` seconds for /metrics, and stops the process if it does not come up.
    `prefix` replaces `python -m llm_operator.cli` (bench/operator_memory.py's probe), `env`
    is added to the environment."""
    metrics_port = free_port()
    env = {**os.environ, **(env or {})}
    if source is not None:
        env["PYTHONPATH"] = str(source.resolve())
    operator = subprocess.Popen(
        [*(prefix or [sys.executable, "-m", "llm_operator.cli"]), "run", "--namespace", namespace,
         "--liveness-port", "0", "--metrics-port", str(metrics_port), "--log-level", "WARNING"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + ready_within
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or operator.poll() is not None:
                stop_operator(operator)  # not left running over the namespace
                raise
            time.sleep(0.2)
    return operator, metrics_port


def stop_operator(operator: subprocess.Popen[bytes]) -> None:
    operator.terminate()
    try:
        operator.wait(timeout=20)
    except subprocess.TimeoutExpired:
        operator.kill()
        operator.wait()


UNRELATED_NAMESPACE = "bench-operator-unrelated"


def unrelated_namespace(api: client.ApiClient, count: int) -> str:
    """A namespace holding `count` Deployments, Services and ConfigMaps each that are not
    the operator's (no managed-by label): other teams' workloads. Made once and kept, since
    15,000 creates take minutes on this machine."""
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    ns = UNRELATED_NAMESPACE
    with contextlib.suppress(ApiException):
        core.create_namespace({"metadata": {"name": ns}})
    have = {
        "cm": {c.metadata.name for c in core.list_namespaced_config_map(ns).items},
        "svc": {c.metadata.name for c in core.list_namespaced_service(ns).items},
        "deploy": {c.metadata.name for c in apps.list_namespaced_deployment(ns).items},
    }
    labels = {"app": "other-team", "app.kubernetes.io/managed-by": "helm"}

    def make(i: int) -> None:
        name = f"other-{i:05d}"
        meta = {"name": name, "labels": {**labels, "app.kubernetes.io/instance": name}}
        if name not in have["cm"]:
            # About 2 KiB, like a typical application config.
            core.create_namespaced_config_map(
                ns, {"metadata": meta, "data": {"app.yaml": "x: 1\n" * 400}}
            )
        if name not in have["svc"]:
            core.create_namespaced_service(ns, {"metadata": meta, "spec": {
                "selector": {"app.kubernetes.io/instance": name},
                "ports": [{"port": 80, "targetPort": 8080}]}})  # fmt: skip
        if name not in have["deploy"]:
            # replicas 0 and paused: no pods, little work for the controller-manager.
            apps.create_namespaced_deployment(ns, {"metadata": meta, "spec": {
                "replicas": 0, "paused": True,
                "selector": {"matchLabels": {"app.kubernetes.io/instance": name}},
                "template": {"metadata": {"labels": meta["labels"]}, "spec": {"containers": [
                    {"name": "app", "image": "registry.example/app:1",
                     "env": [{"name": f"K{j}", "value": "v" * 20} for j in range(10)]}]}}}})  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(make, range(count)))
    return ns


def run_once(
    api: client.ApiClient,
    count: int,
    settle: float,
    source: Path | None = None,
    label: str = "",
    namespace: str | None = None,
) -> dict[str, Any]:
    """One pass. With `namespace` (the unrelated objects' one) the LLMDeployments are made
    there and deleted at the end; otherwise in a fresh namespace, deleted at the end."""
    core = client.CoreV1Api(api)
    shared = namespace is not None
    if namespace is None:
        namespace = f"bench-operator-{count}-{int(time.time())}"
        core.create_namespace({"metadata": {"name": namespace}})
    log = open(f"/tmp/{namespace}-{label or 'run'}-{int(time.time())}.log", "wb")  # noqa: SIM115
    operator, metrics_port = start_operator(namespace, source, log)
    try:
        time.sleep(1)
        rss_idle, _, _ = proc_stats(operator.pid)
        watcher = ChildWatcher(api, namespace)
        before = apiserver_writes(api)
        _, _, cpu_before = proc_stats(operator.pid)
        names = [f"m-{i:04d}" for i in range(count)]
        created: dict[str, float] = {}
        custom = client.CustomObjectsApi(api)

        def create(name: str) -> None:
            created[name] = time.monotonic()
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body(name))

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(create, names))
        create_seconds = time.monotonic() - started
        present: dict[str, float] | None = None
        deadline = time.monotonic() + max(120, count * 0.5)
        while present is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"children of {count} LLMDeployments not all present")
            time.sleep(0.2)
            present = watcher.complete(names)
        converge_seconds = time.monotonic() - started
        latencies = [present[n] - created[n] for n in names]
        # Let status writes finish, then measure a quiet window: settled is when the
        # Deployment controller has observed every Deployment and the operator has written
        # nothing for 10 s (it answers each of those observations with a status patch; on two
        # shared cores that tail outlasted a fixed wait, so the windows held real changes).
        settled_seconds = wait_settled(api, namespace, metrics_port, started, count)
        own_converged = own_counter(metrics_port, "llm_operator_api_writes_total")
        converged = apiserver_writes(api)
        _, _, cpu_converged = proc_stats(operator.pid)
        time.sleep(settle)
        steady = apiserver_writes(api)
        rss, peak, cpu_steady = proc_stats(operator.pid)
        watcher.stop.set()
        reconciles = own_counter(metrics_port, "llm_operator_reconciles_total")
        own_writes = own_counter(metrics_port, "llm_operator_api_writes_total")
        # A restart over the converged namespace: it must write nothing.
        stop_operator(operator)
        operator, metrics_port = start_operator(namespace, source, log)
        time.sleep(min(settle, 30))
        restarted = apiserver_writes(api)
        restart_own = own_counter(metrics_port, "llm_operator_api_writes_total")
        restart_rss, _, _ = proc_stats(operator.pid)
        converge_delta = converged - before
        steady_delta = steady - converged
        return {
            "label": label,
            "unrelated": shared,
            "rss_idle": rss_idle,
            "restart_writes": operator_writes(restarted - steady),
            "restart_own": restart_own,
            "restart_rss": restart_rss,
            "restart_window": min(settle, 30),
            "count": count,
            "create_seconds": create_seconds,
            "converge_seconds": converge_seconds,
            "settled_seconds": settled_seconds,
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
            "writes_converge": operator_writes(converge_delta),
            "writes_converge_detail": {
                f"{v} {r}{'/' + s if s else ''}": n
                for (v, r, s), n in sorted(converge_delta.items())
                if (r, s) in OPERATOR_RESOURCES
            },
            "writes_steady": operator_writes(steady_delta),
            "own_writes": own_converged,
            "own_writes_steady": own_writes - own_converged,
            "reconciles": reconciles,
            "rss": rss,
            "peak_rss": peak,
            "cpu_converge": cpu_converged - cpu_before,
            "cpu_steady": cpu_steady - cpu_converged,
            "settle": settle,
        }
    finally:
        stop_operator(operator)
        log.close()
        if shared:
            custom = client.CustomObjectsApi(api)
            with contextlib.suppress(ApiException):
                custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
            # Wait for garbage collection of the children before the next pass.
            deadline = time.monotonic() + 600
            apps = client.AppsV1Api(api)
            while time.monotonic() < deadline:
                left = (
                    apps.list_namespaced_deployment(
                        namespace,
                        label_selector="app.kubernetes.io/managed-by=llm-operator",
                        limit=1,
                    ).items
                    + custom.list_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, limit=1
                    )["items"]
                )
                if not left:
                    break
                time.sleep(1)
        else:
            delete_namespace_and_wait(core, namespace, 600)


def delete_namespace_and_wait(core: client.CoreV1Api, namespace: str, timeout: float) -> None:
    """Delete and wait until it is gone: the next run must not share the API server with this
    namespace's garbage collection."""
    with contextlib.suppress(ApiException):
        core.delete_namespace(namespace)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            core.read_namespace(namespace)
        except ApiException:
            break
        time.sleep(1)


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| operator | namespace | N | create to children present p50 / p99 | all N converged (children / statuses settled) | operator writes per LLMDeployment while converging | writes in the quiet window | writes after a restart | reconciles | RSS idle / after / peak / restarted | CPU converging / quiet |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        where = f"+{r['unrelated_count']} unrelated of each kind" if r["unrelated"] else "empty"
        lines.append(
            f"| {r['label'] or 'installed'} | {where} | {r['count']} | {r['p50'] * 1000:.0f} ms / {r['p99'] * 1000:.0f} ms | {r['converge_seconds']:.1f} s / {r['settled_seconds']:.1f} s "
            f"| {r['writes_converge'] / r['count']:.2f} (API server) / {r['own_writes'] / r['count']:.2f} (operator's counter) "
            f"| {r['own_writes_steady']:.0f} by the operator's counter, {r['writes_steady']} to those resources by anyone, in {r['settle']:.0f} s "
            f"| {r['restart_own']:.0f} by its counter, {r['restart_writes']} by anyone, in {r['restart_window']:.0f} s "
            f"| {r['reconciles']:.0f} | {r['rss_idle']:.0f} / {r['rss']:.0f} / {r['peak_rss']:.0f} / {r['restart_rss']:.0f} MiB "
            f"| {r['cpu_converge']:.1f} s / {r['cpu_steady']:.2f} s |"
        )
    lines.append("")
    for r in results:
        lines.append(
            f"- {r['label'] or 'installed'}, N={r['count']}{' (unrelated)' if r['unrelated'] else ''}: writes while converging, by verb and resource: {r['writes_converge_detail']}"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", default="1,100")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds of each quiet window")
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--operators",
        default="",
        help="label=operator-dir pairs, comma-separated (e.g. before=/tmp/wt/operator,"
        "after=operator): each count runs once per operator, alternating, so load hits all",
    )
    parser.add_argument("--rounds", type=int, default=1, help="how many times to alternate")
    parser.add_argument(
        "--unrelated",
        type=int,
        default=0,
        help="also run each pass in a namespace holding this many unrelated Deployments, "
        "Services and ConfigMaps each (made once, kept)",
    )
    parser.add_argument(
        "--unrelated-counts", default="100", help="the N of the passes in that namespace"
    )
    parser.add_argument(
        "--unrelated-settle", type=float, default=15.0, help="quiet windows of those passes"
    )
    args = parser.parse_args()
    config.load_kube_config()
    api = client.ApiClient()
    ensure_crds(api)
    operators: list[tuple[str, Path | None]] = [
        (label, Path(path))
        for label, path in (p.split("=", 1) for p in args.operators.split(",") if p)
    ] or [("", None)]
    shared = unrelated_namespace(api, args.unrelated) if args.unrelated else None
    results = []
    for _ in range(args.rounds):
        for label, source in operators:
            for n in args.counts.split(","):
                if n:
                    results.append(run_once(api, int(n), args.settle, source, label))
            if shared:
                for n in args.unrelated_counts.split(","):
                    r = run_once(
                        api, int(n), args.unrelated_settle, source, label, namespace=shared
                    )
                    results.append({**r, "unrelated_count": args.unrelated})
            print(markdown(results), flush=True)  # all so far: a cut-short run keeps them
    table = markdown(results)
    print(table)
    if args.output:
        args.output.write_text(
            args.output.read_text() + "\n" + table if args.output.exists() else table
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
