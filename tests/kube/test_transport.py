"""The operator's own transport (kube/transport.py): credentials from a ServiceAccount or a
kubeconfig, requests and errors against a local HTTP server, watch streams, and the `run`
process without the `kubernetes` package."""

from __future__ import annotations

import base64
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_operator.controller.informer import ApiTransport, Gone
from llm_operator.kube.client import KubeClient
from llm_operator.kube.resources import BY_KIND
from llm_operator.kube.transport import (
    ApiError,
    ConfigError,
    Connection,
    Credentials,
    from_kubeconfig,
    in_cluster,
    load_credentials,
)

DEPLOYMENT = BY_KIND["Deployment"]


# -- credentials ----------------------------------------------------------------------------


def kubeconfig(path: Path, user: dict[str, Any], cluster: dict[str, Any] | None = None) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "dev",
                "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [{"name": "c", "cluster": cluster or {"server": "https://k:6443/"}}],
                "users": [{"name": "u", "user": user}],
            }
        )
    )
    return path


def test_a_service_account_token_is_read_again_when_it_rotates(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("first\n")
    (tmp_path / "ca.crt").write_text("pem")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    creds = in_cluster(tmp_path, env)
    assert creds is not None
    assert creds.server == "https://[fd00::1]:443"
    assert creds.ca_file == str(tmp_path / "ca.crt")
    assert creds.headers()["Authorization"] == "Bearer first"
    (tmp_path / "token").write_text("second, longer\n")  # the kubelet swaps the file
    assert creds.headers()["Authorization"] == "Bearer second, longer"


def test_no_service_account_outside_a_pod(tmp_path: Path) -> None:
    assert in_cluster(tmp_path, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is None
    (tmp_path / "token").write_text("t")
    assert in_cluster(tmp_path, {}) is None


def test_kubeconfig_files_and_data_are_read_relative_to_their_file(tmp_path: Path) -> None:
    path = kubeconfig(
        tmp_path / "config",
        {"client-certificate": "certs/me.crt", "client-key": "/abs/me.key", "tokenFile": "tok"},
        {"server": "https://k:6443/", "certificate-authority": "ca.pem", "tls-server-name": "k"},
    )
    (tmp_path / "tok").write_text("from-file\n")
    creds = from_kubeconfig({"KUBECONFIG": str(path)})
    assert creds is not None
    assert creds.server == "https://k:6443"
    assert creds.ca_file == str(tmp_path / "ca.pem")
    assert (creds.cert_file, creds.key_file) == (str(tmp_path / "certs/me.crt"), "/abs/me.key")
    assert creds.tls_server_name == "k"
    assert creds.headers()["Authorization"] == "Bearer from-file"

    data = kubeconfig(
        tmp_path / "data",
        {
            "client-certificate-data": base64.b64encode(b"CERT").decode(),
            "client-key-data": base64.b64encode(b"KEY").decode(),
            "token": "inline",
        },
        {"server": "https://k", "certificate-authority-data": base64.b64encode(b"CA").decode()},
    )
    creds = from_kubeconfig({"KUBECONFIG": str(data)})
    assert creds is not None
    assert (creds.ca_data, creds.cert_data, creds.key_data) == ("CA", b"CERT", b"KEY")
    assert creds.headers()["Authorization"] == "Bearer inline"

    basic = kubeconfig(tmp_path / "basic", {"username": "a", "password": "b"}, {"server": "h"})
    creds = from_kubeconfig({"KUBECONFIG": str(basic)})
    assert creds is not None
    assert creds.headers()["Authorization"] == "Basic " + base64.b64encode(b"a:b").decode()


def test_several_kubeconfig_files_merge_first_wins(tmp_path: Path) -> None:
    first = kubeconfig(tmp_path / "a", {"token": "a"}, {"server": "https://a"})
    second = tmp_path / "b"
    second.write_text(
        yaml.safe_dump(
            {
                "current-context": "other",
                "contexts": [{"name": "other", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [{"name": "c", "cluster": {"server": "https://b"}}],
                "users": [{"name": "u", "user": {"token": "b"}}],
            }
        )
    )
    creds = from_kubeconfig({"KUBECONFIG": f"{tmp_path / 'missing'}:{first}:{second}"})
    assert creds is not None
    assert creds.server == "https://a"
    assert creds.headers()["Authorization"] == "Bearer a"
    assert from_kubeconfig({"KUBECONFIG": str(tmp_path / "missing")}) is None


def test_an_exec_user_goes_through_the_kubernetes_package(tmp_path: Path) -> None:
    # An exec plugin as `aws eks get-token` is: the package runs it and keeps its token.
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "kind": "ExecCredential",
        "status": {"token": "from-plugin"},
    }
    path = kubeconfig(
        tmp_path / "config",
        {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1",
                "command": "sh",
                "args": ["-c", f"echo '{json.dumps(credential)}'"],
            }
        },
    )
    creds = from_kubeconfig({"KUBECONFIG": str(path)})
    assert creds is not None
    assert creds.server == "https://k:6443"
    assert creds.headers()["Authorization"] == "Bearer from-plugin"


def test_no_credentials_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ConfigError):
        load_credentials()


# -- requests against a local server --------------------------------------------------------


class Recorded(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, list[bytes]]] = {}
    seen: list[dict[str, Any]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )
        status, chunks = self.routes.get(self.path.split("?")[0], (404, [b'{"reason":"NotFound"}']))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if len(chunks) > 1:  # a watch: chunked, one event after the other
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in chunks:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
                time.sleep(0.01)
            self.wfile.write(b"0\r\n\r\n")
        else:
            data = chunks[0] if chunks else b""
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    do_GET = do_PATCH = do_POST = do_DELETE = _answer
    protocol_version = "HTTP/1.1"

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Connection]:
    Recorded.routes, Recorded.seen = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorded)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Connection(
        Credentials(server=f"http://127.0.0.1:{httpd.server_address[1]}", token=lambda: "t")
    )
    httpd.shutdown()


