#!/usr/bin/env python3
"""The operator under a long steady churn: its memory stays flat (not a test).

Issue 17's operator soak. One run against the local control plane:

  1. a fresh namespace, `llm-operator run --namespace <ns>` in a subprocess (as
     bench/operator_bench.py starts it), and --count LLMDeployments (`replicas: 0`, so no
     engine pod is needed), waited for until every one has converged;
  2. **churn** for --seconds: --edit-rate spec edits a second, round robin over the live
     objects (each sets the engine env var SOAK_EDIT to a new value, which re-renders the
     Deployment's pod template), and every --churn-seconds one create and one delete (the
     oldest), so the object count stays constant. A watch on the Deployments records when
     each edited value first shows in the child's pod template: the operator's writes follow;
  3. the operator's RSS (VmRSS), threads and open descriptors sampled every
     --sample-seconds: first, last, least, largest, and the least-squares slope over the
     second half in MiB/hour;
  4. at the end (after at most --settle-seconds): every LLMDeployment converged
     (status.observedGeneration == metadata.generation), every Deployment's template carries
     its owner's last edit, and no Deployment is left of a deleted owner.

    flock /tmp/cluster.lock .venv/bin/python bench/operator_soak.py --seconds 600
    flock /tmp/cluster.lock .venv/bin/python bench/operator_soak.py --seconds 60 --count 10
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

sys.path.insert(0, str(Path(__file__).resolve().parent))
import operator_bench as ob

GROUP, VERSION, PLURAL = ob.GROUP, ob.VERSION, ob.PLURAL
EDIT_VAR = "SOAK_EDIT"
MANAGED = "app.kubernetes.io/managed-by=llm-operator"
OWNER_LABEL = "llmoperator.io/deployment"
LOCAL_KUBECONFIG = Path.home() / ".cache/llm-operator/cluster/kubeconfig"


def body(name: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
            "engine": {"maxModelLen": 8192, "env": [{"name": EDIT_VAR, "value": value}]},
            "replicas": 0,
        },
    }


def proc_sample(pid: int) -> tuple[float, int, int, float]:
    """(VmRSS MiB, threads, open descriptors, CPU seconds) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]
    threads = int(re.search(r"Threads:\s+(\d+)", status)[1])  # type: ignore[index]
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, threads, fds, cpu


def template_value(deployment: Any) -> str | None:
    """SOAK_EDIT in a Deployment's pod template, from the kubernetes client's model."""
    for container in deployment.spec.template.spec.containers or []:
        for env in container.env or []:
            if env.name == EDIT_VAR:
                return str(env.value)
    return None


class FollowWatcher:
    """Records when each (owner, SOAK_EDIT value) first shows in a Deployment's template."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.apps = client.AppsV1Api(api)
        self.namespace = namespace
        self.seen: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            # A fresh watch every few seconds replays the current objects as ADDED: nothing
            # is missed across the restart, and a 410 cannot strand the watcher.
            try:
                for event in watch.Watch().stream(
                    self.apps.list_namespaced_deployment, self.namespace,
                    label_selector=MANAGED, timeout_seconds=5,
                ):  # fmt: skip
                    obj = event["object"]
                    owner = (obj.metadata.labels or {}).get(OWNER_LABEL)
                    value = template_value(obj)
                    if owner and value is not None:
                        with self.lock:
                            self.seen.setdefault((owner, value), time.monotonic())
                    if self.stop.is_set():
                        break
            except (ApiException, OSError) as error:  # a dropped stream: watch again
                print(f"watch: {error}", file=sys.stderr)
                time.sleep(1)

    def first_seen(self, owner: str, value: str) -> float | None:
        with self.lock:
            return self.seen.get((owner, value))


class Sampler:
    """The operator's /proc figures every `every` seconds, in a thread."""

    def __init__(self, pid: int, every: float) -> None:
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float, int, int, float]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.samples.append((time.monotonic() - self.t0, *proc_sample(self.pid)))
            if self.stop.wait(self.every):
                return


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    return statistics.linear_regression([t for t, _ in points], [v for _, v in points])[0] * 3600


