"""Engine pods that survive a busy node: requests always set and derived from the plan,
ephemeral storage sized for the download, readiness apart from liveness, a settable user."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_operator.api import LLMDeployment
from llm_operator.planner import GIB, plan
from llm_operator.planner.pod_resources import (
    DOWNLOAD_HEADROOM,
    SCRATCH_GIB,
    download_bytes,
    pod_resources,
)
from llm_operator.render import RenderConfig, render_all
from llm_operator.render.output import to_yaml
from tests.render.schemas import validate

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = sorted(path for path in GOLDEN.iterdir() if (path / "input.yaml").exists())


def llmd(spec: dict[str, Any] | None = None) -> LLMDeployment:
    body: dict[str, Any] = {
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, **(spec or {})},
    }
    return LLMDeployment.model_validate(body)


def engine(resource: LLMDeployment, config: RenderConfig | None = None) -> dict[str, Any]:
    [deployment] = [o for o in render_all(resource, config) if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def gib(quantity: str) -> int:
    assert quantity.endswith("Gi"), quantity
    return int(quantity[: -len("Gi")])


def golden_engines() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for case in CASES:
        for obj in yaml.safe_load_all((case / "expected.yaml").read_text()):
            if obj["kind"] == "Deployment":
                [container] = obj["spec"]["template"]["spec"]["containers"]
                out.append((case.name, container))
    return out


@pytest.mark.parametrize(("case", "container"), golden_engines(), ids=lambda v: str(v)[:30])
def test_every_golden_engine_is_guaranteed_with_ephemeral_storage(
    case: str, container: dict[str, Any]
) -> None:
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    for name in ("cpu", "memory", "ephemeral-storage"):
        assert name in requests and name in limits, (case, name)
    # Guaranteed: requests equal limits for CPU and memory (and the GPUs).
    assert {k: v for k, v in requests.items() if k != "ephemeral-storage"} == {
        k: v for k, v in limits.items() if k != "ephemeral-storage"
    }
    assert gib(limits["ephemeral-storage"]) > gib(requests["ephemeral-storage"]) >= SCRATCH_GIB


def test_cpu_is_two_per_vllm_process_and_memory_grows_with_the_gpus() -> None:
    one = engine(llmd({"parallelism": {"tensor": 1}}))["resources"]["requests"]
    four = engine(llmd({"parallelism": {"tensor": 4}}))["resources"]["requests"]
    # API server + engine core + one worker per GPU, two CPUs each.
    assert one["cpu"] == "6" and four["cpu"] == "12"
    assert gib(one["memory"]) == 16 and gib(four["memory"]) == 40


def test_cpu_offload_adds_host_memory_per_gpu() -> None:
    plain = engine(llmd({"parallelism": {"tensor": 2}}))
    offload = engine(
        llmd({"parallelism": {"tensor": 2}, "engine": {"extraArgs": ["--cpu-offload-gb", "10"]}})
    )
    spelled = engine(
        llmd({"parallelism": {"tensor": 2}, "engine": {"extraArgs": ["--cpu-offload-gb=10"]}})
    )
    base = gib(plain["resources"]["limits"]["memory"])
    assert gib(offload["resources"]["limits"]["memory"]) == base + 20
    assert spelled["resources"] == offload["resources"]


def test_the_specs_cpu_and_memory_win_over_the_derived_ones() -> None:
    resources = engine(llmd({"resources": {"cpu": "3500m", "memory": "30Gi"}}))["resources"]
    for side in ("requests", "limits"):
        assert resources[side]["cpu"] == "3500m"
        assert resources[side]["memory"] == "30Gi"
    only_cpu = engine(llmd({"resources": {"cpu": "3"}}))["resources"]["requests"]
    assert only_cpu["cpu"] == "3" and only_cpu["memory"] == "16Gi"


def test_ephemeral_storage_holds_the_download_only_when_weights_go_to_the_nodes_disk() -> None:
    def request(spec: dict[str, Any]) -> int:
        return gib(engine(llmd(spec))["resources"]["requests"]["ephemeral-storage"])

    downloaded = request({})
    # Llama 3.1 8B in bfloat16 is 15 GiB of weights.
    assert downloaded == SCRATCH_GIB + 17
    cached = {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "cache": {"claimName": "w"}}}
    assert request(cached) == SCRATCH_GIB
    assert request({"model": {"name": "pvc://weights/Llama-3.1-8B-Instruct"}}) == SCRATCH_GIB
    assert request({"model": {"name": "s3://bucket/Llama-3.1-8B-Instruct"}}) == SCRATCH_GIB


def test_online_quantization_downloads_the_16_bit_checkpoint() -> None:
    online = llmd(
        {
            "model": {"name": "meta-llama/Llama-3.1-70B-Instruct"},
            "engine": {"quantization": "fp8", "maxModelLen": 8192},
        }
    )
    sized = plan(online.spec)
    assert sized.weight_bytes_total is not None
    # On the GPUs the weights are fp8; on disk they are the bfloat16 checkpoint.
    assert download_bytes(online.spec, sized) > 1.9 * sized.weight_bytes_total
    prequantized = llmd({"model": {"name": "RedHatAI/Meta-Llama-3.1-70B-Instruct-FP8"}})
    pre = plan(prequantized.spec)
    assert pre.weight_bytes_total is not None
    assert download_bytes(prequantized.spec, pre) == pytest.approx(pre.weight_bytes_total)


def test_an_unknown_model_is_sized_by_what_its_gpus_can_hold() -> None:
    unknown = llmd(
        {
            "model": {"name": "example/private-model"},
            "parallelism": {"tensor": 2},
            "resources": {"gpu": {"memoryGiB": 48}},
        }
    )
    resources = pod_resources(unknown.spec, plan(unknown.spec))
    assert resources.download_bytes == 2 * 48 * GIB
    expected = math.ceil(SCRATCH_GIB + 96 * DOWNLOAD_HEADROOM)
    assert gib(resources.ephemeral_storage_request) == expected


def test_readiness_and_liveness_are_distinct_and_liveness_is_lenient() -> None:
    container = engine(llmd())
    startup = container["startupProbe"]
    ready = container["readinessProbe"]
    live = container["livenessProbe"]
    assert ready["httpGet"] != live["httpGet"]
    assert startup["httpGet"] == ready["httpGet"] == {"path": "/health", "port": "http"}

    def budget(probe: dict[str, Any]) -> int:
        return int(probe["periodSeconds"] * probe["failureThreshold"])

    assert budget(ready) <= 15  # out of the gateway's backends within 15 s
    assert budget(live) >= 8 * budget(ready)
    assert live["timeoutSeconds"] > ready["timeoutSeconds"]
    # Neither path is under /v1, where vLLM's --api-key would answer 401.
    assert not ready["httpGet"]["path"].startswith("/v1")
    assert not live["httpGet"]["path"].startswith("/v1")


def test_the_user_when_set_runs_the_pod_non_root() -> None:
    # tests/controller/test_settings.py follows it from the chart value operator.runAsUser.
    deployment = render_all(llmd(), RenderConfig(run_as_user=10001))[0]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 10001
    validate(deployment)


def test_the_defaults_render_valid_kubernetes() -> None:
    for spec in ({}, {"parallelism": {"tensor": 8}}, {"resources": {"cpu": "500m"}}):
        for obj in yaml.safe_load_all(to_yaml(render_all(llmd(spec)))):
            validate(obj)


@pytest.mark.parametrize(
    ("label", "model", "engine"),
    [
        ("Llama 3.1 8B, downloaded", "meta-llama/Llama-3.1-8B-Instruct", {}),
        (
            "Llama 3.1 70B fp8 (online), downloaded",
            "meta-llama/Llama-3.1-70B-Instruct",
            {"quantization": "fp8", "maxModelLen": 8192},
        ),
        (
            "Llama 3.1 405B fp8 from `s3://`",
            "s3://bucket/Llama-3.1-405B-Instruct",
            {"quantization": "fp8", "maxModelLen": 16384},
        ),
    ],
)
def test_the_examples_in_docs_sizing_are_what_the_planner_says(
    label: str, model: str, engine: dict[str, Any]
) -> None:
    resource = llmd({"model": {"name": model}, "engine": engine})
    sized = plan(resource.spec)
    pod = pod_resources(resource.spec, sized)
    row = (
        f"| {label} | {sized.gpus_per_replica} | {pod.cpu} | {pod.memory} | "
        f"{pod.ephemeral_storage_request} / {pod.ephemeral_storage_limit} |"
    )
    docs = (Path(__file__).resolve().parents[2] / "docs" / "sizing.md").read_text()
    assert row in docs
