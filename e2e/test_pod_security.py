"""Security check (issue 17): the chart's operator and gateway pods pass Pod Security
"restricted", enforced by the API server's own PodSecurity admission (on by default).

The namespace enforces, warns and audits at ``restricted``/``latest``; the chart is installed
into it and each operator and gateway pod is admitted and Ready. A privileged pod is refused
in the same namespace: the admission really runs, so "admitted" means something.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube
from harness.providers import Cluster
from harness.serving import installed as chart_installed
from harness.serving import ready_pods

pytestmark = pytest.mark.drill

RESTRICTED = {
    f"pod-security.kubernetes.io/{mode}{suffix}": value
    for mode in ("enforce", "warn", "audit")
    for suffix, value in (("", "restricted"), ("-version", "latest"))
}


def restrict(api: client.ApiClient) -> Callable[[str], None]:
    def prepare(namespace: str) -> None:
        client.CoreV1Api(api).patch_namespace(namespace, {"metadata": {"labels": RESTRICTED}})

    return prepare


@pytest.fixture
def release(
    cluster: Cluster, api_client: client.ApiClient, tmp_path: Path
) -> Iterator[tuple[str, str, int]]:
    with chart_installed(
        cluster, api_client, tmp_path / "helm", "psa", prepare=restrict(api_client)
    ) as serving:
        yield serving.namespace, serving.release, 1


def test_operator_and_gateway_pods_are_admitted_as_restricted_and_ready(
    api_client: client.ApiClient, release: tuple[str, str, int]
) -> None:
    namespace, name, operators = release
    core = client.CoreV1Api(api_client)
    meta = core.read_namespace(namespace).metadata
    labels = (meta.labels if meta else None) or {}
    assert {k: labels.get(k) for k in RESTRICTED} == RESTRICTED
    for component, want in (("operator", operators), ("gateway", 2)):
        selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/component={component}"

        def enough(selector: str = selector, want: int = want) -> list[Any] | None:
            pods = ready_pods(api_client, namespace, selector)
            return pods if len(pods) >= want else None

        pods = kube.wait_until(f"{want} Ready {component} pods", enough, timeout=120)
        for pod in pods:
            context = pod.spec.security_context
            assert context.run_as_non_root and context.seccomp_profile.type == "RuntimeDefault"
            for container in [*pod.spec.containers, *(pod.spec.init_containers or [])]:
                sc = container.security_context
                assert sc.allow_privilege_escalation is False, container.name
                assert sc.capabilities.drop == ["ALL"], container.name
    # The same admission refuses what "restricted" forbids: the check above is not vacuous.
    privileged = {
        "metadata": {"name": "privileged-probe"},
        "spec": {
            "containers": [
                {"name": "c", "image": "busybox", "securityContext": {"privileged": True}}
            ]
        },
    }
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(namespace, privileged, dry_run="All")  # type: ignore[arg-type]
    assert refused.value.status == 403 and "violates PodSecurity" in str(refused.value.body)
