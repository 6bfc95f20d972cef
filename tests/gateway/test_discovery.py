"""Pod discovery: the pure pod -> backend rule, and the watcher against a fake API server on
loopback (list, then watch; bookmarks, resumes, 410 relists; readiness)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from llm_operator.api.gateway_config import GatewayConfig
from llm_operator.gateway.discovery import Cluster, PodWatcher, pod_backends
from llm_operator.gateway.routing import BackendRegistry, build_table

SELECTOR = "llmoperator.io/deployment=llama,llmoperator.io/track=stable"
HTTP = [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def _pod(
    name: str,
    ip: str | None,
    *,
    ready: bool | None = True,
    phase: str = "Running",
    deleting: bool = False,
    containers: list[dict[str, Any]] | None = None,
    version: str = "1",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": "ml",
        "resourceVersion": version,
        "labels": {"llmoperator.io/deployment": "llama", "llmoperator.io/track": "stable"},
        "annotations": annotations or {},
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {"phase": phase}
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    status["conditions"] = [{"type": "PodScheduled", "status": "True"}]
    if ready is not None:
        status["conditions"].append({"type": "Ready", "status": "True" if ready else "False"})
    spec = {
        "containers": containers if containers is not None else [{"name": "engine", "ports": HTTP}]
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": status}


@pytest.mark.parametrize(
    ("pods", "port", "expected"),
    [
        pytest.param([_pod("a", "10.0.0.1")], "http", [("10.0.0.1", 8000)], id="ready"),
        pytest.param([_pod("a", "10.0.0.1")], 9000, [("10.0.0.1", 9000)], id="number-as-is"),
        pytest.param([_pod("a", None)], "http", [], id="no-pod-ip"),
        pytest.param([_pod("a", "10.0.0.1", ready=False)], "http", [], id="not-ready"),
        pytest.param([_pod("a", "10.0.0.1", ready=None)], "http", [], id="no-ready-condition"),
        pytest.param([_pod("a", "10.0.0.1", phase="Pending")], "http", [], id="pending"),
        pytest.param([_pod("a", "10.0.0.1", phase="Succeeded")], "http", [], id="finished"),
        pytest.param([_pod("a", "10.0.0.1", deleting=True)], "http", [], id="terminating"),
        pytest.param([_pod("a", "10.0.0.1", containers=[])], "http", [], id="no-such-port"),
        pytest.param([_pod("a", "10.0.0.1")], "metrics", [], id="other-port-name"),
        pytest.param(
            [
                _pod(
                    "a",
                    "10.0.0.1",
                    containers=[
                        {"name": "proxy", "ports": [{"name": "admin", "containerPort": 15000}]},
                        {"name": "engine", "ports": [{"name": "http", "containerPort": 8001}]},
                    ],
                )
            ],
            "http",
            [("10.0.0.1", 8001)],
            id="named-port-in-second-container-protocol-defaults-to-tcp",
        ),
        pytest.param(
            [
                _pod(
                    "a",
                    "10.0.0.1",
                    containers=[
                        {"ports": [{"name": "http", "containerPort": 53, "protocol": "UDP"}]}
                    ],
                )
            ],
            "http",
            [],
            id="udp-port-is-not-http",
        ),
        pytest.param(
            [_pod("b", "10.0.0.2"), _pod("a", "10.0.0.1"), _pod("c", "10.0.0.3", ready=False)],
            "http",
            [("10.0.0.1", 8000), ("10.0.0.2", 8000)],
            id="sorted-ready-only",
        ),
        pytest.param([_pod("a", "fd00::5")], "http", [("fd00::5", 8000)], id="ipv6"),
        pytest.param([_pod("a", "127.1.3.7")], "http", [("127.1.3.7", 8000)], id="loopback-pod-ip"),
    ],
)
def test_pod_backends(
    pods: list[dict[str, Any]], port: int | str, expected: list[tuple[str, int]]
) -> None:
    assert pod_backends(pods, port) == expected


class FakeApiServer:
    """`GET /api/v1/namespaces/{ns}/pods`, list and watch, like the API server answers them:
    a list carries the collection's resourceVersion; a watch streams JSON lines from a script
    ("end" closes the stream, as the server does at timeoutSeconds)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.version = "5"
        self.events: asyncio.Queue[dict[str, Any] | str] = asyncio.Queue()
        self.watch_statuses: list[int] = []
        """HTTP statuses for the next watch requests (instead of a stream)."""
        self.lists: list[dict[str, str]] = []
        self.watches: list[dict[str, str]] = []
        self.auth: list[str] = []
        self.listed = asyncio.Event()
        self.stopped = asyncio.Event()
        self.runner: web.AppRunner | None = None

    async def pods(self, request: web.Request) -> web.StreamResponse:
        assert request.match_info["ns"] == "ml"
        self.auth.append(request.headers.get("Authorization", ""))
        query = dict(request.query)
        if query.get("watch") != "1":
            self.lists.append(query)
            self.listed.set()
            return web.json_response(
                {
                    "kind": "PodList",
                    "metadata": {"resourceVersion": self.version},
                    "items": self.items,
                }
            )
        self.watches.append(query)
        if self.watch_statuses:
            return web.json_response(
                {"kind": "Status", "code": 410}, status=self.watch_statuses.pop(0)
            )
        resp = web.StreamResponse()
        await resp.prepare(request)
        while not self.stopped.is_set():
            get = asyncio.ensure_future(self.events.get())
            stop = asyncio.ensure_future(self.stopped.wait())
            done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            for pending in (get, stop):
                if pending not in done:
                    pending.cancel()
            if get not in done:
                break
            event = get.result()
            if event == "end":
                break
            await resp.write(json.dumps(event).encode() + b"\n")
            if isinstance(event, dict) and event["type"] == "ERROR":
                break  # the API server ends a watch after its ERROR event
        return resp

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self.pods)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        self.stopped.set()
        if self.runner is not None:
            await self.runner.cleanup()


