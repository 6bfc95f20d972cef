"""The pure core (api, planner, render, rollout, and the reconcile, engine_health, constants and
kubeformat modules) does no I/O: it imports no kopf, no Kubernetes client, no HTTP or
Prometheus library, and none of the impure packages."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "operator" / "llm_operator"
PURE = ("api", "planner", "render", "rollout")
#: Pure modules beside the packages: the reconcile decisions, what pods say about engines, the
#: shared names and the Kubernetes wire formats.
PURE_MODULES = ("reconcile", "engine_health", "constants", "kubeformat")
ALLOWED_THIRD_PARTY = {"pydantic", "pydantic_core", "yaml", "jinja2", "typing_extensions"}
ALLOWED_OWN = {f"llm_operator.{name}" for name in PURE + PURE_MODULES} | {"llm_operator"}
# The standard library's network and process modules are I/O too.
FORBIDDEN_STDLIB = {"socket", "http", "urllib", "asyncio", "subprocess", "ssl", "requests"}


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def violations(path: Path) -> list[str]:
    bad = []
    for module in imports_of(path):
        top = module.split(".")[0]
        if top == "llm_operator":
            if not any(module == own or module.startswith(own + ".") for own in ALLOWED_OWN):
                bad.append(module)
        elif top in FORBIDDEN_STDLIB or (
            top not in sys.stdlib_module_names and top not in ALLOWED_THIRD_PARTY
        ):
            bad.append(module)
    return bad


PURE_FILES = [
    path
    for name in PURE
    for path in sorted((PACKAGE / name).rglob("*.py"))
    # CLI front ends read files; they live beside the core but are not part of it.
    if path.name != "cli.py"
] + [PACKAGE / f"{name}.py" for name in PURE_MODULES]


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_pure_module_imports_nothing_impure(path: Path) -> None:
    assert violations(path) == []


def test_the_contract_would_catch_an_impure_import(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("import kopf\nfrom kubernetes import client\nimport aiohttp\nimport socket\n")
    assert sorted(violations(sneaky)) == ["aiohttp", "kopf", "kubernetes", "socket"]


def test_the_api_package_is_covered() -> None:
    assert any(p.parent.name == "api" for p in PURE_FILES)


def test_the_pure_modules_are_covered() -> None:
    assert {p.stem for p in PURE_FILES} >= set(PURE_MODULES)
    assert all(p.is_file() for p in PURE_FILES)
