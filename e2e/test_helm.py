"""The Helm chart on a real API server: install, least-privilege RBAC proven by the chart's own
operator pod doing the work with its ServiceAccount's token, upgrade of the CRD, uninstall that
keeps the CRD.

The chart's pods run for real (on the local cluster, as processes started from the pod spec by
the pod runner, with a TokenRequest token mounted where a kubelet mounts it): every API call the
operator makes is authorised exactly as in production. A denied call fails the test, in the API
(the LLMDeployment never gets Ready) and in the operator's log (scanned for 403 and Forbidden).
"""

from __future__ import annotations

import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube
from harness.providers import Cluster
from harness.serving import Helm, container_log

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "llm-operator"
SAMPLE = REPO / "manifests" / "samples" / "llama-3-8b.yaml"
CRD_NAME = "llmdeployments.llmoperator.io"
#: Every CRD the chart may install (kopf's peering CRDs with ha.enabled).
CHART_CRDS = (CRD_NAME, "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")
GROUP, VERSION, PLURAL = "llmoperator.io", "v1alpha1", "llmdeployments"
NETWORKING = "networking.k8s.io"
#: Signs of a call the RBAC denied, in the operator's log (kopf logs "Not enough permissions"
#: when it falls back from a denied list or watch).
DENIED = re.compile(r"\b403\b|Forbidden|forbidden|Not enough permissions|permission denied")


# -- helpers ---------------------------------------------------------------------------------


def adopt_crds(api: client.ApiClient, release: str, namespace: str) -> None:
    """Let this release take over the CRDs that exist already (the session applied the
    LLMDeployment CRD; an earlier HA test left kopf's peering CRDs). Helm adopts an object that
    carries its release's ownership metadata; without it, install refuses to touch it."""
    ext = client.ApiextensionsV1Api(api)
    for name in CHART_CRDS:
        try:
            ext.patch_custom_resource_definition(
                name,
                {
                    "metadata": {
                        "labels": {"app.kubernetes.io/managed-by": "Helm"},
                        "annotations": {
                            "meta.helm.sh/release-name": release,
                            "meta.helm.sh/release-namespace": namespace,
                        },
                    }
                },
            )
        except ApiException as err:
            if err.status != 404:
                raise


def restore_crds(api: client.ApiClient) -> None:
    """Give the CRDs back to the rest of the session: the LLMDeployment CRD as crds/ defines
    it, and none of the labels and annotations Helm and the chart added to any of them."""
    kube.apply_crds(api, REPO / "crds")
    ext = client.ApiextensionsV1Api(api)
    ours = yaml.safe_load((REPO / "crds" / f"{CRD_NAME}.yaml").read_text())["metadata"]
    for name in CHART_CRDS:
        want = ours if name == CRD_NAME else {}
        try:
            live = ext.read_custom_resource_definition(name).metadata
        except ApiException as err:
            if err.status == 404:
                continue
            raise
        extra: dict[str, dict[str, None]] = {
            field: {
                k: None for k in (getattr(live, field) or {}) if k not in (want.get(field) or {})
            }
            for field in ("labels", "annotations")
        }
        ext.patch_custom_resource_definition(name, {"metadata": extra})


def can(api: client.ApiClient, user: str, verb: str, resource: str, namespace: str | None,
        group: str = "", name: str | None = None) -> bool:  # fmt: skip
    """A SubjectAccessReview: may ``user`` do ``verb`` on ``resource``?"""
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            groups=[
                "system:authenticated",
                "system:serviceaccounts",
                f"system:serviceaccounts:{user.split(':')[2]}",
            ],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, resource=resource, group=group, namespace=namespace, name=name
            ),
        )
    )
    result = client.AuthorizationV1Api(api).create_subject_access_review(review)
    return bool(result.status.allowed)