def own_counters(port: int, name: str) -> dict[str, float]:
    """One counter of the operator's /metrics, by its label set."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)}


def writes_by_kind(counters: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, n in counters.items():
        kind = dict(re.findall(r'(\w+)="([^"]*)"', labels)).get("kind", "?")
        out[kind] = out.get(kind, 0.0) + n
    return out


def state(api: client.ApiClient, namespace: str) -> dict[str, Any]:
    """The namespace as the API server has it: which LLMDeployments have converged, which
    Deployments carry their owner's last edit, and which Deployments have no owner left."""
    custom, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
    llmds = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    live = {o["metadata"]["name"]: o for o in llmds if not o["metadata"].get("deletionTimestamp")}
    deployments = apps.list_namespaced_deployment(namespace, label_selector=MANAGED).items
    by_owner = {(d.metadata.labels or {}).get(OWNER_LABEL): d for d in deployments}
    unconverged = [
        n
        for n, o in live.items()
        if (o.get("status") or {}).get("observedGeneration") != o["metadata"]["generation"]
    ]
    stale = []
    for n, o in live.items():
        want = next(e.get("value") for e in o["spec"]["engine"]["env"] if e["name"] == EDIT_VAR)
        if n not in by_owner or template_value(by_owner[n]) != want:
            stale.append(n)
    orphans = [n for n, d in by_owner.items() if n not in live] + [
        d.metadata.name for d in deployments if not (d.metadata.labels or {}).get(OWNER_LABEL)
    ]
    return {
        "objects": len(llmds),
        "live": len(live),
        "deployments": len(deployments),
        "unconverged": unconverged,
        "stale": stale,
        "orphans": orphans,
    }


def settled(s: dict[str, Any]) -> bool:
    return not (s["unconverged"] or s["stale"] or s["orphans"]) and s["objects"] == s["live"]


def wait_settled(
    api: client.ApiClient, namespace: str, limit: float
) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    while True:
        s = state(api, namespace)
        took = time.monotonic() - started
        if settled(s) or took > limit:
            return s, took
        time.sleep(1)