class Changes:
    """Counts on_change calls and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    async def next(self) -> None:
        await asyncio.wait_for(self.event.wait(), 5)
        self.event.clear()


def _token(tmp_path: Path) -> Path:
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    return token


async def _pods_api(handler: Any, tmp_path: Path) -> tuple[web.AppRunner, Cluster]:
    """A loopback API server answering the pods path with ``handler``, and a Cluster for it."""
    api = web.Application()
    api.router.add_get("/api/v1/namespaces/{ns}/pods", handler)
    runner = web.AppRunner(api)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, Cluster(f"http://127.0.0.1:{runner.addresses[0][1]}", _token(tmp_path), None)


async def _until(check: Any, what: str) -> None:
    for _ in range(250):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}")


@pytest.mark.timeout(30)
async def test_watch_follows_pods_as_they_come_go_and_change_readiness(tmp_path: Path) -> None:
    api = FakeApiServer()
    api.items = [_pod("p1", "10.0.0.1"), _pod("p0", "10.0.0.9", ready=False)]
    changes = Changes()
    watcher = PodWatcher(Cluster(await api.start(), _token(tmp_path), None), changes)

    def ips() -> list[str]:
        return [ip for ip, _ in watcher.resolve("ml", SELECTOR, "http")]

    try:
        watcher.want({("ml", SELECTOR)})
        await changes.next()
        assert watcher.ready()
        assert watcher.resolve("ml", SELECTOR, "http") == [("10.0.0.1", 8000)]
        assert api.lists[0]["labelSelector"] == SELECTOR
        assert api.auth[0] == "Bearer sa-token"
        await _until(lambda: api.watches, "a watch request")
        assert api.watches[0]["resourceVersion"] == "5"
        assert api.watches[0]["allowWatchBookmarks"] == "true"
        assert api.watches[0]["labelSelector"] == SELECTOR

        # A new pod is listed as soon as it is Ready, not when it is created.
        await api.events.put({"type": "ADDED", "object": _pod("p2", "10.0.0.2", version="6")})
        await changes.next()
        await api.events.put(
            {"type": "ADDED", "object": _pod("p3", None, phase="Pending", version="7")}
        )
        await changes.next()
        assert ips() == ["10.0.0.1", "10.0.0.2"]
        await api.events.put(
            {"type": "MODIFIED", "object": _pod("p3", "10.0.0.3", ready=False, version="8")}
        )
        await changes.next()
        assert ips() == ["10.0.0.1", "10.0.0.2"]
        await api.events.put({"type": "MODIFIED", "object": _pod("p3", "10.0.0.3", version="9")})
        await changes.next()
        assert ips() == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]

        # An update routing does not read rebuilds nothing; the next real one does.
        before = changes.count
        await api.events.put(
            {
                "type": "MODIFIED",
                "object": _pod("p3", "10.0.0.3", version="10", annotations={"a": "b"}),
            }
        )
        # A pod going unready leaves; a pod being deleted leaves at once, still Ready.
        await api.events.put(
            {"type": "MODIFIED", "object": _pod("p2", "10.0.0.2", ready=False, version="11")}
        )
        await changes.next()
        assert changes.count == before + 1
        assert ips() == ["10.0.0.1", "10.0.0.3"]
        await api.events.put(
            {"type": "MODIFIED", "object": _pod("p1", "10.0.0.1", deleting=True, version="12")}
        )
        await changes.next()
        assert ips() == ["10.0.0.3"]
        await api.events.put({"type": "DELETED", "object": _pod("p3", "10.0.0.3", version="13")})
        await changes.next()
        assert ips() == []

        # The server ends the watch (timeoutSeconds): it goes on from the last version seen,
        # a bookmark's included, without listing again.
        await api.events.put(
            {"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "20"}}}
        )
        await api.events.put("end")
        await _until(lambda: len(api.watches) == 2, "a second watch")
        assert api.watches[1]["resourceVersion"] == "20"
        assert len(api.lists) == 1

        # 410 Gone as an ERROR event: list again, and the list replaces what was known.
        api.listed.clear()
        api.items = [_pod("p4", "10.0.0.4")]
        api.version = "30"
        await api.events.put(
            {
                "type": "ERROR",
                "object": {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": "too old resource version: 20 (25)",
                    "reason": "Expired",
                    "code": 410,
                },
            }
        )
        await asyncio.wait_for(api.listed.wait(), 5)
        await changes.next()
        assert ips() == ["10.0.0.4"]
        await _until(lambda: len(api.watches) == 3, "a watch after the relist")
        assert api.watches[2]["resourceVersion"] == "30"

        # 410 as the watch's HTTP status: list again too.
        api.listed.clear()
        api.watch_statuses = [410]
        api.items = [_pod("p4", "10.0.0.4"), _pod("p5", "10.0.0.5")]
        api.version = "40"
        await api.events.put("end")
        await asyncio.wait_for(api.listed.wait(), 5)
        await changes.next()
        assert ips() == ["10.0.0.4", "10.0.0.5"]
        assert len(api.lists) == 3
        await _until(lambda: len(api.watches) == 5, "a watch after the second relist")
        assert api.watches[4]["resourceVersion"] == "40"

        # The routing table puts the pods beside the static addresses.
        cfg = GatewayConfig.model_validate(
            {
                "models": [
                    {
                        "name": "m",
                        "tracks": [
                            {
                                "name": "stable",
                                "weight": 1,
                                "addresses": ["10.9.9.9:8000"],
                                "pods": {
                                    "namespace": "ml",
                                    "matchLabels": {
                                        "llmoperator.io/track": "stable",
                                        "llmoperator.io/deployment": "llama",
                                    },
                                    "port": "http",
                                },
                            }
                        ],
                    }
                ]
            }
        )
        table = build_table(cfg, BackendRegistry(), lambda f: None, watcher.resolve)
        keys = [b.key for b in table.models["m"].tracks[0].backends]
        assert keys == ["10.9.9.9:8000", "10.0.0.4:8000", "10.0.0.5:8000"]

        # A selector the table no longer names is forgotten.
        watcher.want(set())
        assert watcher.resolve("ml", SELECTOR, "http") == [] and watcher.ready()
    finally:
        await watcher.close()
        await api.stop()


async def _get(port: int, path: str, method: str = "GET") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 3)
    finally:
        writer.close()


def _pods_table(*apps: str) -> GatewayConfig:
    models = [
        {
            "name": app,
            "tracks": [
                {
                    "name": "stable",
                    "weight": 1,
                    "pods": {"namespace": "ml", "matchLabels": {"app": app}, "port": "http"},
                }
            ],
        }
        for app in apps
    ]
    return GatewayConfig.model_validate({"models": models})


@pytest.mark.timeout(30)
async def test_not_ready_until_every_pod_selector_has_its_first_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm_operator.gateway import cli

    gates = {"app=llama": asyncio.Event(), "app=small": asyncio.Event()}
    stop = asyncio.Event()

    async def pods(request: web.Request) -> web.StreamResponse:
        selector = request.query["labelSelector"]
        if request.query.get("watch") != "1":
            await gates[selector].wait()  # the API server is slow to answer the first list
            return web.json_response({"metadata": {"resourceVersion": "1"}, "items": []})
        resp = web.StreamResponse()
        await resp.prepare(request)
        await stop.wait()
        return resp

    runner, cluster = await _pods_api(pods, tmp_path)
    monkeypatch.setattr(Cluster, "in_cluster", classmethod(lambda _cls: cluster))

    args = cli.parse_args(["--config", str(tmp_path / "routes.yaml"), "--access-log", "off"])
    app = cli.App(args, _pods_table("llama"))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(app.gateway.protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def status(path: str, method: str = "GET") -> bytes:
        return (await _get(port, path, method)).split(b"\r\n", 1)[0]

    async def wait_ready() -> None:
        await _until(app.ready, "ready")

    try:
        await asyncio.sleep(0.1)  # the list is in flight
        assert await status("/healthz") == b"HTTP/1.1 503 Service Unavailable"
        assert await status("/readyz") == b"HTTP/1.1 503 Service Unavailable"
        assert await status("/healthz", "HEAD") == b"HTTP/1.1 503 Service Unavailable"
        assert await status("/health") == b"HTTP/1.1 200 OK"  # liveness never waits

        gates["app=llama"].set()
        await wait_ready()
        assert await status("/healthz") == b"HTTP/1.1 200 OK"
        assert await status("/readyz") == b"HTTP/1.1 200 OK"

        # A reload naming new pods: not ready until those have listed too.
        app.apply(_pods_table("llama", "small"))
        assert await status("/healthz") == b"HTTP/1.1 503 Service Unavailable"
        gates["app=small"].set()
        await wait_ready()
        assert await status("/healthz") == b"HTTP/1.1 200 OK"

        # A table with only static addresses is ready at once.
        app.apply(
            GatewayConfig.model_validate(
                {
                    "models": [
                        {
                            "name": "m",
                            "tracks": [
                                {"name": "stable", "weight": 1, "addresses": ["127.0.0.1:1"]}
                            ],
                        }
                    ]
                }
            )
        )
        assert await status("/healthz") == b"HTTP/1.1 200 OK"
    finally:
        stop.set()
        for gate in gates.values():
            gate.set()
        server.close()
        if app.discovery is not None:
            await app.discovery.close()
        await runner.cleanup()


async def test_ready_at_once_without_pods() -> None:
    from llm_operator.gateway import cli

    args = cli.parse_args(["--config", "/nonexistent/routes.yaml", "--access-log", "off"])
    app = cli.App(args, GatewayConfig())  # no table yet
    assert app.discovery is None and app.ready()
    assert app.gateway.ready is not None and app.gateway.ready()


@pytest.mark.timeout(30)
async def test_pods_it_may_not_read_count_as_listed_with_no_backends(tmp_path: Path) -> None:
    """A 403 lasts until someone changes the RBAC: readiness must not wait for it."""
    calls: list[str] = []

    async def forbidden(request: web.Request) -> web.StreamResponse:
        calls.append(request.match_info["ns"])
        return web.json_response({"kind": "Status", "code": 403}, status=403)

    runner, cluster = await _pods_api(forbidden, tmp_path)
    changes = Changes()
    watcher = PodWatcher(cluster, changes)
    try:
        watcher.want({("elsewhere", "app=llama")})
        await _until(watcher.ready, "ready despite the 403")
        assert watcher.resolve("elsewhere", "app=llama", 8000) == []
        assert calls == ["elsewhere"]
        await _until(lambda: len(calls) >= 2, "a retry")  # and it keeps trying (backoff 1 s)
    finally:
        await watcher.close()
        await runner.cleanup()
