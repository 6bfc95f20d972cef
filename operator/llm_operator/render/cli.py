"""`llm-operator render FILE.yaml [--config CONFIG.yaml] [--plan]`

Prints the manifests the operator would apply for each LLMDeployment in FILE (a YAML stream;
`-` reads standard input), or with `--plan` the GPU sizing the planner chose. The one module
of `render` that reads files; the rendering itself stays pure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llm_operator.api.v1alpha1 import LLMDeployment
from llm_operator.planner import GIB, Plan, PlanError, plan
from llm_operator.render import RenderConfig, render_all
from llm_operator.render.output import to_yaml


def _read(path: str) -> str:
    return sys.stdin.read() if path == "-" else Path(path).read_text()


def plan_report(llmd: LLMDeployment, sizing: Plan) -> dict[str, Any]:
    """The plan as a person reads it: the status block plus what it was computed from."""
    report: dict[str, Any] = {
        "name": llmd.metadata.name,
        "model": sizing.model.name,
        "modelSource": sizing.model.source or None,
        "quantization": sizing.quantization,
        "tensorParallelSize": sizing.tensor_parallel_size,
        "pipelineParallelSize": sizing.pipeline_parallel_size,
        "gpusPerReplica": sizing.gpus_per_replica,
    }
    report["plan"] = sizing.sizing_plan().model_dump(by_alias=True, mode="json", exclude_none=True)
    if sizing.kv_bytes_per_token_per_gpu is not None:
        report["kvCacheKiBPerTokenPerGPU"] = round(sizing.kv_bytes_per_token_per_gpu / 1024, 1)
    if sizing.weight_bytes_total is not None:
        report["weightGiBTotal"] = round(sizing.weight_bytes_total / GIB, 2)
    if sizing.notes:
        report["notes"] = list(sizing.notes)
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llm-operator render",
        description="Render LLMDeployments into the Kubernetes manifests the operator applies.",
    )
    parser.add_argument("file", help="YAML file with one or more LLMDeployments ('-': stdin)")
    parser.add_argument("--config", help="YAML file with operator settings (RenderConfig)")
    parser.add_argument(
        "--plan", action="store_true", help="print the GPU sizing plan instead of manifests"
    )
    args = parser.parse_args(argv)

    try:
        documents = [d for d in yaml.safe_load_all(_read(args.file)) if d is not None]
        config = RenderConfig.from_mapping(
            yaml.safe_load(_read(args.config)) if args.config else None
        )
    except (OSError, yaml.YAMLError, ValidationError) as error:
        print(f"llm-operator render: {error}", file=sys.stderr)
        return 2

    output: list[dict[str, Any]] = []
    failed = False
    for index, document in enumerate(documents):
        label = (document.get("metadata") or {}).get("name") if isinstance(document, dict) else None
        where = f"{args.file}, document {index + 1}" + (f" ({label})" if label else "")
        try:
            llmd = LLMDeployment.model_validate(document)
            sizing = plan(llmd.spec)
            if args.plan:
                output.append(plan_report(llmd, sizing))
            else:
                output.extend(render_all(llmd, config, sizing=sizing))
        except (ValidationError, PlanError) as error:
            print(f"llm-operator render: {where}: {error}", file=sys.stderr)
            failed = True
    if output:
        sys.stdout.write(to_yaml(output))
    return 1 if failed else 0
