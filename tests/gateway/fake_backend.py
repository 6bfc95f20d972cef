"""A tiny OpenAI-compatible backend on loopback for tests that need to see what arrives.

The gateway's integration tests use the project's vLLM simulator; this fake stands in for an
*external* provider (to check the API key and rewritten model it receives), and answers
deterministically so byte-level comparisons are easy.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeBackend:
    name: str = "fake"
    mode: str = "ok"  # ok | 500 | 429 | hang | disconnect-after:N
    chunks: int = 5
    delay: float = 0.001
    """Seconds between streamed chunks (and before the first one)."""
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> FakeBackend:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(Seen(request.path, dict(request.headers), body))
        if self.mode == "500":
            return web.json_response({"error": {"message": "boom", "code": 500}}, status=500)
        if self.mode == "429":
            return web.json_response(
                {"error": {"message": "busy", "code": 429}},
                status=429,
                headers={"Retry-After": "1"},
            )
        if self.mode == "hang":
            await asyncio.sleep(3600)
        model = body.get("model")
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": f"hello from {self.name}"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        cut = int(self.mode.split(":")[1]) if self.mode.startswith("disconnect-after:") else -1
        for i in range(self.chunks):
            if i == cut:
                assert request.transport is not None
                request.transport.abort()
                return resp
            chunk = {
                "id": "cmpl-1",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
            }
            await asyncio.sleep(self.delay)
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
