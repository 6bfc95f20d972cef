"""Bring the local control plane up, down, and report on it.

Five plain processes on loopback, started in order, each waited for before the next:

1. etcd (plain HTTP on 127.0.0.1 only, no fsync: the data is disposable);
2. kube-apiserver: client-certificate auth, Node+RBAC authorization, NodeRestriction on top of
   the default admission plugins, ServiceAccount issuer and keys (so TokenRequest works);
3. kube-controller-manager: per-controller ServiceAccount credentials, the token and root-CA
   publishers, garbage collector, Deployment/ReplicaSet and node lifecycle controllers;
4. kube-scheduler;
5. kwok, keeping every node annotated ``kwok.x-k8s.io/node: fake`` alive (node stages only);
6. the pod runner (``kubelet.py``), the kubelet of those nodes' pods: each container becomes a
   process listening at its pod's loopback IP;
7. Prometheus and its pod discovery (``prometheus.py``);
8. KEDA's operator and metrics API server (``keda.py``), prometheus-adapter (``adapter.py``):
   the autoscalers' metrics APIs, registered with the aggregation layer.

Then the fake nodes are created and ``up`` waits until they are Ready and the ``default``
ServiceAccount exists, i.e. until a test can create a pod and see it run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llm_operator_dev.devcluster import adapter, gobuild, keda, pki, procs, prometheus
from llm_operator_dev.devcluster import nodes as nodespec
from llm_operator_dev.devcluster.kubeapi import Api, ApiError, condition_true, probe
from llm_operator_dev.devcluster.layout import (
    CLUSTER_NAME,
    PORTS,
    SA_ISSUER,
    SERVICE_CIDR,
    SERVICE_IP,
    Layout,
    python,
)

# Prometheus after the runner: its discovery needs the API server and its RBAC; its targets are
# the pods the runner starts. The metrics adapters last: prometheus-adapter reads Prometheus.
ORDER = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "pod-runner",
    "prometheus-sd",
    "prometheus",
    "keda-operator",
    "keda-metrics-apiserver",
    "prometheus-adapter",
)

#: The aggregated APIs that ``up`` waits for and ``status`` reports: APIService -> component.
APISERVICES = {
    keda.APISERVICE: "keda-metrics-apiserver",
    adapter.APISERVICE: "prometheus-adapter",
}
#: Identities with a kubeconfig of their own in pki/ (see pki.CLIENTS).
KUBECONFIG_USERS = (
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "keda",
    "prometheus-adapter",
)


class ClusterError(RuntimeError):
    """Something a person has to look at; the message says what and where."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- component definitions ------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    name: str
    argv: list[str]
    health_url: str
    env: tuple[tuple[str, str], ...] = ()  # added to the environment `up` runs in


