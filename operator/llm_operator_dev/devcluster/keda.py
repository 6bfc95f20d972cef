"""KEDA on the local control plane: its operator and its metrics API server, as host processes.

What a KEDA install puts in a cluster, with the cluster's own pieces where KEDA's manifests
would run a pod:

- the CRDs (``config/crd/bases`` of the pinned release: ScaledObject, ScaledJob,
  TriggerAuthentication, ...) and the release's RBAC (``config/rbac``, ``config/metrics-server``),
  unchanged: both processes authenticate as ``system:serviceaccount:keda:keda-operator``
  (``pki.py``), the subject those bindings name;
- ``keda-operator``: watches ScaledObjects, creates their HPAs (``keda-hpa-<name>``) and
  serves the scalers' metrics over mutual-TLS gRPC on 127.0.0.1:16660;
- ``keda-metrics-apiserver`` (KEDA's ``cmd/adapter``): the ``external.metrics.k8s.io`` API,
  which asks the operator over that gRPC link; registered as the APIService
  ``v1beta1.external.metrics.k8s.io``.

The APIService points at the Service ``keda/keda-metrics-apiserver`` of type ExternalName
``localhost``: without ``--enable-aggregator-routing`` the aggregation layer resolves a
Service to its ClusterIP, or for ExternalName to ``<externalName>:<APIService port>``, which
reaches the process on loopback (EndpointSlices cannot hold 127.0.0.0/8 addresses). The API
server checks the serving certificate against ``caBundle`` (the cluster CA) for the name
``keda-metrics-apiserver.keda.svc``, as in a real cluster.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

from llm_operator_dev.devcluster.kubeapi import Api, apply, condition_true
from llm_operator_dev.devcluster.layout import PORTS, Layout

NAMESPACE = "keda"
SERVICE = "keda-metrics-apiserver"
APISERVICE = "v1beta1.external.metrics.k8s.io"
#: Namespaced objects in KEDA's manifests that do not name a namespace get kustomize's.
RBAC_FILES = (
    "rbac/role.yaml",
    "rbac/role_binding.yaml",
    "metrics-server/role.yaml",
    "metrics-server/role_binding.yaml",
)


def cert_dir(layout: Layout) -> Path:
    """``ca.crt``, ``tls.crt``, ``tls.key``: the layout KEDA's ``--cert-dir`` expects."""
    return layout.pki_dir / "keda"


def kubeconfig(layout: Layout) -> Path:
    return layout.pki_dir / "keda.kubeconfig"


def prepare_files(layout: Layout) -> bool:
    """Copy the cluster CA and KEDA's certificate into its cert folder. True if any changed."""
    folder = cert_dir(layout)
    folder.mkdir(mode=0o700, exist_ok=True)
    changed = False
    for src, dst in (("ca.crt", "ca.crt"), ("keda.crt", "tls.crt"), ("keda.key", "tls.key")):
        data = (layout.pki_dir / src).read_bytes()
        target = folder / dst
        if target.exists() and target.read_bytes() == data:
            continue
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o600)
        tmp.replace(target)
        changed = True
    return changed


def env(layout: Layout) -> dict[str, str]:
    """What KEDA's Deployments set: every namespace watched, its own namespace named."""
    return {
        "WATCH_NAMESPACE": "",
        "POD_NAMESPACE": NAMESPACE,
        "KEDA_CLUSTER_OBJECT_NAMESPACE": NAMESPACE,
        "KUBECONFIG": str(kubeconfig(layout)),
    }


def operator_component(layout: Layout) -> tuple[list[str], str]:
    certs = cert_dir(layout)
    argv = [
        str(layout.binary("keda-operator")),
        f"--kubeconfig={kubeconfig(layout)}",
        f"--metrics-bind-address=127.0.0.1:{PORTS['keda-operator-metrics']}",
        f"--health-probe-bind-address=127.0.0.1:{PORTS['keda-operator-health']}",
        f"--metrics-service-bind-address=127.0.0.1:{PORTS['keda-operator']}",
        # The certificates come from pki.py; KEDA's own rotation would write a Secret and
        # patch the APIService's caBundle.
        "--enable-cert-rotation=false",
        f"--cert-dir={certs}",
        "--leader-elect=false",
        "--zap-log-level=info",
        "--zap-encoder=console",
    ]
    return argv, f"http://127.0.0.1:{PORTS['keda-operator-health']}/healthz"


