"""`llm-operator rollout status|promote|abort|pause|resume NAME`, also `kubectl llmd rollout ...`.

A command is the annotation `llmoperator.io/rollout-command` on the LLMDeployment: the
operator acts on it at its next reconcile and removes it. The spec is never touched, so Argo CD
and Flux see no drift (docs/canary.md); RBAC is the `patch` on llmdeployments that the
aggregated edit role already grants.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from llm_operator.constants import ANNOTATION_ROLLOUT_COMMAND
from llm_operator.kube.client import KubeClient
from llm_operator.kube.transport import ApiError, Connection, from_configuration
from llm_operator.rollout import COMMANDS

ACTIVE_PHASES = ("Progressing", "Paused", "Promoting", "Draining")
#: Which canary phases each command makes sense in.
ACCEPTS = {
    "promote": ("Progressing", "Paused"),
    "abort": ("Progressing", "Paused"),
    "pause": ("Progressing",),
    "resume": ("Paused",),
}
WAIT_SECONDS = 30.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llm-operator rollout", description=__doc__)
    parser.add_argument("action", choices=["status", *COMMANDS])
    parser.add_argument("name", help="the LLMDeployment")
    parser.add_argument("-n", "--namespace", help="default: the kubeconfig context's")
    parser.add_argument("--kubeconfig", help="default: KUBECONFIG or ~/.kube/config")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the request is recorded, without waiting for the operator",
    )
    return parser.parse_args(argv)


def api_client(args: argparse.Namespace) -> tuple[kubernetes.client.ApiClient, str]:
    """An API client from --kubeconfig/--context (or in-cluster) and the namespace to use:
    --namespace, else the context's, else default. Shared by the CLI commands."""
    configuration = kubernetes.client.Configuration()
    namespace = args.namespace
    try:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=args.kubeconfig, context=args.context, client_configuration=configuration
        )
        if namespace is None:
            _, active = kubernetes.config.list_kube_config_contexts(args.kubeconfig)  # type: ignore[no-untyped-call]
            namespace = (active or {}).get("context", {}).get("namespace")
    except (kubernetes.config.ConfigException, FileNotFoundError, TypeError):
        kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return kubernetes.client.ApiClient(configuration), namespace or "default"


def _client(args: argparse.Namespace) -> tuple[KubeClient, str]:
    api, namespace = api_client(args)
    return KubeClient(Connection(from_configuration(api.configuration))), namespace


def describe(body: dict[str, Any]) -> str:
    """What `status` prints: the canary's phase, step, weight, revisions and last analysis."""
    status = body.get("status") or {}
    canary = status.get("canary") or {}
    name = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
    strategy = ((body.get("spec") or {}).get("rollout") or {}).get("strategy", "RollingUpdate")
    lines = [f"LLMDeployment {name}: {status.get('phase', 'Unknown')} ({strategy})"]
    lines.append(f"  stable revision: {status.get('revision', '-')}")
    condition = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "CanaryProgressing"), None
    )
    if canary:
        steps = len(
            (((body.get("spec") or {}).get("rollout") or {}).get("canary") or {}).get("steps") or []
        )
        lines.append(
            f"  canary: {canary.get('phase')} revision {canary.get('revision')}, "
            f"step {int(canary.get('step', 0)) + 1}/{steps}, weight {canary.get('weight', 0)}%, "
            f"failed analyses {canary.get('failedAnalyses', 0)}"
        )
        if canary.get("message"):
            lines.append(f"  {canary['message']}")
        last = canary.get("lastAnalysis") or {}
        if last:
            lines.append(
                f"  last analysis {last.get('time')}: {last.get('verdict')}: {last.get('message')}"
            )
    elif condition is not None:
        lines.append(
            f"  no canary running; last: {condition.get('reason')} {condition.get('message', '')}"
        )
    else:
        lines.append("  no canary running")
    return "\n".join(lines)


def request(client: KubeClient, namespace: str, name: str, action: str) -> str | None:
    """Record the command; an error message when the canary cannot take it."""
    body = client.get_llmdeployment(namespace, name)
    if body is None:
        return f"LLMDeployment {namespace}/{name} not found"
    phase = ((body.get("status") or {}).get("canary") or {}).get("phase")
    if phase not in ACCEPTS[action]:
        now = f"its canary is {phase}" if phase else "it has no canary running"
        allowed = " or ".join(ACCEPTS[action])
        return f"cannot {action} {namespace}/{name}: {now} (needs {allowed})"
    client.annotate(namespace, name, ANNOTATION_ROLLOUT_COMMAND, action)
    return None


def wait_taken(client: KubeClient, namespace: str, name: str, timeout: float) -> bool:
    """Whether the operator took the command (it removes the annotation) within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get_llmdeployment(namespace, name) or {}
        if ANNOTATION_ROLLOUT_COMMAND not in (
            (body.get("metadata") or {}).get("annotations") or {}
        ):
            return True
        time.sleep(0.5)
    return False


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    client, namespace = _client(args)
    try:
        if args.action == "status":
            body = client.get_llmdeployment(namespace, args.name)
            if body is None:
                print(f"LLMDeployment {namespace}/{args.name} not found", file=sys.stderr)
                return 1
            print(describe(body))
            return 0
        problem = request(client, namespace, args.name, args.action)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 1
        if not args.no_wait and not wait_taken(client, namespace, args.name, WAIT_SECONDS):
            print(
                f"{args.action} recorded on {namespace}/{args.name}, but the operator has not "
                f"taken it within {WAIT_SECONDS:.0f}s: is it running and watching {namespace}?",
                file=sys.stderr,
            )
            return 1
        body = client.get_llmdeployment(namespace, args.name)
        print(describe(body) if body else f"{args.action}: done")
        return 0
    except (ApiException, ApiError) as error:
        print(f"API error {error.status}: {error.reason}", file=sys.stderr)
        return 1


def kubectl_main() -> int:
    """`kubectl llmd rollout ACTION NAME`: kubectl finds `kubectl-llmd` on PATH."""
    args = sys.argv[1:]
    if not args or args[0] != "rollout":
        print("usage: kubectl llmd rollout status|promote|abort|pause|resume NAME [-n NS]")
        return 0 if not args or args[0] in {"-h", "--help"} else 2
    return main(args[1:])
