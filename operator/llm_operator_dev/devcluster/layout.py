"""Where the local control plane keeps its binaries, keys, data, logs and pids.

Everything lives under one cache folder outside the clone
(``$LLMOP_CACHE_DIR``, default ``~/.cache/llm-operator``)::

    k8s-<version>/bin/      kube-apiserver kube-controller-manager kube-scheduler kubectl
    etcd-<version>/bin/     etcd
    kwok-<version>/bin/     kwok   (and kwok-<version>/stages.yaml)
    helm-<version>/bin/     helm
    keda-<version>/         bin/keda-operator bin/keda-adapter, config/ (CRDs and RBAC)
    prometheus-adapter-<version>-<commit>/bin/prometheus-adapter
    cluster/                the running cluster
      kubeconfig            admin kubeconfig (cluster-admin via system:masters)
      state.json            versions, ports and pids of the last `up`
      pki/                  CA, serving and client certificates, service-account keys
      etcd/                 etcd's data (wiped by `down`)
      prometheus/           prometheus.yml (generated), rules/*.yml, data/ (the TSDB)
      logs/<component>.log  one log per process
      run/<component>.pid   one pid file per process

The binary folders are named after their pinned versions (``e2e/cluster/versions.env``), so
bumping a version makes ``up`` rebuild just that component; ``e2e/cluster/build.sh`` uses the
same names.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

#: Loopback ports, fixed so that a kubeconfig or a log line stays meaningful across runs.
#: They sit in the 12xxx/16xxx range, away from the well-known Kubernetes ports (6443,
#: 2379, 10250-10259) so that a real cluster's components on this host do not clash.
#: Prometheus (Debian's /usr/bin/prometheus, see prometheus.py) listens on 19090, not 9090,
#: which the Debian package's own service and the chart's operator metrics port use; 19091
#: is the pod discovery it polls (prometheus_sd.py).
PORTS: dict[str, int] = {
    "etcd-client": 12379,
    "etcd-peer": 12380,
    "kube-apiserver": 16443,
    "kube-controller-manager": 16257,
    "kube-scheduler": 16259,
    "kwok": 16247,
    "pod-runner": 16250,
    "prometheus": 19090,
    "prometheus-sd": 19091,
    # KEDA and prometheus-adapter (keda.py, adapter.py). KEDA's metrics API server also serves
    # its own /metrics on a port it binds on every interface (its --port; no address flag).
    "keda-operator": 16660,  # the operator's gRPC metrics service, which the API server asks
    "keda-operator-health": 16661,
    "keda-operator-metrics": 16662,
    "keda-metrics-apiserver": 16663,  # external.metrics.k8s.io (HTTPS)
    "keda-metrics-apiserver-metrics": 16664,
    "prometheus-adapter": 16665,  # custom.metrics.k8s.io (HTTPS)
}

#: Service addresses: nothing routes them, except the `kubernetes` Service's, which the pods'
#: podnet shim maps to the API server. Pod addresses are loopback, one /24 per node
#: (``spec.podCIDR``), so that every pod's processes listen at an address of their own.
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
POD_CIDR = "127.1.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
CLUSTER_NAME = "llm-operator-dev"


def python() -> str:
    """This environment's interpreter under one name, whichever name started us (`python`,
    `python3`): components' command lines must not change with how `up` was invoked, or `up`
    would restart them."""
    candidate = Path(sys.prefix) / "bin" / "python3"
    return str(candidate) if candidate.exists() else sys.executable


class LayoutError(RuntimeError):
    """The repository files that pin the versions could not be found."""


@dataclass(frozen=True)
class Versions:
    """Pinned component versions, read from ``e2e/cluster/versions.env``."""

    k8s: str
    etcd: str
    kwok: str
    helm: str
    keda: str = ""
    prometheus_adapter: str = ""


def default_cache_dir() -> Path:
    raw = os.environ.get("LLMOP_CACHE_DIR")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "llm-operator"


def find_repo_root(start: Path | None = None) -> Path:
    """The clone whose ``e2e/cluster/versions.env`` pins the versions.

    ``LLMOP_REPO_ROOT`` wins; otherwise walk up from this file (an editable install), then
    from the working directory (a wheel install run inside a clone).
    """
    override = os.environ.get("LLMOP_REPO_ROOT")
    if override:
        root = Path(override).expanduser().resolve()
        if (root / "e2e" / "cluster" / "versions.env").is_file():
            return root
        raise LayoutError(f"LLMOP_REPO_ROOT={override} has no e2e/cluster/versions.env")
    starts = [start] if start else [Path(__file__).resolve(), Path.cwd().resolve()]
    for origin in starts:
        for folder in [origin, *origin.parents]:
            if (folder / "e2e" / "cluster" / "versions.env").is_file():
                return folder
    raise LayoutError(
        "cannot find e2e/cluster/versions.env: run from a clone of llm-operator "
        "or set LLMOP_REPO_ROOT"
    )


def read_env(path: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of versions.env (the shell sources the same file)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip("\"'")
    return values


def read_versions(path: Path) -> Versions:
    """The release versions pinned in versions.env."""
    values = read_env(path)
    try:
        return Versions(
            k8s=values["K8S_VERSION"],
            etcd=values["ETCD_VERSION"],
            kwok=values["KWOK_VERSION"],
            helm=values["HELM_VERSION"],
            keda=values["KEDA_VERSION"],
            prometheus_adapter=values["PROMETHEUS_ADAPTER_VERSION"],
        )
    except KeyError as missing:
        raise LayoutError(f"{path} does not set {missing.args[0]}") from None


@dataclass(frozen=True)
class Layout:
    """All paths of one local cluster, derived from the cache folder and the versions."""

    repo_root: Path
    cache_dir: Path
    versions: Versions

    @classmethod
    def discover(cls, cache_dir: Path | None = None) -> Layout:
        root = find_repo_root()
        return cls(
            repo_root=root,
            cache_dir=(cache_dir or default_cache_dir()).resolve(),
            versions=read_versions(root / "e2e" / "cluster" / "versions.env"),
        )

    # -- build inputs and binaries -------------------------------------------------------
    @property
    def build_script(self) -> Path:
        return self.repo_root / "e2e" / "cluster" / "build.sh"

    @property
    def k8s_bin(self) -> Path:
        return self.cache_dir / f"k8s-{self.versions.k8s}" / "bin"

    @property
    def etcd_bin(self) -> Path:
        return self.cache_dir / f"etcd-{self.versions.etcd}" / "bin"

    @property
    def kwok_bin(self) -> Path:
        return self.cache_dir / f"kwok-{self.versions.kwok}" / "bin"

    @property
    def helm_bin(self) -> Path:
        return self.cache_dir / f"helm-{self.versions.helm}" / "bin"

    @property
    def keda_dir(self) -> Path:
        """``bin/keda-operator``, ``bin/keda-adapter`` and ``config/`` (CRDs, RBAC) of KEDA."""
        return self.cache_dir / f"keda-{self.versions.keda}"

    @property
    def prometheus_adapter_commit(self) -> str:
        """The commit of prometheus-adapter that is built (``PROMETHEUS_ADAPTER_COMMIT``): the
        copy beside the clone is newer than its last release."""
        pins = read_env(self.repo_root / "e2e" / "cluster" / "versions.env")
        try:
            return pins["PROMETHEUS_ADAPTER_COMMIT"]
        except KeyError:
            raise LayoutError("versions.env does not set PROMETHEUS_ADAPTER_COMMIT") from None

    @property
    def prometheus_adapter_dir(self) -> Path:
        version, commit = self.versions.prometheus_adapter, self.prometheus_adapter_commit
        return self.cache_dir / f"prometheus-adapter-{version}-{commit}"

    @property
    def third_party_dir(self) -> Path:
        """Sources the module proxy does not serve here, fetched beside the clone."""
        raw = os.environ.get("LLMOP_THIRD_PARTY_DIR")
        return Path(raw) if raw else self.repo_root.parent / "shared" / "third_party"

    @property
    def kwok_stages(self) -> Path:
        return self.cache_dir / f"kwok-{self.versions.kwok}" / "stages.yaml"

    @property
    def kwok_node_stages(self) -> Path:
        """kwok's node stages only: the pod runner, not kwok, plays the pods' kubelet."""
        return self.cluster_dir / "kwok-node-stages.yaml"

    def binary(self, name: str) -> Path:
        folder = {
            "etcd": self.etcd_bin,
            "kwok": self.kwok_bin,
            "helm": self.helm_bin,
            "keda-operator": self.keda_dir / "bin",
            "keda-adapter": self.keda_dir / "bin",
            "prometheus-adapter": self.prometheus_adapter_dir / "bin",
        }.get(name, self.k8s_bin)
        return folder / name

    @property
    def bin_dirs(self) -> list[Path]:
        """Folders to put on PATH for kubectl, helm, etcd and kwok of the pinned versions."""
        return [self.k8s_bin, self.helm_bin, self.kwok_bin, self.etcd_bin]

    # -- the running cluster ---------------------------------------------------------------
    @property
    def cluster_dir(self) -> Path:
        return self.cache_dir / "cluster"

    @property
    def pki_dir(self) -> Path:
        return self.cluster_dir / "pki"

    @property
    def etcd_data_dir(self) -> Path:
        return self.cluster_dir / "etcd"

    @property
    def logs_dir(self) -> Path:
        return self.cluster_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.cluster_dir / "run"

    @property
    def kubeconfig(self) -> Path:
        return self.cluster_dir / "kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.cluster_dir / "state.json"

    @property
    def server_url(self) -> str:
        return f"https://127.0.0.1:{PORTS['kube-apiserver']}"