def components(layout: Layout) -> dict[str, Component]:
    p = layout.pki_dir
    users = ("kube-controller-manager", "kube-scheduler", "kwok")
    kcfg = {n: str(p / f"{n}.kubeconfig") for n in users}
    etcd_url = f"http://127.0.0.1:{PORTS['etcd-client']}"
    peer_url = f"http://127.0.0.1:{PORTS['etcd-peer']}"
    kcm, sched, kwok = (PORTS[n] for n in ("kube-controller-manager", "kube-scheduler", "kwok"))
    defs = [
        Component(
            "etcd",
            [
                str(layout.binary("etcd")),
                "--name=llmop-dev",
                f"--data-dir={layout.etcd_data_dir}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=llmop-dev={peer_url}",
                "--initial-cluster-state=new",
                # Test data: fsync would only make a 2-core machine with a slow disk slower.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            f"{etcd_url}/health",
        ),
        Component(
            "kube-apiserver",
            [
                str(layout.binary("kube-apiserver")),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={PORTS['kube-apiserver']}",
                f"--tls-cert-file={p / 'kube-apiserver.crt'}",
                f"--tls-private-key-file={p / 'kube-apiserver.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--profiling=false",
                # The `kubernetes` Service cannot point at a loopback address (Endpoints
                # validation refuses 127.0.0.0/8) and no pod really runs to use it; the
                # reconciler would only log an error every 10 seconds.
                "--endpoint-reconciler-type=none",
                # The aggregation layer, so aggregated APIs (metrics, custom metrics) can be
                # registered, and so that delegated authentication in the controller-manager
                # and scheduler finds the request-header CA it looks for.
                f"--requestheader-client-ca-file={p / 'front-proxy-ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={p / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={p / 'front-proxy-client.key'}",
                # No real kubelets: `kubectl logs/exec` go to kwok, which serves with this
                # certificate, so the API server authenticates to it with the admin identity.
                f"--kubelet-certificate-authority={p / 'ca.crt'}",
                f"--kubelet-client-certificate={p / 'admin.crt'}",
                f"--kubelet-client-key={p / 'admin.key'}",
            ],
            f"{layout.server_url}/readyz",
        ),
        Component(
            "kube-controller-manager",
            [
                str(layout.binary("kube-controller-manager")),
                f"--kubeconfig={kcfg['kube-controller-manager']}",
                f"--authentication-kubeconfig={kcfg['kube-controller-manager']}",
                f"--authorization-kubeconfig={kcfg['kube-controller-manager']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm}",
                "--leader-elect=false",
                f"--cluster-name={CLUSTER_NAME}",
                # Each controller acts as its own ServiceAccount, as in kubeadm clusters, so
                # RBAC is exercised the same way.
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={p / 'sa.key'}",
                f"--root-ca-file={p / 'ca.crt'}",
                f"--cluster-signing-cert-file={p / 'ca.crt'}",
                f"--cluster-signing-key-file={p / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--profiling=false",
            ],
            f"https://127.0.0.1:{kcm}/healthz",
        ),
        Component(
            "kube-scheduler",
            [
                str(layout.binary("kube-scheduler")),
                f"--kubeconfig={kcfg['kube-scheduler']}",
                f"--authentication-kubeconfig={kcfg['kube-scheduler']}",
                f"--authorization-kubeconfig={kcfg['kube-scheduler']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched}",
                "--leader-elect=false",
                "--profiling=false",
            ],
            f"https://127.0.0.1:{sched}/healthz",
        ),
        Component(
            "kwok",
            [
                str(layout.binary("kwok")),
                f"--kubeconfig={kcfg['kwok']}",
                f"--config={layout.kwok_node_stages}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=" + "=".join(nodespec.KWOK_ANNOTATION),
                f"--server-address=127.0.0.1:{kwok}",
                f"--node-port={kwok}",
                "--node-ip=127.0.0.1",
                f"--tls-cert-file={p / 'kwok.crt'}",
                f"--tls-private-key-file={p / 'kwok.key'}",
                # Nodes renew a Lease like kubelets do; the node lifecycle controller reads it.
                "--node-lease-duration-seconds=40",
            ],
            f"https://127.0.0.1:{kwok}/healthz",
        ),
        Component(
            "pod-runner",
            [
                python(),
                "-m",
                "llm_operator_dev.devcluster.kubelet",
                f"--cluster-dir={layout.cluster_dir}",
                f"--server={layout.server_url}",
                f"--apiserver=127.0.0.1:{PORTS['kube-apiserver']}",
                f"--service-ip={SERVICE_IP}",
                f"--shim-source={layout.repo_root / 'e2e' / 'cluster' / 'podnet.c'}",
                f"--port={PORTS['pod-runner']}",
                # A new version of the runner's code changes the command line: `up` restarts it.
                f"--code-version={runner_code_version(layout)}",
            ],
            f"http://127.0.0.1:{PORTS['pod-runner']}/healthz",
        ),
        Component("prometheus-sd", *prometheus.discovery_component(layout)),
        Component("prometheus", *prometheus.component(layout)),
        Component(
            "keda-operator",
            *keda.operator_component(layout),
            env=tuple(keda.env(layout).items()),
        ),
        Component(
            "keda-metrics-apiserver",
            *keda.metrics_apiserver_component(layout),
            env=tuple(keda.env(layout).items()),
        ),
        Component("prometheus-adapter", *adapter.component(layout)),
    ]
    return {c.name: c for c in defs}


def runner_code_version(layout: Layout) -> str:
    here = Path(__file__).parent
    sources = [here / "kubelet.py", here / "podspec.py", layout.repo_root / "e2e/cluster/podnet.c"]
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


# -- helpers --------------------------------------------------------------------------------


def admin_api(layout: Layout, timeout: float = 10.0) -> Api:
    p = layout.pki_dir
    return Api(layout.server_url, p / "ca.crt", p / "admin.crt", p / "admin.key", timeout=timeout)


def healthy(component: Component, layout: Layout) -> bool:
    context = None
    if component.name in ("kube-apiserver", *APISERVICES.values()):
        # The aggregated API servers authenticate the admin certificate as the API server does.
        context = admin_api(layout).context
    status, body = probe(component.health_url, context=context)
    if component.name == "etcd":
        return status == 200 and '"health":"true"' in body.replace(" ", "")
    return status == 200


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def ensure_built(layout: Layout, allow_build: bool) -> bool:
    """Run build.sh unless every binary is already cached. True if it built something."""
    script = layout.build_script
    env_cache = {"LLMOP_CACHE_DIR": str(layout.cache_dir)}
    check = subprocess.run(
        ["bash", str(script), "--check"],
        env={**os.environ, **env_cache},
        capture_output=True,
        check=False,
    )
    if check.returncode == 0:
        return _ensure_addons_built(layout, allow_build)
    if not allow_build:
        raise ClusterError(
            f"binaries for k8s {layout.versions.k8s} are not built in {layout.cache_dir}; "
            f"run {script} (or `up` without --no-build)"
        )
    if shutil.which("go") is None:
        raise ClusterError("Go is needed to build the control plane (go >= 1.26 on PATH)")
    say(f"building the control plane into {layout.cache_dir} (cold: about 15 minutes on 2 cores)")
    started = time.monotonic()
    result = subprocess.run(["bash", str(script)], env={**os.environ, **env_cache}, check=False)
    if result.returncode != 0:
        raise ClusterError(f"{script} failed with exit code {result.returncode}")
    say(f"build finished in {time.monotonic() - started:.0f}s")
    _ensure_addons_built(layout, allow_build)
    return True


def _ensure_addons_built(layout: Layout, allow_build: bool) -> bool:
    """KEDA and prometheus-adapter (``gobuild.py``). True if it built something."""
    if gobuild.is_built(layout):
        return False
    if not allow_build:
        raise ClusterError(
            f"KEDA {layout.versions.keda} / prometheus-adapter "
            f"{layout.versions.prometheus_adapter} ({layout.prometheus_adapter_commit}) are not "
            f"built in {layout.cache_dir}; run `up` without --no-build"
        )
    say("building KEDA and prometheus-adapter (cold: about 15 minutes on 2 cores)")
    started = time.monotonic()
    try:
        gobuild.ensure_built(layout)
    except gobuild.BuildError as err:
        raise ClusterError(str(err)) from None
    say(f"KEDA and prometheus-adapter built in {time.monotonic() - started:.0f}s")
    return True


def _port_owner_hint(port: int) -> str:
    return f"127.0.0.1:{port} is taken by another process (see `ss -ltnp 'sport = :{port}'`)"


def _health_check(comp: Component, layout: Layout) -> Callable[[], bool]:
    return lambda: healthy(comp, layout)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports_of(name: str) -> list[int]:
    return [PORTS["etcd-client"], PORTS["etcd-peer"]] if name == "etcd" else [PORTS[name]]


@contextmanager
def locked(layout: Layout) -> Iterator[None]:
    """One ``up`` or ``down`` at a time: two test sessions starting together would otherwise
    both see etcd stopped and race to start it."""
    layout.cluster_dir.mkdir(parents=True, exist_ok=True)
    with (layout.cluster_dir / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- up -------------------------------------------------------------------------------------


def up(layout: Layout, allow_build: bool = True, timeout: float = 180.0) -> bool:
    """Bring everything up; True if anything changed, False if it was all already there."""
    marker = str(layout.cluster_dir)
    changed: list[str] = []
    if ensure_built(layout, allow_build):
        changed.append("built binaries")
    for folder in (layout.cluster_dir, layout.logs_dir, layout.run_dir):
        folder.mkdir(parents=True, exist_ok=True)
    if pki.ensure_pki(layout.pki_dir):
        changed.append("generated certificates")
    wrote = pki.write_kubeconfig(layout.kubeconfig, layout.pki_dir, layout.server_url, "admin")
    for user in KUBECONFIG_USERS:
        path = layout.pki_dir / f"{user}.kubeconfig"
        wrote |= pki.write_kubeconfig(path, layout.pki_dir, layout.server_url, user)
    if wrote:
        changed.append("wrote kubeconfigs")
    if write_node_stages(layout):
        changed.append("wrote kwok's node stages")
    prometheus_config_changed = prometheus.prepare(layout)
    if keda.prepare_files(layout) | adapter.prepare_files(layout):
        changed.append("wrote KEDA's and prometheus-adapter's files")

    defs = components(layout)
    for name in ORDER:
        comp = defs[name]
        changed += _before(name, layout, timeout)
        current = procs.running(layout.run_dir, name, marker)
        if current is not None:
            if procs.cmdline(current.pid) == comp.argv:
                wait_for(f"{name} to become healthy", _health_check(comp, layout), timeout)
                if name == "prometheus" and prometheus_config_changed:
                    prometheus.reload()  # a new config does not change its command line
                    changed.append("reloaded Prometheus' config")
                continue
            # Same component, different flags or binary (a version bump): restart it.
            say(f"{name}: restarting, its command line changed")
            procs.stop(current, marker)
        for port in _ports_of(name):
            # A process just stopped may hold its socket a moment longer.
            deadline = time.monotonic() + 10
            while not _port_free(port):
                if time.monotonic() > deadline:
                    raise ClusterError(_port_owner_hint(port))
                time.sleep(0.2)
        if name == "prometheus-sd" and prometheus.ensure_rbac(admin_api(layout)):
            changed.append("granted Prometheus' discovery its RBAC")
        log = layout.logs_dir / f"{name}.log"
        started = procs.start(
            name, comp.argv, layout.run_dir, log, cwd=layout.cluster_dir, env=dict(comp.env)
        )
        t0 = time.monotonic()

        def ready(c: Component = comp, pid: int = started.pid, log: Path = log) -> bool:
            if procs.exited_early(pid):
                raise ClusterError(f"{c.name} exited during startup; last lines of {log}:\n"
                                   f"{tail(log)}")  # fmt: skip
            return healthy(c, layout)

        try:
            wait_for(f"{name} ({comp.health_url})", ready, timeout)
        except ClusterError as err:
            raise ClusterError(f"{err}\nlog: {log}\n{tail(log, 20)}") from None
        say(f"{name}: started (pid {started.pid}, ready in {time.monotonic() - t0:.1f}s)")
        changed.append(f"started {name}")

    api = admin_api(layout)
    created = ensure_nodes(api, layout)
    if created:
        changed.append(f"created nodes {', '.join(created)}")
    wait_for("all nodes Ready", lambda: _nodes_ready(api), timeout)
    # A namespace is usable once the ServiceAccount controller has given it `default`.
    wait_for(
        "ServiceAccount default/default",
        lambda: api.get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
        timeout,
    )
    for name in APISERVICES:
        wait_for(f"APIService {name} Available", _available_check(api, name), timeout)
    write_state(layout)
    if changed:
        say("cluster up: " + "; ".join(changed))
    else:
        say("cluster already up; nothing changed")
    say(f"KUBECONFIG={layout.kubeconfig}")
    return bool(changed)


def _before(name: str, layout: Layout, timeout: float) -> list[str]:
    """The API objects a component needs, applied (idempotently) on every ``up`` just before
    the component is checked or started: the API server is up by then."""
    changed: list[str] = []
    if name == "keda-operator":
        api = admin_api(layout)
        if keda.ensure_objects(api, layout):
            changed.append("applied KEDA's CRDs, RBAC and APIService")
        # The operator watches its CRDs from the start and exits if they are not served.
        wait_for("KEDA's CRDs Established", lambda: keda.crds_established(api, layout), timeout)
    elif name == "prometheus-adapter" and adapter.ensure_objects(admin_api(layout), layout):
        changed.append("applied prometheus-adapter's RBAC and APIService")
    return changed


def _available_check(api: Api, name: str) -> Callable[[], bool]:
    return lambda: _apiservice_available(api, name)


def _apiservice_available(api: Api, name: str) -> bool:
    try:
        status, body = api.get(f"/apis/apiregistration.k8s.io/v1/apiservices/{name}")
    except ApiError:
        return False
    return status == 200 and condition_true(body, "Available")


def write_node_stages(layout: Layout) -> bool:
    """kwok's stages without the pod stages (which would mark every pod Running and Ready
    with no process behind it). True if the file changed."""
    docs = [d for d in yaml.safe_load_all(layout.kwok_stages.read_text()) if d]
    nodes = [d for d in docs if d.get("spec", {}).get("resourceRef", {}).get("kind") == "Node"]
    text = "# Generated by llm-operator dev cluster up from kwok's stages: node stages only.\n"
    text += yaml.safe_dump_all(nodes, sort_keys=False)
    target = layout.kwok_node_stages
    if target.exists() and target.read_text() == text:
        return False
    target.write_text(text)
    return True


def ensure_nodes(api: Api, layout: Layout) -> list[str]:
    """Create the fake nodes that do not exist yet; an existing node only gains its podCIDR
    if it has none (a cluster from before pods had addresses)."""
    created: list[str] = []
    for node in nodespec.desired_nodes(layout.versions.k8s):
        name = node["metadata"]["name"]
        status, live = api.get(f"/api/v1/nodes/{name}")
        if status == 200:
            if not (live.get("spec") or {}).get("podCIDR"):
                patch = {"spec": {k: node["spec"][k] for k in ("podCIDR", "podCIDRs")}}
                api.request("PATCH", f"/api/v1/nodes/{name}", patch, "application/merge-patch+json")
            continue
        status, body = api.request("POST", "/api/v1/nodes", node)
        if status not in (201, 409):
            raise ClusterError(f"creating node {name}: HTTP {status}: {body}")
        created.append(name)
    return created


def _nodes_ready(api: Api) -> bool:
    wanted = {n["metadata"]["name"] for n in nodespec.desired_nodes("")}
    try:
        status, body = api.get("/api/v1/nodes")
    except ApiError:
        return False
    if status != 200:
        return False
    ready = {n["metadata"]["name"] for n in body.get("items", []) if nodespec.is_ready(n)}
    return wanted <= ready


def write_state(layout: Layout) -> None:
    state = {
        "kubeconfig": str(layout.kubeconfig),
        "server": layout.server_url,
        "versions": vars(layout.versions),
        "ports": PORTS,
        "logs": str(layout.logs_dir),
        "pids": {
            name: r.pid
            for name in ORDER
            if (r := procs.running(layout.run_dir, name, str(layout.cluster_dir))) is not None
        },
    }
    text = json.dumps(state, indent=2, sort_keys=True) + "\n"
    if not layout.state_file.exists() or layout.state_file.read_text() != text:
        layout.state_file.write_text(text)


# -- down -----------------------------------------------------------------------------------


def down(layout: Layout, keep_data: bool = False) -> int:
    """Stop every process we started; returns how many were stopped. Raises if any remain."""
    marker = str(layout.cluster_dir)
    stopped = 0
    for name in reversed(ORDER):
        current = procs.running(layout.run_dir, name, marker)
        if current is not None:
            if not procs.stop(current, marker):
                raise ClusterError(f"{name} (pid {current.pid}) did not stop")
            say(f"{name}: stopped (pid {current.pid})")
            stopped += 1
    # Anything still running from our binaries against our folder (a lost pid file, a
    # crashed `up`) is ours too.
    for stray in procs.sweep(layout.cache_dir, marker):
        if procs.stop(stray, marker):
            say(f"{stray.name}: stopped stray process (pid {stray.pid})")
            stopped += 1
    from llm_operator_dev.devcluster.kubelet import sweep  # lazily: the runner runs as __main__

    pods = sweep(layout.cluster_dir)
    if pods:
        say(f"stopped {pods} pod process(es) left behind")
    for stray in prometheus.strays(layout):
        if procs.stop(stray, marker):
            say(f"{stray.name}: stopped stray process (pid {stray.pid})")
            stopped += 1
    left = procs.sweep(layout.cache_dir, marker)
    if left:
        raise ClusterError("still running: " + ", ".join(f"{r.name} (pid {r.pid})" for r in left))
    for name in ORDER:
        procs.pid_file(layout.run_dir, name).unlink(missing_ok=True)
    layout.state_file.unlink(missing_ok=True)
    if not keep_data and layout.etcd_data_dir.exists():
        # The next `up` starts from an empty cluster rather than yesterday's leftovers.
        shutil.rmtree(layout.etcd_data_dir)
    if not keep_data:
        prometheus.remove_data(layout)
    say(f"cluster down: stopped {stopped} process(es); none left")
    return stopped


# -- status ---------------------------------------------------------------------------------


def status(layout: Layout) -> dict[str, Any]:
    """What runs, what answers, and the nodes; ``up`` is True only if everything is fine."""
    marker = str(layout.cluster_dir)
    defs = components(layout)
    comps: dict[str, dict[str, Any]] = {}
    for name in ORDER:
        current = procs.running(layout.run_dir, name, marker)
        comps[name] = {
            "pid": current.pid if current else None,
            "running": current is not None,
            "healthy": bool(current) and healthy(defs[name], layout),
            "log": str(layout.logs_dir / f"{name}.log"),
        }
    nodes: list[dict[str, Any]] = []
    version = None
    apiservices = {name: False for name in APISERVICES}
    if comps["kube-apiserver"]["healthy"]:
        api = admin_api(layout, timeout=5.0)
        apiservices = {name: _apiservice_available(api, name) for name in APISERVICES}
        code, body = api.get("/version")
        version = body.get("gitVersion") if code == 200 and isinstance(body, dict) else None
        code, body = api.get("/api/v1/nodes")
        for n in body.get("items", []) if code == 200 else []:
            nodes.append(
                {
                    "name": n["metadata"]["name"],
                    "ready": nodespec.is_ready(n),
                    "gpus": n.get("status", {}).get("capacity", {}).get(nodespec.GPU_RESOURCE, "0"),
                    "product": n["metadata"].get("labels", {}).get("nvidia.com/gpu.product", ""),
                }
            )
    all_up = (
        all(c["healthy"] for c in comps.values())
        and bool(nodes)
        and all(n["ready"] for n in nodes)
        and all(apiservices.values())
    )
    return {
        "up": all_up,
        "version": version,
        "server": layout.server_url,
        "kubeconfig": str(layout.kubeconfig),
        "components": comps,
        "nodes": nodes,
        "apiservices": apiservices,
        "versions": vars(layout.versions),
    }


def format_status(st: dict[str, Any]) -> str:
    lines = [
        f"cluster: {'up' if st['up'] else 'NOT up'}  server {st['server']}  "
        f"version {st['version'] or '-'}",
        f"kubeconfig: {st['kubeconfig']}",
        "",
        f"{'COMPONENT':<25}{'PID':<9}{'STATE':<10}LOG",
    ]
    for name, c in st["components"].items():
        state = "healthy" if c["healthy"] else ("running" if c["running"] else "stopped")
        lines.append(f"{name:<25}{c['pid'] or '-'!s:<9}{state:<10}{c['log']}")
    if st["nodes"]:
        lines += ["", f"{'NODE':<10}{'READY':<7}{'GPUS':<6}PRODUCT"]
        for n in st["nodes"]:
            lines.append(f"{n['name']:<10}{n['ready']!s:<7}{n['gpus']:<6}{n['product']}")
    if st.get("apiservices"):
        lines += ["", f"{'APISERVICE':<38}AVAILABLE"]
        for name, available in st["apiservices"].items():
            lines.append(f"{name:<38}{available}")
    return "\n".join(lines)


def env_lines(layout: Layout) -> list[str]:
    """Shell lines for ``eval "$(llm-operator dev cluster env)"``."""
    path = ":".join(str(d) for d in layout.bin_dirs)
    return [
        f"export KUBECONFIG={layout.kubeconfig}",
        f'export PATH="{path}:$PATH"',
        *prometheus.env_lines(),
    ]
