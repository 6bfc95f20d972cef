"""Drills: the API server hangs for a minute while a model serves, and the nodes flap (issue 17).

The hang: the local control plane's kube-apiserver is stopped with SIGSTOP (it keeps its
sockets, so every client's requests and watches hang rather than fail: the worst case for
timeouts) for LLMOP_DRILL_HANG_SECONDS (60), then continued, while OpenAI SDK clients keep
calling the model through the chart's gateway. Nothing lost means: no client request failed
during the hang or after it (the gateway serves from its last routing table and pod set); no
pod restarted; every node and pod is Ready soon after; and the operator still acts (an edit
after the hang is reconciled).

The flap: kwok, which renews the nodes' leases, is stopped until the node lifecycle controller
marks the nodes NotReady and their pods unready (a node that stops reporting), then continued.
The pods must be Ready again soon after their nodes are (a kubelet reports its pods' status
again when the API's copy differs from its own); before the fix in the pod runner they stayed
unready for good. Requests fail while the engine is unready (it has left the gateway's pod set,
as it leaves a Service's endpoints): that is Kubernetes' answer to a node that stops
reporting, so the check is that every request after the recovery is answered.

Only the local cluster: nothing here can pause another cluster's API server or node agents.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3
from kubernetes import client, watch

from harness import kube
from harness.providers import Cluster
from harness.serving import GATEWAY_PORT, Load, Serving, installed, llmd, reach

pytestmark = pytest.mark.drill

HANG_SECONDS = float(os.environ.get("LLMOP_DRILL_HANG_SECONDS", "60"))
# After the API server continues: kwok renews the leases within seconds, the node lifecycle
# controller looks every 5 s, and the runner answers the pods' update at once.
RECOVERY_LIMIT = 60.0


@pytest.fixture(scope="module")
def serving(
    cluster: Cluster, api_client: client.ApiClient, crd_names: list[str], tmp_path_factory: Any
) -> Iterator[Serving]:
    if cluster.provider != "local":
        pytest.skip("stops the local control plane's API server by its pid (SIGSTOP)")
    with installed(cluster, api_client, tmp_path_factory.mktemp("helm-home"), "hang") as s:
        yield s


def component_pid(name: str) -> int:
    """The pid of one of the local control plane's processes (its pid file, checked)."""
    from llm_operator_dev.devcluster import procs
    from llm_operator_dev.devcluster.layout import Layout

    layout = Layout.discover()
    running = procs.running(layout.run_dir, name, str(layout.cluster_dir))
    assert running is not None, f"the local {name} is not running"
    return running.pid


@contextlib.contextmanager
def stopped(pid: int, seconds: float) -> Iterator[None]:
    # A detached watchdog continues the process even if this one dies meanwhile: a stopped
    # API server (or kwok) would fail every test after this one.
    watchdog = subprocess.Popen(
        ["/bin/sh", "-c", f"sleep {seconds + 10:.0f}; kill -CONT {pid}"], start_new_session=True
    )
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        watchdog.kill()
        watchdog.wait()


def ready(obj: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in obj.status.conditions or [])


def snapshot(serving: Serving) -> dict[str, Any]:
    """Which kwok nodes and which of the release's pods are not Ready, and restart counts."""
    core = client.CoreV1Api(serving.api)
    nodes = core.list_node(_request_timeout=5).items
    pods = core.list_namespaced_pod(serving.namespace, _request_timeout=5).items
    return {
        "t": time.monotonic(),
        "nodes_not_ready": sorted(n.metadata.name for n in nodes if not ready(n)),
        "pods_not_ready": sorted(p.metadata.name for p in pods if not ready(p)),
        "restarts": {
            p.metadata.name: sum(c.restart_count for c in p.status.container_statuses or [])
            for p in pods
            if p.status is not None
        },
    }


def test_a_hung_api_server_for_a_minute_loses_no_request_and_no_pod(serving: Serving) -> None:
    serving.apply(llmd("steady", replicas=1))
    serving.wait_ready("steady", timeout=180)

    def all_ready() -> dict[str, Any] | None:
        now = snapshot(serving)
        return None if now["pods_not_ready"] else now

    before = kube.wait_until("every pod of the release Ready", all_ready, timeout=60)
    pid = component_pid("kube-apiserver")
    http = urllib3.PoolManager()
    with reach(serving.cluster, serving.gateway_pod(), GATEWAY_PORT) as base:
        serving.wait_routed(base, "steady")
        with Load(base, "steady", clients=2) as load:
            load.wait_for_requests(10)
            ok_before = load.ok
            with stopped(pid, HANG_SECONDS):
                started = time.monotonic()
                time.sleep(HANG_SECONDS)
            resumed = time.monotonic()
            ok_during = load.ok - ok_before
            failures_during = list(load.failures)
            # The API server answers again; from here on, watch the nodes and the pods.
            samples: list[dict[str, Any]] = []

            def recovered() -> bool:
                try:
                    samples.append(snapshot(serving))
                except (urllib3.exceptions.HTTPError, client.ApiException):
                    return False  # still catching up
                last = samples[-1]
                settled = time.monotonic() - resumed > 15  # the lifecycle controller's turn
                return settled and not last["nodes_not_ready"] and not last["pods_not_ready"]

            kube.wait_until("nodes and pods Ready after the hang", recovered, RECOVERY_LIMIT, 0.5)
            # Load a little longer: the gateway's pod set follows the pods back.
            load.wait_for_requests(20)
            gateway_metrics = http.request("GET", f"{base}/metrics", timeout=5).data.decode()
        failures = list(load.failures)
        answered = load.ok
    flapped = sorted({n for s in samples for n in s["nodes_not_ready"]})
    unready = sorted({p for s in samples for p in s["pods_not_ready"]})
    back = next(
        (s["t"] - resumed for s in samples if not s["nodes_not_ready"] and not s["pods_not_ready"]),
        None,
    )
    print(
        f"\nhang: {HANG_SECONDS:.0f} s ({resumed - started:.1f} s measured); {ok_during} requests "
        f"answered during it, {len(failures_during)} failed; after it, nodes NotReady: {flapped}, "
        f"pods unready: {unready}; all Ready {back if back is None else round(back, 1)} s after "
        f"the API returned; {answered} answered, {len(failures)} failed in all"
    )
    assert failures == [], failures[:5]
    assert ok_during > 0, "the gateway answered nothing while the API server hung"
    assert "llm_gateway_requests" in gateway_metrics
    assert samples[-1]["restarts"] == before["restarts"], (
        "a pod restarted across the hang",
        before["restarts"],
        samples[-1]["restarts"],
    )
    # The operator still acts: an edit after the hang is reconciled.
    serving.objects().patch_namespaced_custom_object(
        "llmoperator.io", "v1alpha1", serving.namespace, "llmdeployments", "steady",
        {"spec": {"replicas": 2}},
    )  # fmt: skip
    kube.wait_until("2 ready engines", lambda: len(serving.engines("steady")) == 2, timeout=120)
    serving.wait_ready("steady", timeout=60)


