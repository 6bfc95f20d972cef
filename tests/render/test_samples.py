"""Every sample in manifests/samples renders objects that pass the Kubernetes schemas of a
current release, and the samples' sizing comments hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llm_operator.api import LLMDeployment
from llm_operator.planner import plan
from llm_operator.render import RenderConfig, render_all
from tests.render.schemas import validate

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))


def load(path: Path) -> LLMDeployment:
    return LLMDeployment.model_validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize(
    "config", [RenderConfig(), RenderConfig(run_as_user=1000)], ids=["default", "non-root"]
)
def test_sample_renders_valid_kubernetes(sample: Path, config: RenderConfig) -> None:
    objects = render_all(load(sample), config)
    assert [o["kind"] for o in objects][:2] == ["Deployment", "Service"]
    for obj in objects:
        validate(obj)


def test_the_fp8_sample_gets_the_tensor_size_its_comment_promises() -> None:
    # "the planner picks the tensor-parallel size (auto -> 2 on 80 GiB GPUs)"
    assert (
        plan(load(ROOT / "manifests/samples/llama-3-70b-fp8.yaml").spec).tensor_parallel_size == 2
    )
