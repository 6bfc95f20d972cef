"""Render the chart with the project's pinned helm, for the chart tests."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from llm_operator_dev import chartgen

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / chartgen.CHART_DIR
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "llm-operator"
NAMESPACE = "llm-operator"
#: Groups of custom resources the chart renders: not in the Kubernetes schemas, so their shape
#: is asserted by hand instead.
CUSTOM_GROUPS = frozenset({"monitoring.coreos.com", "kopf.dev"})


@functools.cache
def helm() -> Path:
    """The pinned helm; built into the cache if missing (never skipped)."""
    return chartgen.helm_binary()


@functools.cache
def _render(values: tuple[Path, ...], sets: tuple[str, ...], namespace: str) -> str:
    return chartgen.helm_template(CHART, RELEASE, namespace, list(values), list(sets), helm=helm())


def render(
    values: Path | None = None, *sets: str, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """The objects `helm template` renders with ``values`` and ``--set`` items."""
    text = _render((values,) if values else (), sets, namespace)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def group_of(obj: dict[str, Any]) -> str:
    api_version: str = obj["apiVersion"]
    return api_version.rpartition("/")[0]


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(
    objs: list[dict[str, Any]], kind: str, name: str, namespace: str | None = None
) -> dict[str, Any]:
    found = [
        o
        for o in of_kind(objs, kind)
        if o["metadata"]["name"] == name
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def scenario_id(path: Path | None) -> str:
    return "default" if path is None else path.stem
