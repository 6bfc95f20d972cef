"""Drills: the operator against what others do to its objects, and its own restarts (issue 17).

- deletion while down: every LLMDeployment deleted while the operator is stopped; after its
  restart the routing table drops them within 10 s;
- restarts stay quiet: a restart re-posts no Event and writes nothing that already took;
- kill -9: N LLMDeployments created, edited and deleted while the operator is SIGKILLed at
  random moments; afterwards every one converged, no orphaned or missing child, status present;
- conflicts: another field manager edits the engine Deployment's pod template and strips the
  children's labels; the operator takes the pod template back (with a Warning Event naming the
  manager), keeps foreign metadata labels/annotations, and keeps track of the children.

The operator runs as a subprocess (e2e/test_operator.py's OperatorProcess). Figures go to
bench/results/reliability.md (printed with -s).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube
from harness.providers import Cluster
from test_drills_api import converge, set_replicas, spec
from test_operator import GROUP, PLURAL, VERSION, OperatorProcess, create, custom, get

pytestmark = pytest.mark.drill

ROUTES = "llm-operator-routes"


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster, namespace, tmp_path / "operator.log")
    yield process
    process.stop()
    log = process.log_path.read_text()
    assert "Traceback" not in log, log[-4000:]


def routed(api: client.ApiClient, namespace: str) -> list[str] | None:
    """The models the routing table lists (None: no table)."""
    try:
        data = client.CoreV1Api(api).read_namespaced_config_map(ROUTES, namespace).data
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    table = yaml.safe_load(data["routes.yaml"]) or {}
    return sorted(str(m.get("name")) for m in table.get("models") or [])


def test_llmdeployments_deleted_while_the_operator_is_down_leave_the_table_on_restart(
    api_client: client.ApiClient, namespace: str, cluster: Cluster, tmp_path: Path
) -> None:
    extra = ("--gateway-namespace", namespace)
    wanted = {f"d{i}": 1 for i in range(3)}
    first = OperatorProcess(cluster, namespace, tmp_path / "first.log", extra)
    try:
        for name in wanted:
            create(api_client, namespace, spec(name, 1))
        converge(api_client, namespace, wanted, 120)
        kube.wait_until(
            "3 models routed", lambda: routed(api_client, namespace) == sorted(wanted), timeout=30
        )
    finally:
        first.stop()
    for name in wanted:
        custom(api_client).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    kube.wait_until(
        "the LLMDeployments gone",
        lambda: (
            not custom(api_client).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)[
                "items"
            ]
        ),
        timeout=60,
    )
    second = OperatorProcess(cluster, namespace, tmp_path / "second.log", extra)
    try:
        started = time.monotonic()
        kube.wait_until(
            "the table to drop them",
            lambda: routed(api_client, namespace) == [],
            timeout=10,
            interval=0.2,
        )
        took = time.monotonic() - started
        print(f"\ndeletion while down: 3 deleted; the table dropped them {took:.1f} s after start")
        # One write, then quiet.
        time.sleep(2)
        assert second.writes() == 1, second.metrics()
    finally:
        second.stop()
    assert "Traceback" not in second.log_path.read_text()


def events_of(api: client.ApiClient, namespace: str) -> list[Any]:
    items = client.CoreV1Api(api).list_namespaced_event(namespace).items
    return [e for e in items if e.involved_object.kind == "LLMDeployment"]


def intrude(api: client.ApiClient, namespace: str, name: str, round_: int) -> None:
    """Another field manager: an env var and a nodeSelector in the engine's pod template,
    a label and an annotation on the Deployment itself; the Service loses its managed-by
    label (a JSON patch, whoever owns it)."""
    live = client.AppsV1Api(api).read_namespaced_deployment(name, namespace)
    kube.apply(
        api,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"team": "intruders"},
                "annotations": {"intruder/round": str(round_)},
            },
            "spec": {
                "selector": {"matchLabels": live.spec.selector.match_labels},
                "template": {
                    "metadata": {"labels": live.spec.template.metadata.labels},
                    "spec": {
                        "nodeSelector": {"intruder/disk": "ssd"},
                        "containers": [
                            {"name": "vllm", "env": [{"name": "INTRUDER", "value": str(round_)}]}
                        ],
                    },
                },
            },
        },
    )
    client.CoreV1Api(api).patch_namespaced_service(
        name,
        namespace,
        [{"op": "remove", "path": "/metadata/labels/app.kubernetes.io~1managed-by"}],
    )


def restored(api: client.ApiClient, namespace: str, name: str, round_: int) -> bool:
    deployment = client.AppsV1Api(api).read_namespaced_deployment(name, namespace)
    pod = deployment.spec.template.spec
    envs = {e.name for c in pod.containers for e in c.env or []}
    service = client.CoreV1Api(api).read_namespaced_service(name, namespace)
    return (
        "INTRUDER" not in envs
        and not (pod.node_selector or {}).get("intruder/disk")
        and (service.metadata.labels or {}).get("app.kubernetes.io/managed-by") == "llm-operator"
        # Metadata is theirs to keep.
        and (deployment.metadata.labels or {}).get("team") == "intruders"
        and (deployment.metadata.annotations or {}).get("intruder/round") == str(round_)
    )


def test_another_managers_edits_of_the_children_are_taken_back(
    api_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    wanted = {f"c{i}": 1 for i in range(3)}
    for name in wanted:
        create(api_client, namespace, spec(name, 1))
    converge(api_client, namespace, wanted, 120)
    took = []
    for round_ in range(3):
        began = time.monotonic()
        for name in wanted:
            intrude(api_client, namespace, name, round_)
        kube.wait_until(
            f"round {round_}: every child restored",
            lambda: all(restored(api_client, namespace, n, round_) for n in wanted),  # noqa: B023
            timeout=30,
            interval=0.25,
        )
        took.append(time.monotonic() - began)
    converge(api_client, namespace, wanted, 60)
    warnings = [e for e in events_of(api_client, namespace) if e.reason == "ForeignFieldsRemoved"]
    assert {e.involved_object.name for e in warnings} == set(wanted)
    message = warnings[0].message
    assert "llm-operator-e2e" in message and "nodeSelector" in message, message
    assert "env[name=INTRUDER]" in message, message
    print(
        f"\nconflicts: 3 LLMDeployments x 3 rounds of foreign edits; restored in "
        f"{', '.join(f'{t:.1f}' for t in took)} s; {len(warnings)} ForeignFieldsRemoved Events"
    )


def test_a_kubectl_rollout_restart_is_honoured(
    api_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """The pod template is the operator's, but a restart asked for with `kubectl rollout
    restart` (its annotation, set by another manager) is kept: one new ReplicaSet, not two."""
    name = "restarted"
    create(api_client, namespace, spec(name, 1))
    converge(api_client, namespace, {name: 1}, 120)
    apps = client.AppsV1Api(api_client)
    stamp = "2026-12-02T15:00:00Z"
    apps.patch_namespaced_deployment(  # what `kubectl rollout restart` sends
        name,
        namespace,
        {"spec": {"template": {"metadata": {"annotations": {RESTART: stamp}}}}},
        field_manager="kubectl-rollout",
    )
    # And another manager's addition, so the operator replaces the template meanwhile.
    intrude(api_client, namespace, name, 0)
    kube.wait_until(
        "the intrusion restored", lambda: restored(api_client, namespace, name, 0), timeout=30
    )
    time.sleep(3)  # a second rollout would show up as a third ReplicaSet by now
    live = apps.read_namespaced_deployment(name, namespace)
    assert (live.spec.template.metadata.annotations or {}).get(RESTART) == stamp
    replica_sets = apps.list_namespaced_replica_set(
        namespace, label_selector=f"llmoperator.io/deployment={name}"
    ).items
    templates = {(rs.spec.template.metadata.annotations or {}).get(RESTART) for rs in replica_sets}
    # The first rollout (no annotation) and the restart; the intrusion's template never ran
    # long enough to matter, but if it did it carries the stamp too.
    assert templates <= {None, stamp} and stamp in templates, templates


RESTART = "kubectl.kubernetes.io/restartedAt"


#: LLMDeployments and kills of the kill -9 drill: 20 and 5 in `make test`, 100 and 100 in
#: `make chaos` (LLMOP_DRILL_N, LLMOP_DRILL_KILLS).
KILL_N = int(os.environ.get("LLMOP_DRILL_N", "20"))
KILLS = int(os.environ.get("LLMOP_DRILL_KILLS", "5"))


def kill(process: OperatorProcess) -> float:
    """SIGKILL the operator; the writes it had counted (read just before)."""
    try:
        writes = process.writes()
    except OSError:
        writes = 0.0
    process.process.kill()
    process.process.wait(10)
    process.log.close()
    return writes


def test_kill_9_while_llmdeployments_are_created_edited_and_deleted_loses_nothing(
    api_client: client.ApiClient, namespace: str, cluster: Cluster, tmp_path: Path
) -> None:
    rng = random.Random(17)
    wanted = {f"k{i}": 1 for i in range(KILL_N)}
    writes = 0.0
    logs = []
    process = OperatorProcess(cluster, namespace, tmp_path / "run0.log")
    logs.append(process.log_path)
    began = time.monotonic()
    try:
        for name in wanted:
            create(api_client, namespace, spec(name, 1))
        for round_ in range(KILLS):
            time.sleep(rng.uniform(0.3, 2.5))
            writes += kill(process)
            # While it is down: an edit, a create and (every other round) a delete.
            edited = rng.choice(sorted(wanted))
            wanted[edited] = 3 - wanted[edited]
            set_replicas(api_client, namespace, edited, wanted[edited])
            fresh = f"k{KILL_N + round_}"
            create(api_client, namespace, spec(fresh, 1))
            wanted[fresh] = 1
            if round_ % 2:
                gone = rng.choice(sorted(set(wanted) - {edited, fresh}))
                custom(api_client).delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, gone
                )
                del wanted[gone]
            process = OperatorProcess(cluster, namespace, tmp_path / f"run{round_ + 1}.log")
            logs.append(process.log_path)
        took = converge(api_client, namespace, wanted, 180)
        time.sleep(3)  # settle
        writes += process.writes()
    finally:
        process.stop()
    total = time.monotonic() - began
    apps = client.AppsV1Api(api_client)

    def orphans() -> list[str]:
        live = custom(api_client).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        uids = {b["metadata"]["uid"] for b in live["items"]}
        out = []
        for d in apps.list_namespaced_deployment(namespace).items:
            owners = {r.uid for r in d.metadata.owner_references or []}
            if not owners & uids:
                out.append(d.metadata.name)
        return out

    kube.wait_until("no orphaned Deployment", lambda: not orphans(), timeout=60)
    deployments = {d.metadata.name for d in apps.list_namespaced_deployment(namespace).items}
    assert deployments == set(wanted), deployments ^ set(wanted)
    for name in wanted:
        assert (get(api_client, namespace, name).get("status") or {}).get("phase"), name
    # A restart repeats no write that took: no Deployment's template was ever re-rendered
    # differently (one ReplicaSet each), and no Event of the operator's is posted twice.
    replica_sets: dict[str, int] = {}
    for rs in apps.list_namespaced_replica_set(namespace).items:
        owner = next(iter(rs.metadata.owner_references or []), None)
        if owner is not None:
            replica_sets[owner.name] = replica_sets.get(owner.name, 0) + 1
    assert all(n == 1 for n in replica_sets.values()), replica_sets
    ours = [
        (e.involved_object.name, e.reason, e.message)
        for e in events_of(api_client, namespace)
        if e.reporting_component == "llm-operator"
    ]
    assert len(ours) == len(set(ours)), ours
    tracebacks = [p.name for p in logs if "Traceback" in p.read_text()]
    assert not tracebacks, tracebacks
    print(
        f"\nkill -9: {KILL_N} LLMDeployments (+{KILLS} created, {KILLS // 2} deleted, {KILLS} "
        f"edited while down), {KILLS} SIGKILLs; converged {took:.1f} s after the last restart "
        f"({total:.0f} s in all); {writes:.0f} writes counted ({writes / len(wanted):.2f} per "
        f"LLMDeployment, a lower bound: a killed process's last writes are not read); "
        f"{len(ours)} Events of the operator's; one ReplicaSet per Deployment"
    )


def test_restarts_repost_no_event_and_write_nothing(
    api_client: client.ApiClient, namespace: str, cluster: Cluster, tmp_path: Path
) -> None:
    """Events come only with a transition recorded in status: a Failed LLMDeployment and a
    Ready one through 3 restarts (SIGTERM and SIGKILL) cost no Event and no write."""
    process = OperatorProcess(cluster, namespace, tmp_path / "run0.log")
    try:
        create(api_client, namespace, spec("ok", 1))
        broken = spec("broken", 1)
        broken["spec"]["parallelism"] = {"tensor": 8}  # 28 heads cannot be split 8 ways
        create(api_client, namespace, broken)
        kube.wait_until(
            "one Failed, one Ready",
            lambda: (
                (get(api_client, namespace, "broken").get("status") or {}).get("phase") == "Failed"
                and (get(api_client, namespace, "ok").get("status") or {}).get("phase") == "Ready"
            ),
            timeout=90,
        )
        time.sleep(2)  # settle
    finally:
        process.stop()
    before = sorted((e.involved_object.name, e.reason) for e in events_of(api_client, namespace))
    assert before == [("broken", "CannotPlan")], before
    names = ("ok", "broken")
    versions = {n: get(api_client, namespace, n)["metadata"]["resourceVersion"] for n in names}
    writes = []
    for round_ in range(3):
        process = OperatorProcess(cluster, namespace, tmp_path / f"run{round_ + 1}.log")
        time.sleep(4)  # list, reconcile both, settle
        writes.append(process.writes())
        if round_ % 2:
            kill(process)
        else:
            process.stop()
    after = sorted((e.involved_object.name, e.reason) for e in events_of(api_client, namespace))
    print(f"\nquiet restarts: 3 restarts, writes {writes}, Events {len(before)} -> {len(after)}")
    assert after == before
    assert writes == [0.0, 0.0, 0.0]
    assert versions == {
        n: get(api_client, namespace, n)["metadata"]["resourceVersion"] for n in versions
    }
