"""The day-2 loop (controller/day2.py) over a fake API and Prometheus: a stalled engine pod is
deleted with a Warning Event carrying the numbers, an idle or loading one is not, GPU-seconds
are exported every look and written to status.cost only when a pod starts or stops."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from prometheus_client import REGISTRY

from llm_operator.controller.day2 import ENGINE_PODS, Day2
from llm_operator.controller.reconciler import Controller
from llm_operator.controller.standby import Standby
from llm_operator.kube.transport import ApiError
from llm_operator.kubeformat import rfc3339
from llm_operator.render import RenderConfig
from tests.controller.test_reconciler import BASE, FakeKube, body

T0 = 1767225600.0  # 2026-01-01T00:00:00Z


class Kube(FakeKube):
    def __init__(self) -> None:
        super().__init__()
        self.owner = body(BASE)

    def delete_pod(self, namespace: str, name: str, uid: str) -> None:
        self.writes.append(("delete", "Pod", name))

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        super().patch_status(namespace, name, status)
        self.owner = {**self.owner, "status": {**(self.owner.get("status") or {}), **status}}
        self.owner["metadata"] = {**self.owner["metadata"], "resourceVersion": "200"}
        return copy.deepcopy(self.owner)


class Prometheus:
    def __init__(self) -> None:
        self.values: dict[str, dict[str, float]] = {}
        self.queries: list[str] = []

    def custom_query(self, query: str) -> list[dict[str, Any]]:
        self.queries.append(query)
        metric = query.split("(")[-1].rstrip(")")
        return [
            {"metric": {"namespace": "ns", "pod": pod}, "value": [0, str(value)]}
            for pod, value in self.values.get(metric, {}).items()
        ]


def engine_pod(
    name: str, ready: bool = True, gpus: int = 2, start: str = "2026-01-01T00:00:00Z"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "labels": {"llmoperator.io/deployment": "m"},
        },
        "spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
        "status": {
            "phase": "Running",
            "startTime": start,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "False",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
        },
    }


def setup(**settings: Any) -> tuple[Day2, Kube, Prometheus, list[float]]:
    kube = Kube()
    controller = Controller(client=kube, config=RenderConfig())  # type: ignore[arg-type]
    prometheus = Prometheus()
    controller.analyst.prometheus = prometheus  # type: ignore[assignment]
    controller.remember_owner(kube.owner)
    clock = [T0]
    day2 = Day2(controller=controller, epoch=lambda: clock[0], **settings)
    return day2, kube, prometheus, clock


def look(day2: Day2, clock: list[float], at: float) -> None:
    clock[0] = T0 + at
    asyncio.run(day2.tick())


def busy(prometheus: Prometheus, pod: str, running: float, waiting: float, tokens: float) -> None:
    for metric, value in [
        ("vllm:num_requests_running", running),
        ("vllm:num_requests_waiting", waiting),
        ("vllm:generation_tokens_total", tokens),
        ("vllm:prompt_tokens_total", 0.0),
    ]:
        prometheus.values.setdefault(metric, {})[pod] = value


def test_a_stalled_engine_is_deleted_with_an_event_and_an_idle_one_is_not() -> None:
    day2, kube, prometheus, clock = setup(stall_timeout_seconds=60)
    kube.pods = [engine_pod("hung"), engine_pod("idle")]
    busy(prometheus, "hung", running=3, waiting=5, tokens=42)
    busy(prometheus, "idle", running=0, waiting=0, tokens=7)
    for at in (0, 30):
        look(day2, clock, at)
    assert ("delete", "Pod", "hung") not in kube.writes
    look(day2, clock, 60)
    assert [w for w in kube.writes if w[1] == "Pod"] == [("delete", "Pod", "hung")]
    assert kube.events == [
        (
            "Warning",
            "EngineStalled",
            "engine pod hung restarted: 3 requests running and 5 waiting, generated-token "
            "counter stuck at 42 for 60s",
        )
    ]
    assert ("ns", ENGINE_PODS) in kube.pod_lists
    owner = {"llmdeployment_namespace": "ns", "llmoperator_io_deployment": "m"}
    assert (REGISTRY.get_sample_value("llm_operator_stall_restarts_total", owner) or 0) >= 1


def test_a_loading_engine_is_left_alone() -> None:
    day2, kube, prometheus, clock = setup(stall_timeout_seconds=60)
    kube.pods = [engine_pod("loading", ready=False)]
    busy(prometheus, "loading", running=0, waiting=4, tokens=0)
    for at in range(0, 600, 15):
        look(day2, clock, at)
    assert kube.events == [] and not [w for w in kube.writes if w[1] == "Pod"]


def test_without_prometheus_nothing_is_restarted_but_gpu_seconds_still_count() -> None:
    day2, kube, _, clock = setup(stall_timeout_seconds=60)
    day2.controller.analyst.prometheus = None
    kube.pods = [engine_pod("a")]
    for at in range(0, 300, 15):
        look(day2, clock, at)
    assert not [w for w in kube.writes if w[1] == "Pod"]
    # 285 s x 2 GPUs since the pod's startTime.
    labels = {"llmdeployment_namespace": "ns", "llmoperator_io_deployment": "m"}
    assert REGISTRY.get_sample_value("llm_operator_gpu_seconds", labels) == 570
    # Computed when scraped: 15 s later, 30 more GPU-seconds without another look.
    clock[0] += 15
    assert REGISTRY.get_sample_value("llm_operator_gpu_seconds", labels) == 600


def test_cost_status_is_written_when_a_pod_starts_or_stops_and_not_when_only_seconds_grow() -> None:
    day2, kube, prometheus, clock = setup(cost_status_interval_seconds=600, gpu_hour_price=2.0)
    kube.pods = [engine_pod("a")]
    busy(prometheus, "a", running=1, waiting=0, tokens=0)
    look(day2, clock, 0)  # the first look after a start writes nothing
    for at in range(15, 300, 15):
        busy(prometheus, "a", running=1, waiting=0, tokens=at * 10)
        look(day2, clock, at)
    assert kube.statuses == []  # quiet: only the numbers grew
    kube.pods = [engine_pod("a"), engine_pod("b", gpus=1, start="2026-01-01T00:05:00Z")]
    look(day2, clock, 300)
    [written] = kube.statuses
    cost = written["cost"]
    assert cost["gpuSeconds"] == 600.0  # a: 300 s x 2; b starts now
    assert cost["tokens"] == 2850  # all of a's tokens: it started after counting began
    assert cost["gpuHourPrice"] == 2.0
    assert cost["perMillionTokens"] == round(600 / 3600 * 2.0 / 2850 * 1e6, 6)
    # The cache has the written cost, so a reconcile's full status patch keeps it.
    assert day2.controller.bodies[("ns", "m")]["status"]["cost"] == cost
    look(day2, clock, 315)
    assert len(kube.statuses) == 1
    # After the interval, the grown numbers are written once.
    look(day2, clock, 300 + 600 * 1.2 + 1)
    assert len(kube.statuses) == 2


def test_a_restarted_operator_writes_no_cost_before_a_pod_change_or_a_whole_interval() -> None:
    """Also the first write of an LLMDeployment whose pods were there at the first look."""
    day2, kube, _, clock = setup(cost_status_interval_seconds=600)
    kube.owner["status"] = {
        "cost": {"gpuSeconds": 10.0, "tokens": 0, "updatedAt": "2025-01-01T00:00:00Z"}
    }
    day2.controller.remember_owner(kube.owner)
    kube.pods = [engine_pod("a")]
    for at in range(0, 600, 15):  # the last write was a year ago: still nothing for 600 s
        look(day2, clock, at)
    assert kube.statuses == []
    look(day2, clock, 600 * 1.2 + 1)
    [written] = kube.statuses
    assert written["cost"]["gpuSeconds"] == 10.0 + 2 * (600 * 1.2 + 1)  # base + a since T0


def test_a_never_written_cost_is_written_an_interval_after_the_first_look() -> None:
    day2, kube, _, clock = setup(cost_status_interval_seconds=60)
    kube.pods = [engine_pod("a")]
    for at in range(0, 60, 15):
        look(day2, clock, at)
    assert kube.statuses == []
    look(day2, clock, 60 * 1.2)
    [written] = kube.statuses
    assert written["cost"]["gpuSeconds"] == 2 * 60 * 1.2


class Peerings:
    """The peering objects a standby replica reads (controller/standby.py)."""

    def __init__(self, status: dict[str, Any] | None) -> None:
        self.status = status
        self.paths: list[str] = []

    def get_path(self, path: str) -> dict[str, Any] | None:
        self.paths.append(path)
        return None if self.status is None else {"status": self.status}


def peer(priority: int, at: float) -> dict[str, Any]:
    return {"priority": priority, "lifetime": 60, "lastseen": rfc3339(at)}


def test_a_standby_replica_restarts_nothing_and_counts_no_cost_until_the_active_one_dies() -> None:
    day2, kube, prometheus, clock = setup(stall_timeout_seconds=60)
    # The active peer's last keep-alive, at 100 s, holds it alive until 160 s.
    peerings = Peerings({"me": peer(5, T0 + 100), "active": peer(9, T0 + 100)})
    day2.standby = Standby(
        client=peerings,  # type: ignore[arg-type]
        peering_name="llm-operator",
        identity="me",
        priority=5,
        epoch=lambda: clock[0],
    )
    kube.pods = [engine_pod("hung")]
    busy(prometheus, "hung", running=3, waiting=5, tokens=42)
    for at in range(0, 160, 15):
        look(day2, clock, at)
    assert peerings.paths[0] == "/apis/kopf.dev/v1/clusterkopfpeerings/llm-operator"
    assert not [w for w in kube.writes if w[1] == "Pod"] and kube.events == []
    assert not day2.ledgers and kube.pod_lists == []
    # The active peer's keep-alive lapses (lastseen + lifetime passed): this one takes over.
    for at in range(165, 300, 15):
        look(day2, clock, at)
    assert [w for w in kube.writes if w[1] == "Pod"] == [("delete", "Pod", "hung")]


def test_an_unreadable_peering_skips_the_round_and_a_missing_one_is_standalone() -> None:
    day2, kube, _, clock = setup(stall_timeout_seconds=60)

    class Unreadable(Peerings):
        def get_path(self, path: str) -> dict[str, Any] | None:
            raise ApiError(status=403)

    day2.standby = Standby(client=Unreadable(None), peering_name="p", identity="me", priority=1)  # type: ignore[arg-type]
    kube.pods = [engine_pod("a")]
    look(day2, clock, 0)
    assert kube.pod_lists == []
    day2.standby = Standby(client=Peerings(None), peering_name="p", identity="me", priority=1)  # type: ignore[arg-type]
    look(day2, clock, 15)
    assert kube.pod_lists != []
