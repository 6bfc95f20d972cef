"""Properties over any valid spec: the planner and renderers raise nothing but PlanError, and
whatever they render is valid Kubernetes (strict schemas of a current release)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from pydantic import ValidationError

from llm_operator.api import LLMDeployment
from llm_operator.constants import LABEL_DEPLOYMENT, LABEL_MANAGED_BY
from llm_operator.planner import HEADROOM, PlanError, plan
from llm_operator.render import RenderConfig, render_all, status_extras
from tests.render.schemas import validate
from tests.render.strategies import llm_deployments, render_configs

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def parse(body: dict[str, Any]) -> LLMDeployment:
    try:
        return LLMDeployment.model_validate(body)
    except ValidationError:
        assume(False)
        raise AssertionError("unreachable") from None


@PROPERTY
@given(body=llm_deployments())
def test_the_planner_raises_nothing_but_plan_error_and_its_plans_fit(body: dict[str, Any]) -> None:
    llmd = parse(body)
    try:
        result = plan(llmd.spec)
    except PlanError as error:
        assert str(error)
        event("refused")
        return
    event("planned")
    spec = llmd.spec
    assert result.gpus_per_replica <= spec.resources.gpu.per_node
    if spec.parallelism.tensor != "auto":
        assert result.tensor_parallel_size == spec.parallelism.tensor
    if result.kv_cache_tokens is not None and result.max_model_len is not None:
        assert result.kv_cache_tokens >= result.max_model_len * HEADROOM
        assert result.sizing_plan().kv_cache_tokens == result.kv_cache_tokens


@PROPERTY
@given(body=llm_deployments(), config_body=render_configs)
def test_any_valid_spec_renders_valid_kubernetes_objects(
    body: dict[str, Any], config_body: dict[str, Any]
) -> None:
    llmd = parse(body)
    config = RenderConfig.from_mapping(config_body)
    try:
        objects = render_all(llmd, config)
        extras = status_extras(llmd, config)
    except PlanError:
        event("refused")
        return
    event("rendered " + "+".join(obj["kind"] for obj in objects[2:]))
    kinds = [obj["kind"] for obj in objects]
    assert kinds[:2] == ["Deployment", "Service"]
    for obj in objects:
        validate(obj)
        metadata = obj["metadata"]
        assert len(metadata["name"]) <= 63 and DNS_1035.match(metadata["name"])
        for value in metadata["labels"].values():
            assert len(value) <= 63 and LABEL_VALUE.match(value)
        assert metadata["labels"][LABEL_MANAGED_BY] == "llm-operator"
        assert (
            metadata["labels"][LABEL_DEPLOYMENT]
            == objects[0]["metadata"]["labels"][LABEL_DEPLOYMENT]
        )
        assert ("ownerReferences" in metadata) == bool(llmd.metadata.uid)
    deployment = objects[0]
    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    assert ("replicas" in deployment["spec"]) == (llmd.spec.autoscaling is None)
    (engine,) = pod["spec"]["containers"]
    gpus = engine["resources"]["limits"][llmd.spec.resources.gpu.resource_name]
    assert int(gpus) == extras["gpusPerReplica"]
    env_names = [item["name"] for item in engine["env"]]
    assert len(env_names) == len(set(env_names))
    service = objects[1]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    # Deterministic: the same input renders the same output.
    assert render_all(llmd, config) == objects


def test_the_strict_schema_check_would_catch_a_misspelt_field() -> None:
    llmd = LLMDeployment.model_validate(
        {"metadata": {"name": "x"}, "spec": {"model": {"name": "Qwen/Qwen2.5-7B-Instruct"}}}
    )
    deployment = render_all(llmd)[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["startupprobe"] = {}
    with pytest.raises(Exception, match="startupprobe"):
        validate(deployment)
