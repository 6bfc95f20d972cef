"""The reconcile loop without a cluster: a fake API that records every write."""

from __future__ import annotations

import asyncio
import copy
import itertools
import threading
from typing import Any

import pytest

from llm_operator.constants import FIELD_MANAGER
from llm_operator.controller.reconciler import HANDOVER_MANAGER, Controller
from llm_operator.controller.slots import PrioritySlots
from llm_operator.kube.transport import ApiError
from llm_operator.render import RenderConfig


class FakeKube:
    """Just enough of KubeClient: objects by (kind, name), resourceVersions, status, events,
    and pods to read (which it only ever hands out)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.writes: list[tuple[str, str, str]] = []
        self.handovers: list[tuple[str, dict[str, Any]]] = []
        self.versions = itertools.count(100)
        self.pods: list[dict[str, Any]] = []
        self.pod_lists: list[tuple[str, str]] = []
        self.pods_error: ApiError | None = None

    def apply(self, obj: dict[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
        if field_manager != FIELD_MANAGER:
            self.handovers.append((field_manager, copy.deepcopy(obj)))
            return obj
        self.writes.append(("apply", obj["kind"], obj["metadata"]["name"]))
        stored = copy.deepcopy(obj)
        spec_fields = {f"f:{k}": {} for k in obj.get("spec", {})}
        stored["metadata"]["managedFields"] = [
            {"manager": field_manager, "operation": "Apply", "fieldsV1": {"f:spec": spec_fields}}
        ]
        stored["metadata"]["resourceVersion"] = str(next(self.versions))
        stored["metadata"].setdefault("uid", f"uid-{obj['kind']}")
        self.objects[(obj["kind"], obj["metadata"]["name"])] = stored
        return copy.deepcopy(stored)

    def delete(self, obj: dict[str, Any]) -> None:
        self.writes.append(("delete", obj["kind"], obj["metadata"]["name"]))
        self.objects.pop((obj["kind"], obj["metadata"]["name"]), None)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.writes.append(("status", "LLMDeployment", name))
        self.statuses.append(status)

    def clear_annotation(self, namespace: str, name: str, annotation: str) -> None:
        self.writes.append(("unannotate", "LLMDeployment", f"{name}:{annotation}"))

    def post_event(self, owner: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        self.pod_lists.append((namespace, label_selector))
        if self.pods_error is not None:
            raise self.pods_error
        return copy.deepcopy(self.pods)


def body(spec: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "llmoperator.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "m", "namespace": "ns", "uid": "owner-uid", "generation": generation},
        "spec": spec,
    }


BASE = {
    "model": {"name": "Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen"},
    "engine": {"maxModelLen": 8192},
    "parallelism": {"tensor": 1},
}


@pytest.fixture
def fake() -> FakeKube:
    return FakeKube()


@pytest.fixture
def controller(fake: FakeKube) -> Controller:
    return Controller(client=fake, config=RenderConfig(), clock=lambda: "2026-01-01T00:00:00Z")  # type: ignore[arg-type]


def run(controller: Controller, fake: FakeKube, llmd: dict[str, Any]) -> dict[str, Any]:
    """One reconcile as a watch event starts it, then hand the written status back."""
    owner_key = controller.remember_owner(llmd)
    written = len(fake.statuses)
    asyncio.run(controller.reconcile(owner_key))
    if len(fake.statuses) > written:
        llmd = {**llmd, "status": apply_merge_patch(llmd.get("status") or {}, fake.statuses[-1])}
    return llmd


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies the status patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = apply_merge_patch(result.get(name), value)
    return result


def make_ready(fake: FakeKube, controller: Controller) -> None:
    """What the Deployment controller and kwok would report once pods run."""
    for (kind, _), obj in fake.objects.items():
        if kind == "Deployment":
            replicas = obj["spec"].get("replicas", 1)
            obj["metadata"]["generation"] = 1
            obj["status"] = {
                "observedGeneration": 1,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
            }
            obj["metadata"]["resourceVersion"] = str(next(fake.versions))
            controller.remember_child(copy.deepcopy(obj))


def test_first_reconcile_creates_children_then_a_steady_state_writes_nothing(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = run(controller, fake, body(BASE))
    assert [w[:2] for w in fake.writes] == [
        ("apply", "Deployment"),
        ("apply", "Service"),
        ("status", "LLMDeployment"),
    ]
    for obj in fake.objects.values():
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "owner-uid"
    assert llmd["status"]["phase"] == "Pending"  # the Deployment exists, no pod yet
    make_ready(fake, controller)
    llmd = run(controller, fake, llmd)
    assert llmd["status"]["phase"] == "Ready"
    fake.writes.clear()
    run(controller, fake, llmd)
    run(controller, fake, llmd)
    assert fake.writes == []


def test_an_invalid_spec_fails_with_its_message_and_one_event(
    controller: Controller, fake: FakeKube
) -> None:
    bad = body({**BASE, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}})
    llmd = run(controller, fake, bad)
    assert fake.objects == {}
    assert llmd["status"]["phase"] == "Failed"
    degraded = next(c for c in llmd["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert "autoscaling: autoscaling.minReplicas must not exceed" in degraded["message"]
    assert len(fake.events) == 1 and fake.events[0][:2] == ("Warning", "InvalidSpec")
    fake.writes.clear()
    run(controller, fake, llmd)
    assert fake.writes == [] and len(fake.events) == 1


def test_an_unplannable_edit_keeps_the_running_children(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = run(controller, fake, body(BASE))
    make_ready(fake, controller)
    llmd = run(controller, fake, llmd)
    before = copy.deepcopy(fake.objects)
    fake.writes.clear()
    edited = {**llmd, "spec": {**BASE, "parallelism": {"tensor": 8}}}
    edited["metadata"] = {**llmd["metadata"], "generation": 2}
    edited = run(controller, fake, edited)
    assert [w[0] for w in fake.writes] == ["status"]
    assert fake.objects == before
    assert edited["status"]["phase"] == "Degraded"
    assert edited["status"]["observedGeneration"] == 2
    degraded = next(c for c in edited["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "CannotPlan" and "28" in degraded["message"]


def test_autoscaling_leaves_replicas_to_the_hpa_and_turning_it_off_prunes_the_hpa(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = run(
        controller, fake, body({**BASE, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}})
    )
    deployment = fake.objects[("Deployment", "m")]
    assert "replicas" not in deployment["spec"]
    assert ("HorizontalPodAutoscaler", "m") in fake.objects
    assert ("PodDisruptionBudget", "m") in fake.objects
    fake.writes.clear()
    fixed = {**llmd, "spec": {**BASE, "replicas": 1}}
    fixed["metadata"] = {**llmd["metadata"], "generation": 2}
    run(controller, fake, fixed)
    deleted = sorted(w[1] for w in fake.writes if w[0] == "delete")
    assert deleted == ["HorizontalPodAutoscaler", "PodDisruptionBudget"]
    assert fake.objects[("Deployment", "m")]["spec"]["replicas"] == 1


def test_a_hand_edited_child_is_restored(controller: Controller, fake: FakeKube) -> None:
    llmd = run(controller, fake, body(BASE))
    edited = copy.deepcopy(fake.objects[("Deployment", "m")])
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    edited["metadata"]["resourceVersion"] = str(next(fake.versions))
    controller.remember_child(edited)
    fake.writes.clear()
    run(controller, fake, llmd)
    assert ("apply", "Deployment", "m") in fake.writes
    restored = fake.objects[("Deployment", "m")]["spec"]["template"]["spec"]["containers"][0]
    assert restored["image"] == "vllm/vllm-openai:v0.11.0"


def test_turning_autoscaling_on_hands_the_replica_count_over_instead_of_resetting_it(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = run(controller, fake, body({**BASE, "replicas": 3}))
    assert fake.objects[("Deployment", "m")]["spec"]["replicas"] == 3
    scaled = {**llmd, "spec": {**BASE, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}}}
    scaled["metadata"] = {**llmd["metadata"], "generation": 2}
    run(controller, fake, scaled)
    [(manager, handover)] = fake.handovers
    assert manager == HANDOVER_MANAGER
    assert handover["spec"] == {"replicas": 3}
    assert "replicas" not in fake.objects[("Deployment", "m")]["spec"]
    fake.handovers.clear()
    run(controller, fake, scaled)  # once handed over, never again
    assert fake.handovers == []


def test_a_plan_that_loses_numbers_removes_them_from_status(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = run(controller, fake, body(BASE))
    assert "kvCacheTokens" in llmd["status"]["plan"]
    unknown = {
        **llmd,
        "spec": {**BASE, "model": {"name": "acme/unknown"}, "parallelism": {"tensor": 2}},
    }
    unknown["metadata"] = {**llmd["metadata"], "generation": 2}
    unknown = run(controller, fake, unknown)
    assert "kvCacheTokens" not in unknown["status"]["plan"]
    fake.writes.clear()
    run(controller, fake, unknown)
    assert fake.writes == []


def test_an_llmdeployment_being_deleted_is_not_rebuilt(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = run(controller, fake, body(BASE))
    fake.objects.clear()  # garbage collection took the children
    for child in controller.live_children(("ns", "m")):
        controller.remember_child(child, deleted=True)
    fake.writes.clear()
    deleting = {
        **llmd,
        "metadata": {**llmd["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"},
    }
    run(controller, fake, deleting)
    assert [w for w in fake.writes if w[0] == "apply"] == []


# -- engine health: the pods are read while replicas are missing, and never written ----------

ENGINE_SELECTOR = (
    "llmoperator.io/deployment=m,app.kubernetes.io/managed-by=llm-operator,"
    "app.kubernetes.io/component=engine"
)


def make_unavailable(fake: FakeKube, controller: Controller) -> None:
    """What the Deployment controller reports while its one pod does not turn ready."""
    obj = fake.objects[("Deployment", "m")]
    obj["metadata"]["generation"] = 1
    obj["status"] = {
        "observedGeneration": 1,
        "replicas": 1,
        "updatedReplicas": 1,
        "unavailableReplicas": 1,
        "conditions": [
            {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"},
        ],
    }
    obj["metadata"]["resourceVersion"] = str(next(fake.versions))
    controller.remember_child(copy.deepcopy(obj))


def engine_pod(restarts: int = 0, waiting: str = "") -> dict[str, Any]:
    state: dict[str, Any] = (
        {"waiting": {"reason": waiting}}
        if waiting
        else {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    )
    last = {"terminated": {"reason": "Error", "exitCode": 1}} if restarts else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "m-5f6d7c8b9-x2x4z",
            "namespace": "ns",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"llmoperator.io/deployment": "m", "llmoperator.io/track": "stable"},
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"},
            ],
            "containerStatuses": [
                {"name": "vllm", "ready": False, "started": False, "restartCount": restarts,
                 "state": state, "lastState": last},
            ],
        },
    }  # fmt: skip


def condition(llmd: dict[str, Any], type_: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in llmd["status"]["conditions"] if c["type"] == type_)
    return found


def test_a_steady_state_never_reads_pods(controller: Controller, fake: FakeKube) -> None:
    llmd = run(controller, fake, body(BASE))
    make_ready(fake, controller)
    llmd = run(controller, fake, llmd)
    fake.pod_lists.clear()
    run(controller, fake, llmd)
    run(controller, fake, llmd)
    assert fake.pod_lists == []
    assert controller.rechecks == {}


def test_a_crash_looping_engine_is_degraded_with_one_event_and_recovers(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = run(controller, fake, body(BASE))
    assert fake.pod_lists == [("ns", ENGINE_SELECTOR)]  # not rolled out yet: looked at the pods
    make_unavailable(fake, controller)
    fake.pods = [engine_pod(restarts=2, waiting="CrashLoopBackOff")]
    llmd = run(controller, fake, llmd)
    assert llmd["status"]["phase"] == "Degraded"
    degraded = condition(llmd, "Degraded")
    assert degraded["reason"] == "EngineCrashLoop"
    assert "pod m-5f6d7c8b9-x2x4z container vllm: CrashLoopBackOff" in degraded["message"]
    assert "restarted 2 times, last exit Error (exit code 1)" in degraded["message"]
    assert condition(llmd, "Ready")["status"] == "False"
    assert [e[:2] for e in fake.events] == [("Warning", "EngineCrashLoop")]
    assert "endpoint" in llmd["status"]  # the spec was applied; only the engine is failing

    fake.writes.clear()
    llmd = run(controller, fake, llmd)  # nothing changed: a look, and no write
    assert fake.writes == []

    fake.pods = [engine_pod(restarts=3, waiting="CrashLoopBackOff")]
    llmd = run(controller, fake, llmd)
    assert "restarted 3 times" in condition(llmd, "Degraded")["message"]
    assert len(fake.events) == 1  # one Event for the crash loop, not one per restart

    make_ready(fake, controller)
    fake.pod_lists.clear()
    llmd = run(controller, fake, llmd)
    assert llmd["status"]["phase"] == "Ready"
    assert condition(llmd, "Degraded")["status"] == "False"
    assert fake.pod_lists == []  # rolled out: the pods have nothing to explain
    assert not [w for w in fake.writes if w[1] == "Pod"]


def test_one_exit_is_progressing_with_the_exit_in_the_message(
    controller: Controller, fake: FakeKube
) -> None:
    llmd = run(controller, fake, body(BASE))
    make_unavailable(fake, controller)
    fake.pods = [engine_pod(restarts=1, waiting="CrashLoopBackOff")]
    llmd = run(controller, fake, llmd)
    assert llmd["status"]["phase"] == "Progressing"
    progressing = condition(llmd, "Progressing")
    assert progressing["reason"] == "EngineNotReady"
    assert "restarted 1 time, last exit Error (exit code 1)" in progressing["message"]
    assert condition(llmd, "Degraded")["status"] == "False"
    assert fake.events == []


def test_without_rights_to_list_pods_status_still_follows_the_deployment(
    controller: Controller, fake: FakeKube
) -> None:
    fake.pods_error = ApiError(status=403, reason="Forbidden")
    llmd = run(controller, fake, body(BASE))
    make_unavailable(fake, controller)
    llmd = run(controller, fake, llmd)
    assert llmd["status"]["phase"] == "Progressing"
    assert controller.failures == {}  # not retried as an error


def test_pods_are_looked_at_again_while_replicas_are_missing(
    controller: Controller, fake: FakeKube
) -> None:
    controller.recheck_seconds = 0.01
    owner_key = controller.remember_owner(body(BASE))

    async def scenario() -> None:
        await controller.reconcile(owner_key)
        make_unavailable(fake, controller)
        await controller.reconcile(owner_key)
        assert owner_key in controller.rechecks
        # The pod crashes again and again; the Deployment's status does not change.
        fake.pods = [engine_pod(restarts=2, waiting="CrashLoopBackOff")]
        written = len(fake.statuses)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(fake.statuses) > written:
                break
        assert fake.statuses[-1]["phase"] == "Degraded"
        make_ready(fake, controller)
        await controller.reconcile(owner_key)
        assert owner_key not in controller.rechecks  # rolled out: no more looks
        lists = len(fake.pod_lists)
        await asyncio.sleep(0.05)
        assert len(fake.pod_lists) == lists

    asyncio.run(scenario())


def test_deleting_an_llmdeployment_cancels_its_next_look(
    controller: Controller, fake: FakeKube
) -> None:
    controller.recheck_seconds = 0.01
    llmd = body(BASE)
    owner_key = controller.remember_owner(llmd)

    async def scenario() -> None:
        await controller.reconcile(owner_key)
        assert owner_key in controller.rechecks
        controller.remember_owner(llmd, deleted=True)
        assert controller.rechecks == {}
        lists = len(fake.pod_lists)
        await asyncio.sleep(0.05)
        assert len(fake.pod_lists) == lists

    asyncio.run(scenario())


def test_a_reconcile_is_handed_only_its_own_deployments_ownership(
    controller: Controller, fake: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(controller, fake, body({**BASE, "replicas": 3}))  # Deployment m, replicas owned
    # Another LLMDeployment's Deployment in the namespace, its replicas owned too, and a
    # foreign field on it: none of it is this reconcile's business.
    other = copy.deepcopy(fake.objects[("Deployment", "m")])
    other["metadata"] |= {"name": "other", "labels": {"llmoperator.io/deployment": "other"}}
    other["metadata"]["ownerReferences"] = [
        {**other["metadata"]["ownerReferences"][0], "name": "other", "uid": "u-other"}
    ]
    other["metadata"]["managedFields"] = [
        *other["metadata"]["managedFields"],
        {
            "manager": "kubectl",
            "operation": "Update",
            "fieldsV1": {"f:spec": {"f:template": {"f:spec": {"f:nodeSelector": {}}}}},
        },
    ]
    controller.remember_child(other)
    assert controller.replicas_owned[("ns", "other")] and ("ns", "other") in controller.foreign
    seen: list[tuple[set[str], dict[str, Any]]] = []
    sync = controller.reconcile_sync

    def spy(body: Any, live: Any, owned: set[str], foreign: Any = None) -> Any:
        seen.append((owned, foreign))
        return sync(body, live, owned, foreign)

    monkeypatch.setattr(controller, "reconcile_sync", spy)
    asyncio.run(controller.reconcile(("ns", "m")))
    assert seen == [({"m"}, {})]


def test_a_queued_reconcile_reads_the_cache_when_a_thread_is_free_for_it(
    controller: Controller, fake: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A burst queues more reconciles than there are threads. One that waits must read what
    # the cache holds when its turn comes, not hold (and then act on) what it held when
    # queued: 1,000 such snapshots were ~25 MiB at a burst's peak, and stale.
    controller.slots = PrioritySlots(1)
    first, second = body(BASE), body(BASE)
    second["metadata"] = {**second["metadata"], "name": "n", "uid": "n-uid"}
    controller.remember_owner(first)
    controller.remember_owner(second)
    running, release = threading.Event(), threading.Event()
    read: list[tuple[str, Any]] = []
    sync = controller.reconcile_sync

    def spy(llmd: Any, live: Any, owned: set[str], foreign: Any = None) -> Any:
        read.append((llmd["metadata"]["name"], llmd["spec"].get("replicas")))
        if llmd["metadata"]["name"] == "m":
            running.set()
            release.wait(5)
        return sync(llmd, live, owned, foreign)

    monkeypatch.setattr(controller, "reconcile_sync", spy)

    async def scenario() -> None:
        a = asyncio.create_task(controller.reconcile(("ns", "m")))
        while not running.is_set():
            await asyncio.sleep(0.01)
        b = asyncio.create_task(controller.reconcile(("ns", "n")))
        await asyncio.sleep(0.05)
        controller.remember_owner({**second, "spec": {**BASE, "replicas": 5}})  # an edit
        release.set()
        await asyncio.gather(a, b)

    asyncio.run(scenario())
    assert read == [("m", None), ("n", 5)]


def test_a_new_or_edited_llmdeployment_gets_a_thread_before_status_only_looks(
    controller: Controller, fake: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(controller, fake, body(BASE))  # m: reconciled at generation 1
    done = body(BASE)
    done["metadata"] = {**done["metadata"], "name": "done", "uid": "done-uid"}
    run(controller, fake, done)  # reconciled too: its next look is status-only
    controller.slots = PrioritySlots(1)
    new = body(BASE)
    new["metadata"] = {**new["metadata"], "name": "new", "uid": "new-uid"}
    controller.remember_owner(new)
    running, release = threading.Event(), threading.Event()
    order: list[str] = []
    sync = controller.reconcile_sync

    def spy(llmd: Any, live: Any, owned: set[str], foreign: Any = None) -> Any:
        order.append(llmd["metadata"]["name"])
        if len(order) == 1:
            running.set()
            release.wait(5)
        return sync(llmd, live, owned, foreign)

    monkeypatch.setattr(controller, "reconcile_sync", spy)

    async def scenario() -> None:
        tasks = [asyncio.create_task(controller.reconcile(("ns", "m")))]
        while not running.is_set():
            await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(controller.reconcile(("ns", "done"))))  # first in line
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(controller.reconcile(("ns", "new"))))
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert order == ["m", "new", "done"]
