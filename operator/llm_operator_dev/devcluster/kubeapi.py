"""A minimal HTTPS client for the few API calls ``up`` and ``status`` make.

The standard library is enough for readiness probes, reading nodes and creating them, and it
keeps ``llm-operator dev`` usable before (or without) the Kubernetes Python client.
"""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ApiError(RuntimeError):
    """A transport error (connection refused, TLS, timeout)."""


def insecure_context() -> ssl.SSLContext:
    """For the loopback health ports of components that serve a self-signed certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def probe(url: str, timeout: float = 2.0, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    """GET ``url``; (status, body), or (0, reason) when nothing answers."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=context or insecure_context()
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as err:
        return 0, str(err)
    finally:
        conn.close()


class Api:
    """Authenticated calls to one API server with a client certificate."""

    def __init__(self, server: str, ca: Path, cert: Path, key: Path, timeout: float = 10.0) -> None:
        parts = urlsplit(server)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 443
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=str(ca))
        self.context.load_cert_chain(str(cert), str(key))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        """(status, decoded JSON or text). Raises :class:`ApiError` when nothing answers."""
        conn = http.client.HTTPSConnection(
            self.host, self.port, timeout=self.timeout, context=self.context
        )
        headers = {"Accept": "application/json"}
        payload: bytes | None = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as err:
            raise ApiError(f"{method} {path}: {err}") from err
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)


#: Where each kind the add-ons apply lives: (API prefix, plural, namespaced).
KINDS: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("/api/v1", "namespaces", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Service": ("/api/v1", "services", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "CustomResourceDefinition": (
        "/apis/apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        False,
    ),
    "APIService": ("/apis/apiregistration.k8s.io/v1", "apiservices", False),
}

FIELD_MANAGER = "llm-operator-dev"


def object_path(obj: dict[str, Any]) -> str:
    """The URL path of one object, from its kind, namespace and name."""
    kind, meta = obj["kind"], obj["metadata"]
    if kind not in KINDS:
        raise ValueError(f"no path known for kind {kind}")
    prefix, plural, namespaced = KINDS[kind]
    if namespaced:
        return f"{prefix}/namespaces/{meta['namespace']}/{plural}/{meta['name']}"
    return f"{prefix}/{plural}/{meta['name']}"


def apply(api: Api, obj: dict[str, Any]) -> bool:
    """Server-side apply ``obj`` (field manager ``llm-operator-dev``, forced). True if the
    object changed: a no-op apply keeps its resourceVersion."""
    path = object_path(obj)
    status, live = api.get(path)
    before = live.get("metadata", {}).get("resourceVersion") if status == 200 else None
    status, body = api.request(
        "PATCH",
        f"{path}?fieldManager={FIELD_MANAGER}&force=true",
        obj,
        "application/apply-patch+yaml",
    )
    if status not in (200, 201):
        message = body.get("message") if isinstance(body, dict) else body
        raise ApiError(f"apply {obj['kind']} {obj['metadata']['name']}: HTTP {status}: {message}")
    return bool(body.get("metadata", {}).get("resourceVersion") != before)


def condition_true(obj: dict[str, Any], kind: str) -> bool:
    """Whether ``status.conditions`` has ``kind`` with status True."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return bool(cond.get("status") == "True")
    return False
