"""The `llm-operator` command: a thin dispatcher to each component's own `main(argv)`.

Subcommands import their component lazily, so `llm-operator crd` never loads kopf or aiohttp.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, help). Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "crd": ("llm_operator_dev.crdgen", "generate or check the CRD from the API models"),
    "generate": ("llm_operator_dev.generate", "regenerate generated files, or --check for drift"),
    "run": ("llm_operator.controller.main", "run the operator (kopf) against the current cluster"),
    "sim": ("llm_operator.sim.cli", "run the vLLM simulator (accepts `vllm serve` flags)"),
    "gateway": ("llm_operator.gateway.cli", "run the OpenAI-compatible gateway"),
    "dev": ("llm_operator_dev.devcluster", "a local control plane: dev cluster up|down|status|env"),
    "rollout": (
        "llm_operator.rolloutctl",
        "a canary: rollout status|promote|abort|pause|resume NAME",
    ),
    "cost": (
        "llm_operator.costctl",
        "GPU-hours, tokens and price per million tokens per LLMDeployment (-n NS | -A)",
    ),
    "render": ("llm_operator.render.cli", "render an LLMDeployment YAML into Kubernetes manifests"),
}


def _usage() -> str:
    lines = ["usage: llm-operator <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if args[0] == "--version":
        from llm_operator import __version__

        print(__version__)
        return 0
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"llm-operator: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    entry: Callable[[list[str]], int] = module.main
    return entry(rest)


if __name__ == "__main__":
    sys.exit(main())
