"""The generated Grafana dashboards: valid against Grafana's dashboard schema as
grafana-foundation-sdk models it (generated from Grafana's schema), every panel queries
Prometheus through the datasource variable with the variables it needs, and the chart ships
them as sidecar ConfigMaps."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from grafana_foundation_sdk.models.dashboard import Dashboard

from llm_operator_dev import dashboards
from tests.chart.render import REPO, render

FILES = sorted((REPO / dashboards.DASHBOARD_DIR).glob("*.json"))


def query_panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in data["panels"] if p["type"] != "row"]


def test_both_dashboards_are_generated() -> None:
    assert [f.name for f in FILES] == sorted(dashboards.DASHBOARDS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_schema_round_trip_keeps_every_field(path: Path) -> None:
    """Grafana's schema as typed models: a field it does not know would be dropped, a wrong
    type would fail to load; what loads and writes back unchanged is in the schema."""
    data = json.loads(path.read_text())
    model = Dashboard.from_json(data)
    assert json.loads(json.dumps(model.to_json(), default=lambda o: o.to_json())) == data
    assert data["schemaVersion"] >= 36
    assert data["uid"] and len(data["uid"]) <= 40


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_panels_query_prometheus_through_the_variable(path: Path) -> None:
    data = json.loads(path.read_text())
    variables = {v["name"] for v in data["templating"]["list"]}
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in query_panels(data):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range"}
            assert used <= variables, (panel["title"], used - variables)
        # Every panel fits the 24-column grid.
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_the_llmdeployment_dashboard_covers_the_issue() -> None:
    data = json.loads((REPO / dashboards.DASHBOARD_DIR / "llm-deployment.json").read_text())
    titles = " | ".join(p["title"] for p in query_panels(data)).lower()
    topics = ("by track", "first token", "per output token", "end-to-end", "queue", "kv-cache")
    for topic in (*topics, "replicas against desired", "gpu-hours", "fallback", "canary"):
        assert topic in titles, topic
    assert {"namespace", "llmdeployment", "model"} <= {
        v["name"] for v in data["templating"]["list"]
    }


def test_the_chart_ships_them_for_the_sidecar_when_asked() -> None:
    assert not [
        o for o in render() if o["kind"] == "ConfigMap" and "dashboard" in o["metadata"]["name"]
    ]
    objs = render(None, "metrics.dashboards.enabled=true")
    maps = [o for o in objs if o["kind"] == "ConfigMap" and "dashboard" in o["metadata"]["name"]]
    assert len(maps) == len(FILES)
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((REPO / dashboards.DASHBOARD_DIR / name).read_text())
