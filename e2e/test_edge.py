"""Edge settings in a real install: client keys from a Secret in the release namespace (the
chart's `gateway.edge.clientKeysSecret`), a per-key token budget counted from the answers'
usage, a per-model budget from the LLMDeployment (`spec.routing.clientLimits`), a rotated
key taken with no restart, and the gateway's audit log: one JSON line per request, with the
client's name and never its key or a prompt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from openai import AuthenticationError, OpenAI, RateLimitError

from harness import kube
from harness.providers import Cluster
from harness.serving import GATEWAY_PORT, Serving, container_log, installed, llmd, reach

KEYS = {"team-a": "sk-e2e-team-a-1", "team-b": "sk-e2e-team-b-1"}
TEAM_A_TOKENS_PER_MINUTE = 60
PROMPT = "a prompt the audit log must never hold"


@pytest.fixture(scope="module")
def serving(
    cluster: Cluster, api_client: client.ApiClient, crd_names: list[str], tmp_path_factory: Any
) -> Iterator[Serving]:
    def client_keys(namespace: str) -> None:
        client.CoreV1Api(api_client).create_namespaced_secret(
            namespace, {"metadata": {"name": "clients"}, "stringData": dict(KEYS)}
        )

    home = tmp_path_factory.mktemp("helm-home")
    values = [
        "gateway.replicas=1",  # budgets are per gateway replica: one keeps the arithmetic plain
        "gateway.edge.clientKeysSecret=clients",
        f"gateway.edge.keyLimits.team-a.tokensPerMinute={TEAM_A_TOKENS_PER_MINUTE}",
    ]
    with installed(cluster, api_client, home, "edge", *values, prepare=client_keys) as s:
        yield s


def sdk(base: str, key: str) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


def audit(serving: Serving, pod: Any) -> list[dict[str, Any]]:
    text = container_log(serving.cluster, serving.api, pod, "gateway")
    return [json.loads(line) for line in text.splitlines() if '"msg":"request"' in line]


def test_client_keys_budgets_and_the_audit_log(serving: Serving) -> None:
    serving.apply(llmd("edged"))
    small = llmd("edged-small")
    small["spec"]["routing"] = {"clientLimits": {"requestsPerSecond": 0.01, "burst": 2}}
    serving.apply(small)
    serving.wait_ready("edged")
    serving.wait_ready("edged-small")
    gateway = serving.gateway_pod()
    with reach(serving.cluster, gateway, GATEWAY_PORT) as base:
        serving.wait_routed(base, "edged", api_key=KEYS["team-b"])
        serving.wait_routed(base, "edged-small", api_key=KEYS["team-b"])
        a, b = sdk(base, KEYS["team-a"]), sdk(base, KEYS["team-b"])
        with pytest.raises(AuthenticationError):
            sdk(base, "sk-not-a-client").chat.completions.create(
                model="edged", messages=[{"role": "user", "content": PROMPT}]
            )

        # team-a streams (no include_usage: the gateway counts anyway) until its budget is
        # spent; team-b, with no budget, goes on meanwhile.
        used, refused = 0, None
        for _ in range(20):
            try:
                stream = a.chat.completions.create(
                    model="edged",
                    messages=[{"role": "user", "content": PROMPT}],
                    max_tokens=16,
                    stream=True,
                )
                chunks = list(stream)
                assert chunks and all(c.choices for c in chunks)
                used += 1
            except RateLimitError as e:
                refused = e
                break
            b.chat.completions.create(
                model="edged", messages=[{"role": "user", "content": PROMPT}], max_tokens=16
            )
        assert refused is not None, "team-a was never refused"
        assert refused.code == "rate_limit_exceeded" and refused.type == "rate_limit_error"
        assert f"{TEAM_A_TOKENS_PER_MINUTE} tokens per minute" in refused.message
        assert int(refused.response.headers["retry-after"]) >= 1
        for _ in range(3):
            answer = b.chat.completions.create(
                model="edged", messages=[{"role": "user", "content": PROMPT}], max_tokens=16
            )
            assert answer.usage is not None and answer.usage.completion_tokens > 0

        # The LLMDeployment's own budget, per key: a burst of 2 on edged-small.
        def small_ok(client_: OpenAI) -> bool:
            try:
                client_.chat.completions.create(
                    model="edged-small", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
                return True
            except RateLimitError as e:
                assert "on model `edged-small`" in e.message, e.message
                return False

        assert [small_ok(b) for _ in range(3)] == [True, True, False]

        # Rotate team-a's key in the Secret: the new key works within 60 s, the old one
        # stops, the gateway is not restarted.
        core = client.CoreV1Api(serving.api)
        core.patch_namespaced_secret(
            "clients", serving.namespace, {"stringData": {"team-a": "sk-e2e-team-a-2"}}
        )
        rotated = time.monotonic()

        def new_key_works() -> bool:
            try:
                sdk(base, "sk-e2e-team-a-2").models.list()
                return True
            except AuthenticationError:
                return False

        kube.wait_until("the rotated key to work", new_key_works, timeout=90, interval=1)
        took = time.monotonic() - rotated
        with pytest.raises(AuthenticationError):
            a.models.list()
    assert took <= 60, took
    now = core.read_namespaced_pod(gateway.metadata.name, serving.namespace)
    assert now.metadata.uid == gateway.metadata.uid
    assert all(s.restart_count == 0 for s in now.status.container_statuses)

    # One audit line per request, refusals included; never a key or a prompt.
    deadline = time.monotonic() + 10
    while True:
        lines = [ln for ln in audit(serving, gateway) if ln["model"].startswith("edged")]
        team_a = [ln for ln in lines if ln["client"] == "team-a" and ln["model"] == "edged"]
        if len(team_a) >= used + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [ln["status"] for ln in team_a] == [200] * used + [429], team_a
    team_b = [ln for ln in lines if ln["client"] == "team-b"]
    assert [ln["status"] for ln in team_b if ln["model"] == "edged"] == [200] * (used + 3)
    assert [ln["status"] for ln in team_b if ln["model"] == "edged-small"] == [200, 200, 429]
    for ln in team_a[:-1] + team_b[: used + 3]:
        assert ln["tokens_in"] > 0 and ln["tokens_out"] > 0, ln
        assert ln["backend"] and ln["track"] == "stable" and ln["fallback_path"] == []
        assert {"ts", "status", "outcome", "duration_ms", "stream"} <= set(ln)
    log = container_log(serving.cluster, serving.api, gateway, "gateway")
    assert PROMPT not in log
    assert not any(key in log for key in [*KEYS.values(), "sk-e2e-team-a-2"])
    print(
        f"team-a refused after {used} streams ({TEAM_A_TOKENS_PER_MINUTE} tokens/min), "
        f"Retry-After {refused.response.headers['retry-after']} s; rotated key in use after "
        f"{took:.1f} s; {len(lines)} audit lines"
    )