def soak(args: argparse.Namespace, api: client.ApiClient) -> dict[str, Any]:
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    namespace = f"soak-operator-{int(time.time())}"
    core.create_namespace({"metadata": {"name": namespace}})
    log_path = Path(f"/tmp/{namespace}.log")
    log = log_path.open("wb")
    operator, port = ob.start_operator(namespace, None, log)
    r: dict[str, Any] = {"namespace": namespace, "log": str(log_path), "count": args.count}
    try:
        time.sleep(1)
        r["rss_idle"] = proc_sample(operator.pid)[0]
        watcher = FollowWatcher(api, namespace)
        serial = 0
        live: deque[str] = deque()
        for _ in range(args.count):
            name = f"m-{serial:05d}"
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body(name, "init"))  # fmt: skip
            live.append(name)
            serial += 1
        start_state, r["initial_converge_s"] = wait_settled(api, namespace, 300)
        if not settled(start_state):
            raise TimeoutError(f"{args.count} LLMDeployments did not converge: {start_state}")
        writes_before = writes_by_kind(own_counters(port, "llm_operator_api_writes_total"))
        reconciles_before = sum(own_counters(port, "llm_operator_reconciles_total").values())
        cpu_before = proc_sample(operator.pid)[3]

        sampler = Sampler(operator.pid, args.sample_seconds)
        edits: list[tuple[str, str, float]] = []  # (owner, value, sent at)
        errors = {"edit": 0, "create": 0, "delete": 0}
        creates = deletes = late = 0
        t0 = time.monotonic()
        stop = t0 + args.seconds
        next_edit, next_churn = t0, t0 + args.churn_seconds
        turn = 0
        while (now := time.monotonic()) < stop:
            if now >= next_churn:
                # One in, one out: the oldest goes, so no live object is edited after delete.
                name = f"m-{serial:05d}"
                serial += 1
                try:
                    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body(name, "init"))  # fmt: skip
                    live.append(name)
                    creates += 1
                except ApiException as error:
                    errors["create"] += 1
                    print(f"create {name}: {error.status} {error.reason}", file=sys.stderr)
                gone = live.popleft()
                try:
                    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, gone)
                    deletes += 1
                except ApiException as error:
                    errors["delete"] += 1
                    print(f"delete {gone}: {error.status} {error.reason}", file=sys.stderr)
                next_churn += args.churn_seconds
            if now >= next_edit:
                name = live[turn % len(live)]
                turn += 1
                value = str(len(edits) + 1)
                patch = {"spec": {"engine": {"env": [{"name": EDIT_VAR, "value": value}]}}}
                sent = time.monotonic()
                try:
                    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)  # fmt: skip
                    edits.append((name, value, sent))
                except ApiException as error:
                    errors["edit"] += 1
                    print(f"edit {name}: {error.status} {error.reason}", file=sys.stderr)
                next_edit += 1 / args.edit_rate
                if time.monotonic() > next_edit + 1:
                    late += 1  # behind the schedule by over a second: say so, do not burst
                    next_edit = time.monotonic()
            time.sleep(max(0.0, min(next_edit, next_churn, stop) - time.monotonic()))
        churn_seconds = time.monotonic() - t0
        end_state, r["settle_s"] = wait_settled(api, namespace, args.settle_seconds)
        sampler.stop.set()
        sampler.thread.join()
        watcher.stop.set()

        # Each edit: when did its value first show in the Deployment? An edit overwritten by
        # the next edit of the same object before the operator got to it may never show.
        follows, superseded, missing = [], 0, 0
        last_edit = {name: value for name, value, _ in edits}
        for name, value, sent in edits:
            seen = watcher.first_seen(name, value)
            if seen is not None:
                follows.append(max(0.0, seen - sent))
            elif last_edit.get(name) != value or name not in live:
                superseded += 1
            else:
                missing += 1
        writes_after = writes_by_kind(own_counters(port, "llm_operator_api_writes_total"))
        samples = sampler.samples
        half = [s for s in samples if s[0] >= samples[-1][0] / 2]
        rss = [s[1] for s in samples]
        r.update(
            seconds=churn_seconds,
            edits=len(edits),
            edit_rate=args.edit_rate,
            late=late,
            creates=creates,
            deletes=deletes,
            errors=errors,
            churn_every=args.churn_seconds,
            follow_seen=len(follows),
            follow_superseded=superseded,
            follow_missing=missing,
            follow_p50=ob.percentile(follows, 0.5) if follows else float("nan"),
            follow_p99=ob.percentile(follows, 0.99) if follows else float("nan"),
            follow_max=max(follows, default=float("nan")),
            writes={
                k: writes_after.get(k, 0.0) - writes_before.get(k, 0.0)
                for k in sorted(set(writes_after) | set(writes_before))
            },
            reconciles=sum(own_counters(port, "llm_operator_reconciles_total").values())
            - reconciles_before,
            cpu=proc_sample(operator.pid)[3] - cpu_before,
            end=end_state,
            converged=settled(end_state),
            samples=samples,
            sample_every=args.sample_seconds,
            rss_first=rss[0],
            rss_last=rss[-1],
            rss_min=min(rss),
            rss_max=max(rss),
            rss_slope=slope_per_hour([(s[0], s[1]) for s in half]),
            threads=(samples[0][2], samples[-1][2], max(s[2] for s in samples)),
            fds=(samples[0][3], samples[-1][3], max(s[3] for s in samples)),
            fd_slope=slope_per_hour([(s[0], float(s[3])) for s in half]),
            load=os.getloadavg(),
            alive=operator.poll() is None,
        )
        return r
    finally:
        ob.stop_operator(operator)
        log.close()
        r["tracebacks"] = log_path.read_bytes().count(b"Traceback")
        ob.delete_namespace_and_wait(core, namespace, 300)


