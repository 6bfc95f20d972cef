"""`llm-operator gateway`: run the OpenAI-compatible gateway.

llm-operator gateway --config /etc/llm-gateway/routes.yaml --port 8000 --metrics-port 9090
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from llm_operator.api.gateway_config import GatewayConfig
from llm_operator.gateway.accesslog import AccessLog, open_log
from llm_operator.gateway.discovery import Cluster, PodWatcher
from llm_operator.gateway.loader import ConfigError, fingerprint, load, read_api_key, watch
from llm_operator.gateway.metrics import Metrics
from llm_operator.gateway.routing import (
    BackendRegistry,
    RoutingTable,
    build_table,
    pod_selectors_in,
)
from llm_operator.gateway.server import Gateway

log = logging.getLogger("llm_operator.gateway")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llm-operator gateway", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="routing table file (YAML or JSON)")
    p.add_argument(
        "--edge",
        default=None,
        help="edge settings file (YAML: limits, client keys and their budgets); replaces the "
        "table's `edge`, and is watched like it",
    )
    p.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="listen port; 0 picks a free one")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics on this port only; by default /metrics is on --port",
    )
    p.add_argument("--log-format", choices=["json", "text"], default="json")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--access-log",
        choices=["on", "off"],
        default="on",
        help="one line per request on stdout (no bodies, no keys)",
    )
    p.add_argument(
        "--access-log-file",
        default=None,
        help="write the access log (the audit log) to this file, appending, instead of stdout",
    )
    p.add_argument(
        "--access-log-sample",
        type=float,
        default=1.0,
        help="share of requests that get an access-log line (0..1)",
    )
    p.add_argument(
        "--port-file",
        default=None,
        help="write the bound port(s) here as JSON once listening (for tests with --port 0)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=75.0,
        help="close client connections with no request in progress for this long (0: never)",
    )
    p.add_argument(
        "--upstream-idle-seconds",
        type=float,
        default=15.0,
        help="do not reuse a backend connection idle for longer than this (0: no limit)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM, wait this long for in-flight requests before exiting",
    )
    return p.parse_args(argv)


class App:
    """Wires the table file, discovery and the server; rebuilds the table on any change."""

    def __init__(self, args: argparse.Namespace, config: GatewayConfig) -> None:
        self.args = args
        self.config = config
        self.registry = BackendRegistry()
        self.metrics = Metrics()
        self.discovery: PodWatcher | None = None
        self.loop = asyncio.get_running_loop()
        table = self.build(config, None)
        stream: TextIO | None = None
        if args.access_log == "on":
            stream = open_log(args.access_log_file) if args.access_log_file else sys.stdout
        self.access_log = AccessLog(stream, args.log_format, args.access_log_sample)
        self.gateway = Gateway(
            self.loop,
            table,
            self.metrics,
            self.access_log,
            serve_metrics=args.metrics_port is None,
            idle_timeout=args.idle_timeout,
            upstream_idle_seconds=args.upstream_idle_seconds,
        )
        self.gateway.ready = self.ready

    def ready(self) -> bool:
        """Readiness: every pod selector the table names has finished its first list (a
        static-address table, or none yet, is ready at once)."""
        return self.discovery is None or self.discovery.ready()

    def build(self, config: GatewayConfig, previous: RoutingTable | None) -> RoutingTable:
        selectors = set(pod_selectors_in(config))
        if selectors and self.discovery is None:
            cluster = Cluster.in_cluster()
            if cluster is None:
                log.warning(
                    "the routing table names pods but the gateway is not running in a "
                    "cluster; those tracks use only their static addresses"
                )
            else:
                self.discovery = PodWatcher(cluster, self.on_pods)
        if self.discovery is not None:
            self.discovery.want(selectors)
        resolve = self.discovery.resolve if self.discovery is not None else None
        return build_table(config, self.registry, read_api_key, resolve, previous)

    def apply(self, config: GatewayConfig) -> None:
        try:
            table = self.build(config, self.gateway.table)
        except Exception as e:  # a bug in build must not take the gateway down
            log.exception("routing table rejected")
            self.on_error(str(e))
            return
        self.config = config
        self.gateway.set_table(table)
        self.registry.prune(table.backend_keys())
        self.metrics.inc(self.metrics.reloads, "success")
        log.info(
            "routing table loaded: generation %d, %d models", table.generation, len(table.models)
        )

    def on_error(self, _: str) -> None:
        self.metrics.inc(self.metrics.reloads, "error")

    def on_pods(self) -> None:
        table = self.build(self.config, self.gateway.table)
        self.gateway.set_table(table)
        self.registry.prune(table.backend_keys())


async def serve(args: argparse.Namespace) -> int:
    seen = fingerprint(args.config, None, args.edge)
    if not os.path.exists(args.config):
        # The operator writes the table once it has models; until then every model is unknown
        # (404), and the watcher loads the file as soon as it appears.
        log.warning("routing table %s does not exist yet; serving no models", args.config)
    try:
        config = load(args.config, args.edge, missing_ok=True)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    app = App(args, config)
    gw = app.gateway
    app.metrics.inc(app.metrics.reloads, "success")
    loop = app.loop
    server = await loop.create_server(
        gw.protocol, args.host, args.port, reuse_address=True, backlog=2048
    )
    servers = [server]
    ports = {"port": server.sockets[0].getsockname()[1]}
    metrics_gw: Gateway | None = None
    if args.metrics_port is not None:
        metrics_gw = Gateway(
            loop, gw.table, app.metrics, AccessLog(None), serve_metrics=True, metrics_only=True
        )
        metrics_gw.ready = app.ready
        ms = await loop.create_server(metrics_gw.protocol, args.host, args.metrics_port)
        servers.append(ms)
        ports["metricsPort"] = ms.sockets[0].getsockname()[1]
    app.access_log.start(loop)
    # Everything allocated so far (modules, the table) lives for the whole process: move it
    # out of the collector's generations so collections on the hot path stay short.
    gc.freeze()
    watcher = loop.create_task(
        watch(
            args.config,
            config,
            app.apply,
            app.on_error,
            seen=seen + fingerprint(args.config, config, args.edge)[len(seen) :],
            edge_path=args.edge,
        ),
        name="routing-table-watch",
    )
    log.info(
        "gateway listening on %s:%d with %d models", args.host, ports["port"], len(gw.table.models)
    )
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(json.dumps(ports))
        os.replace(tmp, args.port_file)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    gw.start_draining()
    if metrics_gw is not None:
        metrics_gw.start_draining()
    # Drain: stop accepting, let in-flight requests finish (Kubernetes sends SIGTERM while
    # the endpoint is being removed, so new connections can still arrive for a moment).
    for s in servers:
        s.close()
    deadline = time.monotonic() + args.drain_seconds
    while gw.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    watcher.cancel()
    if app.discovery is not None:
        await app.discovery.close()
    app.access_log.stop()
    for conn in list(gw.connections):
        conn.close()
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(args.log_level.upper())
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return int(asyncio.run(serve(args)))
    return int(uvloop.run(serve(args)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
