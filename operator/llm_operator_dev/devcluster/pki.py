"""Certificates, service-account keys and kubeconfigs for the local control plane.

The ``openssl`` command does the cryptography, so that this package needs nothing beyond the
standard library. Keys are ECDSA P-256: fast to generate on a small machine and accepted by
every Kubernetes component, including as the service-account signing key (ES256).

Identities follow kubeadm's, so that the built-in RBAC bindings apply unchanged:

- ``admin``: ``O=system:masters`` (cluster-admin), written to the kubeconfig users get;
- ``kube-controller-manager`` / ``kube-scheduler``: ``CN=system:kube-...``, bound by the
  bootstrap ClusterRoles of the same names;
- ``kwok``: ``O=system:masters``. kwok plays the kubelet of every fake node at once, and the
  Node authorizer only lets a kubelet touch its own Node and pods, so kwok needs more;
- ``prometheus``: ``CN=llm-operator-dev:prometheus``, no groups: it may only read pods, through
  the ClusterRole that ``prometheus.ensure_rbac`` binds once the API server is up. A pki
  folder from before it existed gains it on the next ``up`` (only missing files are made);
- ``keda`` / ``prometheus-adapter``: the user names of the ServiceAccounts their upstream
  manifests bind (``system:serviceaccount:keda:keda-operator``,
  ``system:serviceaccount:monitoring:prometheus-adapter``), also serving certificates.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from llm_operator_dev.devcluster.layout import CLUSTER_NAME, SERVICE_IP

DAYS = "3650"  # a dev CA that expires mid-project only breaks people's mornings


class PKIError(RuntimeError):
    """openssl is missing or failed."""


@dataclass(frozen=True)
class ClientCert:
    """A client identity: the certificate's CN is the user, each O a group."""

    name: str
    common_name: str
    organizations: tuple[str, ...] = ()
    server_names: tuple[str, ...] = ()  # also a serving certificate for these SANs


CLIENTS: tuple[ClientCert, ...] = (
    ClientCert("admin", "kubernetes-admin", ("system:masters",)),
    ClientCert("kube-controller-manager", "system:kube-controller-manager"),
    ClientCert("kube-scheduler", "system:kube-scheduler"),
    ClientCert("kwok", "system:kwok-controller", ("system:masters",), ("IP:127.0.0.1",)),
    ClientCert("prometheus", "llm-operator-dev:prometheus"),
    # KEDA and prometheus-adapter act as the ServiceAccounts their upstream manifests bind (RBAC
    # matches a ServiceAccount subject by this user name), so those bindings apply unchanged.
    # Each certificate also serves: the aggregation layer checks it for <service>.<ns>.svc, and
    # KEDA's operator and metrics API server use it for their mutual-TLS gRPC link.
    ClientCert(
        "keda",
        "system:serviceaccount:keda:keda-operator",
        ("system:serviceaccounts", "system:serviceaccounts:keda"),
        (
            "DNS:keda-metrics-apiserver.keda.svc",
            "DNS:keda-operator.keda.svc",
            "DNS:keda-operator.keda.svc.cluster.local",
            "DNS:localhost",
            "IP:127.0.0.1",
        ),
    ),
    ClientCert(
        "prometheus-adapter",
        "system:serviceaccount:monitoring:prometheus-adapter",
        ("system:serviceaccounts", "system:serviceaccounts:monitoring"),
        ("DNS:prometheus-adapter.monitoring.svc", "DNS:localhost", "IP:127.0.0.1"),
    ),
)

APISERVER_SANS: tuple[str, ...] = (
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
    "IP:127.0.0.1",
    f"IP:{SERVICE_IP}",
)


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise PKIError("the openssl command is required (Debian: apt-get install openssl)")
    proc = subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    if proc.returncode != 0:
        raise PKIError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


def _new_key(path: Path) -> None:
    _openssl(
        "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path), cwd=path.parent
    )
    path.chmod(0o600)


def _subject(common_name: str, organizations: tuple[str, ...]) -> str:
    return "".join(f"/O={o}" for o in organizations) + f"/CN={common_name}"


def _sign(
    pki: Path, name: str, subject: str, usages: str, sans: tuple[str, ...], ca: str = "ca"
) -> None:
    """Issue ``name.crt`` for ``name.key``, signed by ``<ca>.crt``/``<ca>.key`` in ``pki``."""
    key, crt = pki / f"{name}.key", pki / f"{name}.crt"
    if not key.exists():
        _new_key(key)
    ext = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={usages}",
    ]
    if sans:
        ext.append("subjectAltName=" + ",".join(sans))
    with tempfile.TemporaryDirectory(dir=pki) as tmp:
        csr, extfile = Path(tmp) / "req.csr", Path(tmp) / "ext.cnf"
        extfile.write_text("\n".join(ext) + "\n")
        _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr), cwd=pki)
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", DAYS, "-sha256", "-extfile", str(extfile),
            "-out", str(crt), cwd=pki,
        )  # fmt: skip


def _new_ca(pki: Path, name: str, common_name: str) -> None:
    _new_key(pki / f"{name}.key")
    _openssl(
        "req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={common_name}",
        "-days", DAYS, "-sha256", "-out", f"{name}.crt",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=pki,
    )  # fmt: skip


def ensure_pki(pki: Path) -> bool:
    """Create whatever of the CA, certificates and keys is missing. True if anything was."""
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    wanted = ["ca.crt", "sa.key", "sa.pub", "kube-apiserver.crt", "front-proxy-client.crt"]
    wanted += [f"{c.name}.crt" for c in CLIENTS]
    if all((pki / f).exists() for f in wanted):
        return False
    if not (pki / "ca.crt").exists():
        # A new CA invalidates every certificate it signed: start the folder over.
        for old in pki.iterdir():
            if old.is_file():
                old.unlink()
        _new_ca(pki, "ca", f"{CLUSTER_NAME}-ca")
    if not (pki / "front-proxy-client.crt").exists():
        # The aggregation layer's own CA, as in kubeadm: the API server presents this client
        # certificate to aggregated API servers, which then trust its X-Remote-* headers.
        _new_ca(pki, "front-proxy-ca", f"{CLUSTER_NAME}-front-proxy-ca")
        _sign(
            pki, "front-proxy-client", "/CN=front-proxy-client", "clientAuth", (), "front-proxy-ca"
        )
    if not (pki / "sa.key").exists() or not (pki / "sa.pub").exists():
        _new_key(pki / "sa.key")
        _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    if not (pki / "kube-apiserver.crt").exists():
        _sign(pki, "kube-apiserver", "/CN=kube-apiserver", "serverAuth", APISERVER_SANS)
    for client in CLIENTS:
        if not (pki / f"{client.name}.crt").exists():
            usages = "clientAuth,serverAuth" if client.server_names else "clientAuth"
            subject = _subject(client.common_name, client.organizations)
            _sign(pki, client.name, subject, usages, client.server_names)
    return True


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig(pki: Path, server: str, user: str) -> str:
    """A self-contained kubeconfig (certificates inlined) for one of :data:`CLIENTS`."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CLUSTER_NAME,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": _b64(pki / "ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(pki / f"{user}.crt"),
                    "client-key-data": _b64(pki / f"{user}.key"),
                },
            }
        ],
        "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": user}}],
        "current-context": CLUSTER_NAME,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def write_kubeconfig(path: Path, pki: Path, server: str, user: str) -> bool:
    """Write the kubeconfig unless it already says the same. True if it was written."""
    text = kubeconfig(pki, server, user)
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)
    return True
