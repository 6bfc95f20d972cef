"""Small Kubernetes helpers shared by the end-to-end tests.

Manifests are plain dicts, applied with server-side apply through the dynamic client, as the
operator itself applies them (one field manager, conflicts forced).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

FIELD_MANAGER = "llm-operator-e2e"
E2E_LABEL = "llmoperator.io/e2e"
#: The pid of the pytest session that made a namespace: sessions running side by side (a
#: person's and an agent's on one cluster) reap only their own and those of dead sessions.
E2E_SESSION_LABEL = "llmoperator.io/e2e-session"
SESSION = str(os.getpid())

T = TypeVar("T")


class Timeout(AssertionError):
    """A condition did not hold in time; an AssertionError so pytest shows it as a failure."""


def wait_until(
    what: str,
    check: Callable[[], T | None],
    timeout: float = 60.0,
    interval: float = 0.5,
) -> T:
    """Poll ``check`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except ApiException as err:  # a transient API error is just "not yet"
            last = err
        if time.monotonic() > deadline:
            detail = f" (last error: {last})" if last else ""
            raise Timeout(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


_dynamic: dict[int, Any] = {}


def dynamic(api: client.ApiClient) -> Any:
    """One DynamicClient per ApiClient: building one runs API discovery."""
    if id(api) not in _dynamic:
        _dynamic[id(api)] = DynamicClient(api)  # type: ignore[no-untyped-call]
    return _dynamic[id(api)]


def as_dict(api: client.ApiClient, obj: Any) -> dict[str, Any]:
    """A client model object as the plain JSON dict the API server sent (camelCase keys)."""
    return api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call,no-any-return]


def apply(
    api: client.ApiClient,
    manifest: dict[str, Any],
    namespace: str | None = None,
    dry_run: bool = False,
) -> Any:
    """Server-side apply ``manifest``; returns the resulting object (a ResourceInstance)."""
    dyn = dynamic(api)
    resource = dyn.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
    kwargs: dict[str, Any] = {"field_manager": FIELD_MANAGER, "force_conflicts": True}
    if dry_run:
        kwargs["dry_run"] = "All"
    if resource.namespaced:
        kwargs["namespace"] = namespace or manifest.get("metadata", {}).get("namespace")
    return dyn.server_side_apply(resource, body=manifest, **kwargs)


def crd_established(api: client.ApiClient, name: str) -> bool:
    crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(name)
    conditions = (crd.status.conditions if crd.status else None) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def apply_crds(api: client.ApiClient, folder: Path, timeout: float = 60.0) -> list[str]:
    """Apply every CRD in ``folder`` and wait until each is Established; returns their names."""
    names: list[str] = []
    for path in sorted(folder.glob("*.yaml")):
        for doc in load_yaml_documents(path):
            if doc.get("kind") != "CustomResourceDefinition":
                continue
            apply(api, doc)
            names.append(doc["metadata"]["name"])
    for name in names:
        wait_until(f"CRD {name} Established", _established(api, name), timeout)
    return names


def _established(api: client.ApiClient, name: str) -> Callable[[], bool]:
    return lambda: crd_established(api, name)


def create_namespace(api: client.ApiClient, name: str) -> None:
    labels = {E2E_LABEL: "true", E2E_SESSION_LABEL: SESSION}
    body = client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
    client.CoreV1Api(api).create_namespace(body)
    # Pods need the namespace's `default` ServiceAccount (ServiceAccount admission).
    wait_until(
        f"ServiceAccount {name}/default",
        lambda: client.CoreV1Api(api).read_namespaced_service_account("default", name),
        timeout=60,
    )


def delete_namespace(api: client.ApiClient, name: str) -> None:
    """Ask for deletion and return; :func:`reap_namespaces` makes sure it finishes."""
    try:
        client.CoreV1Api(api).delete_namespace(name, propagation_policy="Background")
    except ApiException as err:
        if err.status != 404:
            raise


def _strip_custom_finalizers(api: client.ApiClient, namespace: str, crds: list[str]) -> None:
    """Remove finalizers from custom resources left in ``namespace`` (an operator that is no
    longer running cannot remove its own, and the namespace would stay Terminating forever)."""
    ext = client.ApiextensionsV1Api(api)
    custom = client.CustomObjectsApi(api)
    for crd_name in crds:
        try:
            crd = ext.read_custom_resource_definition(crd_name)
        except ApiException:
            continue
        if crd.spec.scope != "Namespaced":
            continue
        group, plural = crd.spec.group, crd.spec.names.plural
        for version in (v.name for v in crd.spec.versions if v.served):
            try:
                listed = cast(
                    dict[str, Any],
                    custom.list_namespaced_custom_object(group, version, namespace, plural),
                )
            except ApiException:
                continue
            for item in listed.get("items", []):
                if item["metadata"].get("finalizers"):
                    custom.patch_namespaced_custom_object(
                        group,
                        version,
                        namespace,
                        plural,
                        item["metadata"]["name"],
                        {"metadata": {"finalizers": None}},
                    )


def reap_namespaces(api: client.ApiClient, crds: list[str], timeout: float = 90.0) -> list[str]:
    """Delete every namespace the tests created and wait until they are gone.

    After half the timeout, finalizers of custom resources still inside are removed. Returns
    the namespaces that are still there at the end (a leak worth a warning, not a failure).
    """
    core = client.CoreV1Api(api)
    selector = f"{E2E_LABEL}=true"

    def remaining() -> list[str]:
        items = [
            as_dict(api, ns)["metadata"]
            for ns in core.list_namespace(label_selector=selector).items
        ]
        return [m["name"] for m in items if not _live_other_session(m.get("labels") or {})]

    for name in remaining():
        delete_namespace(api, name)
    deadline = time.monotonic() + timeout
    stripped = False
    while (left := remaining()) and time.monotonic() < deadline:
        if not stripped and time.monotonic() > deadline - timeout / 2:
            for name in left:
                _strip_custom_finalizers(api, name, crds)
            stripped = True
        time.sleep(1.0)
    return remaining()


def _live_other_session(labels: dict[str, str]) -> bool:
    session = labels.get(E2E_SESSION_LABEL, "")
    if session == SESSION or not session.isdigit():
        return False
    return Path(f"/proc/{session}").exists()


def events_for(api: client.ApiClient, namespace: str, name: str, kind: str = "Pod") -> list[Any]:
    selector = f"involvedObject.name={name},involvedObject.kind={kind}"
    return list(
        client.CoreV1Api(api).list_namespaced_event(namespace, field_selector=selector).items
    )


def run(
    args: list[str], env: dict[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run a command (kubectl, helm) with the cluster's environment; never raises on exit code."""
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def stop_process(process: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM (kopf and the servers shut down cleanly on it), then SIGKILL after `grace`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
