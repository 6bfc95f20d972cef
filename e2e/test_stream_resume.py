"""Resumed streams end to end: the chart's gateway as a pod, an LLMDeployment with
`routing.resumeStreams: true` and two engine replicas, and the engine answering a stream
killed with SIGKILL half-way. The client's stream completes through the other replica, and
its text, finish reason and usage equal an uninterrupted answer to the same seeded request.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from kubernetes import client

from harness import kube
from harness.providers import Cluster
from harness.serving import (
    GATEWAY_PORT,
    Serving,
    container_pid,
    installed,
    llmd,
    reach,
)

NAME = "resume"
ENGINE_PORT = 8000
# 30 ms a token, long natural answers: a 60-token answer streams for about 2 s.
ENGINE_ENV = [
    {"name": "LLMOP_SIM_ITL", "value": "0.03"},
    {"name": "LLMOP_SIM_JITTER", "value": "0"},
    {"name": "LLMOP_SIM_OUTPUT_TOKENS", "value": "200"},
]
BODY = {
    "model": NAME,
    "messages": [{"role": "user", "content": "Tell me a long story"}],
    "stream": True,
    "max_tokens": 60,
    "seed": 42,
    "stream_options": {"include_usage": True},
}


@pytest.fixture(scope="module")
def serving(
    cluster: Cluster, api_client: client.ApiClient, crd_names: list[str], tmp_path_factory: Any
) -> Iterator[Serving]:
    if cluster.provider != "local":
        pytest.skip("killing an engine's process needs the local cluster (pods are processes)")
    home = tmp_path_factory.mktemp("helm-home")
    with installed(cluster, api_client, home, "resume") as s:
        yield s


def chunks_of(lines: Iterator[str]) -> Iterator[Any]:
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            yield data if data == "[DONE]" else json.loads(data)


def text_of(chunks: list[Any]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if c != "[DONE]" and c["choices"]
    )


def running(serving: Serving, pod: Any) -> float:
    with reach(serving.cluster, pod, ENGINE_PORT) as base:
        for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
            if line.startswith("vllm:num_requests_running"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_stream_whose_engine_is_killed_completes_on_the_other_replica(
    serving: Serving,
) -> None:
    body = llmd(NAME, replicas=2, env=ENGINE_ENV)
    body["spec"]["routing"] = {"resumeStreams": True}
    serving.apply(body)
    serving.wait_ready(NAME, timeout=180)
    kube.wait_until("two ready engines", lambda: len(serving.engines(NAME)) == 2, timeout=60)
    with reach(serving.cluster, serving.gateway_pod(), GATEWAY_PORT) as base:
        serving.wait_routed(base, NAME)
        with httpx.Client(timeout=30) as http:
            whole = http.post(base + "/v1/chat/completions", json=BODY)
            assert whole.status_code == 200, whole.text
            ref = list(chunks_of(iter(whole.text.splitlines())))
            assert ref[-1] == "[DONE]" and len(text_of(ref)) > 100

            got: list[Any] = []
            killed = None
            t0 = time.monotonic()
            with http.stream("POST", base + "/v1/chat/completions", json=BODY) as r:
                assert r.status_code == 200
                for chunk in chunks_of(r.iter_lines()):
                    got.append(chunk)
                    if killed is None and len(got) == 10:
                        # The replica answering is the one running a request.
                        busy = [p for p in serving.engines(NAME) if running(serving, p) >= 1]
                        assert len(busy) == 1, "exactly one engine should be streaming"
                        killed = busy[0]
                        os.kill(container_pid(killed, "vllm"), signal.SIGKILL)
            elapsed = time.monotonic() - t0
        metrics = httpx.get(base + "/metrics", timeout=5).text

    assert killed is not None
    assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
    assert text_of(got) == text_of(ref), "the resumed text differs from the uninterrupted one"
    pieces = [
        c["choices"][0]["delta"].get("content") for c in got if c != "[DONE]" and c["choices"]
    ]
    ref_pieces = [
        c["choices"][0]["delta"].get("content") for c in ref if c != "[DONE]" and c["choices"]
    ]
    assert pieces == ref_pieces  # token by token
    finish = [c["choices"][0]["finish_reason"] for c in got if c != "[DONE]" and c["choices"]]
    assert finish[-1] == "length" == ref[-3]["choices"][0]["finish_reason"]
    [usage] = [c["usage"] for c in got if c != "[DONE]" and not c["choices"]]
    [ref_usage] = [c["usage"] for c in ref if c != "[DONE]" and not c["choices"]]
    assert usage == ref_usage and usage["completion_tokens"] == 60
    assert len({(c["id"], c["created"], c["model"]) for c in got if c != "[DONE]"}) == 1
    assert elapsed < 20
    # The client saw a success; the killed replica's attempt counts as a failed one.
    failed = [
        line
        for line in metrics.splitlines()
        if line.startswith("llm_gateway_attempt_failures_total{")
        and f'model="{NAME}"' in line
        and 'track="stable"' in line
    ]
    assert failed and sum(float(x.rsplit(" ", 1)[1]) for x in failed) >= 1, metrics[-2000:]
