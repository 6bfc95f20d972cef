"""Drill: two operator replicas with kopf peering; the active one is killed with SIGKILL and
the standby takes over within 15 s (issue 17). While both run, only one acts: the standby
makes no write. Its day-2 loop follows the same rule (controller/standby.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from harness import kube
from harness.providers import Cluster
from test_drills_api import converge, set_replicas, spec
from test_operator import REPO, OperatorProcess, create

pytestmark = pytest.mark.drill

PEERING = "llm-operator-drill"
TAKEOVER_SECONDS = 15.0


@pytest.fixture
def peering(cluster: Cluster, api_client: client.ApiClient, namespace: str) -> str:
    helm = cluster.which("helm") or "helm"
    rendered = subprocess.run(
        [helm, "template", "x", str(REPO / "charts" / "llm-operator"), "--kube-version",
         "1.36.0", "--set", "ha.enabled=true", "--show-only",
         "templates/crds/kopf-peerings.yaml"],
        capture_output=True, text=True, timeout=120, check=True, env=cluster.env(),
    )  # fmt: skip
    for doc in yaml.safe_load_all(rendered.stdout):
        if doc:
            kube.apply(api_client, doc, None)
    for name in ("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        kube.wait_until(f"{name} Established", lambda n=name: kube.crd_established(api_client, n))  # type: ignore[misc]
    kube.apply(
        api_client,
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}},
        namespace,
    )
    return PEERING


@pytest.fixture
def replicas(
    cluster: Cluster, namespace: str, peering: str, tmp_path: Path
) -> Iterator[list[OperatorProcess]]:
    started = []
    for index in range(2):
        os.environ["POD_ID"] = f"replica-{index}"  # kopf's identity in the peering
        try:
            started.append(
                OperatorProcess(
                    cluster, namespace, tmp_path / f"operator-{index}.log",
                    ("--peering", peering),
                )
            )  # fmt: skip
        finally:
            del os.environ["POD_ID"]
    yield started
    for process in started:
        if process.process.poll() is None:
            process.stop()
        log = process.log_path.read_text()
        assert "Traceback" not in log, log[-4000:]


def peers(api_client: client.ApiClient, namespace: str) -> dict[str, Any]:
    body = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        "kopf.dev", "v1", namespace, "kopfpeerings", PEERING
    )
    return dict(body.get("status") or {})


def test_the_standby_takes_over_within_15_s_of_a_kill(
    api_client: client.ApiClient, namespace: str, replicas: list[OperatorProcess]
) -> None:
    status = kube.wait_until(
        "both replicas in the peering",
        lambda: (lambda s: s if len(s) == 2 else None)(peers(api_client, namespace)),
        timeout=60,
    )
    active_id = max(status, key=lambda peer: status[peer]["priority"])
    active = replicas[int(active_id.rsplit("-", 1)[1])]
    standby = next(r for r in replicas if r is not active)

    wanted = {f"h{i}": 1 for i in range(3)}
    for name in wanted:
        create(api_client, namespace, spec(name, 1))
    converge(api_client, namespace, wanted, 90)
    assert standby.writes() == 0, "the standby wrote while the active replica ran"
    assert active.writes() > 0

    active.process.send_signal(signal.SIGKILL)
    active.process.wait(10)
    killed = time.monotonic()
    for name in wanted:
        set_replicas(api_client, namespace, name, 2)
        wanted[name] = 2
    converge(api_client, namespace, wanted, 60)
    took = time.monotonic() - killed
    print(f"\nHA drill: standby converged {took:.1f} s after SIGKILL of the active replica")
    assert standby.writes() > 0
    assert took <= TAKEOVER_SECONDS, f"the standby took over {took:.1f} s after the kill"
