"""Golden renders: each tests/golden/<case>/input.yaml (with an optional config.yaml of
operator settings) renders exactly expected.yaml. Rewrite on purpose only:
`LLMOP_UPDATE_GOLDEN=1 pytest tests/render/test_golden.py`, then review the diff like code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from llm_operator.api import LLMDeployment
from llm_operator.render import RenderConfig, render_all
from llm_operator.render.output import to_yaml
from tests.render.schemas import validate

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = sorted(path for path in GOLDEN.iterdir() if (path / "input.yaml").exists())
UPDATE = os.environ.get("LLMOP_UPDATE_GOLDEN") == "1"


def render_case(case: Path) -> str:
    llmd = LLMDeployment.model_validate(yaml.safe_load((case / "input.yaml").read_text()))
    config_file = case / "config.yaml"
    config = RenderConfig.from_mapping(
        yaml.safe_load(config_file.read_text()) if config_file.exists() else None
    )
    return to_yaml(render_all(llmd, config))


def test_there_are_at_least_six_cases() -> None:
    assert len(CASES) >= 6


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_render_matches_golden(case: Path) -> None:
    rendered = render_case(case)
    expected_file = case / "expected.yaml"
    if UPDATE:
        expected_file.write_text(rendered)
    assert expected_file.exists(), f"no {expected_file}: run with LLMOP_UPDATE_GOLDEN=1"
    assert rendered == expected_file.read_text()


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_golden_objects_are_valid_kubernetes(case: Path) -> None:
    objects = list(yaml.safe_load_all((case / "expected.yaml").read_text()))
    assert objects
    for obj in objects:
        validate(obj)
