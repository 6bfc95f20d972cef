"""Drill: the operator killed with SIGKILL again and again while LLMDeployments are created,
edited and deleted (issue 17). Afterwards everything converges: each LLMDeployment has its
status for its latest generation and exactly one Deployment and one Service, with the replicas
it asks for; no child is left without a living owner; no traceback in any of the logs.

`make test` runs a quick size (LLMOP_DRILL_KILL_OBJECTS=20, LLMOP_DRILL_KILLS=10); `make chaos`
can run the issue's (100 and 100) by setting the variables.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube
from harness.providers import Cluster
from test_drills_api import lagging, set_replicas, spec
from test_operator import GROUP, PLURAL, VERSION, OperatorProcess, create, custom

pytestmark = pytest.mark.drill

OBJECTS = int(os.environ.get("LLMOP_DRILL_KILL_OBJECTS", "20"))
KILLS = int(os.environ.get("LLMOP_DRILL_KILLS", "10"))


def orphans_and_duplicates(api: client.ApiClient, namespace: str) -> list[str]:
    """Children without a living owner, and LLMDeployments with more than one of a kind."""
    owners = {
        o["metadata"]["uid"]: o["metadata"]["name"]
        for o in custom(api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)[
            "items"
        ]
    }
    selector = "app.kubernetes.io/managed-by=llm-operator"
    problems = []
    seen: dict[tuple[str, str], int] = {}
    children = [
        *client.AppsV1Api(api).list_namespaced_deployment(namespace, label_selector=selector).items,
        *client.CoreV1Api(api).list_namespaced_service(namespace, label_selector=selector).items,
    ]
    for child in children:
        if child.metadata.deletion_timestamp is not None:
            continue
        refs = [r for r in child.metadata.owner_references or [] if r.controller]
        kind = type(child).__name__
        if len(refs) != 1 or refs[0].uid not in owners:
            problems.append(f"orphan {kind} {child.metadata.name}")
            continue
        key = (owners[refs[0].uid], kind)
        seen[key] = seen.get(key, 0) + 1
    problems += [f"{n} {kind}s of {owner}" for (owner, kind), n in seen.items() if n > 1]
    missing = [
        f"{name} has no {kind}"
        for name in owners.values()
        for kind in ("V1Deployment", "V1Service")
        if (name, kind) not in seen
    ]
    return problems + missing


def test_repeated_sigkill_under_churn_loses_nothing(
    cluster: Cluster, api_client: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    rng = random.Random(11)
    wanted: dict[str, int] = {}
    next_name = 0
    logs: list[Path] = []
    operations = 0
    started = time.monotonic()
    for kill in range(KILLS + 1):
        log = tmp_path / f"operator-{kill}.log"
        logs.append(log)
        operator = OperatorProcess(cluster, namespace, log)
        # A burst of changes, then the kill at a random moment while they are being handled.
        for _ in range(max(1, OBJECTS // 4)):
            action = rng.random()
            if len(wanted) < OBJECTS and (action < 0.5 or not wanted):
                name = f"k{next_name}"
                next_name += 1
                wanted[name] = rng.choice([1, 2])
                create(api_client, namespace, spec(name, wanted[name]))
            elif action < 0.85:
                name = rng.choice(sorted(wanted))
                wanted[name] = 3 - wanted[name]
                set_replicas(api_client, namespace, name, wanted[name])
            else:
                name = rng.choice(sorted(wanted))
                try:
                    custom(api_client).delete_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, name
                    )
                except ApiException as error:
                    if error.status != 404:
                        raise
                del wanted[name]
            operations += 1
        if kill == KILLS:
            break
        time.sleep(rng.uniform(0.2, 3.0))
        operator.process.send_signal(signal.SIGKILL)
        operator.process.wait(10)
        operator.log.close()
    # The last operator runs on: everything converges, with no orphan and no duplicate.
    try:
        kube.wait_until(
            f"{len(wanted)} LLMDeployments converged",
            lambda: not lagging(api_client, namespace, wanted),
            timeout=120,
        )
        kube.wait_until(
            "no orphaned or duplicate child",
            lambda: not orphans_and_duplicates(api_client, namespace),
            timeout=120,
        )
    finally:
        operator.stop()
    for log in logs:
        text = log.read_text()
        assert "Traceback" not in text, f"{log.name}:\n{text[-4000:]}"
    print(
        f"\nkill drill: {KILLS} SIGKILLs, {operations} operations ({next_name} created, "
        f"{next_name - len(wanted)} deleted), {len(wanted)} left; all converged, 0 orphans, "
        f"0 duplicates, in {time.monotonic() - started:.0f} s"
    )
