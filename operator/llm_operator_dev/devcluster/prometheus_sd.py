"""Pod discovery for Prometheus over HTTP SD: the local cluster's ``kubernetes_sd_configs``.

Debian builds Prometheus without Kubernetes service discovery (its NEWS.Debian, 1.5.0+ds-1:
"Kubernetes support has been completely removed, due to the insane amount of dependencies in
their client library"; ``promtool check config`` says ``field kubernetes_sd_configs not
found``). This small server stands in for it: on every ``GET /targets`` it lists the pods
with the ``prometheus`` identity and answers in Prometheus' HTTP SD format, one target per
container port, with exactly the ``__meta_kubernetes_*`` labels that ``role: pod`` discovery
gives. So the relabelling in prometheus.py is the one a real cluster's Prometheus would run,
and with an upstream build only the ``*_sd_configs`` key would change.

Listing on each request instead of watching keeps it stateless: Prometheus asks every
refresh interval (2 s), and the API server answers a LIST of a few dozen pods from its watch
cache in milliseconds. The two jobs share one answer through a one-second cache.

    python -m llm_operator_dev.devcluster.prometheus_sd --server https://127.0.0.1:16443 \\
        --ca pki/ca.crt --cert pki/prometheus.crt --key pki/prometheus.key \\
        --listen 127.0.0.1:19091

``GET /healthz`` answers 200 only when the pods can be listed (so ``up`` waits for the RBAC
binding, and ``status`` shows a broken one), 503 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from llm_operator_dev.devcluster.kubeapi import Api, ApiError

PREFIX = "__meta_kubernetes_pod_"
CACHE_SECONDS = 1.0


def sanitize(name: str) -> str:
    """A Kubernetes label or annotation key as a Prometheus label name (as Prometheus does)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _pod_labels(pod: dict[str, Any]) -> dict[str, str]:
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    ready = next(
        (c.get("status", "Unknown") for c in status.get("conditions", []) if c["type"] == "Ready"),
        "Unknown",
    )
    labels = {
        "__meta_kubernetes_namespace": meta.get("namespace", ""),
        f"{PREFIX}name": meta["name"],
        f"{PREFIX}ip": status.get("podIP", ""),
        f"{PREFIX}ready": ready.lower(),
        f"{PREFIX}phase": status.get("phase", ""),
        f"{PREFIX}node_name": spec.get("nodeName", ""),
        f"{PREFIX}host_ip": status.get("hostIP", ""),
        f"{PREFIX}uid": meta.get("uid", ""),
    }
    owner = next((o for o in meta.get("ownerReferences", []) if o.get("controller")), None)
    if owner is not None:
        labels[f"{PREFIX}controller_kind"] = owner.get("kind", "")
        labels[f"{PREFIX}controller_name"] = owner.get("name", "")
    for kind, values in (("label", meta.get("labels")), ("annotation", meta.get("annotations"))):
        for key, value in (values or {}).items():
            labels[f"{PREFIX}{kind}_{sanitize(key)}"] = value
            labels[f"{PREFIX}{kind}present_{sanitize(key)}"] = "true"
    return labels


def pod_groups(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """HTTP SD target groups of one pod: one per container port, or per container without
    ports (address: the pod IP alone), init containers included; none without a pod IP."""
    status = pod.get("status", {})
    ip = status.get("podIP")
    if not ip:
        return []
    common = _pod_labels(pod)
    ids = {
        s["name"]: s.get("containerID", "")
        for key in ("containerStatuses", "initContainerStatuses")
        for s in status.get(key) or []
    }
    spec = pod.get("spec", {})
    containers = [(c, "false") for c in spec.get("containers", [])]
    containers += [(c, "true") for c in spec.get("initContainers") or []]
    groups: list[dict[str, Any]] = []
    for container, init in containers:
        base = {
            **common,
            f"{PREFIX}container_name": container["name"],
            f"{PREFIX}container_image": container.get("image", ""),
            f"{PREFIX}container_init": init,
            f"{PREFIX}container_id": ids.get(container["name"], ""),
        }
        ports = container.get("ports") or []
        if not ports:
            groups.append({"targets": [ip], "labels": base})
        for port in ports:
            number = str(port["containerPort"])
            host = f"[{ip}]" if ":" in ip else ip
            labels = {
                **base,
                f"{PREFIX}container_port_name": port.get("name", ""),
                f"{PREFIX}container_port_number": number,
                f"{PREFIX}container_port_protocol": port.get("protocol", "TCP"),
            }
            groups.append({"targets": [f"{host}:{number}"], "labels": labels})
    return groups


def target_groups(pods: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [group for pod in pods for group in pod_groups(pod)]


class PodsApi(Protocol):
    """What the lister needs of :class:`~llm_operator_dev.devcluster.kubeapi.Api`."""

    def get(self, path: str) -> tuple[int, Any]: ...


class PodLister:
    """Lists pods, and shares one answer between requests less than a second apart."""

    def __init__(self, api: PodsApi) -> None:
        self.api = api
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._groups: list[dict[str, Any]] = []

    def list_pods(self, limit: int | None = None) -> list[dict[str, Any]]:
        path = "/api/v1/pods" + (f"?limit={limit}" if limit else "")
        try:
            status, body = self.api.get(path)
        except ApiError as err:
            raise LookupError(str(err)) from err
        if status != 200:
            reason = body.get("message", body) if isinstance(body, dict) else body
            raise LookupError(f"GET {path}: HTTP {status}: {reason}")
        items: list[dict[str, Any]] = body.get("items", [])
        return items

    def groups(self) -> list[dict[str, Any]]:
        with self._lock:
            if time.monotonic() - self._at > CACHE_SECONDS:
                self._groups = target_groups(self.list_pods())
                self._at = time.monotonic()
            return self._groups


def _handler(lister: PodLister) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                if self.path == "/targets":
                    self._answer(200, json.dumps(lister.groups()), "application/json")
                elif self.path == "/healthz":
                    lister.list_pods(limit=1)
                    self._answer(200, "ok\n", "text/plain")
                else:
                    self._answer(404, "not found\n", "text/plain")
            except LookupError as err:
                # Prometheus keeps the targets it had when discovery fails, and logs this.
                self.log_message("%s: %s", self.path, err)
                self._answer(503, f"{err}\n", "text/plain")

        def _answer(self, code: int, text: str, content_type: str) -> None:
            payload = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            pass  # two polls every 2 s would drown the log; errors still go to it

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_operator_dev.devcluster.prometheus_sd")
    parser.add_argument("--server", required=True, help="API server URL")
    parser.add_argument("--ca", type=Path, required=True, help="cluster CA certificate")
    parser.add_argument("--cert", type=Path, required=True, help="client certificate")
    parser.add_argument("--key", type=Path, required=True, help="client key")
    parser.add_argument("--listen", default="127.0.0.1:19091", help="host:port to serve on")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    api = Api(args.server, args.ca, args.cert, args.key, timeout=5.0)
    server = ThreadingHTTPServer((host, int(port)), _handler(PodLister(api)))
    print(f"serving pod targets on http://{args.listen}/targets", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
