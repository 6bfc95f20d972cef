"""Fixtures for the end-to-end tests: one cluster per session, a fresh namespace per test.

The cluster comes from ``LLMOP_CLUSTER`` (``local`` by default, see ``harness/providers.py``).
It is prepared once, right after collection and only if an end-to-end test was selected: on a
fresh machine the local provider builds the control plane first, which takes minutes, and doing
that in a hook keeps it outside the per-test timeout. The CRDs in ``crds/`` are applied with
server-side apply and awaited (Established) before the first test.

Fixtures:

- ``cluster``: a :class:`harness.providers.Cluster` (provider, kubeconfig, pinned tool dirs);
- ``kubeconfig``: its path; ``api_client``: a ``kubernetes.client.ApiClient`` for it;
- ``crd_names``: the CRDs applied from ``crds/``;
- ``namespace``: a new namespace for one test, deleted afterwards (and at the end of the
  session every e2e namespace is reaped, finalizers of stuck custom resources removed).

The cluster stays up after the session so that the next run starts in seconds; set
``LLMOP_CLUSTER_DOWN=1`` to stop it, or run ``llm-operator dev cluster down``.
"""

from __future__ import annotations

import re
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from harness import kube
from harness.providers import Cluster, ProviderError, Unavailable, get_cluster, provider_name
from harness.providers import teardown as provider_teardown

E2E_DIR = Path(__file__).resolve().parent
REPO = E2E_DIR.parent
CRD_DIR = REPO / "crds"

# What the post-collection hook found: a cluster, a reason to skip, or an error to fail with.
_prepared: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: needs a Kubernetes cluster (local control plane, kind, or KUBECONFIG)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every test under e2e/ is an end-to-end test, whoever wrote the file.
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session: pytest.Session) -> None:
    if not any(item.get_closest_marker("e2e") for item in session.items):
        return
    if session.config.option.collectonly:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"e2e: preparing the {provider_name()!r} cluster (LLMOP_CLUSTER); a first local run "
            "builds the control plane into the cache, which takes several minutes"
        )
    try:
        _prepared["cluster"] = get_cluster()
    except Unavailable as err:
        _prepared["skip"] = str(err)
    except ProviderError as err:
        _prepared["error"] = str(err)
    if reporter is not None:
        state = "ready" if "cluster" in _prepared else "NOT available"
        reporter.write_line(f"e2e: cluster {state}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if "error" in _prepared:
        pytest.fail(f"e2e cluster could not be prepared: {_prepared['error']}", pytrace=False)
    if "skip" in _prepared:
        pytest.skip(f"no cluster for the e2e tests: {_prepared['skip']}")
    found = _prepared.get("cluster")
    if not isinstance(found, Cluster):
        # Collected without the hook having run (e.g. via another plugin): prepare now.
        try:
            found = get_cluster()
        except Unavailable as err:
            pytest.skip(f"no cluster for the e2e tests: {err}")
    yield found
    provider_teardown(found)


@pytest.fixture(scope="session")
def kubeconfig(cluster: Cluster) -> Path:
    return cluster.kubeconfig


@pytest.fixture(scope="session")
def api_client(cluster: Cluster) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    with api:
        yield api


@pytest.fixture(scope="session")
def crd_names(api_client: client.ApiClient) -> Iterator[list[str]]:
    """Apply ``crds/*.yaml`` once per session (an empty list while none exist yet)."""
    names = kube.apply_crds(api_client, CRD_DIR) if CRD_DIR.is_dir() else []
    # Leftovers of an interrupted earlier session would otherwise pile up.
    kube.reap_namespaces(api_client, names, timeout=30)
    yield names
    left = kube.reap_namespaces(api_client, names)
    if left:
        warnings.warn(f"e2e namespaces still terminating: {', '.join(left)}", stacklevel=1)


def _namespace_name(nodeid: str) -> str:
    """``e2e-<test name>-<random>``, within the 63-character DNS label limit."""
    base = re.sub(r"[^a-z0-9]+", "-", nodeid.rsplit("::", 1)[-1].lower()).strip("-")
    return f"e2e-{base[:44].strip('-')}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(
    request: pytest.FixtureRequest, api_client: client.ApiClient, crd_names: list[str]
) -> Iterator[str]:
    name = _namespace_name(request.node.nodeid)
    kube.create_namespace(api_client, name)
    yield name
    # Deleting a namespace takes a few seconds of controller work; the session end waits for
    # all of them at once instead of each test waiting for its own.
    kube.delete_namespace(api_client, name)
