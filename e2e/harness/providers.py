"""Where the end-to-end tests get a cluster: ``LLMOP_CLUSTER=local|kind|existing``.

- ``local`` (default): the project's own control plane (``llm-operator dev cluster up``):
  real etcd, kube-apiserver, kube-controller-manager and kube-scheduler built from source,
  kwok for fake GPU nodes. Reuses a running one; builds into the cache on first use.
- ``kind``: a kind cluster named ``llm-operator-e2e`` (created if missing), only where
  ``docker info`` answers and ``kind`` is on PATH.
- ``existing``: whatever ``KUBECONFIG`` (or ``~/.kube/config``) points at.

A provider that cannot work raises :class:`Unavailable` with a message naming what is missing;
the tests then skip with that message. A provider that should work but fails raises
:class:`ProviderError`, and the tests fail: a broken harness must not look like a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KIND_CLUSTER = "llm-operator-e2e"


class Unavailable(Exception):
    """This provider cannot run here; the message says what is missing."""


class ProviderError(Exception):
    """This provider should have worked and did not."""


@dataclass
class Cluster:
    """A reachable cluster and the tools that match it."""

    provider: str
    kubeconfig: Path
    bin_dirs: list[Path] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The environment for a subprocess (kubectl, helm, the operator) aimed at this cluster."""
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        if self.bin_dirs:
            env["PATH"] = os.pathsep.join([*map(str, self.bin_dirs), env.get("PATH", "")])
        return env

    def which(self, tool: str) -> str | None:
        """``tool`` from this cluster's pinned binaries first, then from PATH."""
        for folder in self.bin_dirs:
            if (folder / tool).is_file():
                return str(folder / tool)
        return shutil.which(tool)


def _devcluster(*args: str, log: Path | None = None, timeout: float = 5400) -> str:
    """Run ``llm-operator dev cluster ...`` in a child process; returns its stderr+stdout.

    A child process, not an in-process call: the control-plane processes must not be children
    of pytest, or a crashed one would linger as a zombie that still looks alive.
    """
    cmd = [sys.executable, "-m", "llm_operator_dev.devcluster", "cluster", *args]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False
        )
        out.seek(0)
        text = out.read()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{text}\n")
    if proc.returncode != 0:
        raise ProviderError(f"`llm-operator dev cluster {' '.join(args)}` failed:\n{text[-4000:]}")
    return text


def local() -> Cluster:
    if not sys.platform.startswith("linux"):
        raise Unavailable("the local control plane runs on Linux only (LLMOP_CLUSTER=local)")
    from llm_operator_dev.devcluster.layout import Layout

    layout = Layout.discover()
    if shutil.which("openssl") is None:
        raise Unavailable("the local control plane needs the openssl command")
    built = subprocess.run(
        ["bash", str(layout.build_script), "--check"],
        env=dict(os.environ, LLMOP_CACHE_DIR=str(layout.cache_dir)),
        capture_output=True,
        check=False,
    )
    if built.returncode != 0 and shutil.which("go") is None:
        raise Unavailable(
            "the local control plane is not built and Go (>= 1.26) is not on PATH to build it"
        )
    _devcluster("up", log=layout.logs_dir / "e2e-up.log")
    return Cluster("local", layout.kubeconfig, layout.bin_dirs)


def kind() -> Cluster:
    if shutil.which("kind") is None:
        raise Unavailable("LLMOP_CLUSTER=kind needs the kind command on PATH")
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "info"], capture_output=True, check=False, timeout=30).returncode
    ):
        raise Unavailable("LLMOP_CLUSTER=kind needs a Docker engine (`docker info` failed)")
    clusters = subprocess.run(
        ["kind", "get", "clusters"], capture_output=True, text=True, check=True
    ).stdout.split()
    if KIND_CLUSTER not in clusters:
        created = subprocess.run(
            ["kind", "create", "cluster", "--name", KIND_CLUSTER, "--wait", "120s"],
            capture_output=True,
            text=True,
            check=False,
        )
        if created.returncode:
            raise ProviderError(f"kind create cluster failed:\n{created.stderr[-4000:]}")
    config = subprocess.run(
        ["kind", "get", "kubeconfig", "--name", KIND_CLUSTER],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.gettempdir()) / f"{KIND_CLUSTER}.kubeconfig"
    path.write_text(config)
    path.chmod(0o600)
    return Cluster("kind", path)


def existing() -> Cluster:
    raw = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    # KUBECONFIG may list several files; the client merges them, the first must exist.
    first = Path(raw.split(os.pathsep)[0]).expanduser()
    if not first.is_file():
        raise Unavailable(f"LLMOP_CLUSTER=existing needs a kubeconfig; {first} does not exist")
    return Cluster("existing", first)


PROVIDERS = {"local": local, "kind": kind, "existing": existing}


def provider_name() -> str:
    return os.environ.get("LLMOP_CLUSTER", "local").strip() or "local"


def get_cluster() -> Cluster:
    name = provider_name()
    if name not in PROVIDERS:
        raise ProviderError(f"LLMOP_CLUSTER={name!r}: choose one of {', '.join(PROVIDERS)}")
    return PROVIDERS[name]()


def teardown(cluster: Cluster) -> None:
    """Stop the cluster if asked to (``LLMOP_CLUSTER_DOWN=1``); by default it stays up so the
    next run starts in seconds. CI's ``.ci/run`` stops the local one at the end."""
    if os.environ.get("LLMOP_CLUSTER_DOWN") != "1":
        return
    if cluster.provider == "local":
        _devcluster("down")
    elif cluster.provider == "kind":
        subprocess.run(["kind", "delete", "cluster", "--name", KIND_CLUSTER], check=False)
