"""HTTP to the API server on urllib3, with raw JSON bodies (issue 18).

The `kubernetes` package was only ever the operator's transport and credential loader, and
importing it costs about 21 MiB of the `run` process (bench/results/operator.md). This is
the part of it the operator uses: the pod's ServiceAccount or a kubeconfig (server, CA,
client certificate and key as files or data, token or token file, basic auth), requests by
path, and watch streams read line by line. Kubeconfig users that authenticate with `exec`
or an `auth-provider` plugin go through the `kubernetes` package's loader, imported only
then, so they keep working.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import urllib3
import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
USER_AGENT = "llm-operator"


class ApiError(Exception):
    """The API server answered with a status outside 2xx (what `ApiException` was)."""

    def __init__(self, status: int = 0, reason: str = "", body: str = "") -> None:
        super().__init__(status, reason, body)
        self.status = status
        self.reason = reason
        self.body = body

    def __str__(self) -> str:
        return f"({self.status}) {self.reason}: {self.body[:500]}"


def compact(value: Any) -> Any:
    """The same JSON value with every string interned, so that equal strings are one object.

    json.loads shares equal keys only within one document, and each watch event or apply
    response is one: the 1,000 Deployments of 1,000 LLMDeployments in the operator's cache
    each held their own copies of the same keys, image, arguments, probe paths and label
    values. Interned, the cached children take about half the memory
    (bench/results/operator.md, 2026-12-03). The content is unchanged, so everything that
    reads the cache (drift, the foreign-fields check, status, the canary's live template)
    sees exactly what it saw. `managedFields` is left as parsed: the cache drops it once the
    foreign fields are read from it.
    """
    type_ = type(value)
    if type_ is str:
        return sys.intern(value)
    if type_ is dict:
        return {sys.intern(k): v if k == "managedFields" else compact(v) for k, v in value.items()}
    if type_ is list:
        return [compact(v) for v in value]
    return value


class ConfigError(Exception):
    """Neither a ServiceAccount nor a usable kubeconfig."""


class TokenFile:
    """A bearer token in a file, read again when the file changes: bound ServiceAccount
    tokens are rotated by the kubelet (every hour or so) and the old one expires."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.stamp: tuple[int, int] | None = None
        self.token = ""

    def __call__(self) -> str:
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self.lock:
            if stamp != self.stamp:
                self.token = self.path.read_text().strip()
                self.stamp = stamp
            return self.token


@dataclass
class Credentials:
    """Where the API server is and how to authenticate to it."""

    server: str
    ca_file: str | None = None
    ca_data: str | None = None
    """PEM text of the CA bundle."""
    cert_file: str | None = None
    key_file: str | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    token: Callable[[], str | None] | None = None
    """The bearer token now (a file re-read when it changes, a plugin's refresh)."""
    basic: tuple[str, str] | None = None
    insecure: bool = False
    tls_server_name: str | None = None
    proxy_url: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif self.ca_file or self.ca_data:
            context = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        if self.cert_file and self.key_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        elif self.cert_data and self.key_data:
            _load_cert_data(context, self.cert_data, self.key_data)
        return context

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT}
        token = self.token() if self.token is not None else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif self.basic is not None:
            raw = f"{self.basic[0]}:{self.basic[1]}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        return headers


