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
