"""``llm-operator dev cluster up|down|status|env``: the local control plane's command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llm_operator_dev.devcluster import cluster, prometheus
from llm_operator_dev.devcluster.layout import Layout, LayoutError
from llm_operator_dev.devcluster.pki import PKIError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-operator dev",
        description="A real Kubernetes control plane on loopback (etcd, kube-apiserver, "
        "kube-controller-manager, kube-scheduler, kwok), built from source into a cache.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="cache folder (default $LLMOP_CACHE_DIR or ~/.cache/llm-operator)",
    )
    top = parser.add_subparsers(dest="area", required=True)
    cl = top.add_parser("cluster", help="the local cluster").add_subparsers(
        dest="action", required=True
    )
    up = cl.add_parser("up", help="build if needed, start, create fake GPU nodes (idempotent)")
    up.add_argument("--no-build", action="store_true", help="fail instead of building")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds per readiness wait")
    down = cl.add_parser("down", help="stop every process `up` started")
    down.add_argument("--keep-data", action="store_true", help="keep etcd's data for next `up`")
    st = cl.add_parser("status", help="processes, health and nodes; exit 0 only if all is up")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    cl.add_parser("env", help='shell exports: eval "$(llm-operator dev cluster env)"')
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        layout = Layout.discover(args.cache_dir)
        if args.action == "up":
            with cluster.locked(layout):
                cluster.up(layout, allow_build=not args.no_build, timeout=args.timeout)
            return 0
        if args.action == "down":
            with cluster.locked(layout):
                cluster.down(layout, keep_data=args.keep_data)
            return 0
        if args.action == "status":
            st = cluster.status(layout)
            print(json.dumps(st, indent=2) if args.json else cluster.format_status(st))
            return 0 if st["up"] else 1
        if args.action == "env":
            print("\n".join(cluster.env_lines(layout)))
            return 0
    except (cluster.ClusterError, LayoutError, PKIError, prometheus.PrometheusError) as err:
        print(f"llm-operator dev cluster {args.action}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; `llm-operator dev cluster down` stops it all", file=sys.stderr)
        return 130
    return 2
