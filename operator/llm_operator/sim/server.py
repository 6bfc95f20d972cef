"""Run a simulator: bind, write the port file, log stats now and then, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
from pathlib import Path

from llm_operator.sim.app import SimApp
from llm_operator.sim.config import SimConfig
from llm_operator.sim.http import HttpConnection, serve

log = logging.getLogger("llm_operator.sim")

STATS_INTERVAL_S = 10.0


class SimServer:
    """One simulator listening on a socket; usable in-process (tests) or from the CLI."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.app = SimApp(cfg)
        self._server: asyncio.Server | None = None
        self._connections: set[HttpConnection] = set()
        self._stats: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        self._server, self._connections = await serve(self.app.handle, self.cfg.host, self.cfg.port)
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else self.cfg.port
        self.app.start_loading(asyncio.get_running_loop())
        if self.cfg.port_file:
            _write_atomically(Path(self.cfg.port_file), f"{self.port}\n")
        self._stats = asyncio.create_task(self._log_stats())
        log.info(
            "vLLM simulator serving %s as %s on http://%s:%d (max-num-seqs %d, max-model-len %d)",
            self.cfg.model,
            ", ".join(self.cfg.served_names),
            self.cfg.host,
            self.port,
            self.cfg.max_num_seqs,
            self.cfg.max_model_len,
        )

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let running and waiting requests finish for up to `timeout` s.

        Like uvicorn under vLLM on SIGTERM: a rolling update or scale-down should not
        cut streams that can finish within the pod's grace period.
        """
        self.app.draining = True
        if self._server is not None:
            self._server.close()  # no new connections; open ones stay
        deadline = asyncio.get_running_loop().time() + timeout
        engine = self.app.engine
        # Hung work (hang mode, x-sim-fail: hang) never finishes: no point waiting on it.
        while engine.busy:
            if asyncio.get_running_loop().time() >= deadline:
                log.warning(
                    "drain timeout: cutting %d running and %d waiting requests",
                    engine.running,
                    len(engine.waiting),
                )
                break
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._stats is not None:
            self._stats.cancel()
            self._stats = None
        if self._server is not None:
            self._server.close()
            # Open streams are cut, as when a pod is killed; no waiting on clients.
            for conn in list(self._connections):
                conn.abort()
            await self._server.wait_closed()
            self._server = None

    async def _log_stats(self) -> None:
        # vLLM logs a line like this every few seconds; per-request logs would cost
        # too much at benchmark rates.
        last = (0.0, 0.0)
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            running, waiting, kv = self.app.engine.gauges()
            gen = self.app.engine.generated_total
            prompt = self.app.engine.prompt_total
            log.info(
                "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f "
                "tokens/s, Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%",
                (prompt - last[0]) / STATS_INTERVAL_S,
                (gen - last[1]) / STATS_INTERVAL_S,
                running,
                waiting,
                kv * 100,
            )
            last = (prompt, gen)


def _write_atomically(path: Path, text: str) -> None:
    # A reader polling for the file must never see it half-written.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


async def run(cfg: SimConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = SimServer(cfg)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down (draining for up to %gs)", cfg.drain_timeout)
        if cfg.drain_timeout > 0:
            # A second signal cuts the drain short.
            stop.clear()
            drain = asyncio.create_task(server.drain(cfg.drain_timeout))
            interrupted = asyncio.create_task(stop.wait())
            await asyncio.wait({drain, interrupted}, return_when=asyncio.FIRST_COMPLETED)
            drain.cancel()
            interrupted.cancel()
    finally:
        await server.stop()
