"""The chart's alerts (charts/llm-operator/files/alerts.yaml), as `helm template` renders them:
`promtool check rules`, and `promtool test rules` with a firing and a quiet case for each
alert (tests/chart/alerts_test.yaml); each runbook_url names a section of docs/runbooks.md."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.render import REPO, render

PROMTOOL = "promtool"
CASES = Path(__file__).with_name("alerts_test.yaml")
RUNBOOKS = REPO / "docs" / "runbooks.md"


def promtool() -> str:
    found = shutil.which(PROMTOOL) or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if found is None:
        message = "promtool is missing: `make setup` installs Debian's prometheus"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def rule_groups() -> list[dict[str, Any]]:
    (rule,) = [
        o
        for o in render(None, "metrics.prometheusRule.enabled=true")
        if o["kind"] == "PrometheusRule"
    ]
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    return path


def test_promtool_checks_the_rendered_rules(rules_file: Path) -> None:
    result = run("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass(rules_file: Path) -> None:
    cases = yaml.safe_load(CASES.read_text())
    by_name = alerts()
    for test in cases["tests"]:
        for check in test["alert_rule_test"]:
            for expected in check["exp_alerts"]:
                # The runbook link is the rule's own text; the other annotations are spelled out.
                url = by_name[check["alertname"]]["annotations"]["runbook_url"]
                expected["exp_annotations"]["runbook_url"] = url
    cases["rule_files"] = [rules_file.name]
    tests = rules_file.with_name("tests.yaml")
    tests.write_text(yaml.safe_dump(cases, sort_keys=False))
    result = run("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_broken_expectation_fails_promtool(rules_file: Path) -> None:
    """The harness can fail: the canary alert expected one minute early is a failure."""
    cases = {
        "rule_files": [rules_file.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'llm_operator_condition{type="FallbackActive"}', "values": "1x10"}
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "4m",
                        "alertname": "LLMFallbackActive",
                        "exp_alerts": [{"exp_labels": {}}],
                    }
                ],
            }
        ],
    }
    tests = rules_file.with_name("broken.yaml")
    tests.write_text(yaml.safe_dump(cases))
    assert run("test", "rules", str(tests)).returncode != 0


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in yaml.safe_load(CASES.read_text())["tests"]:
        for check in test["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == quiet == set(alerts())


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_each_alert_links_its_runbook_section() -> None:
    sections = anchors(RUNBOOKS.read_text())
    for name, rule in alerts().items():
        url = rule["annotations"]["runbook_url"]
        assert url.endswith(f"docs/runbooks.md#{name.lower()}"), url
        assert name.lower() in sections, f"docs/runbooks.md has no section {name}"
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}


def test_thresholds_come_from_values() -> None:
    sets = ("metrics.prometheusRule.enabled=true", "metrics.prometheusRule.ttftP95Seconds=3",
            "metrics.prometheusRule.stalledFor=3m")  # fmt: skip
    (rule,) = [o for o in render(None, *sets) if o["kind"] == "PrometheusRule"]
    by_name = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert by_name["LLMTTFTp95AboveObjective"]["expr"].rstrip().endswith("> 3")
    assert "[3m]" in by_name["LLMEngineStalled"]["expr"]
    assert by_name["LLMEngineStalled"]["for"] == "3m"


def test_off_by_default() -> None:
    kinds = {o["kind"] for o in render()}
    assert not kinds & {"PrometheusRule", "PodMonitor"}


def test_the_pod_monitor_selects_every_rendered_engine_pod_and_no_chart_pod() -> None:
    objs = render(None, "metrics.podMonitor.enabled=true")
    (monitor,) = [o for o in objs if o["kind"] == "PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    selector = spec["selector"]["matchLabels"].items()
    goldens = sorted((REPO / "tests" / "golden").glob("*/expected.yaml"))
    engines = [
        o
        for g in goldens
        for o in yaml.safe_load_all(g.read_text())
        if o and o["kind"] == "Deployment"
    ]
    assert engines
    for deployment in engines:
        template = deployment["spec"]["template"]
        assert selector <= template["metadata"]["labels"].items()
        (container,) = [c for c in template["spec"]["containers"] if c["name"] == "vllm"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        (endpoint,) = spec["podMetricsEndpoints"]
        annotations = template["metadata"]["annotations"]
        # The same port and path the scrape annotations name (what the dev Prometheus uses).
        assert str(ports[endpoint["port"]]) == annotations["prometheus.io/port"]
        assert endpoint["path"] == annotations["prometheus.io/path"]
    chart_pods = [o["spec"]["template"] for o in objs if o["kind"] == "Deployment"]
    assert chart_pods and not [p for p in chart_pods if selector <= p["metadata"]["labels"].items()]
    namespaced = render(None, "metrics.podMonitor.enabled=true", "watchNamespaces={a,b}")
    (monitor,) = [o for o in namespaced if o["kind"] == "PodMonitor"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["a", "b"]}
    labels = set(monitor["spec"]["podTargetLabels"])
    assert {"llmoperator.io/deployment", "llmoperator.io/track"} <= labels
