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
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.secret_reads: list[tuple[str, str]] = []

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.secret_reads.append((namespace, name))
        return self.secrets.get((namespace, name))

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("API server restarting")
        self.applied.append(obj)
        return obj

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.applied if o["kind"] == kind]


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
    assert fake.secret_reads == []  # no fallback keys referenced: no Secret read or written


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


EXTERNAL = {
    "routing": {
        "fallbacks": [
            {
                "url": "https://api.example.com/v1",
                "model": "gpt-x",
                "apiKeySecretRef": {"name": "provider", "key": "token"},
            }
        ]
    }
}


def test_referenced_fallback_keys_are_copied_to_one_secret_and_follow_rotation(
    caplog: Any,
) -> None:
    """Exactly the referenced keys, read by name (GET), copied into the gateway's keys Secret;
    a rotated key is copied again at the next refresh; no key is ever logged."""

    async def scenario() -> FakeKube:
        fake = FakeKube()
        fake.secrets[("ml", "provider")] = {"data": {"token": "czNjcjN0", "other": "bm9wZQ=="}}
        fake.secrets[("ml", "unrelated")] = {"data": {"x": "eA=="}}
        writer = RoutesWriter(fake, "gw", "routes", delay=0.01)  # type: ignore[arg-type]
        writer.bodies[("ml", "a")] = body("a", **EXTERNAL)
        await writer.write()
        assert writer.pending is not None  # a refresh is scheduled for rotation
        await writer.write()  # nothing changed: no second write
        fake.secrets[("ml", "provider")] = {"data": {"token": "cm90YXRlZA=="}}
        await writer.write()
        writer.pending.cancel()
        return fake

    fake = asyncio.run(scenario())
    secrets = fake.of_kind("Secret")
    assert [s["data"] for s in secrets] == [
        {"ml_provider_token": "czNjcjN0"},
        {"ml_provider_token": "cm90YXRlZA=="},
    ]
    assert {s["metadata"]["name"] for s in secrets} == {"routes-keys"}
    assert {s["metadata"]["namespace"] for s in secrets} == {"gw"}
    assert set(fake.secret_reads) == {("ml", "provider")}
    table = yaml.safe_load(fake.of_kind("ConfigMap")[0]["data"]["routes.yaml"])
    [step] = table["models"][0]["fallbacks"]
    assert step["apiKeyFile"] == "/etc/llm-gateway-keys/ml_provider_token"
    assert "czNjcjN0" not in caplog.text and "cm90YXRlZA" not in caplog.text


def test_a_missing_key_is_reported_and_the_table_still_written(caplog: Any) -> None:
    async def scenario() -> FakeKube:
        fake = FakeKube()
        writer = RoutesWriter(fake, "gw", "routes", delay=0.01)  # type: ignore[arg-type]
        writer.bodies[("ml", "a")] = body("a", **EXTERNAL)
        await writer.write()
        assert writer.pending is not None
        writer.pending.cancel()
        return fake

    fake = asyncio.run(scenario())
    assert models(fake.of_kind("ConfigMap")[0]) == ["org/a"]
    assert "fallback key Secret ml/provider not found" in caplog.text
