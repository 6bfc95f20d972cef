"""EndpointSlice discovery against a fake API server on loopback (list, then watch)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from llm_operator.api.gateway_config import GatewayConfig
from llm_operator.gateway.discovery import Cluster, EndpointSliceWatcher
from llm_operator.gateway.routing import BackendRegistry, build_table


def _slice(name: str, ips: list[str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "llama"}},
        "ports": [{"name": "http", "port": 8000}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
    }


@pytest.mark.timeout(30)
async def test_watch_follows_endpointslice_changes(tmp_path: Path) -> None:
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    seen_auth: list[str] = []
    seen_selectors: list[str] = []

    async def endpointslices(request: web.Request) -> web.StreamResponse:
        seen_auth.append(request.headers.get("Authorization", ""))
        seen_selectors.append(request.query.get("labelSelector", ""))
        assert request.match_info["ns"] == "ml"
        if request.query.get("watch") != "1":
            return web.json_response(
                {"metadata": {"resourceVersion": "5"}, "items": [_slice("s1", ["10.0.0.1"])]}
            )
        assert request.query["resourceVersion"] == "5"
        resp = web.StreamResponse()
        await resp.prepare(request)
        while (ev := await events.get()) is not None:
            await resp.write(json.dumps(ev).encode() + b"\n")
        return resp

    app = web.Application()
    app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", endpointslices)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    changed = asyncio.Event()
    watcher = EndpointSliceWatcher(
        Cluster(f"http://127.0.0.1:{port}", token, None), on_change=changed.set
    )
    try:
        watcher.want({("ml", "llama")})
        await asyncio.wait_for(changed.wait(), 5)
        assert watcher.resolve("ml", "llama", "http") == [("10.0.0.1", 8000)]
        changed.clear()
        await events.put({"type": "ADDED", "object": _slice("s2", ["10.0.0.2", "10.0.0.3"])})
        await asyncio.wait_for(changed.wait(), 5)
        assert [a for a, _ in watcher.resolve("ml", "llama", "http")] == [
            "10.0.0.1",
            "10.0.0.2",
            "10.0.0.3",
        ]
        changed.clear()
        await events.put({"type": "DELETED", "object": _slice("s1", [])})
        await asyncio.wait_for(changed.wait(), 5)
        assert [a for a, _ in watcher.resolve("ml", "llama", 8000)] == ["10.0.0.2", "10.0.0.3"]
        assert seen_auth[0] == "Bearer sa-token"
        assert seen_selectors[0] == "kubernetes.io/service-name=llama"

        # The routing table picks the endpoints up beside the static addresses.
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
                                "service": {"namespace": "ml", "name": "llama", "port": "http"},
                            }
                        ],
                    }
                ]
            }
        )
        table = build_table(cfg, BackendRegistry(), lambda f: None, watcher.resolve)
        keys = [b.key for b in table.models["m"].tracks[0].backends]
        assert keys == ["10.9.9.9:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
    finally:
        await events.put(None)  # end the watch stream so the server can shut down
        await watcher.close()
        await runner.cleanup()


async def _get(port: int, path: str, method: str = "GET") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 3)
    finally:
        writer.close()


def _service_table(*services: str) -> GatewayConfig:
    models = [
        {
            "name": name,
            "tracks": [
                {
                    "name": "stable",
                    "weight": 1,
                    "service": {"namespace": "ml", "name": name, "port": "http"},
                }
            ],
        }
        for name in services
    ]
    return GatewayConfig.model_validate({"models": models})


@pytest.mark.timeout(30)
async def test_not_ready_until_every_service_has_its_first_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm_operator.gateway import cli

    gates = {"llama": asyncio.Event(), "small": asyncio.Event()}
    stop = asyncio.Event()

    async def endpointslices(request: web.Request) -> web.StreamResponse:
        name = request.query["labelSelector"].split("=", 1)[1]
        if request.query.get("watch") != "1":
            await gates[name].wait()  # the API server is slow to answer the first list
            return web.json_response({"metadata": {"resourceVersion": "1"}, "items": []})
        resp = web.StreamResponse()
        await resp.prepare(request)
        await stop.wait()
        return resp

    api = web.Application()
    api.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", endpointslices)
    runner = web.AppRunner(api)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    cluster = Cluster(f"http://127.0.0.1:{runner.addresses[0][1]}", token, None)
    monkeypatch.setattr(Cluster, "in_cluster", classmethod(lambda _cls: cluster))

    args = cli.parse_args(["--config", str(tmp_path / "routes.yaml"), "--access-log", "off"])
    app = cli.App(args, _service_table("llama"))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(app.gateway.protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def status(path: str, method: str = "GET") -> bytes:
        return (await _get(port, path, method)).split(b"\r\n", 1)[0]

    async def wait_ready() -> None:
        for _ in range(200):
            if app.ready():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("never ready")

    try:
        await asyncio.sleep(0.1)  # the list is in flight
        assert await status("/healthz") == b"HTTP/1.1 503 Service Unavailable"
        assert await status("/readyz") == b"HTTP/1.1 503 Service Unavailable"
        assert await status("/healthz", "HEAD") == b"HTTP/1.1 503 Service Unavailable"
        assert await status("/health") == b"HTTP/1.1 200 OK"  # liveness never waits

        gates["llama"].set()
        await wait_ready()
        assert await status("/healthz") == b"HTTP/1.1 200 OK"
        assert await status("/readyz") == b"HTTP/1.1 200 OK"

        # A reload naming a new Service: not ready until that one has listed too.
        app.apply(_service_table("llama", "small"))
        assert await status("/healthz") == b"HTTP/1.1 503 Service Unavailable"
        gates["small"].set()
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


async def test_ready_at_once_without_services() -> None:
    from llm_operator.gateway import cli

    args = cli.parse_args(["--config", "/nonexistent/routes.yaml", "--access-log", "off"])
    app = cli.App(args, GatewayConfig())  # no table yet
    assert app.discovery is None and app.ready()
    assert app.gateway.ready is not None and app.gateway.ready()
