"""KEDA and prometheus-adapter on the local cluster: their builds' bookkeeping, the rule the
adapter serves (one copy, shown verbatim in the docs), and the objects and argvs `up` uses.
No cluster and no Go build needed."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_operator.render.config import DEFAULT_HPA_METRIC
from llm_operator_dev.devcluster import adapter, gobuild, keda, pki
from llm_operator_dev.devcluster.kubeapi import object_path
from llm_operator_dev.devcluster.layout import PORTS, Layout, read_versions

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(REPO, tmp_path, read_versions(REPO / "e2e" / "cluster" / "versions.env"))


# -- the rule ---------------------------------------------------------------------------------


def _docs_rule() -> Any:
    text = (REPO / "docs" / "autoscaling.md").read_text()
    section = text.split("### prometheus-adapter rule", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "docs/autoscaling.md lost its rule block"
    return yaml.safe_load(block.group(1))


def test_docs_show_the_rule_the_cluster_runs() -> None:
    assert _docs_rule() == adapter.chart_values()


def test_rule_serves_the_metric_the_hpa_asks_for() -> None:
    (rule,) = adapter.chart_values()["rules"]["custom"]
    assert re.fullmatch(rule["name"]["matches"], "vllm:num_requests_waiting")
    assert rule["name"]["as"] == DEFAULT_HPA_METRIC
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }


def test_adapter_config_is_the_charts_rendering_of_the_values() -> None:
    values = {"rules": {"custom": [{"seriesQuery": "a"}], "external": [{"seriesQuery": "b"}]}}
    assert adapter.adapter_config(values) == {
        "rules": [{"seriesQuery": "a"}],
        "externalRules": [{"seriesQuery": "b"}],
    }
    assert (
        adapter.adapter_config(adapter.chart_values())["rules"]
        == (adapter.chart_values()["rules"]["custom"])
    )


def test_bad_rules_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules: [oops]\n")
    with pytest.raises(ValueError, match=r"rules\.custom"):
        adapter.chart_values(bad)


def test_config_file_is_named_for_its_content(layout: Layout) -> None:
    assert adapter.prepare_files(layout) is True
    path = adapter.config_path(layout)
    assert yaml.safe_load(path.read_text()) == adapter.adapter_config(adapter.chart_values())
    assert adapter.prepare_files(layout) is False  # nothing to do the second time
    assert adapter.config_path(layout, "other") != path
    argv, health = adapter.component(layout)
    assert f"--config={path}" in argv
    assert f"--prometheus-url=http://127.0.0.1:{PORTS['prometheus']}/" in argv
    assert health == f"https://127.0.0.1:{PORTS['prometheus-adapter']}/healthz"


# -- builds -----------------------------------------------------------------------------------


def test_source_commit_is_read_from_the_source_file() -> None:
    text = 'Upstream: https://x\nCommit:   01919d0e (2025-04-01, "Merge")\nModule: m\n'
    assert gobuild.parse_source_commit(text) == "01919d0e"
    assert gobuild.parse_source_commit("Upstream: x\n") is None


def _fake_adapter_copy(root: Path, commit: str) -> None:
    src = root / "prometheus-adapter"
    src.mkdir(parents=True)
    (src / "go.mod").write_text("module sigs.k8s.io/prometheus-adapter\n")
    (src / "SOURCE").write_text(f"Commit:   {commit} (a date)\n")


def test_local_adapter_copy_is_used_only_at_the_pinned_commit(
    layout: Layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    third = tmp_path / "third_party"
    monkeypatch.setenv("LLMOP_THIRD_PARTY_DIR", str(third))
    assert gobuild.local_adapter_source(layout) is None  # nothing there: the module proxy
    _fake_adapter_copy(third, layout.prometheus_adapter_commit)
    assert gobuild.local_adapter_source(layout) == third / "prometheus-adapter"
    other = tmp_path / "other"
    monkeypatch.setenv("LLMOP_THIRD_PARTY_DIR", str(other))
    _fake_adapter_copy(other, "deadbeef")
    assert gobuild.local_adapter_source(layout) is None


def test_stamps_follow_the_pins(layout: Layout) -> None:
    keda_t, adapter_t = gobuild.keda_target(layout), gobuild.adapter_target(layout)
    assert keda_t.folder.name == f"keda-{layout.versions.keda}"
    assert set(keda_t.binaries) == {"keda-operator", "keda-adapter"}
    assert f"version.Version={layout.versions.keda.lstrip('v')}" in keda_t.ldflags
    bumped = Layout(layout.repo_root, layout.cache_dir, replace(layout.versions, keda="v9.9.9"))
    assert gobuild._stamp(bumped, keda_t) != gobuild._stamp(layout, keda_t)
    assert gobuild._stamp(bumped, adapter_t) == gobuild._stamp(layout, adapter_t)


def test_up_to_date_needs_the_stamp_and_every_binary(layout: Layout) -> None:
    target = gobuild.adapter_target(layout)
    stamp = gobuild._stamp(layout, target)
    assert not gobuild.up_to_date(target, stamp)
    (target.folder / "bin").mkdir(parents=True)
    (target.folder / ".stamp").write_text(stamp + "\n")
    assert not gobuild.up_to_date(target, stamp)  # no binary yet
    binary = target.folder / "bin" / "prometheus-adapter"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert gobuild.up_to_date(target, stamp)
    assert not gobuild.up_to_date(target, "other")


# -- KEDA's objects and processes ----------------------------------------------------------


def _fake_keda_config(layout: Layout) -> None:
    config = layout.keda_dir / "config"
    (config / "crd" / "bases").mkdir(parents=True)
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "scaledobjects.keda.sh"},
    }
    (config / "crd" / "bases" / "keda.sh_scaledobjects.yaml").write_text(yaml.safe_dump(crd))
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role"}
    for name in keda.RBAC_FILES:
        (config / name).parent.mkdir(parents=True, exist_ok=True)
        docs = [{**role, "metadata": {"name": name}}]
        (config / name).write_text(yaml.safe_dump_all(docs))


def test_keda_objects(layout: Layout) -> None:
    _fake_keda_config(layout)
    layout.pki_dir.mkdir(parents=True)
    (layout.pki_dir / "ca.crt").write_bytes(b"CA")
    objs = keda.objects(layout)
    assert objs[0]["kind"] == "CustomResourceDefinition"  # CRDs before anything else
    roles = [o for o in objs if o["kind"] == "Role"]
    assert roles and all(r["metadata"]["namespace"] == keda.NAMESPACE for r in roles)
    (service,) = [o for o in objs if o["kind"] == "Service"]
    (apiservice,) = [o for o in objs if o["kind"] == "APIService"]
    assert service["spec"] == {
        "type": "ExternalName",
        "externalName": "localhost",
        "ports": [{"name": "https", "port": PORTS["keda-metrics-apiserver"], "protocol": "TCP"}],
    }
    assert apiservice["metadata"]["name"] == "v1beta1.external.metrics.k8s.io"
    assert apiservice["spec"]["service"] == {
        "name": service["metadata"]["name"],
        "namespace": service["metadata"]["namespace"],
        "port": PORTS["keda-metrics-apiserver"],
    }
    assert base64.b64decode(apiservice["spec"]["caBundle"]) == b"CA"
    for obj in objs:
        assert object_path(obj).endswith("/" + obj["metadata"]["name"])
    assert keda.crd_names(layout) == ["scaledobjects.keda.sh"]


def test_adapter_objects_register_custom_metrics(layout: Layout) -> None:
    layout.pki_dir.mkdir(parents=True)
    (layout.pki_dir / "ca.crt").write_bytes(b"CA")
    objs = adapter.objects(layout)
    (apiservice,) = [o for o in objs if o["kind"] == "APIService"]
    assert apiservice["metadata"]["name"] == "v1beta1.custom.metrics.k8s.io"
    assert apiservice["spec"]["service"]["port"] == PORTS["prometheus-adapter"]
    bindings = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ClusterRoleBinding"}
    hpa = bindings["hpa-controller-custom-metrics"]["subjects"][0]
    assert hpa == {
        "kind": "ServiceAccount",
        "name": "horizontal-pod-autoscaler",
        "namespace": "kube-system",
    }


def test_keda_processes_bind_loopback_and_talk_over_grpc(layout: Layout) -> None:
    op, op_health = keda.operator_component(layout)
    api, api_health = keda.metrics_apiserver_component(layout)
    grpc = f"127.0.0.1:{PORTS['keda-operator']}"
    assert f"--metrics-service-bind-address={grpc}" in op
    assert f"--metrics-service-address={grpc}" in api
    assert op_health.startswith("http://127.0.0.1:")
    assert api_health == f"https://127.0.0.1:{PORTS['keda-metrics-apiserver']}/healthz"
    assert "--bind-address=127.0.0.1" in api
    assert keda.env(layout)["WATCH_NAMESPACE"] == ""  # every namespace


def test_identities_are_the_service_accounts_upstream_binds() -> None:
    certs = {c.name: c for c in pki.CLIENTS}
    assert certs["keda"].common_name == "system:serviceaccount:keda:keda-operator"
    assert "DNS:keda-metrics-apiserver.keda.svc" in certs["keda"].server_names
    assert "IP:127.0.0.1" in certs["keda"].server_names
    adapter_cert = certs["prometheus-adapter"]
    assert adapter_cert.common_name == "system:serviceaccount:monitoring:prometheus-adapter"
    assert "DNS:prometheus-adapter.monitoring.svc" in adapter_cert.server_names


def test_keda_cert_dir_is_copied_once(layout: Layout) -> None:
    layout.pki_dir.mkdir(parents=True)
    for name in ("ca.crt", "keda.crt", "keda.key"):
        (layout.pki_dir / name).write_text(name)
    assert keda.prepare_files(layout) is True
    assert (keda.cert_dir(layout) / "tls.key").read_text() == "keda.key"
    assert keda.prepare_files(layout) is False
