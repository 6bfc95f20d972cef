"""Build KEDA and prometheus-adapter into the cache, as ``e2e/cluster/build.sh`` builds the rest.

Both are built from their own ``go.mod`` rather than through a wrapper module:

- **KEDA** (``github.com/kedacore/keda/v2``): its go.mod has ``replace`` directives, which Go
  ignores in a dependency, so neither ``go install pkg@version`` nor a wrapper module builds
  it. ``go mod download`` fetches the release (verified against the checksum database), the
  tree is copied to a writable folder and ``go build ./cmd/operator ./cmd/adapter`` runs there
  with ``-mod=readonly``: the release's go.sum is the whole truth. Its CRDs and RBAC
  (``config/``) are copied beside the binaries, so ``up`` never reads the module cache.
- **prometheus-adapter** (``sigs.k8s.io/prometheus-adapter``): the module proxy refuses it on
  some machines, so a copy of its repository may sit beside the clone
  (``../shared/third_party/prometheus-adapter``, with a ``SOURCE`` file naming the commit). That
  copy is used when its commit is the pinned one; otherwise the pinned commit comes from the
  module proxy. Either way the same commit is built the same way.

Each folder carries a ``.stamp`` (a hash of the version, the build inputs and the Go version):
a version bump rebuilds only that component. Builds take the same lock as build.sh, so there is
never more than one Go build per cache at a time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llm_operator_dev.devcluster.layout import Layout

KEDA_MODULE = "github.com/kedacore/keda/v2"
ADAPTER_MODULE = "sigs.k8s.io/prometheus-adapter"
#: KEDA's config folders that ``up`` applies from (CRD bases and RBAC).
KEDA_CONFIG = ("crd/bases", "rbac", "metrics-server")


class BuildError(RuntimeError):
    """A build failed; the message says which and where its output went."""


@dataclass(frozen=True)
class Target:
    """One component built from a Go module's own go.mod."""

    name: str
    folder: Path  # the cache folder named after the version; binaries in folder/bin
    binaries: dict[str, str]  # binary name -> package path inside the module
    ldflags: str


def _log(message: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def go_env() -> dict[str, str]:
    """The environment build.sh uses: this machine's Go only, reproducible flags."""
    env = dict(os.environ)
    env.update(
        GOTOOLCHAIN="local",
        GOFLAGS="-trimpath -mod=readonly -buildvcs=false",
        CGO_ENABLED="0",
    )
    return env


def _go_version() -> str:
    proc = subprocess.run(
        ["go", "env", "GOVERSION"], capture_output=True, text=True, check=False, env=go_env()
    )
    return proc.stdout.strip()


def stamp_of(*parts: str) -> str:
    """A hash of the inputs that decide a build, Go's version included."""
    digest = hashlib.sha256()
    for part in (*parts, _go_version()):
        digest.update(part.encode() + b"\n")
    return digest.hexdigest()


def up_to_date(target: Target, stamp: str) -> bool:
    stamp_file = target.folder / ".stamp"
    if not stamp_file.is_file() or stamp_file.read_text().strip() != stamp:
        return False
    return all(os.access(target.folder / "bin" / b, os.X_OK) for b in target.binaries)


def parse_source_commit(text: str) -> str | None:
    """The commit a third-party copy's SOURCE file names (``Commit:   01919d0e (...)``)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "commit" and value.split():
            return value.split()[0]
    return None


def keda_target(layout: Layout) -> Target:
    version = layout.versions.keda
    return Target(
        "keda",
        layout.keda_dir,
        {"keda-operator": "./cmd/operator", "keda-adapter": "./cmd/adapter"},
        f"-s -w -X {KEDA_MODULE}/version.Version={version.lstrip('v')}",
    )


def adapter_target(layout: Layout) -> Target:
    return Target(
        "prometheus-adapter",
        layout.prometheus_adapter_dir,
        {"prometheus-adapter": "./cmd/adapter"},
        "-s -w",
    )


def local_adapter_source(layout: Layout) -> Path | None:
    """The beside-the-clone copy of prometheus-adapter, if it is the pinned commit."""
    src = layout.third_party_dir / "prometheus-adapter"
    source_file = src / "SOURCE"
    if not (src / "go.mod").is_file() or not source_file.is_file():
        return None
    commit = parse_source_commit(source_file.read_text()) or ""
    pinned = layout.prometheus_adapter_commit
    if not commit or not (commit.startswith(pinned) or pinned.startswith(commit)):
        _log(f"{src} is commit {commit or '?'}, not the pinned {pinned}: using the module proxy")
        return None
    return src


def _stamp(layout: Layout, target: Target) -> str:
    if target.name == "keda":
        return stamp_of(KEDA_MODULE, layout.versions.keda, target.ldflags, *KEDA_CONFIG)
    # The same commit builds the same binary from either origin: the stamp names the commit.
    return stamp_of(ADAPTER_MODULE, layout.prometheus_adapter_commit, target.ldflags)


def is_built(layout: Layout) -> bool:
    return all(
        up_to_date(t, _stamp(layout, t)) for t in (keda_target(layout), adapter_target(layout))
    )


@contextmanager
def build_lock(cache: Path) -> Iterator[None]:
    """build.sh's lock (``flock`` on ``.build.lock``): one Go build per cache at a time."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".build.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def module_dir(cache: Path, module: str, version: str) -> Path:
    """``go mod download`` the module at ``version``; its folder in the module cache."""
    proc = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        cwd=cache,
        capture_output=True,
        text=True,
        check=False,
        env={**go_env(), "GOFLAGS": "-mod=mod"},
    )
    try:
        info = json.loads(proc.stdout or "{}")
    except ValueError:
        info = {}
    if proc.returncode != 0 or not info.get("Dir"):
        raise BuildError(
            f"go mod download {module}@{version} failed: "
            f"{info.get('Error') or proc.stderr.strip() or proc.stdout.strip()}"
        )
    return Path(info["Dir"])


