"""The pieces of ``llm-operator dev cluster`` that can be checked without touching the running
cluster: versions and paths, the fake nodes, certificates and kubeconfigs, and process
bookkeeping (a stale or reused pid must never be mistaken for ours, or signalled)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from llm_operator_dev.devcluster import nodes, pki, procs
from llm_operator_dev.devcluster.layout import PORTS, Layout, read_versions

REPO = Path(__file__).resolve().parents[1]
VERSIONS = REPO / "e2e" / "cluster" / "versions.env"


def test_versions_are_pinned_and_name_the_cache_folders(tmp_path: Path) -> None:
    versions = read_versions(VERSIONS)
    for value in vars(versions).values():
        assert value.startswith("v") and value.count(".") == 2, value
    layout = Layout(REPO, tmp_path, versions)
    assert layout.binary("kube-apiserver") == tmp_path / f"k8s-{versions.k8s}/bin/kube-apiserver"
    assert layout.binary("kubectl").parent == layout.binary("kube-scheduler").parent
    assert layout.binary("etcd") == tmp_path / f"etcd-{versions.etcd}/bin/etcd"
    assert layout.binary("helm") == tmp_path / f"helm-{versions.helm}/bin/helm"
    assert layout.kubeconfig == tmp_path / "cluster" / "kubeconfig"


def test_the_k8s_wrapper_replaces_every_staging_module_with_the_pinned_release() -> None:
    versions = read_versions(VERSIONS)
    gomod = (REPO / "e2e" / "cluster" / "k8s" / "go.mod").read_text()
    staging = "v0." + versions.k8s.removeprefix("v1.")
    assert f"require k8s.io/kubernetes {versions.k8s}" in gomod
    replaces = [line.split() for line in gomod.splitlines() if "=>" in line]
    assert len(replaces) > 25
    assert all(r[0] == r[2] and r[3] == staging for r in replaces), replaces


def test_ports_are_loopback_only_and_distinct() -> None:
    assert len(set(PORTS.values())) == len(PORTS)
    assert all(1024 < port < 32768 for port in PORTS.values())


def test_gpu_nodes_look_like_the_gpu_operator_labelled_them() -> None:
    desired = {n["metadata"]["name"]: n for n in nodes.desired_nodes("v1.36.3")}
    gpu = [n for name, n in desired.items() if name.startswith("gpu-")]
    assert len(gpu) >= 2
    for node in gpu:
        labels = node["metadata"]["labels"]
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert labels["nvidia.com/gpu.count"] == node["status"]["capacity"]["nvidia.com/gpu"]
        assert node["spec"]["taints"] == [nodes.GPU_TAINT]
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    cpu = desired["cpu-0"]
    assert "taints" not in cpu["spec"]
    assert "nvidia.com/gpu" not in cpu["status"]["capacity"]


def _openssl(*args: str) -> str:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def test_pki_is_complete_verifiable_and_generated_once(tmp_path: Path) -> None:
    assert pki.ensure_pki(tmp_path) is True
    assert pki.ensure_pki(tmp_path) is False  # nothing missing: nothing regenerated
    for name in ["kube-apiserver", *(c.name for c in pki.CLIENTS)]:
        assert "OK" in _openssl(
            "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / f"{name}.crt")
        )
    assert "OK" in _openssl(
        "verify", "-CAfile", str(tmp_path / "front-proxy-ca.crt"),
        str(tmp_path / "front-proxy-client.crt"),
    )  # fmt: skip
    subject = _openssl("x509", "-in", str(tmp_path / "admin.crt"), "-noout", "-subject")
    assert "O = system:masters" in subject
    sans = _openssl(
        "x509", "-in", str(tmp_path / "kube-apiserver.crt"), "-noout", "-ext", "subjectAltName"
    )
    assert "IP Address:127.0.0.1" in sans and "DNS:kubernetes.default.svc" in sans
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0


def test_kubeconfigs_are_self_contained(tmp_path: Path) -> None:
    pki.ensure_pki(tmp_path / "pki")
    path = tmp_path / "kubeconfig"
    assert pki.write_kubeconfig(path, tmp_path / "pki", "https://127.0.0.1:16443", "admin")
    assert not pki.write_kubeconfig(path, tmp_path / "pki", "https://127.0.0.1:16443", "admin")
    config = yaml.safe_load(path.read_text())
    assert config["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:16443"
    assert config["users"][0]["user"]["client-key-data"]
    assert path.stat().st_mode & 0o077 == 0


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[procs.Running]:
    """A harmless process started the way `up` starts components, marked with tmp_path."""
    argv = [sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path)]
    started = procs.start("sleeper", argv, tmp_path / "run", tmp_path / "sleeper.log", tmp_path)
    yield started
    procs.stop(started, str(tmp_path), grace=2)


def test_a_started_process_is_found_and_stopped(tmp_path: Path, sleeper: procs.Running) -> None:
    marker = str(tmp_path)
    assert procs.running(tmp_path / "run", "sleeper", marker) == sleeper
    assert sleeper.pid in [r.pid for r in procs.sweep(Path(sys.executable).parent, marker)]
    assert procs.stop(sleeper, marker, grace=5)
    assert procs.running(tmp_path / "run", "sleeper", marker) is None
    assert not procs.sweep(Path(sys.executable).parent, marker)


def test_a_pid_file_is_not_trusted_on_its_own(tmp_path: Path, sleeper: procs.Running) -> None:
    # Another folder's marker, another binary: the same live pid is not ours.
    assert procs.running(tmp_path / "run", "sleeper", "/some/other/cluster") is None
    assert not procs.is_ours(sleeper.pid, "/usr/bin/something-else", str(tmp_path))
    # A pid file naming a process that has exited.
    procs.stop(sleeper, str(tmp_path), grace=5)
    time.sleep(0.1)
    assert procs.running(tmp_path / "run", "sleeper", str(tmp_path)) is None
    # A garbled pid file.
    (tmp_path / "run" / "sleeper.pid").write_text("not json")
    assert procs.running(tmp_path / "run", "sleeper", str(tmp_path)) is None
