"""A fault-injecting HTTP proxy in front of the API server, for the drills.

The operator under test gets a kubeconfig whose server is this proxy (plain HTTP on
127.0.0.1); the proxy forwards each request to the real API server over TLS with the
cluster's admin credentials, streaming answers (watches) through as they come. The test
switches faults on and off while it runs:

- ``outage``: every connection is reset at once, and open streams are cut (the API is gone);
- ``error_ratio`` / ``error_status``: that share of requests answered 429 or 500 with
  ``Retry-After`` (the API server's own shape: a Status object);
- ``reset_ratio``: that share of requests reset before an answer;
- ``delay``: seconds added before each answer;
- ``cut_watches()``: cut every open watch stream now; ``gone_ratio``: that share of watch
  requests answered with a single ERROR event of 410 Gone (an expired resourceVersion).

Every request is counted per second, so a test can bound the operator's rate during an outage.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import random
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

HOP_BY_HOP = {
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
    "upgrade", "proxy-connection", "te", "trailer", "host",
}  # fmt: skip


class FaultProxy:
    def __init__(self, kubeconfig: Path, seed: int = 17) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        self.upstream = cluster["server"].rstrip("/")
        self._dir = tempfile.TemporaryDirectory(prefix="faultproxy-")
        folder = Path(self._dir.name)
        files = {}
        for key, name in (
            ("certificate-authority-data", "ca.crt"),
            ("client-certificate-data", "client.crt"),
            ("client-key-data", "client.key"),
        ):
            data = cluster.get(key) if key.startswith("certificate-authority") else user.get(key)
            assert data, f"the kubeconfig has no {key}: the proxy needs the admin's certificates"
            (folder / name).write_bytes(base64.b64decode(data))
            files[name] = str(folder / name)
        self._tls = ssl.create_default_context(cafile=files["ca.crt"])
        self._tls.load_cert_chain(files["client.crt"], files["client.key"])
        self.outage = False
        self.error_ratio = 0.0
        self.error_status = 429
        self.reset_ratio = 0.0
        self.gone_ratio = 0.0
        self.delay = 0.0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.per_second: collections.Counter[int] = collections.Counter()
        self.injected: collections.Counter[str] = collections.Counter()
        self._streams: dict[int, web.Request] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="faultproxy", daemon=True)
        self.port = 0
        self._thread.start()
        assert self._ready.wait(10), "the fault proxy did not start"

    # -- the test's side ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig that reaches the API server only through this proxy."""
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "proxy", "cluster": {"server": self.url}}],
                    "users": [{"name": "proxy", "user": {}}],
                    "contexts": [
                        {"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}
                    ],
                    "current-context": "proxy",
                }
            )
        )
        return path

    def requests_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(n for second, n in self.per_second.items() if start <= second < end)

    def busiest_second(self, start: float, end: float) -> int:
        with self._lock:
            return max(
                (n for second, n in self.per_second.items() if start <= second < end), default=0
            )

    def cut_watches(self) -> None:
        self._loop.call_soon_threadsafe(self._cut)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._dir.cleanup()

    # -- the proxy ---------------------------------------------------------------------------

    def _cut(self) -> None:
        for request in list(self._streams.values()):
            if request.transport is not None:
                request.transport.abort()
        self.injected["cut"] += len(self._streams)
        self._streams.clear()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        # A reset connection is the point; aiohttp would log each answer it could not send.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = int(runner.addresses[0][1])
        self._session = self._loop.run_until_complete(self._client())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._session.close())
        self._loop.run_until_complete(runner.cleanup())

    async def _client(self) -> aiohttp.ClientSession:  # made inside the loop it runs on
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._tls, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )

    def _chance(self, ratio: float) -> bool:
        return ratio > 0 and self._random.random() < ratio

    def _reset(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=503)  # never sent: the connection is gone

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.per_second[int(time.time())] += 1
        watch = request.query.get("watch") in {"true", "1"}
        if self.outage:
            self.injected["outage"] += 1
            return self._reset(request)
        if self._chance(self.reset_ratio):
            self.injected["reset"] += 1
            return self._reset(request)
        if self._chance(self.error_ratio):
            self.injected[str(self.error_status)] += 1
            status = {
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "injected by the drill", "code": self.error_status,
                "reason": "TooManyRequests" if self.error_status == 429 else "InternalError",
                "details": {"retryAfterSeconds": 1},
            }  # fmt: skip
            return web.json_response(status, status=self.error_status, headers={"Retry-After": "1"})
        if watch and self._chance(self.gone_ratio):
            self.injected["410"] += 1
            event = {
                "type": "ERROR",
                "object": {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                    "reason": "Expired", "message": "too old resource version (injected)",
                },
            }  # fmt: skip
            return web.Response(
                body=(json.dumps(event) + "\n").encode(), content_type="application/json"
            )
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Accept-Encoding"] = "identity"
        body = await request.read()
        url = self.upstream + request.rel_url.path_qs
        try:
            upstream = await self._session.request(
                request.method, url, headers=headers, data=body or None
            )
        except aiohttp.ClientError:
            return self._reset(request)
        async with upstream:
            answer = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
            )
            await answer.prepare(request)
            if watch:
                self._streams[id(request)] = request
            try:
                async for chunk in upstream.content.iter_any():
                    if self.outage:  # the API went away mid-answer
                        return self._reset(request)
                    await answer.write(chunk)
                await answer.write_eof()
            except (ConnectionResetError, aiohttp.ClientError, RuntimeError):
                pass
            finally:
                self._streams.pop(id(request), None)
        return answer

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