def _copy_tree(src: Path, dst: Path) -> None:
    """A writable copy (the module cache is read-only), without a .git folder."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git"), symlinks=True)
    for folder, dirs, files in os.walk(dst):
        for name in dirs + files:
            path = Path(folder) / name
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)


def _go_build(target: Target, src: Path, out: Path) -> None:
    packages = list(target.binaries.values())
    argv = ["nice", "-n", "10", "go", "build", "-ldflags", target.ldflags]
    if len(packages) == 1:
        argv += ["-o", str(out / next(iter(target.binaries))), packages[0]]
    else:
        argv += ["-o", str(out) + os.sep, *packages]
    proc = subprocess.run(argv, cwd=src, env=go_env(), check=False)
    if proc.returncode != 0:
        raise BuildError(f"{target.name}: go build {' '.join(packages)} failed in {src}")
    if len(packages) > 1:
        # go build -o dir/ names each binary after its package's folder (operator, adapter).
        for name, package in target.binaries.items():
            (out / Path(package).name).rename(out / name)


def _install(target: Target, stamp: str, staged: Path) -> None:
    """Move the staged folder's contents in; the stamp goes last, so an interrupted build
    never leaves a stamped, half-built folder."""
    target.folder.mkdir(parents=True, exist_ok=True)
    (target.folder / ".stamp").unlink(missing_ok=True)
    for item in staged.iterdir():
        dest = target.folder / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)
    (target.folder / ".stamp").write_text(stamp + "\n")


def build(layout: Layout, target: Target) -> bool:
    """Build ``target`` unless its stamp is current. True if it built."""
    stamp = _stamp(layout, target)
    if up_to_date(target, stamp):
        return False
    cache = layout.cache_dir
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".build-{target.name}.", dir=cache) as tmp:
        work, staged = Path(tmp) / "src", Path(tmp) / "staged"
        (staged / "bin").mkdir(parents=True)
        if target.name == "keda":
            version = layout.versions.keda
            _log(f"keda {version}: go mod download {KEDA_MODULE}@{version}")
            origin = module_dir(cache, KEDA_MODULE, version)
        else:
            version = layout.prometheus_adapter_commit
            local = local_adapter_source(layout)
            if local is not None:
                _log(f"prometheus-adapter {version}: from {local}")
                origin = local
            else:
                _log(f"prometheus-adapter {version}: go mod download {ADAPTER_MODULE}@{version}")
                origin = module_dir(cache, ADAPTER_MODULE, version)
        _copy_tree(origin, work)
        _log(f"{target.name} {version}: go build {' '.join(target.binaries.values())}")
        _go_build(target, work, staged / "bin")
        if target.name == "keda":
            for sub in KEDA_CONFIG:
                shutil.copytree(work / "config" / sub, staged / "config" / sub)
        _install(target, stamp, staged)
    _log(f"{target.name} {version}: done in {time.monotonic() - started:.0f}s")
    return True


def ensure_built(layout: Layout) -> bool:
    """Build whatever of KEDA and prometheus-adapter is missing. True if anything was."""
    if is_built(layout):
        return False
    if shutil.which("go") is None:
        raise BuildError("Go is needed to build KEDA and prometheus-adapter (go >= 1.26)")
    built = False
    with build_lock(layout.cache_dir):
        for target in (keda_target(layout), adapter_target(layout)):
            built |= build(layout, target)
    return built