def ready(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    body: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    status = body.get("status") or {}
    if (
        status.get("phase") == "Ready"
        and status.get("observedGeneration") == body["metadata"]["generation"]
    ):
        return body
    return None


def operator_pods(api: client.ApiClient, namespace: str, release: str) -> list[Any]:
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
    return list(client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items)


def denied_calls(cluster: Cluster, api: client.ApiClient, pods: list[Any]) -> list[str]:
    lines = []
    for pod in pods:
        text = container_log(cluster, api, pod, "operator")
        assert "Traceback" not in text, text[-4000:]
        lines += [line[:1500] for line in text.splitlines() if DENIED.search(line)]
    return lines


def reconcile_sample_in_cluster(
    api: client.ApiClient,
    cluster: Cluster,
    namespace: str,
    release: str,
    workload_namespace: str,
    while_running: Callable[[], None] | None = None,
) -> None:
    """Create the sample in ``workload_namespace`` and wait until the chart's operator pod made
    it Ready with its children, then call ``while_running``. Fails on any call the RBAC denied."""
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(
        workload_namespace,
        {"metadata": {"name": "hf-token"}, "stringData": {"token": "hf_e2e_not_a_real_token"}},
    )
    sample = yaml.safe_load(SAMPLE.read_text())
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, workload_namespace, PLURAL, sample
    )
    name = sample["metadata"]["name"]
    pods = operator_pods(api, namespace, release)
    assert pods

    def reconciled() -> dict[str, Any] | None:
        denied = denied_calls(cluster, api, pods)
        assert not denied, "calls the chart's RBAC denied:\n" + "\n".join(denied[:5])
        return ready(api, workload_namespace, name)

    body = kube.wait_until(f"{name} to be Ready", reconciled, timeout=180)
    children = (
        client.AppsV1Api(api)
        .list_namespaced_deployment(
            workload_namespace, label_selector=f"llmoperator.io/deployment={name}"
        )
        .items
    )
    assert children and all(
        d.metadata.owner_references[0].uid == body["metadata"]["uid"] for d in children
    )
    assert body["spec"] == sample["spec"], "the operator wrote into spec"
    if while_running is not None:
        while_running()
    denied = denied_calls(cluster, api, operator_pods(api, namespace, release))
    assert not denied, "calls the chart's RBAC denied:\n" + "\n".join(denied[:20])


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def workload_namespace(api_client: client.ApiClient, namespace: str) -> Iterator[str]:
    """A second namespace, for the models: the operator watches it, not its own."""
    name = f"{namespace}-ml"
    kube.create_namespace(api_client, name)
    yield name
    kube.delete_namespace(api_client, name)


@pytest.fixture
def helm(cluster: Cluster, tmp_path: Path) -> Helm:
    return Helm(cluster, tmp_path / "helm-home")


@pytest.fixture
def release(
    api_client: client.ApiClient, namespace: str, helm: Helm, crd_names: list[str]
) -> Iterator[str]:
    """A release name for this test; whatever happens, it is uninstalled and the session's CRD
    is given back as crds/ defines it."""
    name = f"llmop-{secrets.token_hex(3)}"
    adopt_crds(api_client, name, namespace)
    yield name
    kube.run([helm.binary, "uninstall", name, "--namespace", namespace, "--wait"], helm.env, 120)
    restore_crds(api_client)


# -- tests -----------------------------------------------------------------------------------


