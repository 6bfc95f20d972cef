"""The LLMDeployment models: defaults, aliases, and every validation rule."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from llm_operator.api import LLMDeployment
from llm_operator.api.v1alpha1 import parse_duration_seconds

ROOT = Path(__file__).resolve().parents[2]
TABLE = yaml.safe_load((Path(__file__).parent / "invalid_cases.yaml").read_text())
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))


def merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def case_body(case: dict[str, Any]) -> dict[str, Any]:
    return merge(TABLE["base"], {"spec": case["spec"]})  # type: ignore[no-any-return]


def test_minimal_spec_gets_the_defaults_a_user_expects() -> None:
    llmd = LLMDeployment.model_validate(TABLE["base"])
    spec = llmd.spec
    assert spec.engine.kind == "vllm"
    assert spec.engine.gpu_memory_utilization == 0.9
    assert spec.parallelism.tensor == "auto"
    assert spec.parallelism.pipeline == 1
    assert spec.resources.gpu.resource_name == "nvidia.com/gpu"
    assert spec.rollout.strategy == "RollingUpdate"
    assert (spec.rollout.max_surge, spec.rollout.max_unavailable) == (0, 1)
    assert spec.routing.fallback_on == ["connectError", "timeout", "429", "5xx", "saturated"]
    assert spec.desired_replicas == 1
    assert spec.model.effective_served_name == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_samples_round_trip_unchanged(sample: Path) -> None:
    body = yaml.safe_load(sample.read_text())
    llmd = LLMDeployment.model_validate(body)
    assert llmd.to_wire() == body


def test_there_are_three_samples_at_least() -> None:
    assert len(SAMPLES) >= 3


def test_camel_case_aliases_on_the_wire_and_snake_case_in_python() -> None:
    body = merge(
        TABLE["base"],
        {
            "spec": {
                "engine": {"gpuMemoryUtilization": 0.8, "maxModelLen": 4096},
                "resources": {"gpu": {"memoryGiB": 40, "perNode": 4}},
                "rollout": {
                    "strategy": "Canary",
                    "canary": {"steps": [{"weight": 5}], "analysis": {"maxTTFTp95Ratio": 1.5}},
                },
            }
        },
    )
    llmd = LLMDeployment.model_validate(body)
    assert llmd.spec.engine.max_model_len == 4096
    assert llmd.spec.resources.gpu.memory_gi_b == 40
    assert llmd.spec.rollout.canary is not None
    assert llmd.spec.rollout.canary.analysis.max_ttft_p95_ratio == 1.5
    assert llmd.to_wire() == body


def test_tensor_accepts_integers_and_auto_but_not_numeric_strings() -> None:
    for tensor in (1, 2, 8, "auto"):
        body = merge(TABLE["base"], {"spec": {"parallelism": {"tensor": tensor}}})
        assert LLMDeployment.model_validate(body).spec.parallelism.tensor == tensor
    with pytest.raises(ValidationError):
        LLMDeployment.model_validate(
            merge(TABLE["base"], {"spec": {"parallelism": {"tensor": "4"}}})
        )


def test_the_table_covers_at_least_twelve_distinct_mistakes() -> None:
    names = [c["name"] for c in TABLE["cases"]]
    assert len(names) == len(set(names))
    assert len({c["message"] for c in TABLE["cases"]}) >= 12


@pytest.mark.parametrize("case", TABLE["cases"], ids=lambda c: c["name"])
def test_each_invalid_spec_is_rejected_with_its_message(case: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as raised:
        LLMDeployment.model_validate(case_body(case))
    assert case["message"] in str(raised.value)


VALID_NEIGHBOURS = {
    "min-replicas-equal-max": {"autoscaling": {"minReplicas": 2, "maxReplicas": 2}},
    "scale-to-zero-with-keda": {
        "autoscaling": {"provider": "keda", "minReplicas": 0, "maxReplicas": 2}
    },
    "canary-increasing-to-100": {
        "rollout": {"strategy": "Canary", "canary": {"steps": [{"weight": 1}, {"weight": 100}]}}
    },
    "fallback-to-another": {"routing": {"fallbacks": [{"llmDeployment": "other"}]}},
    "fallback-url-with-model-and-key": {
        "routing": {
            "fallbacks": [
                {
                    "url": "http://127.0.0.1:9/v1",
                    "model": "m",
                    "apiKeySecretRef": {"name": "s", "key": "k"},
                }
            ]
        }
    },
    "tensor-equal-to-node": {"parallelism": {"tensor": 4}, "resources": {"gpu": {"perNode": 4}}},
    "gpu-memory-utilization-one": {"engine": {"gpuMemoryUtilization": 1}},
    "served-name-with-slash-and-colon": {"model": {"name": "x/y", "servedName": "org/model:v2"}},
    "extra-args-unmanaged": {"engine": {"extraArgs": ["--enable-prefix-caching", "--seed=1"]}},
    "rollout-surge-only": {"rollout": {"maxSurge": 1, "maxUnavailable": 0}},
    "replicas-zero": {"replicas": 0},
    "env-from-secret": {
        "engine": {"env": [{"name": "A", "secretKeyRef": {"name": "s", "key": "k"}}]}
    },
}


@pytest.mark.parametrize("spec", VALID_NEIGHBOURS.values(), ids=list(VALID_NEIGHBOURS))
def test_valid_neighbours_are_accepted(spec: dict[str, Any]) -> None:
    LLMDeployment.model_validate(merge(TABLE["base"], {"spec": spec}))


def test_mistakes_in_different_sections_are_all_reported() -> None:
    body = merge(
        TABLE["base"],
        {
            "spec": {
                "autoscaling": {"minReplicas": 3, "maxReplicas": 2},
                "parallelism": {"tensor": 3},
                "rollout": {"maxSurge": 0, "maxUnavailable": 0},
            }
        },
    )
    with pytest.raises(ValidationError) as raised:
        LLMDeployment.model_validate(body)
    text = str(raised.value)
    assert "minReplicas must not exceed" in text
    assert "power of two" in text
    assert "cannot both be 0" in text


def test_duplicate_env_names_are_refused() -> None:
    body = merge(
        TABLE["base"],
        {"spec": {"engine": {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}}},
    )
    with pytest.raises(ValidationError, match=r"engine\.env names must be unique"):
        LLMDeployment.model_validate(body)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5), ("1.5s", 1.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration_seconds(text) == seconds