def _load_cert_data(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    # ssl loads a client certificate only from files: write them (owner-only) for the call.
    with tempfile.TemporaryDirectory(prefix="llmop-tls-") as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        context.load_cert_chain(str(cert_path), str(key_path))


def in_cluster(sa_dir: Path = SA_DIR, environ: dict[str, str] | None = None) -> Credentials | None:
    """The pod's ServiceAccount, as client-go's rest.InClusterConfig reads it."""
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    token = sa_dir / "token"
    if not host or not port or not token.exists():
        return None
    if ":" in host:  # IPv6
        host = f"[{host}]"
    ca = sa_dir / "ca.crt"
    return Credentials(
        server=f"https://{host}:{port}",
        ca_file=str(ca) if ca.exists() else None,
        token=TokenFile(token),
    )


def _kubeconfig_paths(environ: dict[str, str] | None = None) -> list[Path]:
    env = os.environ if environ is None else environ
    value = env.get("KUBECONFIG")
    if value:
        return [Path(p).expanduser() for p in value.split(os.pathsep) if p]
    return [Path("~/.kube/config").expanduser()]


def _merged(paths: list[Path]) -> tuple[dict[str, Any], dict[str, Path]]:
    """The kubeconfig files merged as kubectl does (the first file to name an entry or the
    current context wins), and the file each cluster and user came from, since relative
    paths in an entry are relative to its file."""
    merged: dict[str, Any] = {"clusters": {}, "users": {}, "contexts": {}}
    origin: dict[str, Path] = {}
    for path in paths:
        if not path.exists():
            continue
        doc = yaml.safe_load(path.read_text()) or {}
        if "current-context" not in merged and doc.get("current-context"):
            merged["current-context"] = doc["current-context"]
        for section, key in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
            for entry in doc.get(section) or []:
                name = entry.get("name")
                if name is not None and name not in merged[section]:
                    merged[section][name] = entry.get(key) or {}
                    origin[f"{section}/{name}"] = path.parent
    return merged, origin


def _file(base: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def from_kubeconfig(
    environ: dict[str, str] | None = None, context: str | None = None
) -> Credentials | None:
    """The current context of KUBECONFIG (or ~/.kube/config). None when there is none."""
    paths = _kubeconfig_paths(environ)
    merged, origin = _merged(paths)
    name = context or merged.get("current-context")
    if not name or name not in merged["contexts"]:
        return None
    ctx = merged["contexts"][name]
    cluster = merged["clusters"].get(ctx.get("cluster"))
    user = merged["users"].get(ctx.get("user"), {})
    if cluster is None or not cluster.get("server"):
        raise ConfigError(f"kubeconfig context {name!r} has no cluster with a server")
    if user.get("exec") or user.get("auth-provider"):
        return _via_kubernetes_package(paths, name)
    cbase = origin.get(f"clusters/{ctx.get('cluster')}", Path.cwd())
    ubase = origin.get(f"users/{ctx.get('user')}", Path.cwd())
    creds = Credentials(
        server=str(cluster["server"]).rstrip("/"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        tls_server_name=cluster.get("tls-server-name"),
        proxy_url=cluster.get("proxy-url"),
    )
    if cluster.get("certificate-authority-data"):
        creds.ca_data = base64.b64decode(cluster["certificate-authority-data"]).decode()
    elif cluster.get("certificate-authority"):
        creds.ca_file = _file(cbase, cluster["certificate-authority"])
    if user.get("client-certificate-data") and user.get("client-key-data"):
        creds.cert_data = base64.b64decode(user["client-certificate-data"])
        creds.key_data = base64.b64decode(user["client-key-data"])
    elif user.get("client-certificate") and user.get("client-key"):
        creds.cert_file = _file(ubase, user["client-certificate"])
        creds.key_file = _file(ubase, user["client-key"])
    if user.get("token"):
        token = str(user["token"])
        creds.token = lambda: token
    elif user.get("tokenFile"):
        creds.token = TokenFile(Path(_file(ubase, user["tokenFile"])))
    elif user.get("username") is not None and user.get("password") is not None:
        creds.basic = (str(user["username"]), str(user["password"]))
    return creds


def _via_kubernetes_package(paths: list[Path], context: str) -> Credentials:
    """exec and auth-provider users: the `kubernetes` package runs the plugin and refreshes
    its token; imported here only, so other users never load it."""
    import kubernetes

    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=os.pathsep.join(str(p) for p in paths),
        context=context,
        client_configuration=configuration,
    )
    return from_configuration(configuration)


def from_configuration(configuration: Any) -> Credentials:
    """The credentials a `kubernetes.client.Configuration` holds (the CLI tools load theirs
    with the package)."""

    def token() -> str | None:
        header = configuration.get_api_key_with_prefix("BearerToken")  # refreshes when due
        return str(header).removeprefix("Bearer ").strip() if header else None

    return Credentials(
        server=str(configuration.host).rstrip("/"),
        ca_file=configuration.ssl_ca_cert,
        cert_file=configuration.cert_file,
        key_file=configuration.key_file,
        token=token,
        insecure=not configuration.verify_ssl,
        tls_server_name=getattr(configuration, "tls_server_name", None),
        proxy_url=configuration.proxy,
    )


def load_credentials() -> Credentials:
    """The pod's ServiceAccount, else KUBECONFIG / ~/.kube/config (the same order as before)."""
    creds = in_cluster() or from_kubeconfig()
    if creds is None:
        raise ConfigError("no ServiceAccount token and no kubeconfig with a current context")
    return creds


class Connection:
    """A pool of keep-alive connections to one API server; thread-safe (urllib3's pool)."""

    def __init__(self, credentials: Credentials, maxsize: int = 16) -> None:
        self.credentials = credentials
        kwargs: dict[str, Any] = {
            "maxsize": maxsize,
            "ssl_context": credentials.ssl_context(),
        }
        if credentials.insecure:
            kwargs.update(cert_reqs="CERT_NONE", assert_hostname=False)
        if credentials.tls_server_name:
            kwargs["server_hostname"] = credentials.tls_server_name
        self.pool: urllib3.PoolManager = (
            urllib3.ProxyManager(credentials.proxy_url, **kwargs)
            if credentials.proxy_url
            else urllib3.PoolManager(**kwargs)
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        timeout: float | tuple[float, float] = 60,
        stream: bool = False,
    ) -> urllib3.BaseHTTPResponse:
        """The response, whatever its status; with `stream` its body is not read yet (the
        caller reads it and releases the connection)."""
        url = self.credentials.server + path
        if query:
            url += "?" + urlencode(query)
        headers = self.credentials.headers()
        headers["Accept"] = accept
        payload = None
        if body is not None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        return self.pool.request(
            method,
            url,
            body=payload,
            headers=headers,
            timeout=urllib3.Timeout(connect=connect, read=read),
            preload_content=not stream,
        )

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] = 60,
    ) -> Any:
        """The decoded JSON answer (None for an empty one); ApiError outside 2xx."""
        response = self.request(
            method, path, query=query, body=body, content_type=content_type, timeout=timeout
        )
        data = response.data
        if not 200 <= response.status < 300:
            raise error_of(response, data)
        return json.loads(data) if data else None

    def lines(self, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        """A streamed body line by line (a watch: one line per event); releases the
        connection at the end or when the caller stops."""
        finished = False
        try:
            buffered = b""
            for chunk in response.stream(64 * 1024):
                buffered += chunk
                *complete, buffered = buffered.split(b"\n")
                yield from complete
            if buffered:
                yield buffered
            finished = True
        finally:
            with contextlib.suppress(Exception):
                if not finished:  # unread body: the connection cannot be reused
                    response.close()
                response.release_conn()


def error_of(response: urllib3.BaseHTTPResponse, data: bytes | None = None) -> ApiError:
    raw = response.data if data is None else data
    return ApiError(
        status=response.status,
        reason=str(response.reason or ""),
        body=(raw or b"").decode(errors="replace"),
    )


def connect(maxsize: int = 16) -> Connection:
    return Connection(load_credentials(), maxsize)
