"""The local cluster's Prometheus: its generated configuration (checked by promtool, and its
relabelling run by a real Prometheus on pods made from the renderer's and the chart's own
pod templates), the pod discovery that stands in for Kubernetes SD, and the process argvs."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_operator.api import LLMDeployment
from llm_operator.planner import plan
from llm_operator.render import RenderConfig, Track, keda_query, render_deployment
from llm_operator_dev.devcluster import pki, procs
from llm_operator_dev.devcluster import prometheus as prom
from llm_operator_dev.devcluster import prometheus_sd as sd
from llm_operator_dev.devcluster.layout import PORTS, Layout, read_versions
from tests.support.sim import run_sims

REPO = Path(__file__).resolve().parents[3]
NAMESPACE = "ml"


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(REPO, tmp_path, read_versions(REPO / "e2e" / "cluster" / "versions.env"))


def _need(binary: Path) -> None:
    """The tests' rule for Debian's prometheus package (tests/support/prometheus.py): missing
    fails, unless LLMOP_ALLOW_SKIP_PROMETHEUS=1 asks for a skip, so CI cannot go green by
    skipping."""
    if binary.is_file():
        return
    message = f"{binary} not found: {prom.INSTALL_HINT}"
    if os.environ.get("LLMOP_ALLOW_SKIP_PROMETHEUS") == "1":
        pytest.skip(message)
    pytest.fail(message + "; set LLMOP_ALLOW_SKIP_PROMETHEUS=1 to skip instead", pytrace=False)


# -- pods as the cluster would run them -------------------------------------------------------


def _pod(
    template: dict[str, Any], name: str, ip: str | None, phase: str = "Running"
) -> dict[str, Any]:
    template = copy.deepcopy(template)
    status: dict[str, Any] = {"phase": phase, "hostIP": "127.0.0.1"}
    if ip:
        status["podIP"] = ip
        status["conditions"] = [{"type": "Ready", "status": "True"}]
    meta = {**template["metadata"], "name": name, "namespace": NAMESPACE, "uid": f"uid-{name}"}
    return {"metadata": meta, "spec": {**template["spec"], "nodeName": "gpu-0"}, "status": status}


def _engine_template(track: Track) -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "manifests" / "samples" / "llama-3-8b.yaml").read_text())
    llmd = LLMDeployment.model_validate(raw)
    deployment = render_deployment(llmd, RenderConfig(), plan(llmd.spec), track=track, replicas=1)
    template: dict[str, Any] = deployment["spec"]["template"]
    return template


def _chart_templates() -> dict[str, dict[str, Any]]:
    """The operator's and the gateway's pod templates from the plain-YAML install (generated
    from the chart, so no helm is needed here)."""
    docs = yaml.safe_load_all((REPO / "manifests" / "install.yaml").read_text())
    return {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"][
            "template"
        ]
        for d in docs
        if d and d["kind"] == "Deployment"
    }


def _cluster_pods() -> list[dict[str, Any]]:
    chart = _chart_templates()
    plain = {
        "metadata": {"labels": {"app": "other"}},
        "spec": {"containers": [{"name": "web", "ports": [{"name": "http", "containerPort": 80}]}]},
    }
    return [
        _pod(_engine_template("stable"), "llama-3-8b-5d8f7c9b4-x2x7k", "127.1.0.2"),
        _pod(_engine_template("canary"), "llama-3-8b-canary-6c9d8b7f5-q8w4z", "127.1.0.3"),
        _pod(chart["operator"], "llm-operator-7b9c6d5f4-abcde", "127.1.1.2"),
        _pod(chart["gateway"], "llm-operator-gateway-6f5d4c3b2-fghij", "127.1.1.3"),
        # Not targets: unannotated and not the chart's; no IP yet; finished.
        _pod(plain, "other-1", "127.1.2.2"),
        _pod(_engine_template("stable"), "llama-3-8b-5d8f7c9b4-pendi", None, phase="Pending"),
        _pod(_engine_template("stable"), "llama-3-8b-5d8f7c9b4-done0", "127.1.0.9", "Succeeded"),
    ]


class FakeApi:
    def __init__(self, pods: list[dict[str, Any]], status: int = 200) -> None:
        self.pods, self.status, self.calls = pods, status, 0

    def get(self, path: str) -> tuple[int, Any]:
        self.calls += 1
        if self.status != 200:
            return self.status, {"message": 'pods is forbidden: User "x" cannot list'}
        return 200, {"kind": "PodList", "items": self.pods}


@contextlib.contextmanager
def _serve_discovery(pods: list[dict[str, Any]]) -> Iterator[tuple[str, FakeApi]]:
    """prometheus_sd's HTTP server on a free port, listing ``pods`` from a fake API."""
    api = FakeApi(pods)
    server = ThreadingHTTPServer(("127.0.0.1", 0), sd._handler(sd.PodLister(api)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", api
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def discovery() -> Iterator[tuple[str, FakeApi]]:
    with _serve_discovery(_cluster_pods()) as served:
        yield served


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


# -- the configuration ------------------------------------------------------------------------


def test_promtool_accepts_the_generated_config(layout: Layout) -> None:
    if not prom.PROMTOOL.is_file():
        pytest.skip(f"{prom.PROMTOOL} not found: {prom.INSTALL_HINT}")
    prom.write_config(layout)
    rules = prom.rules_dir(layout)
    rules.mkdir(parents=True)
    (rules / "up.yml").write_text(
        "groups: [{name: t, rules: [{record: 'job:up:sum', expr: 'sum by (job) (up)'}]}]\n"
    )
    check = subprocess.run(
        [str(prom.PROMTOOL), "check", "config", str(prom.config_path(layout))],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "1 rules found" in check.stdout + check.stderr


def test_config_is_generated_once_into_the_cluster_folder(layout: Layout) -> None:
    assert prom.write_config(layout) is True
    assert prom.write_config(layout) is False
    path = prom.config_path(layout)
    assert path.parent.parent == layout.cluster_dir
    text = path.read_text()
    assert text.startswith("# Generated by") and "do not edit" in text.splitlines()[0]
    assert "&id" not in text and "*id" not in text  # no YAML aliases for people to decode
    config = yaml.safe_load(text)
    assert config["global"] == {
        "scrape_interval": "2s",
        "scrape_timeout": "2s",
        "evaluation_interval": "2s",
    }
    assert [j["job_name"] for j in config["scrape_configs"]] == ["kubernetes-pods", "llm-operator"]
    for job in config["scrape_configs"]:
        assert job["http_sd_configs"] == [
            {"url": f"http://127.0.0.1:{PORTS['prometheus-sd']}/targets", "refresh_interval": "2s"}
        ]


def test_argvs_name_the_cluster_folder_and_listen_on_loopback(layout: Layout) -> None:
    marker = str(layout.cluster_dir)
    argv, health = prom.component(layout)
    assert argv[0] == "/usr/bin/prometheus"
    assert f"--config.file={prom.config_path(layout)}" in argv
    assert f"--storage.tsdb.path={prom.data_dir(layout)}" in argv
    assert "--web.listen-address=127.0.0.1:19090" in argv
    assert health == "http://127.0.0.1:19090/-/ready"
    sd_argv, sd_health = prom.discovery_component(layout)
    assert sd_argv[:3] == [sys.executable, "-m", "llm_operator_dev.devcluster.prometheus_sd"]
    assert f"--cert={layout.pki_dir / 'prometheus.crt'}" in sd_argv
    assert sd_health == "http://127.0.0.1:19091/healthz"
    for command in (argv, sd_argv):
        assert any(marker in part for part in command[1:])  # what makes procs call it ours
    assert prom.env_lines() == ["export LLMOP_PROMETHEUS_URL=http://127.0.0.1:19090"]


def test_a_missing_binary_names_the_package_to_install(layout: Layout, tmp_path: Path) -> None:
    with pytest.raises(prom.PrometheusError, match="apt-get install prometheus"):
        prom.prepare(layout, binary=tmp_path / "no-prometheus")
    assert not prom.config_path(layout).exists()


def test_rbac_lets_the_identity_read_pods_and_nothing_else() -> None:
    role, binding = prom.rbac_objects()
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": prom.USER}
    ]
    assert prom.USER == "llm-operator-dev:prometheus"


def test_an_existing_pki_folder_gains_the_prometheus_certificate(tmp_path: Path) -> None:
    folder = tmp_path / "pki"
    pki.ensure_pki(folder)
    for old in ("prometheus.crt", "prometheus.key"):
        (folder / old).unlink()  # a folder made before the identity existed
    kept = {f: (folder / f).read_bytes() for f in ("ca.crt", "admin.crt", "kube-apiserver.crt")}
    assert pki.ensure_pki(folder) is True
    assert {f: (folder / f).read_bytes() for f in kept} == kept
    cert = str(folder / "prometheus.crt")
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(folder / "ca.crt"), cert],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    subject = subprocess.run(
        ["openssl", "x509", "-in", cert, "-noout", "-subject"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    assert "CN = llm-operator-dev:prometheus" in subject and "O =" not in subject


# -- pod discovery ----------------------------------------------------------------------------


def test_pod_groups_carry_the_labels_of_kubernetes_sd() -> None:
    engine = _pod(_engine_template("stable"), "llama-3-8b-abc-xyz", "127.1.0.2")
    engine["metadata"]["ownerReferences"] = [
        {"kind": "ReplicaSet", "name": "llama-3-8b-abc", "controller": True}
    ]
    (group,) = sd.pod_groups(engine)
    assert group["targets"] == ["127.1.0.2:8000"]
    labels = group["labels"]
    m = "__meta_kubernetes_pod_"
    assert labels["__meta_kubernetes_namespace"] == NAMESPACE
    assert labels[m + "name"] == "llama-3-8b-abc-xyz"
    assert labels[m + "ip"] == "127.1.0.2"
    assert labels[m + "phase"] == "Running"
    assert labels[m + "ready"] == "true"
    assert labels[m + "node_name"] == "gpu-0"
    assert labels[m + "controller_kind"] == "ReplicaSet"
    assert labels[m + "controller_name"] == "llama-3-8b-abc"
    assert labels[m + "label_app_kubernetes_io_name"] == "vllm"
    assert labels[m + "labelpresent_llmoperator_io_track"] == "true"
    assert labels[m + "annotation_prometheus_io_scrape"] == "true"
    assert labels[m + "annotation_prometheus_io_port"] == "8000"
    assert labels[m + "annotationpresent_prometheus_io_path"] == "true"
    assert labels[m + "container_name"] == "vllm"
    assert labels[m + "container_init"] == "false"
    assert labels[m + "container_port_name"] == "http"
    assert labels[m + "container_port_number"] == "8000"
    assert labels[m + "container_port_protocol"] == "TCP"
    assert all(isinstance(v, str) for v in labels.values())


def test_pod_groups_per_port_per_container_and_none_without_an_ip() -> None:
    pod = {
        "metadata": {"name": "p", "namespace": "n"},
        "spec": {
            "containers": [
                {"name": "a", "ports": [{"containerPort": 1}, {"containerPort": 2, "name": "x"}]},
                {"name": "b"},
            ],
            "initContainers": [{"name": "init"}],
        },
        "status": {"phase": "Running", "podIP": "127.1.0.5"},
    }
    groups = sd.pod_groups(pod)
    assert [g["targets"] for g in groups] == [
        ["127.1.0.5:1"],
        ["127.1.0.5:2"],
        ["127.1.0.5"],
        ["127.1.0.5"],
    ]
    init = groups[-1]["labels"]
    assert init["__meta_kubernetes_pod_container_init"] == "true"
    assert init["__meta_kubernetes_pod_ready"] == "unknown"
    del pod["status"]["podIP"]
    assert sd.pod_groups(pod) == []


def test_discovery_serves_http_sd_and_says_when_it_cannot_list(
    discovery: tuple[str, FakeApi],
) -> None:
    url, api = discovery
    status, body = _get(f"{url}/targets")
    assert status == 200
    assert json.loads(body) == sd.target_groups(api.pods)
    calls = api.calls
    _get(f"{url}/targets")
    assert api.calls == calls  # the second job's poll shares the first one's list
    assert _get(f"{url}/healthz") == (200, "ok\n")
    api.status = 403
    status, body = _get(f"{url}/healthz")
    assert status == 503 and "forbidden" in body


def test_strays_finds_a_discovery_process_without_its_pid_file(layout: Layout) -> None:
    pki.ensure_pki(layout.pki_dir)  # it loads its certificate at start
    argv, _ = prom.discovery_component(layout)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [a if not a.startswith("--listen=") else f"--listen=127.0.0.1:{port}" for a in argv]
    started = procs.start("prometheus-sd", argv, layout.run_dir, layout.logs_dir / "sd.log", REPO)
    try:
        procs.pid_file(layout.run_dir, "prometheus-sd").unlink()
        assert [(r.name, r.pid) for r in prom.strays(layout)] == [("prometheus-sd", started.pid)]
    finally:
        assert procs.stop(started, str(layout.cluster_dir), grace=5)
    assert prom.strays(layout) == []


# -- the relabelling, run by a real Prometheus ------------------------------------------------


@contextlib.contextmanager
def _prometheus(layout: Layout, discovery_url: str) -> Iterator[str]:
    """The real Prometheus with the generated config and argv, on a free port, discovering
    from ``discovery_url`` instead of the fixed prometheus-sd port."""
    _need(prom.BINARY)
    config = prom.config(layout)
    for job in config["scrape_configs"]:
        job["http_sd_configs"][0]["url"] = f"{discovery_url}/targets"
    path = prom.config_path(layout)
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv, _ = prom.component(layout)
    argv = [a if "--web.listen-address" not in a else f"--web.listen-address=127.0.0.1:{port}"
            for a in argv]  # fmt: skip
    log = layout.cluster_dir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=layout.cluster_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not _ready(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.prometheus
def test_prometheus_keeps_annotated_pods_and_the_chart_metrics_ports(
    layout: Layout, discovery: tuple[str, FakeApi]
) -> None:
    with _prometheus(layout, discovery[0]) as base:
        targets = _wait_for_targets(base, want=4)

    active = {t["labels"]["pod"]: t for t in targets["activeTargets"]}
    assert set(active) == {
        "llama-3-8b-5d8f7c9b4-x2x7k",
        "llama-3-8b-canary-6c9d8b7f5-q8w4z",
        "llm-operator-7b9c6d5f4-abcde",
        "llm-operator-gateway-6f5d4c3b2-fghij",
    }
    stable = active["llama-3-8b-5d8f7c9b4-x2x7k"]
    assert stable["scrapeUrl"] == "http://127.1.0.2:8000/metrics"
    assert stable["labels"] == {
        "instance": "127.1.0.2:8000",
        "job": "kubernetes-pods",
        "namespace": NAMESPACE,
        "pod": "llama-3-8b-5d8f7c9b4-x2x7k",
        "container": "vllm",
        "app_kubernetes_io_name": "vllm",
        "app_kubernetes_io_instance": "llama-3-8b",
        "app_kubernetes_io_component": "engine",
        "app_kubernetes_io_managed_by": "llm-operator",
        "llmoperator_io_deployment": "llama-3-8b",
        "llmoperator_io_track": "stable",
    }
    assert active["llama-3-8b-canary-6c9d8b7f5-q8w4z"]["labels"]["llmoperator_io_track"] == "canary"
    operator = active["llm-operator-7b9c6d5f4-abcde"]
    # The metrics port, not the health port beside it.
    assert operator["scrapeUrl"] == "http://127.1.1.2:9090/metrics"
    assert operator["labels"]["job"] == "llm-operator"
    assert operator["labels"]["container"] == "operator"
    assert operator["labels"]["app_kubernetes_io_component"] == "operator"
    gateway = active["llm-operator-gateway-6f5d4c3b2-fghij"]
    assert gateway["scrapeUrl"] == "http://127.1.1.3:8080/metrics"
    assert gateway["labels"]["app_kubernetes_io_component"] == "gateway"
    # Every other container port of every pod was discovered, and dropped, by both jobs.
    groups = sd.target_groups(_cluster_pods())
    assert len(targets["droppedTargets"]) == 2 * len(groups) - 4


def _wait_for_targets(base: str, want: int) -> dict[str, Any]:
    # Prometheus hands discovered targets to its scrape loops every 5 s.
    deadline = time.monotonic() + 20
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, body = _get(f"{base}/api/v1/targets?state=any")
        if status == 200:
            data = json.loads(body)["data"]
            if len(data["activeTargets"]) >= want:
                return data
        time.sleep(0.2)
    pytest.fail(f"no {want} active targets in 20 s: {data}")


@pytest.mark.prometheus
def test_a_scraped_engine_answers_the_renderers_keda_query(layout: Layout) -> None:
    """The series of a real simulator at a pod's IP carry what the renderer's queries match
    on: the KEDA query of the sample finds its stable pod, and only that one."""
    raw = yaml.safe_load((REPO / "manifests" / "samples" / "llama-3-8b.yaml").read_text())
    raw["metadata"]["namespace"] = NAMESPACE
    llmd = LLMDeployment.model_validate(raw)
    with run_sims(1, llmd.spec.model.name, served_name="llama-3-8b") as (sim,):
        pods = []
        names: dict[Track, str] = {
            "stable": "llama-3-8b-5d8f7c9b4-x2x7k",
            "canary": "llama-3-8b-canary-6c9d8b7f5-q8w4z",
        }
        for track, name in names.items():
            template = _engine_template(track)
            # Both at the simulator's address: the loopback "pod IP" of the serving cluster.
            template["metadata"]["annotations"]["prometheus.io/port"] = str(sim.port)
            template["spec"]["containers"][0]["ports"][0]["containerPort"] = sim.port
            pods.append(_pod(template, name, "127.0.0.1"))
        query = keda_query(llmd, RenderConfig())
        assert query.startswith("sum(")
        with _serve_discovery(pods) as (url, _), _prometheus(layout, url) as base:
            waiting = _wait_for_query(base, "vllm:num_requests_waiting", want=2)
            (total,) = _wait_for_query(base, query, want=1)
            (only,) = _wait_for_query(base, query.replace("sum(", "count(", 1), want=1)
    labels = {w["metric"]["llmoperator_io_track"]: w["metric"] for w in waiting}
    assert labels["stable"]["namespace"] == NAMESPACE
    assert labels["stable"]["pod"] == "llama-3-8b-5d8f7c9b4-x2x7k"
    assert labels["stable"]["model_name"] == "llama-3-8b"
    assert labels["canary"]["pod"] == "llama-3-8b-canary-6c9d8b7f5-q8w4z"
    assert total["value"][1] == "0"  # nobody waits on an idle simulator
    assert only["value"][1] == "1"  # the stable pod's series, not the canary's


def _wait_for_query(base: str, promql: str, want: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        query = urllib.parse.urlencode({"query": promql})
        status, body = _get(f"{base}/api/v1/query?{query}")
        if status == 200:
            result = json.loads(body)["data"]["result"]
            if len(result) >= want:
                return result
        time.sleep(0.2)
    pytest.fail(f"{promql!r}: fewer than {want} series in 20 s: {result}")


def _ready(base: str) -> bool:
    try:
        return _get(f"{base}/-/ready")[0] == 200
    except OSError:
        return False
