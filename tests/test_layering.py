"""The import contracts in pyproject.toml ([tool.importlinter], run by `make lint`) name real
modules, and import-linter enforces them. The pure core (api, planner, render, rollout, and the
reconcile, engine_health, constants and kubeformat modules) imports no kopf, no Kubernetes
client, no HTTP or Prometheus library, no network or process module, and none of the impure
packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "operator"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def contracts() -> dict[str, dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["id"]: contract for contract in config["contracts"]}


def module_path(module: str) -> Path | None:
    base = SOURCES.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def own_modules(contract: dict[str, Any]) -> list[str]:
    names = contract.get("source_modules", []) + contract.get("modules", [])
    names += contract.get("forbidden_modules", [])
    return [name for name in names if name.split(".")[0].startswith("llm_operator")]


@pytest.mark.parametrize("contract_id", sorted(contracts()))
def test_every_contract_names_modules_that_exist(contract_id: str) -> None:
    missing = [m for m in own_modules(contracts()[contract_id]) if module_path(m) is None]
    assert missing == [], f"{contract_id} names modules that do not exist: {missing}"


def test_every_pure_module_beside_the_packages_is_in_the_contract() -> None:
    """A new module of pure decisions must be listed, or it is checked by nothing."""
    pure = set(contracts()["pure-core"]["source_modules"])
    for name in (
        "rollout",
        "reconcile",
        "engine_health",
        "constants",
        "kubeformat",
        "stall",
        "cost",
    ):
        assert f"llm_operator.{name}" in pure


def _lint_imports(workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(workdir / "operator"), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_the_repository_keeps_its_contracts() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_the_contract_would_catch_an_impure_import(tmp_path: Path) -> None:
    """The same contracts over a copy of the package with one impure import fail."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(SOURCES, tmp_path / "operator", ignore=shutil.ignore_patterns("*.egg-info"))
    names = tmp_path / "operator" / "llm_operator" / "render" / "names.py"
    names.write_text(names.read_text() + "\nimport socket  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "llm_operator.render.names -> socket" in result.stdout
