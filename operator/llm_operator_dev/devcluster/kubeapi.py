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
