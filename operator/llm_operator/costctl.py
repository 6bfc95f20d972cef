"""`llm-operator cost [-n NS | -A] [--output table|csv|json] [--gpu-hour-price P]`: what each
LLMDeployment's engines cost, from status.cost (written by the operator, docs/operations.md).

Read only: one LIST of LLMDeployments (the `get`/`list` the aggregated view role grants).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import kubernetes

from llm_operator.api import GROUP, PLURAL, VERSION
from llm_operator.cost import cost_rows, format_rows
from llm_operator.rolloutctl import api_client


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llm-operator cost", description=__doc__)
    parser.add_argument("-n", "--namespace", help="default: the kubeconfig context's")
    parser.add_argument("-A", "--all-namespaces", action="store_true")
    parser.add_argument("-o", "--output", choices=["table", "csv", "json"], default="table")
    parser.add_argument(
        "--gpu-hour-price",
        type=float,
        help="price of a GPU-hour for the per-million column (default: the operator's)",
    )
    parser.add_argument("--kubeconfig", help="default: KUBECONFIG or ~/.kube/config")
    parser.add_argument("--context", help="kubeconfig context")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    api, namespace = api_client(args)
    objects = kubernetes.client.CustomObjectsApi(api)
    listed: Any
    if args.all_namespaces:
        listed = objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    else:
        listed = objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    rows = cost_rows(listed.get("items") or [], args.gpu_hour_price)
    sys.stdout.write(format_rows(rows, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
