"""spec.monitoring in a real install: with prometheus-operator's own CRDs (PodMonitor and
PrometheusRule, from its Go module at the version pinned in e2e/cluster/versions.env) and
`operator.prometheusOperator=true`, the chart's operator (its ServiceAccount and RBAC) creates a
PodMonitor and a PrometheusRule per LLMDeployment that the real API server accepts against
prometheus-operator's schemas, owned by the LLMDeployment; the PodMonitor selects exactly the
model's engine pods; the stored rules pass `promtool check rules`; turning alerts off prunes the
rule without touching the engines.

What this does NOT prove: that a Prometheus picks them up. The local cluster runs Debian's
Prometheus with its own file-based discovery, not prometheus-operator; the rules' behaviour is
checked with promtool's unit tests (tests/render/test_monitoring.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube
from harness.providers import Cluster
from harness.serving import Serving, installed, llmd
from llm_operator_dev.devcluster.layout import read_env

REPO = Path(__file__).resolve().parents[1]
MODULE = "github.com/prometheus-operator/prometheus-operator"
CRDS = ("monitoring.coreos.com_podmonitors.yaml", "monitoring.coreos.com_prometheusrules.yaml")
RUNBOOKS = "https://runbooks.example/llm.md"


def prometheus_operator_crds(tmp: Path) -> Path:
    """The two CRD files, from the Go module cache (downloaded once through the proxy)."""
    version = read_env(REPO / "e2e" / "cluster" / "versions.env")["PROMETHEUS_OPERATOR_VERSION"]
    go = shutil.which("go")
    if go is None:
        pytest.fail("go is missing: the prometheus-operator CRDs come from its Go module")
    result = subprocess.run(
        [go, "mod", "download", "-json", f"{MODULE}@{version}"],
        cwd=tmp, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "GOFLAGS": "-mod=mod"},
    )  # fmt: skip
    info = json.loads(result.stdout or "{}")
    assert result.returncode == 0 and "Dir" in info, result.stdout + result.stderr
    folder = tmp / "crds"
    folder.mkdir()
    for name in CRDS:
        shutil.copy(Path(info["Dir"]) / "example" / "prometheus-operator-crd" / name, folder)
    return folder


@pytest.fixture(scope="module")
def serving(
    cluster: Cluster,
    api_client: client.ApiClient,
    crd_names: list[str],
    tmp_path_factory: Any,
) -> Iterator[Serving]:
    kube.apply_crds(api_client, prometheus_operator_crds(tmp_path_factory.mktemp("promop")))
    values = (
        "operator.prometheusOperator=true",
        f"metrics.prometheusRule.runbookBaseUrl={RUNBOOKS}",
    )
    with installed(cluster, api_client, tmp_path_factory.mktemp("helm-home"), "mon", *values) as s:
        yield s


def monitoring_object(serving: Serving, plural: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = serving.objects().get_namespaced_custom_object(
            "monitoring.coreos.com", "v1", serving.namespace, plural, name
        )
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return obj


def test_monitoring_objects_are_created_owned_and_pruned(serving: Serving, tmp_path: Path) -> None:
    name = "watched"
    body = llmd(name, replicas=2)
    body["spec"]["monitoring"] = {
        "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "alerts": {"enabled": True, "ttftP95Seconds": 1.5, "errorRatio": 0.02},
    }
    serving.apply(body)
    live = serving.wait_ready(name)
    monitor = kube.wait_until(
        "the PodMonitor", lambda: monitoring_object(serving, "podmonitors", name), 60
    )
    rule = kube.wait_until(
        "the PrometheusRule", lambda: monitoring_object(serving, "prometheusrules", name), 60
    )
    for obj in (monitor, rule):
        [owner] = obj["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "LLMDeployment", name, live["metadata"]["uid"],
        )  # fmt: skip
        assert {m["manager"] for m in obj["metadata"]["managedFields"]} == {"llm-operator"}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    # The API server's own reading of the selector: exactly this model's two engine pods.
    selector = ",".join(f"{k}={v}" for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    selected = client.CoreV1Api(serving.api).list_namespaced_pod(
        serving.namespace, label_selector=selector
    )
    engines = {p.metadata.name for p in serving.engines(name)}
    assert {p.metadata.name for p in selected.items} == engines and len(engines) == 2

    # The rules as stored: promtool accepts them, with this model's thresholds and runbooks.
    [group] = rule["spec"]["groups"]
    rules = {r["alert"]: r for r in group["rules"]}
    assert "> 1.5" in rules["LLMTTFTp95AboveObjective"]["expr"]
    assert "> 0.02" in rules["LLMErrorRateHigh"]["expr"]
    assert rules["LLMEngineStalled"]["annotations"]["runbook_url"] == (
        f"{RUNBOOKS}#llmenginestalled"
    )
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # Alerts off: the rule is pruned, the PodMonitor and the engines stay.
    apps = client.AppsV1Api(serving.api)
    deployment_uid = apps.read_namespaced_deployment(name, serving.namespace).metadata.uid
    body["spec"]["monitoring"]["alerts"]["enabled"] = False
    serving.apply(body)
    kube.wait_until(
        "the PrometheusRule pruned",
        lambda: monitoring_object(serving, "prometheusrules", name) is None,
        60,
    )
    assert monitoring_object(serving, "podmonitors", name) is not None
    assert apps.read_namespaced_deployment(name, serving.namespace).metadata.uid == deployment_uid
    serving.wait_ready(name)
