"""prometheus-adapter on the local control plane: ``custom.metrics.k8s.io`` from Prometheus.

One host process (``cmd/adapter`` of the pinned commit, see ``gobuild.py``), reading the local
Prometheus (127.0.0.1:19090) with the rule the chart ships
(``charts/llm-operator/files/prometheus-adapter-values.yaml``): the pods metric
``vllm_num_requests_waiting`` from vLLM's ``vllm:num_requests_waiting``, what an HPA with
``provider: hpa`` asks for. Registered as the APIService ``v1beta1.custom.metrics.k8s.io``
through an ExternalName Service, as KEDA's metrics API server is (see ``keda.py``).

It authenticates as ``system:serviceaccount:monitoring:prometheus-adapter`` with the RBAC of
upstream's ``deploy/manifests``: read nodes, namespaces, pods and services; delegated
authentication and authorization; and the HPA controller may read ``custom.metrics.k8s.io``.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import yaml

from llm_operator_dev.devcluster import prometheus
from llm_operator_dev.devcluster.kubeapi import Api, apply
from llm_operator_dev.devcluster.layout import PORTS, Layout

NAMESPACE = "monitoring"
NAME = "prometheus-adapter"
APISERVICE = "v1beta1.custom.metrics.k8s.io"
RULES_FILE = (
    Path(__file__).resolve().parents[3] / "charts/llm-operator/files/prometheus-adapter-values.yaml"
)
#: How often the adapter lists the series it can serve. A metric it has not listed yet is
#: "not found"; a short relist makes a new engine's metric servable within seconds. It must
#: not be shorter than Prometheus' scrape interval (2 s here).
RELIST_INTERVAL = "10s"


def chart_values(path: Path = RULES_FILE) -> dict[str, Any]:
    """The rule as prometheus-community/prometheus-adapter chart values (``rules.custom``)."""
    values = yaml.safe_load(path.read_text())
    rules = values.get("rules") if isinstance(values, dict) else None
    if not isinstance(rules, dict) or not isinstance(rules.get("custom"), list):
        raise ValueError(f"{path}: expected rules.custom: [...]")
    return dict(values)


def adapter_config(values: dict[str, Any]) -> dict[str, Any]:
    """The adapter's own ``--config`` file from chart values: the chart writes ``rules.custom``
    as the config's ``rules`` (and ``rules.external`` as ``externalRules``)."""
    config: dict[str, Any] = {"rules": list(values["rules"]["custom"])}
    if values["rules"].get("external"):
        config["externalRules"] = list(values["rules"]["external"])
    return config


def config_text() -> str:
    return yaml.safe_dump(adapter_config(chart_values()), sort_keys=False)


def config_path(layout: Layout, text: str | None = None) -> Path:
    """Named after its content: a new rule changes the adapter's command line, so ``up``
    restarts it (it reads its config only at start)."""
    digest = hashlib.sha256((text if text is not None else config_text()).encode()).hexdigest()
    return layout.cluster_dir / "prometheus-adapter" / f"config-{digest[:12]}.yaml"


def prepare_files(layout: Layout) -> bool:
    """Write the config file (old ones go). True if it was written."""
    text = config_text()
    path = config_path(layout, text)
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob("config-*.yaml"):
        old.unlink()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def kubeconfig(layout: Layout) -> Path:
    return layout.pki_dir / f"{NAME}.kubeconfig"


def component(layout: Layout) -> tuple[list[str], str]:
    p, kcfg, port = layout.pki_dir, kubeconfig(layout), PORTS["prometheus-adapter"]
    argv = [
        str(layout.binary("prometheus-adapter")),
        f"--secure-port={port}",
        "--bind-address=127.0.0.1",
        f"--tls-cert-file={p / 'prometheus-adapter.crt'}",
        f"--tls-private-key-file={p / 'prometheus-adapter.key'}",
        f"--client-ca-file={p / 'ca.crt'}",
        f"--lister-kubeconfig={kcfg}",
        f"--authentication-kubeconfig={kcfg}",
        f"--authorization-kubeconfig={kcfg}",
        f"--prometheus-url={prometheus.url()}/",
        f"--config={config_path(layout)}",
        f"--metrics-relist-interval={RELIST_INTERVAL}",
    ]
    return argv, f"https://127.0.0.1:{port}/healthz"


def _rbac() -> list[dict[str, Any]]:
    rbac = "rbac.authorization.k8s.io/v1"
    account = {"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}
    hpa = {
        "kind": "ServiceAccount",
        "name": "horizontal-pod-autoscaler",
        "namespace": "kube-system",
    }

    def ref(kind: str, name: str) -> dict[str, str]:
        return {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name}

    return [
        {
            "apiVersion": rbac,
            "kind": "ClusterRole",
            "metadata": {"name": NAME},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["nodes", "namespaces", "pods", "services"],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
        {
            "apiVersion": rbac,
            "kind": "ClusterRoleBinding",
            "metadata": {"name": NAME},
            "roleRef": ref("ClusterRole", NAME),
            "subjects": [account],
        },
        {
            "apiVersion": rbac,
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{NAME}:system:auth-delegator"},
            "roleRef": ref("ClusterRole", "system:auth-delegator"),
            "subjects": [account],
        },
        {
            "apiVersion": rbac,
            "kind": "RoleBinding",
            "metadata": {"name": f"{NAME}-auth-reader", "namespace": "kube-system"},
            "roleRef": ref("Role", "extension-apiserver-authentication-reader"),
            "subjects": [account],
        },
        {
            "apiVersion": rbac,
            "kind": "ClusterRole",
            "metadata": {"name": "custom-metrics-server-resources"},
            "rules": [{"apiGroups": ["custom.metrics.k8s.io"], "resources": ["*"], "verbs": ["*"]}],
        },
        {
            "apiVersion": rbac,
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "hpa-controller-custom-metrics"},
            "roleRef": ref("ClusterRole", "custom-metrics-server-resources"),
            "subjects": [hpa],
        },
    ]


def objects(layout: Layout) -> list[dict[str, Any]]:
    port = PORTS["prometheus-adapter"]
    labels = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": "metrics-adapter"}
    ca = base64.b64encode((layout.pki_dir / "ca.crt").read_bytes()).decode()
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": NAME, "namespace": NAMESPACE},
        },
        *_rbac(),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": labels},
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
                "group": "custom.metrics.k8s.io",
                "version": "v1beta1",
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
                "service": {"name": NAME, "namespace": NAMESPACE, "port": port},
                "caBundle": ca,
            },
        },
    ]


def ensure_objects(api: Api, layout: Layout) -> bool:
    return any([apply(api, obj) for obj in objects(layout)])
