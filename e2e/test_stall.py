"""Progress-based liveness through a real install (the chart's operator, its RBAC, the local
cluster's Prometheus scraping the simulators): a hung engine (`--sim-hang`: /health stays 200,
no token is ever produced) under load is deleted within the configured window and recreated by
its Deployment, with a Warning Event carrying the numbers; an idle hung engine and one still
loading (start-up delay) are left alone over the same window."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from openai import OpenAI

from harness import kube
from harness.providers import Cluster
from harness.serving import Serving, installed, llmd, pod_prometheus_url, reach

STALL_SECONDS = 20
#: The operator looks every 15 s (stall.CHECK_SECONDS) and Prometheus scrapes every 2 s: a
#: stall is acted on at most one look after the timeout, plus a scrape.
WINDOW_SECONDS = STALL_SECONDS + 15 + 10
ENGINE_PORT = 8000
HANG = {"name": "LLMOP_SIM_HANG", "value": "true"}


@pytest.fixture(scope="module")
def serving(
    cluster: Cluster, api_client: client.ApiClient, crd_names: list[str], tmp_path_factory: Any
) -> Iterator[Serving]:
    url = pod_prometheus_url(cluster)
    if url is None:
        pytest.skip("stalls are seen in Prometheus: set LLMOP_E2E_PROMETHEUS_POD_URL")
    home = tmp_path_factory.mktemp("helm-home")
    values = [
        f"operator.prometheusUrl={url}",
        f"operator.stallTimeoutSeconds={STALL_SECONDS}",
        "gateway.enabled=false",
    ]
    with installed(cluster, api_client, home, "stall", *values) as s:
        yield s


def all_pods(serving: Serving, name: str) -> list[Any]:
    selector = f"llmoperator.io/deployment={name}"
    return list(
        client.CoreV1Api(serving.api)
        .list_namespaced_pod(serving.namespace, label_selector=selector)
        .items
    )


class Pressure:
    """Clients holding requests open on one engine pod (each hangs until the pod goes)."""

    def __init__(self, base_url: str, model: str, clients: int = 3) -> None:
        self.model = model
        self.sdk = OpenAI(base_url=f"{base_url}/v1", api_key="e2e", max_retries=0, timeout=300)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.sdk.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": "hi"}], max_tokens=8
                )
            except Exception:  # the pod went away, or is still loading: ask again
                time.sleep(0.5)

    def __enter__(self) -> Pressure:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()


def test_a_hung_engine_under_load_is_restarted_and_idle_and_loading_ones_are_not(
    serving: Serving,
) -> None:
    if serving.cluster.provider != "local":
        pytest.skip("the hang fault is the simulator's, which only the local cluster runs")
    serving.apply(llmd("hung", env=[HANG]))
    serving.apply(llmd("idle", env=[HANG]))
    loading = {"name": "LLMOP_SIM_STARTUP_DELAY", "value": "600"}
    serving.apply(llmd("loading", env=[HANG, loading]))
    serving.wait_ready("hung")
    serving.wait_ready("idle")
    [hung] = serving.engines("hung")
    [idle] = serving.engines("idle")
    [slow] = kube.wait_until(
        "the loading engine's pod running",
        lambda: [p for p in all_pods(serving, "loading") if p.status.pod_ip],
        timeout=90,
    )
    with (
        reach(serving.cluster, hung, ENGINE_PORT) as hung_url,
        reach(serving.cluster, idle, ENGINE_PORT) as _,
        reach(serving.cluster, slow, ENGINE_PORT) as slow_url,
        Pressure(hung_url, "hung"),
        Pressure(slow_url, "loading"),
    ):
        started = time.monotonic()

        def hung_gone() -> bool:
            uids = {
                p.metadata.uid
                for p in all_pods(serving, "hung")
                if not p.metadata.deletion_timestamp
            }
            return hung.metadata.uid not in uids

        kube.wait_until("the hung engine restarted", hung_gone, timeout=WINDOW_SECONDS + 60)
        took = time.monotonic() - started
        print(f"hung engine deleted {took:.0f}s after the load began (timeout {STALL_SECONDS}s)")
        assert STALL_SECONDS <= took <= WINDOW_SECONDS, took
        # Its Deployment brings a new one.
        kube.wait_until(
            "a new engine for hung",
            lambda: [p for p in serving.engines("hung") if p.metadata.uid != hung.metadata.uid],
            timeout=90,
        )
        # The others stay through a whole window more.
        time.sleep(max(0.0, WINDOW_SECONDS - (time.monotonic() - started)))
    events = kube.events_for(serving.api, serving.namespace, "hung", kind="LLMDeployment")
    stalled = [e for e in events if e.reason == "EngineStalled"]
    assert stalled, [(e.reason, e.message) for e in events]
    assert stalled[0].type == "Warning"
    message = stalled[0].message
    numbers = re.search(
        rf"engine pod {hung.metadata.name} restarted: (\d+) requests running and (\d+) waiting",
        message,
    )
    assert numbers, message
    assert int(numbers[1]) + int(numbers[2]) == 3, message  # the three clients' requests
    assert "generated-token counter stuck at 0 for" in message, message
    for name, pod in (("idle", idle), ("loading", slow)):
        assert [p.metadata.uid for p in all_pods(serving, name)] == [pod.metadata.uid], name
        events = kube.events_for(serving.api, serving.namespace, name, kind="LLMDeployment")
        assert not [e for e in events if e.reason == "EngineStalled"], name
    # The loading one really was asked and not Ready all along.
    [now] = all_pods(serving, "loading")
    ready = [c for c in now.status.conditions or [] if c.type == "Ready"]
    assert ready and ready[0].status == "False"
