"""The routing-table writer: newest state, one write per change, bad edits keep the route."""

from __future__ import annotations

import asyncio
from typing import Any

import yaml

from llm_operator.controller.routes import RoutesWriter


class FakeKube:
    def __init__(self, fail: int = 0) -> None:
        self.applied: list[dict[str, Any]] = []
        self.fail = fail

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("API server restarting")
        self.applied.append(obj)
        return obj


def body(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmoperator.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"model": {"name": f"org/{name}"}, **spec},
    }


def models(obj: dict[str, Any]) -> list[str]:
    return [m["name"] for m in yaml.safe_load(obj["data"]["routes.yaml"])["models"]]


def test_writes_once_per_change_and_keeps_a_route_through_a_bad_edit() -> None:
    async def scenario() -> FakeKube:
        fake = FakeKube()
        writer = RoutesWriter(fake, "gw", "routes", delay=0.01)  # type: ignore[arg-type]
        writer.bodies[("ml", "a")] = body("a")
        await writer.write()
        await writer.write()  # nothing changed: no second write
        # A bad edit (the CRD would refuse it; imagine an older CRD): the route stays.
        writer.bodies[("ml", "a")] = body("a", autoscaling={"minReplicas": 3, "maxReplicas": 1})
        writer.bodies[("ml", "b")] = body("b")
        await writer.write()
        del writer.bodies[("ml", "a")]
        await writer.write()
        return fake

    fake = asyncio.run(scenario())
    assert [models(o) for o in fake.applied] == [["org/a"], ["org/a", "org/b"], ["org/b"]]


def test_a_failed_write_is_retried_with_the_newest_state() -> None:
    async def scenario() -> FakeKube:
        fake = FakeKube(fail=1)
        writer = RoutesWriter(fake, "gw", "routes", delay=0.01)  # type: ignore[arg-type]
        writer.bodies[("ml", "a")] = body("a")
        await writer.write()  # fails, schedules a retry
        assert writer.pending is not None
        writer.pending.cancel()
        writer.bodies[("ml", "b")] = body("b")  # a change while the retry waits
        writer.schedule(0.01)
        await asyncio.sleep(0.2)
        return fake

    fake = asyncio.run(scenario())
    assert [models(o) for o in fake.applied] == [["org/a", "org/b"]]