def test_apply_sends_json_with_the_field_manager_and_the_token(server: Connection) -> None:
    path = "/apis/apps/v1/namespaces/ns/deployments/d"
    Recorded.routes[path] = (200, [b'{"kind":"Deployment","metadata":{"name":"d"}}'])
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": "ns"},
    }
    assert KubeClient(server).apply(obj)["metadata"] == {"name": "d"}
    (request,) = Recorded.seen
    assert request["method"] == "PATCH"
    assert request["path"] == f"{path}?fieldManager=llm-operator&force=true"
    assert request["headers"]["Content-Type"] == "application/apply-patch+yaml"
    assert request["headers"]["Authorization"] == "Bearer t"
    assert json.loads(request["body"]) == obj


def test_an_error_status_is_an_api_error_with_the_answer(server: Connection) -> None:
    Recorded.routes["/x"] = (422, [b'{"message":"spec.replicas: Invalid value"}'])
    with pytest.raises(ApiError) as caught:
        server.call("GET", "/x")
    assert caught.value.status == 422
    assert "Invalid value" in caught.value.body
    assert KubeClient(server).get_path("/nothing") is None  # 404: absent, not an error


def test_a_list_page_and_a_watch_stream_as_the_informer_reads_them(server: Connection) -> None:
    path = DEPLOYMENT.collection_path("ns")
    item = {"metadata": {"name": "d", "namespace": "ns", "resourceVersion": "5"}}
    page = {"metadata": {"resourceVersion": "7", "continue": "c2"}, "items": [item]}
    Recorded.routes[path] = (200, [json.dumps(page).encode()])
    transport = ApiTransport(server)
    items, token, version = transport.list_page(DEPLOYMENT, "ns", "a=b", None)
    assert (items[0]["kind"], token, version) == ("Deployment", "c2", "7")
    event = json.dumps({"type": "MODIFIED", "object": item}).encode()
    # Events split across chunks and two in one chunk are still one line each.
    Recorded.routes[path] = (200, [event[:10], event[10:] + b"\n" + event + b"\n", b"\n"])
    events = list(transport.watch(DEPLOYMENT, "ns", "a=b", "7"))
    assert [e["type"] for e in events] == ["MODIFIED", "MODIFIED"]
    assert "watch=true" in Recorded.seen[-1]["path"]
    assert "resourceVersion=7" in Recorded.seen[-1]["path"]
    Recorded.routes[path] = (410, [b'{"reason":"Expired"}'])
    with pytest.raises(Gone):
        list(transport.watch(DEPLOYMENT, "ns", "a=b", "1"))


# -- the run process ------------------------------------------------------------------------


def test_the_run_process_never_loads_the_kubernetes_package() -> None:
    code = (
        "import sys; import llm_operator.controller.main, llm_operator.kube.client; "
        "assert 'kubernetes' not in sys.modules, 'kubernetes loaded'; "
        "import kopf._cogs.helpers.thirdparty as t; assert t.V1ObjectMetaSync is None; "
        "import kubernetes.client; print('ok')"  # still importable after (exec users)
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)
    )
    assert result.stdout.strip() == "ok", result.stderr
