"""GPU sizing for an LLMDeployment (pure: no I/O).

`plan(spec)` resolves `parallelism.tensor: auto`, checks vLLM's tensor-parallel rules and that
one maxModelLen sequence fits in the KV cache, and returns a `Plan`; `Plan.sizing_plan()` is
the `SizingPlan` that status carries. Specs that cannot work raise `PlanError`.
`pod_resources(spec, plan)` sizes the pod's CPU, memory and ephemeral storage.
"""

from llm_operator.planner.catalog import CATALOG, ModelInfo, lookup_model
from llm_operator.planner.pod_resources import PodResources, pod_resources
from llm_operator.planner.sizing import (
    AUTO_MIN_KV_TOKENS,
    GIB,
    HEADROOM,
    RUNTIME_OVERHEAD_GIB,
    Plan,
    PlanError,
    kv_bytes_per_token,
    plan,
    resolve_model,
    tensor_rule_violation,
    weight_bytes,
)

__all__ = [
    "AUTO_MIN_KV_TOKENS",
    "CATALOG",
    "GIB",
    "HEADROOM",
    "RUNTIME_OVERHEAD_GIB",
    "ModelInfo",
    "Plan",
    "PlanError",
    "PodResources",
    "kv_bytes_per_token",
    "lookup_model",
    "plan",
    "pod_resources",
    "resolve_model",
    "tensor_rule_violation",
    "weight_bytes",
]