def metrics_apiserver_component(layout: Layout) -> tuple[list[str], str]:
    certs, kcfg = cert_dir(layout), kubeconfig(layout)
    port = PORTS["keda-metrics-apiserver"]
    argv = [
        str(layout.binary("keda-adapter")),
        f"--secure-port={port}",
        "--bind-address=127.0.0.1",
        f"--cert-dir={certs}",
        f"--tls-cert-file={certs / 'tls.crt'}",
        f"--tls-private-key-file={certs / 'tls.key'}",
        f"--client-ca-file={layout.pki_dir / 'ca.crt'}",
        f"--lister-kubeconfig={kcfg}",
        f"--authentication-kubeconfig={kcfg}",
        f"--authorization-kubeconfig={kcfg}",
        f"--metrics-service-address=127.0.0.1:{PORTS['keda-operator']}",
        # Its Prometheus endpoint; KEDA binds it on every interface (":<port>", no flag).
        f"--port={PORTS['keda-metrics-apiserver-metrics']}",
        "--zap-log-level=info",
        "--zap-encoder=console",
    ]
    return argv, f"https://127.0.0.1:{port}/healthz"


#: libyaml when PyYAML has it: KEDA's ScaledJob CRD is 650 KB, half a second in pure Python.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d]


def crds(layout: Layout) -> list[dict[str, Any]]:
    folder = layout.keda_dir / "config" / "crd" / "bases"
    return [doc for f in sorted(folder.glob("*.yaml")) for doc in _load(f)]


def rbac(layout: Layout) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in RBAC_FILES:
        for doc in _load(layout.keda_dir / "config" / name):
            if doc["kind"] in ("Role", "RoleBinding"):
                doc["metadata"].setdefault("namespace", NAMESPACE)
            docs.append(doc)
    return docs


def service_and_apiservice(layout: Layout, ca_bundle: bytes) -> list[dict[str, Any]]:
    port = PORTS["keda-metrics-apiserver"]
    labels = {"app.kubernetes.io/name": SERVICE, "app.kubernetes.io/part-of": "keda-operator"}
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": NAMESPACE, "labels": labels},
            "spec": {
                "type": "ExternalName",
                "externalName": "localhost",
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            },
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": APISERVICE, "labels": labels},
            "spec": {
                "group": "external.metrics.k8s.io",
                "version": "v1beta1",
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
                "service": {"name": SERVICE, "namespace": NAMESPACE, "port": port},
                "caBundle": base64.b64encode(ca_bundle).decode(),
            },
        },
    ]


def objects(layout: Layout) -> list[dict[str, Any]]:
    """Everything ``up`` applies for KEDA, CRDs first."""
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "keda-operator", "namespace": NAMESPACE},
    }
    ca = (layout.pki_dir / "ca.crt").read_bytes()
    return [
        *crds(layout),
        namespace,
        account,
        *rbac(layout),
        *service_and_apiservice(layout, ca),
    ]


def ensure_objects(api: Api, layout: Layout) -> bool:
    """Apply KEDA's objects. True if any changed."""
    return any([apply(api, obj) for obj in objects(layout)])


def crd_names(layout: Layout) -> list[str]:
    folder = layout.keda_dir / "config" / "crd" / "bases"
    # The files are named <group>_<plural>.yaml, as controller-gen writes them; the CRD's name
    # is <plural>.<group>.
    names = []
    for path in sorted(folder.glob("*.yaml")):
        group, _, plural = path.stem.partition("_")
        names.append(f"{plural}.{group}")
    return names


def crds_established(api: Api, layout: Layout) -> bool:
    for name in crd_names(layout):
        status, body = api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        if status != 200 or not condition_true(body, "Established"):
            return False
    return True