def test_install_runs_restricted_and_its_service_account_reconciles_a_sample_to_ready(
    api_client: client.ApiClient,
    cluster: Cluster,
    namespace: str,
    workload_namespace: str,
    helm: Helm,
    release: str,
    tmp_path: Path,
) -> None:
    core = client.CoreV1Api(api_client)
    # Pod Security "restricted", enforced: a pod of the chart that breaks it is never created.
    core.patch_namespace(
        namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    out = helm(
        "install", release, str(CHART), "--namespace", namespace, "--wait", "--timeout", "180s",
        "--set", f"watchNamespaces={{{workload_namespace}}}",
    )  # fmt: skip
    assert "NOTES:" in out and f"It watches LLMDeployments in: {workload_namespace}." in out
    apps = client.AppsV1Api(api_client)
    fullname = f"{release}-llm-operator"
    operator_deployment = apps.read_namespaced_deployment(fullname, namespace)
    gateway = apps.read_namespaced_deployment(f"{fullname}-gateway", namespace)
    assert operator_deployment.status.ready_replicas == 1
    assert gateway.status.ready_replicas == 2
    assert core.list_namespaced_pod(namespace).items, "the pods were admitted as restricted"

    sa = fullname
    user = f"system:serviceaccount:{namespace}:{sa}"
    # What the chart granted, and what it did not.
    assert can(api_client, user, "create", "deployments", workload_namespace, "apps")
    assert can(api_client, user, "patch", "llmdeployments/status", workload_namespace, GROUP)
    assert can(api_client, user, "watch", "customresourcedefinitions", None, "apiextensions.k8s.io")
    # Secrets: only `get` by name, of those an external fallback names (copied for the
    # gateway); never list or watch, so no Secret it is not pointed at is ever read.
    assert can(api_client, user, "get", "secrets", workload_namespace)
    assert not can(api_client, user, "list", "secrets", workload_namespace)
    assert not can(api_client, user, "watch", "secrets", workload_namespace)
    assert not can(api_client, user, "list", "secrets", None)
    # NetworkPolicies, with networkPolicy.enabled off too: the operator watches them to prune
    # the ones it made while it was on. Applied, never read by name.
    for verb in ("list", "watch", "create", "patch", "delete"):
        assert can(api_client, user, verb, "networkpolicies", workload_namespace, NETWORKING)
    assert not can(api_client, user, "get", "networkpolicies", workload_namespace, NETWORKING)
    assert not can(api_client, user, "patch", "networkpolicies", "default", NETWORKING)
    assert not can(api_client, user, "create", "deployments", "default", "apps")
    assert not can(api_client, user, "list", "llmdeployments", None, GROUP)
    assert not can(api_client, user, "update", "llmdeployments", workload_namespace, GROUP)
    assert not can(api_client, user, "create", "pods", workload_namespace)
    # Stalled engines are deleted (progress-based liveness), never patched or watched.
    assert can(api_client, user, "delete", "pods", workload_namespace)
    assert not can(api_client, user, "patch", "pods", workload_namespace)
    assert not can(api_client, user, "watch", "pods", workload_namespace)
    assert not can(api_client, user, "delete", "pods", "default")
    gateway_user = f"system:serviceaccount:{namespace}:{fullname}-gateway"
    assert can(api_client, gateway_user, "watch", "pods", workload_namespace)
    assert not can(api_client, gateway_user, "watch", "pods", "default")
    assert not can(api_client, gateway_user, "get", "secrets", namespace)
    assert not can(api_client, gateway_user, "get", "configmaps", namespace, name="other")

    # The operator pod, with the chart's arguments and only the SA's rights, does the work.
    args = operator_deployment.spec.template.spec.containers[0].args
    assert f"--namespace={workload_namespace}" in args
    pod = operator_pods(api_client, namespace, release)[0]
    assert pod.spec.service_account_name == sa
    reconcile_sample_in_cluster(api_client, cluster, namespace, release, workload_namespace)


def test_ha_install_peers_through_its_peering_object_with_its_service_account(
    api_client: client.ApiClient,
    cluster: Cluster,
    namespace: str,
    workload_namespace: str,
    helm: Helm,
    release: str,
    tmp_path: Path,
) -> None:
    helm(
        "install", release, str(CHART), "--namespace", namespace, "--wait", "--timeout", "180s",
        "--set", f"watchNamespaces={{{workload_namespace}}}", "--set", "ha.enabled=true",
    )  # fmt: skip
    fullname = f"{release}-llm-operator"
    operator_deployment = client.AppsV1Api(api_client).read_namespaced_deployment(
        fullname, namespace
    )
    assert operator_deployment.status.ready_replicas == 2
    # The peering CRDs came with the release and the peering object after them (a hook).
    peerings = client.CustomObjectsApi(api_client)
    peering = peerings.get_namespaced_custom_object(
        "kopf.dev", "v1", workload_namespace, "kopfpeerings", "llm-operator"
    )
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"

    assert "--peering=llm-operator" in operator_deployment.spec.template.spec.containers[0].args
    # kopf's identity in the peering is the pod's name (POD_ID from the downward API).
    identities = {p.metadata.name for p in operator_pods(api_client, namespace, release)}
    assert len(identities) == 2

    def keeps_alive_in_the_peering() -> None:
        def seen() -> bool:
            status = (
                peerings.get_namespaced_custom_object(
                    "kopf.dev", "v1", workload_namespace, "kopfpeerings", "llm-operator"
                ).get("status")
                or {}
            )
            return identities <= {key.split("@", 1)[0] for key in status}

        kube.wait_until("both operator pods' keep-alives in the KopfPeering", seen, timeout=60)

    reconcile_sample_in_cluster(
        api_client, cluster, namespace, release, workload_namespace,
        while_running=keeps_alive_in_the_peering,
    )  # fmt: skip


def test_upgrade_updates_the_crd_and_uninstall_keeps_it(
    api_client: client.ApiClient,
    namespace: str,
    workload_namespace: str,
    helm: Helm,
    release: str,
    tmp_path: Path,
) -> None:
    ext = client.ApiextensionsV1Api(api_client)
    helm("install", release, str(CHART), "--namespace", namespace,
         "--set", f"watchNamespaces={{{workload_namespace}}}")  # fmt: skip
    crd = ext.read_custom_resource_definition(CRD_NAME)
    assert crd.metadata.annotations["helm.sh/resource-policy"] == "keep"
    assert crd.metadata.labels["app.kubernetes.io/instance"] == release

    # An upgrade changes the CRD: metadata from values, and the schema from the template (a
    # chart's crds/ folder would never be upgraded; templates/crds is).
    changed = tmp_path / "chart"
    shutil.copytree(CHART, changed)
    template = changed / "templates" / "crds" / f"{CRD_NAME}.yaml"
    # A status field nobody reads in tests, so a concurrent test is not disturbed.
    text, found = re.subn(
        r"(\n\s+kvCacheTokens:\n(?:\s+[a-zA-Z]+: .*\n)*?\s+description: )",
        r"\1Upgraded. ",
        template.read_text(),
    )
    assert found == 1
    template.write_text(text)
    marker = secrets.token_hex(4)
    helm("upgrade", release, str(changed), "--namespace", namespace, "--reuse-values",
         "--set", f"crds.annotations.llmoperator\\.io/e2e-upgrade={marker}")  # fmt: skip
    crd = ext.read_custom_resource_definition(CRD_NAME)
    assert crd.metadata.annotations["llmoperator.io/e2e-upgrade"] == marker
    status = crd.spec.versions[0].schema.open_apiv3_schema.properties["status"]
    plan = status.properties["plan"].properties
    assert plan["kvCacheTokens"].description.startswith("Upgraded. ")

    # A model exists when the release goes away.
    sample = yaml.safe_load(SAMPLE.read_text())
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, workload_namespace, PLURAL, sample
    )
    helm("uninstall", release, "--namespace", namespace, "--wait")
    apps, rbac = client.AppsV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
    assert not apps.list_namespaced_deployment(
        namespace, label_selector=f"app.kubernetes.io/instance={release}"
    ).items
    assert not [
        r
        for r in rbac.list_cluster_role(
            label_selector=f"app.kubernetes.io/instance={release}"
        ).items
    ]
    with pytest.raises(ApiException) as gone:
        client.CoreV1Api(api_client).read_namespaced_service_account(
            f"{release}-llm-operator", namespace
        )
    assert gone.value.status == 404
    # The CRD stays (crds.keep), and with it the LLMDeployment.
    assert ext.read_custom_resource_definition(CRD_NAME).metadata.deletion_timestamp is None
    kept = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        GROUP, VERSION, workload_namespace, PLURAL, sample["metadata"]["name"]
    )
    assert kept["metadata"].get("deletionTimestamp") is None
