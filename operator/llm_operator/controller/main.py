"""`llm-operator run`: the operator process.

Settings come from flags, each with an environment variable for Deployments:
namespaces to watch (or all), log level and format, liveness and metrics ports, peering.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import random
import sys

import kopf
from prometheus_client import start_http_server

from llm_operator.controller.reconciler import Controller
from llm_operator.controller.routes import RoutesWriter
from llm_operator.controller.watches import register
from llm_operator.kube.client import API_CONCURRENCY, KubeClient
from llm_operator.kube.resources import CHILD_KINDS
from llm_operator.render import RenderConfig


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="llm-operator run", description=__doc__)
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[n for n in env("LLMOP_NAMESPACES", "").split(",") if n],
        help="namespace to watch; repeat for several (env LLMOP_NAMESPACES, comma-separated)",
    )
    parser.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="watch every namespace (the default when no --namespace is given)",
    )
    parser.add_argument("--log-level", default=env("LLMOP_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format", choices=["json", "text"], default=env("LLMOP_LOG_FORMAT", "text")
    )
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=int(env("LLMOP_LIVENESS_PORT", "8080")),
        help="serve /healthz here (0 to disable)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env("LLMOP_METRICS_PORT", "9090")),
        help="serve Prometheus /metrics here (0 to disable)",
    )
    parser.add_argument(
        "--peering",
        default=env("LLMOP_PEERING", ""),
        help="kopf peering name for a second replica (needs kopf's peering CRDs); "
        "without it the operator runs standalone",
    )
    parser.add_argument(
        "--keda",
        action="store_true",
        default=env("LLMOP_KEDA", "") == "true",
        help="also watch KEDA ScaledObjects (KEDA's CRDs must be installed)",
    )
    parser.add_argument("--cluster-domain", default=env("LLMOP_CLUSTER_DOMAIN", "cluster.local"))
    parser.add_argument(
        "--gateway-namespace",
        default=env("LLMOP_GATEWAY_NAMESPACE", ""),
        help="write the gateway's routing table into a ConfigMap in this namespace "
        "(off when empty; the Helm chart sets it)",
    )
    parser.add_argument(
        "--routes-configmap",
        default=env("LLMOP_ROUTES_CONFIGMAP", "llm-operator-routes"),
        help="name of the routing-table ConfigMap",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    kopf.configure(
        debug=args.log_level.upper() == "DEBUG",
        # kopf's INFO lines say "handler succeeded" for every watch event: noise at scale.
        verbose=False,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    logging.getLogger().setLevel(args.log_level.upper())
    if args.metrics_port:
        start_http_server(args.metrics_port)
    client = KubeClient()
    config = RenderConfig(cluster_domain=args.cluster_domain, keda_enabled=args.keda)
    routes = (
        RoutesWriter(client, args.gateway_namespace, args.routes_configmap)
        if args.gateway_namespace
        else None
    )
    controller = Controller(client=client, config=config, routes=routes)
    registry = kopf.OperatorRegistry()
    child_kinds = [k.kind for k in CHILD_KINDS if k.kind != "ScaledObject" or args.keda]
    namespaces = [] if args.all_namespaces else list(dict.fromkeys(args.namespace))
    register(registry, controller, namespaces, child_kinds)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None

    async def operate() -> None:
        # Blocking API calls run in this pool, as many at once as the client has connections.
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(API_CONCURRENCY, "llm-operator-api")
        )
        await kopf.operator(
            registry=registry,
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=not args.peering,
            peering_name=args.peering or None,
            # Peers of equal priority all keep working; distinct ones make a real standby.
            priority=random.SystemRandom().randint(1, 1_000_000) if args.peering else None,
            liveness_endpoint=liveness,
        )

    try:
        asyncio.run(operate())
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