def markdown(r: dict[str, Any]) -> str:
    writes = ", ".join(f"{k} {v:.0f}" for k, v in r["writes"].items() if v)
    end = r["end"]
    lines = [
        f"Operator soak, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: namespace {r['namespace']}, "
        f"load average at the end {r['load'][0]:.2f} / {r['load'][1]:.2f} / {r['load'][2]:.2f}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| load | {r['count']} LLMDeployments (replicas 0), {r['seconds']:.0f} s of churn: {r['edit_rate']:g} spec edits/s (engine env), one create + one delete every {r['churn_every']:g} s |",
        f"| edits / creates / deletes made | {r['edits']} / {r['creates']} / {r['deletes']} (errors: {r['errors']}; edit ticks more than 1 s late: {r['late']}) |",
        f"| edit to Deployment template, p50 / p99 / max | {r['follow_p50'] * 1000:.0f} ms / {r['follow_p99'] * 1000:.0f} ms / {r['follow_max'] * 1000:.0f} ms ({r['follow_seen']} seen, {r['follow_superseded']} superseded before seen, {r['follow_missing']} never seen) |",
        f"| operator writes during churn (its counter, by kind) | {writes} |",
        f"| reconciles during churn / CPU seconds | {r['reconciles']:.0f} / {r['cpu']:.1f} s |",
        f"| RSS idle (before any object) | {r['rss_idle']:.1f} MiB |",
        f"| RSS first / last / min / max (every {r['sample_every']:g} s, {len(r['samples'])} samples) | {r['rss_first']:.1f} / {r['rss_last']:.1f} / {r['rss_min']:.1f} / {r['rss_max']:.1f} MiB |",
        f"| RSS slope, least squares over the second half | {r['rss_slope']:+.2f} MiB/hour |",
        f"| threads first / last / max | {r['threads'][0]} / {r['threads'][1]} / {r['threads'][2]} |",
        f"| open fds first / last / max (slope, second half) | {r['fds'][0]} / {r['fds'][1]} / {r['fds'][2]} ({r['fd_slope']:+.1f}/hour) |",
        f"| all converged at the end (observedGeneration == generation, template carries the last edit, no orphan) | {'yes' if r['converged'] else 'NO'}, after {r['settle_s']:.1f} s: {end['live']} LLMDeployments, {end['deployments']} Deployments, {len(end['unconverged'])} unconverged, {len(end['stale'])} stale, {len(end['orphans'])} orphaned |",
        f"| operator alive at the end / tracebacks in its log | {'yes' if r['alive'] else 'NO'} / {r['tracebacks']} |",
        "",
        "RSS samples (s, MiB): " + ", ".join(f"{s[0]:.0f}:{s[1]:.1f}" for s in r["samples"]),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--count", type=int, default=50, help="LLMDeployments kept alive")
    p.add_argument("--seconds", type=float, default=600.0, help="seconds of churn")
    p.add_argument("--edit-rate", type=float, default=2.0, help="spec edits a second")
    p.add_argument("--churn-seconds", type=float, default=5.0, help="one create + one delete every")
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument("--settle-seconds", type=float, default=120.0, help="longest wait at the end")
    p.add_argument("--output", type=Path, help="also write the table here")
    args = p.parse_args()
    # The operator subprocess reads KUBECONFIG too: default both to the local cluster's.
    if "KUBECONFIG" not in os.environ and LOCAL_KUBECONFIG.exists():
        os.environ["KUBECONFIG"] = str(LOCAL_KUBECONFIG)
    # The client reads KUBECONFIG when imported, so name the file.
    config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    api = client.ApiClient()
    ob.ensure_crds(api)
    result = soak(args, api)
    table = markdown(result)
    print(table)
    if args.output:
        args.output.write_text(table)
    return 0 if result["converged"] and result["alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
