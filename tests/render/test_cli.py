"""`llm-operator render`: manifests or the plan on stdout, errors on stderr with an exit code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llm_operator.cli import main as top_level
from llm_operator.render.cli import main
from tests.render.schemas import validate

SPEC = """\
apiVersion: llmoperator.io/v1alpha1
kind: LLMDeployment
metadata: {name: llama, namespace: ml}
spec:
  model: {name: meta-llama/Llama-3.1-8B-Instruct}
  autoscaling: {maxReplicas: 3}
---
apiVersion: llmoperator.io/v1alpha1
kind: LLMDeployment
metadata: {name: qwen, namespace: ml}
spec:
  model: {name: Qwen/Qwen2.5-7B-Instruct}
"""


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "llmd.yaml"
    path.write_text(SPEC)
    return path


def test_render_prints_every_object_as_a_yaml_stream(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert top_level(["render", str(spec_file)]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Deployment", "llama"),
        ("Service", "llama"),
        ("PodDisruptionBudget", "llama"),
        ("HorizontalPodAutoscaler", "llama"),
        ("Deployment", "qwen"),
        ("Service", "qwen"),
    ]
    for obj in objects:
        validate(obj)


def test_config_file_shapes_the_render(
    spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("hpaMetricName: queue_depth\ndefaultEngineImage: mirror/vllm:1\n")
    assert main([str(spec_file), "--config", str(config)]) == 0
    objects = {o["kind"]: o for o in yaml.safe_load_all(capsys.readouterr().out)}
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "queue_depth"


def test_plan_prints_the_sizing(spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(spec_file), "--plan"]) == 0
    reports = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [r["name"] for r in reports] == ["llama", "qwen"]
    assert reports[0]["plan"]["tensorParallelSize"] == 1
    assert reports[0]["kvCacheKiBPerTokenPerGPU"] == 128.0
    assert reports[0]["model"] == "meta-llama/Llama-3.1-8B-Instruct"


def test_an_unfit_spec_fails_with_the_planners_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "metadata: {name: big}\n"
        "spec:\n"
        "  model: {name: meta-llama/Llama-3.1-70B-Instruct}\n"
        "  parallelism: {tensor: 1}\n"
    )
    assert main([str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "document 1 (big)" in captured.err
    assert "cannot hold 131.4 GiB of weights" in captured.err


def test_an_invalid_spec_and_a_bad_config_are_reported(
    spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: {name: x}\nspec: {model: {name: m}, replicas: -1}\n")
    assert main([str(bad)]) == 1
    assert "replicas" in capsys.readouterr().err
    config = tmp_path / "config.yaml"
    config.write_text("hpaMetricNmae: typo\n")
    assert main([str(spec_file), "--config", str(config)]) == 2
    assert "hpaMetricNmae" in capsys.readouterr().err
