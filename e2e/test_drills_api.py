"""Drills: the API server in trouble, and watches that break (issue 17).

The operator runs as a subprocess whose only way to the API server is a fault-injecting proxy
(harness/faultproxy.py); the test itself talks to the API server directly, so it can change
LLMDeployments while the operator cannot see them. Checked each time: the operator never
exits and logs no traceback, and every LLMDeployment converges to its latest spec (its
status.observedGeneration is its generation, and its Deployment has the replicas it asks for).

- outage: the API is gone for OUTAGE_SECONDS (60 by default) while specs change and one is
  created; the operator's request rate stays bounded (no retry storm), and it converges within
  10 s of the API's return;
- bursts: 429 and 500 with Retry-After on 30% of requests, resets on 10%, then 2 s answers;
- watches: every open watch cut every 2 s and 30% of new watches answered 410 Gone, while 100
  spec updates land: 0 lost.

Figures go to bench/results/reliability.md (printed with -s).
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube
from harness.faultproxy import FaultProxy
from harness.providers import Cluster
from test_operator import SPEC, OperatorProcess, create, custom, get

pytestmark = pytest.mark.drill

GROUP, VERSION, PLURAL = "llmoperator.io", "v1alpha1", "llmdeployments"
OUTAGE_SECONDS = float(os.environ.get("LLMOP_DRILL_OUTAGE_SECONDS", "60"))
#: Requests per second the operator may make on average while the API is gone (measured: 5;
#: a retry storm is hundreds).
OUTAGE_RATE_BOUND = 10.0


@pytest.fixture
def proxy(cluster: Cluster) -> Iterator[FaultProxy]:
    with FaultProxy(cluster.kubeconfig) as p:
        yield p


@pytest.fixture
def operator(
    cluster: Cluster, namespace: str, proxy: FaultProxy, tmp_path: Path
) -> Iterator[OperatorProcess]:
    behind = dataclasses.replace(cluster, kubeconfig=proxy.kubeconfig(tmp_path / "proxy.yaml"))
    process = OperatorProcess(behind, namespace, tmp_path / "operator.log")
    yield process
    alive = process.process.poll() is None
    process.stop()
    log = process.log_path.read_text()
    assert alive, f"the operator exited during the drill:\n{log[-4000:]}"
    assert "Traceback" not in log, log[-4000:]


def spec(name: str, replicas: int) -> dict[str, Any]:
    body = {**SPEC, "metadata": {"name": name}, "spec": {**SPEC["spec"], "replicas": replicas}}
    body["spec"]["model"] = {**SPEC["spec"]["model"], "servedName": name}
    return body


def set_replicas(api: client.ApiClient, namespace: str, name: str, replicas: int) -> None:
    for _ in range(5):  # the test's own writes go straight to the API server
        try:
            custom(api).patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"spec": {"replicas": replicas}}
            )
            return
        except ApiException as error:
            if error.status != 409:
                raise


def lagging(api: client.ApiClient, namespace: str, wanted: dict[str, int]) -> list[str]:
    """The LLMDeployments not yet converged to their latest spec."""
    apps = client.AppsV1Api(api)
    out = []
    for name, replicas in wanted.items():
        body = get(api, namespace, name)
        observed = (body.get("status") or {}).get("observedGeneration")
        try:
            live = apps.read_namespaced_deployment(name, namespace).spec.replicas
        except ApiException as error:
            if error.status != 404:
                raise
            live = None
        if observed != body["metadata"]["generation"] or live != replicas:
            out.append(f"{name} (generation {body['metadata']['generation']}, observed "
                       f"{observed}, replicas {live} of {replicas})")  # fmt: skip
    return out


def converge(
    api: client.ApiClient, namespace: str, wanted: dict[str, int], timeout: float
) -> float:
    start = time.monotonic()
    kube.wait_until(
        f"{len(wanted)} LLMDeployments converged",
        lambda: not lagging(api, namespace, wanted),
        timeout=timeout,
        interval=0.25,
    )
    return time.monotonic() - start


def test_an_api_outage_and_error_bursts_cost_no_crash_no_storm_and_nothing_lost(
    api_client: client.ApiClient, namespace: str, proxy: FaultProxy, operator: OperatorProcess
) -> None:
    wanted = {f"m{i}": 1 for i in range(5)}
    for name in wanted:
        create(api_client, namespace, spec(name, 1))
    converge(api_client, namespace, wanted, 120)

    # Bursts: 429s, then 500s, with Retry-After, and resets, while specs change.
    proxy.reset_ratio = 0.1
    proxy.error_ratio = 0.3
    for status, names in ((429, ["m0", "m1"]), (500, ["m2", "m3"])):
        proxy.error_status = status
        for name in names:
            set_replicas(api_client, namespace, name, 2)
            wanted[name] = 2
        converge(api_client, namespace, wanted, 90)
    proxy.error_ratio = proxy.reset_ratio = 0.0
    # Slow answers.
    proxy.delay = 2.0
    set_replicas(api_client, namespace, "m4", 2)
    wanted["m4"] = 2
    slow = converge(api_client, namespace, wanted, 90)
    proxy.delay = 0.0

    # The outage: specs change and one is created while the operator cannot see them.
    writes_before = operator.writes()
    proxy.outage = True
    began = time.time()
    time.sleep(min(5.0, OUTAGE_SECONDS / 2))
    for name in ("m0", "m2"):
        set_replicas(api_client, namespace, name, 1)
        wanted[name] = 1
    create(api_client, namespace, spec("during", 1))
    wanted["during"] = 1
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.time() - began)))
    assert operator.process.poll() is None, "the operator exited during the outage"
    proxy.outage = False
    ended = time.time()
    recovery = converge(api_client, namespace, wanted, 60)
    attempts = proxy.requests_between(began, ended)
    rate = attempts / (ended - began)
    print(
        f"\nAPI drill: bursts injected {dict(proxy.injected)}; slow answers converged in "
        f"{slow:.1f} s; outage {ended - began:.0f} s: {attempts} requests ({rate:.2f}/s, busiest "
        f"second {proxy.busiest_second(began + 1, ended)}), converged {recovery:.1f} s after the "
        f"API's return; operator writes {operator.writes() - writes_before:.0f} since the outage"
    )
    assert rate <= OUTAGE_RATE_BOUND, f"{rate:.1f} requests/s while the API was gone"
    assert recovery <= 10.0, f"converged {recovery:.1f} s after the API's return"


def test_broken_watches_lose_no_spec_update(
    api_client: client.ApiClient, namespace: str, proxy: FaultProxy, operator: OperatorProcess
) -> None:
    wanted = {f"w{i}": 1 for i in range(10)}
    for name in wanted:
        create(api_client, namespace, spec(name, 1))
    converge(api_client, namespace, wanted, 120)

    stop = threading.Event()

    def cutter() -> None:
        while not stop.wait(2.0):
            proxy.cut_watches()

    proxy.gone_ratio = 0.3
    thread = threading.Thread(target=cutter, daemon=True)
    thread.start()
    try:
        rng = random.Random(5)
        names = sorted(wanted)
        for update in range(100):
            name = names[update % len(names)]
            wanted[name] = rng.choice([1, 2]) if wanted[name] == 0 else 3 - wanted[name]
            set_replicas(api_client, namespace, name, wanted[name])
            time.sleep(0.2)
        # Converged with the faults still on: every latest update was seen.
        took = converge(api_client, namespace, wanted, 90)
    finally:
        stop.set()
        thread.join(5)
        proxy.gone_ratio = 0.0
    print(
        f"\nwatch drill: 100 updates to 10 LLMDeployments; faults {dict(proxy.injected)}; "
        f"converged {took:.1f} s after the last update; lost 0"
    )
    assert proxy.injected["cut"] > 0 and proxy.injected["410"] > 0
