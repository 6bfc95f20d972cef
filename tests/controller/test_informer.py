"""The child informer: list, watch from the list's version, relist on 410, bounded backoff,
and the loop-side dispatcher that coalesces reconciles."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import pytest

from llm_operator.controller import watches
from llm_operator.controller.informer import Gone, Informer
from llm_operator.kube.resources import BY_KIND, Kind
from llm_operator.kube.transport import ApiError, compact

DEPLOYMENT = BY_KIND["Deployment"]
SELECTOR = "app.kubernetes.io/managed-by=llm-operator"


def obj(name: str, version: str, owner: str = "m") -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "apiVersion": "apps/v1",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": version,
            "labels": {"llmoperator.io/deployment": owner},
        },
    }


class FakeTransport:
    def __init__(self) -> None:
        self.lists: list[list[dict[str, Any]]] = []
        self.list_version = "10"
        self.watches: list[list[dict[str, Any]] | Exception] = []
        self.calls: list[tuple[str, Any]] = []
        self.current: list[dict[str, Any]] = []

    def list_page(
        self, kind: Kind, namespace: str | None, selector: str, token: str | None
    ) -> tuple[list[dict[str, Any]], str | None, str]:
        self.calls.append(("list", (namespace, selector, token)))
        if token is None:
            self.current = self.lists.pop(0)
        items = self.current
        half = len(items) // 2
        if token is None and half:  # two pages, to prove the continue token is followed
            return items[:half], "next", self.list_version
        return items[half:] if token else items, None, self.list_version

    def watch(
        self, kind: Kind, namespace: str | None, selector: str, resource_version: str
    ) -> Iterator[dict[str, Any]]:
        self.calls.append(("watch", resource_version))
        step = self.watches.pop(0)
        if isinstance(step, Exception):
            raise step
        yield from step


def informer(transport: FakeTransport, got: list[tuple[str, str]], **kw: Any) -> Informer:
    return Informer(
        transport,
        DEPLOYMENT,
        "ns",
        SELECTOR,
        lambda t, o: got.append((t, o["metadata"]["name"])),
        **kw,
    )


def test_the_list_is_filtered_by_the_server_and_paged() -> None:
    transport = FakeTransport()
    items = [obj("a", "1"), obj("b", "2")]
    transport.lists = [items]
    got: list[tuple[str, str]] = []
    inf = informer(transport, got)
    inf.relist()
    assert got == [("ADDED", "a"), ("ADDED", "b")]
    assert transport.calls == [("list", ("ns", SELECTOR, None)), ("list", ("ns", SELECTOR, "next"))]
    assert inf.resource_version == "10"


def test_watch_events_are_delivered_and_move_the_version() -> None:
    transport = FakeTransport()
    transport.lists = [[obj("a", "1")]]
    transport.watches = [
        [
            {"type": "MODIFIED", "object": obj("a", "11")},
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}},
            {"type": "ADDED", "object": obj("c", "16")},
            # A child whose label was removed leaves the selection: DELETED.
            {"type": "DELETED", "object": obj("a", "17")},
        ]
    ]
    got: list[tuple[str, str]] = []
    inf = informer(transport, got)
    inf.relist()
    inf.watch_once()
    assert transport.calls[-1] == ("watch", "10")
    assert got == [("ADDED", "a"), ("MODIFIED", "a"), ("ADDED", "c"), ("DELETED", "a")]
    assert inf.resource_version == "17"
    assert set(inf.known) == {("ns", "c")}


def test_an_object_leaving_the_selection_is_deleted_under_the_owner_it_had() -> None:
    transport = FakeTransport()
    transport.lists = [[obj("a", "1", owner="m")]]
    stripped = obj("a", "2")
    stripped["metadata"]["labels"] = {}  # every label that named the owner removed
    transport.watches = [[{"type": "DELETED", "object": stripped}]]
    got: list[tuple[str, dict[str, Any]]] = []
    inf = Informer(transport, DEPLOYMENT, "ns", SELECTOR, lambda t, o: got.append((t, o)))
    inf.relist()
    inf.watch_once()
    kind, tomb = got[-1]
    assert kind == "DELETED"
    assert tomb["metadata"]["labels"] == {"llmoperator.io/deployment": "m"}
    assert tomb["kind"] == "Deployment" and tomb["metadata"]["name"] == "a"


@pytest.mark.parametrize("gone", ["event", "status"])
def test_410_relists_delivering_what_was_missed_and_nothing_it_had(gone: str) -> None:
    transport = FakeTransport()
    transport.lists = [[obj("a", "1"), obj("b", "2")], [obj("b", "2"), obj("c", "30")]]
    transport.list_version = "40"
    expired = [{"type": "ERROR", "object": {"kind": "Status", "code": 410}}]
    transport.watches = [expired if gone == "event" else Gone()]
    got: list[tuple[str, str]] = []
    inf = informer(transport, got)
    inf.relist()
    got.clear()
    inf.watch_once()
    assert inf.resource_version is None
    inf.relist()
    # a went while the watch was gone; b is unchanged, so not delivered again.
    assert sorted(got) == [("ADDED", "c"), ("DELETED", "a")]
    assert inf.resource_version == "40"


def test_failures_back_off_bounded_and_a_working_watch_resets() -> None:
    transport = FakeTransport()
    boom = ApiError(status=500, reason="boom")
    transport.lists = [[], []]
    transport.watches = [boom, boom, boom, boom]
    waits: list[float] = []
    inf = informer(transport, [], backoffs=(1.0, 2.0, 5.0))

    def sleep(seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) == 4:
            inf.stop()
        return inf.stopped.is_set()

    inf.sleep = sleep
    inf.run()
    assert waits == [1.0, 2.0, 5.0, 5.0]
    assert [c[0] for c in transport.calls] == ["list", "watch", "watch", "watch", "watch"]


def test_a_kind_that_is_not_served_is_empty_and_looked_at_again() -> None:
    transport = FakeTransport()

    def missing(*_: Any) -> Any:
        raise ApiError(status=404, reason="Not Found")

    transport.list_page = missing  # type: ignore[method-assign,assignment]
    waits: list[float] = []
    inf = informer(transport, [], backoffs=(1.0, 30.0))
    inf.sleep = lambda s: waits.append(s) or True  # type: ignore[func-returns-value]
    inf.run()
    assert inf.missing and waits == [30.0]


def test_an_api_error_of_the_first_list_is_raised() -> None:
    transport = FakeTransport()

    def forbidden(*_: Any) -> Any:
        raise ApiError(status=403, reason="Forbidden")

    transport.list_page = forbidden  # type: ignore[method-assign,assignment]
    with pytest.raises(ApiError):
        informer(transport, []).relist()


class FakeController:
    def __init__(self) -> None:
        self.bodies: dict[Any, Any] = {("ns", "m"): {}}
        self.locks: dict[Any, asyncio.Lock] = {}
        self.tasks: set[Any] = set()
        self.cached: list[str] = []
        self.reconciled: list[list[str]] = []

    def remember_child(self, o: dict[str, Any], deleted: bool = False) -> Any:
        self.cached.append(o["metadata"]["resourceVersion"])
        return ("ns", o["metadata"]["labels"]["llmoperator.io/deployment"])

    async def reconcile(self, owner_key: Any, reading: Any = None) -> None:
        async with self.locks[owner_key]:
            if reading is not None:
                reading()
            self.reconciled.append(list(self.cached))  # what this reconcile read
            await asyncio.sleep(0.01)


async def test_a_burst_of_child_events_is_one_reconcile_that_reads_them_all() -> None:
    controller = FakeController()
    controller.locks[("ns", "m")] = asyncio.Lock()
    on_child = watches.child_dispatcher(controller)  # type: ignore[arg-type]
    for version in ("1", "2", "3"):
        on_child("MODIFIED", obj("d", version))
    on_child("ADDED", obj("x", "9", owner="unknown"))  # no LLMDeployment: cached only
    await asyncio.gather(*controller.tasks)
    assert controller.reconciled == [["1", "2", "3", "9"]]
    # Events during a reconcile (which read the cache before them) get one more, reading all.
    on_child("MODIFIED", obj("d", "4"))
    await asyncio.sleep(0)
    assert controller.reconciled[-1][-1] == "4"  # running
    for version in ("5", "6", "7"):
        on_child("MODIFIED", obj("d", version))
    while controller.tasks:
        await asyncio.gather(*controller.tasks)
    assert len(controller.reconciled) == 3 and controller.reconciled[-1][-1] == "7"


async def test_the_heap_is_trimmed_after_activity_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watches, "TRIM_SECONDS", 0.01)
    trimmer = watches.HeapTrimmer()
    assert trimmer.trim is not None  # glibc here
    calls: list[int] = []
    trimmer.trim = lambda pad: calls.append(pad) or 1  # type: ignore[func-returns-value]
    task = asyncio.create_task(trimmer.run())
    await asyncio.sleep(0.05)
    assert calls == []  # quiet: no work
    trimmer.collect = lambda: calls.append(-1) or 0  # type: ignore[func-returns-value]
    controller = FakeController()
    controller.locks[("ns", "m")] = asyncio.Lock()
    watches.child_dispatcher(controller, trimmer)("ADDED", obj("d", "1"))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    task.cancel()
    assert calls == [-1, 0]  # the cycles collected, then the pages handed back; once


HANDLER_CONTEXT: ContextVar[str] = ContextVar("handler_context")


async def test_a_scheduled_reconcile_keeps_nothing_of_the_handler_that_scheduled_it() -> None:
    # kopf's handler context holds its cause (the event's body and patch): a task made in it
    # kept that alive until the reconcile ran, which in a burst is after every one before it.
    controller = FakeController()
    controller.locks[("ns", "m")] = asyncio.Lock()
    seen: list[str | None] = []
    reconcile = controller.reconcile

    async def spy(owner_key: Any, reading: Any = None) -> None:
        seen.append(HANDLER_CONTEXT.get(None))
        await reconcile(owner_key, reading)

    controller.reconcile = spy  # type: ignore[method-assign]
    schedule = watches.reconcile_scheduler(controller)  # type: ignore[arg-type]
    HANDLER_CONTEXT.set("kopf's cause")
    on_child = watches.child_dispatcher(controller, schedule=schedule)  # type: ignore[arg-type]
    # While it waits for a thread (here: the lock), further events are read by the same run.
    async with controller.locks[("ns", "m")]:
        schedule(("ns", "m"))
        for version in ("1", "2"):
            on_child("MODIFIED", obj("d", version))
        await asyncio.sleep(0.01)
    while controller.tasks:
        await asyncio.gather(*controller.tasks)
    assert seen == [None]
    assert controller.reconciled == [["1", "2"]]


def parsed(name: str, version: str) -> dict[str, Any]:
    """A child as the API server sends it: its own json.loads, so its own strings."""
    child = obj(name, version)
    child["spec"] = {
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "engine",
                        "image": "vllm/vllm-openai:v0.6.3",
                        "args": ["--port", "8000"],
                    }
                ]
            }
        }
    }
    child["metadata"]["managedFields"] = [{"manager": "llm-operator", "fieldsV1": {"f:spec": {}}}]
    return json.loads(json.dumps(child))


def test_compact_keeps_the_content_and_shares_equal_strings() -> None:
    one, two = parsed("a", "1"), parsed("b", "2")
    image = "vllm/vllm-openai:v0.6.3"
    assert (
        one["spec"]["template"]["spec"]["containers"][0]["image"]
        is not two["spec"]["template"]["spec"]["containers"][0]["image"]
    )  # what json.loads gives: two copies
    small_one, small_two = compact(one), compact(two)
    assert small_one == one and small_two == two  # the same JSON, to the last field
    first = small_one["spec"]["template"]["spec"]["containers"][0]
    second = small_two["spec"]["template"]["spec"]["containers"][0]
    assert first["image"] is second["image"] and first["image"] == image
    assert first["args"][0] is second["args"][0]
    assert next(iter(first)) is next(iter(second))  # keys too
    # managedFields is not walked: the cache drops it after reading the foreign fields.
    assert small_one["metadata"]["managedFields"] is one["metadata"]["managedFields"]


def test_compact_halves_what_a_thousand_parsed_children_hold() -> None:
    def held(objects: list[Any]) -> int:
        seen: set[int] = set()
        stack, total = list(objects), 0
        while stack:
            o = stack.pop()
            if id(o) in seen:
                continue
            seen.add(id(o))
            total += sys.getsizeof(o)
            if isinstance(o, dict):
                stack += [*o.keys(), *o.values()]
            elif isinstance(o, list):
                stack += o
        return total

    raw = [parsed(f"m-{i:04d}", str(i)) for i in range(1000)]
    for child in raw:
        del child["metadata"]["managedFields"]
    small = [compact(child) for child in raw]
    assert small == raw
    assert held(small) < 0.6 * held(raw)


def test_the_informer_delivers_compacted_objects() -> None:
    transport = FakeTransport()
    transport.lists = [[parsed("a", "1")]]
    transport.watches = [[{"type": "MODIFIED", "object": parsed("b", "11")}]]
    got: list[dict[str, Any]] = []
    inf = Informer(transport, DEPLOYMENT, "ns", SELECTOR, lambda t, o: got.append(o))
    inf.relist()
    inf.watch_once()
    listed, watched = (o["spec"]["template"]["spec"]["containers"][0] for o in got)
    assert listed["image"] is watched["image"] and listed["name"] is watched["name"]


def test_apply_results_are_compacted_too() -> None:
    # The cache keeps an apply's answer until the watch brings a newer version, and a Service
    # gets no later event: its cached copy is often the apply's.
    from llm_operator.kube.client import KubeClient

    class Answers:
        def call(self, method: str, path: str, body: Any = None, **_: Any) -> Any:
            return json.loads(json.dumps({**body, "status": {"phase": "Bound"}}))

    kube = KubeClient(Answers())  # type: ignore[arg-type]
    one, two = (kube.apply(parsed(name, "1")) for name in ("a", "b"))
    assert one["status"] == {"phase": "Bound"} and one["metadata"]["name"] == "a"
    first, second = (o["spec"]["template"]["spec"]["containers"][0] for o in (one, two))
    assert first["image"] is second["image"]