# The node lifecycle controller's grace period (node-monitor-grace-period, 50 s) plus its
# 5 s look, with room for a loaded machine.
FLAP_LIMIT = 120.0


class ReadyWatch:
    """Every change of the pods' Ready condition in a namespace, from a watch (a status that
    is overwritten within milliseconds would slip between polls)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.changes: list[tuple[float, str, str, str]] = []  # (time, pod, status, reason)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(api, namespace), daemon=True)

    def _run(self, api: client.ApiClient, namespace: str) -> None:
        core = client.CoreV1Api(api)
        last: dict[str, str] = {}
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(core.list_namespaced_pod, namespace, timeout_seconds=5):
                    pod = event["object"]
                    ready = next(
                        (c for c in pod.status.conditions or [] if c.type == "Ready"), None
                    )
                    if ready is None or last.get(pod.metadata.name) == ready.status:
                        continue
                    last[pod.metadata.name] = ready.status
                    self.changes.append(
                        (time.monotonic(), pod.metadata.name, ready.status, ready.reason or "")
                    )
                    if self._stop.is_set():
                        break
            except (urllib3.exceptions.HTTPError, client.ApiException):
                time.sleep(0.5)
            finally:
                stream.stop()

    def __enter__(self) -> ReadyWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(15)


def test_pods_are_ready_again_after_their_nodes_flap_not_ready(serving: Serving) -> None:
    """kwok, which renews the nodes' leases, is stopped until the node lifecycle controller
    has marked the nodes NotReady (and with them their pods unready), then continued. The pod
    runner plays a kubelet that is still alive: it reports its pods' status again when the
    API's copy differs from its own, so the engine is Ready again at once; before the fix its
    pods stayed unready for good."""
    serving.apply(llmd("flapping", replicas=1))
    serving.wait_ready("flapping", timeout=180)
    engine = serving.engines("flapping")[0].metadata.name
    pid = component_pid("kwok")
    with (
        ReadyWatch(serving.api, serving.namespace) as readiness,
        reach(serving.cluster, serving.gateway_pod(), GATEWAY_PORT) as base,
    ):
        serving.wait_routed(base, "flapping")
        with Load(base, "flapping", clients=2) as load:
            load.wait_for_requests(10)
            with stopped(pid, FLAP_LIMIT):
                started = time.monotonic()

                def flapped() -> dict[str, Any] | None:
                    now = snapshot(serving)
                    marked = any(
                        t > started and pod == engine and status != "True"
                        for t, pod, status, _ in readiness.changes
                    )
                    return now if now["nodes_not_ready"] and marked else None

                down = kube.wait_until(
                    "the nodes NotReady and the engine marked unready", flapped, FLAP_LIMIT, 1
                )
                marked_after = time.monotonic() - started
            resumed = time.monotonic()

            def nodes_ready() -> bool:
                return not snapshot(serving)["nodes_not_ready"]

            kube.wait_until("the nodes Ready again", nodes_ready, 60, 0.5)
            nodes_back = time.monotonic() - resumed

            def pods_ready() -> bool:
                return not snapshot(serving)["pods_not_ready"]

            kube.wait_until("every pod Ready again", pods_ready, 30, 0.2)
            failed_at_recovery = len(load.failures)
            load.wait_for_requests(20)
            time.sleep(2)  # the watch's last changes
        failures = list(load.failures)
    ours = [(round(t - started, 2), s, r) for t, pod, s, r in readiness.changes if pod == engine]
    unready = [
        later[0] - earlier[0]
        for earlier, later in itertools.pairwise(ours)
        if earlier[1] != "True" and later[1] == "True" and earlier[0] > 0
    ]
    print(
        f"\nnode flap: kwok stopped; nodes {down['nodes_not_ready']} NotReady and the engine "
        f"marked unready after {marked_after:.1f} s; the engine's Ready changes (s after the "
        f"stop, status, reason): {ours}; unready for {[round(u, 2) for u in unready]} s; kwok "
        f"continued: nodes Ready {nodes_back:.1f} s later; client failures by the recovery "
        f"{failed_at_recovery}, in all {len(failures)} ({failures[:3]})"
    )
    assert unready, f"the engine was never Ready again after the mark: {ours}"
    assert snapshot(serving)["pods_not_ready"] == []
    # After the recovery every request is answered again.
    assert len(failures) == failed_at_recovery, failures[failed_at_recovery:][:5]
    serving.wait_ready("flapping", timeout=60)
