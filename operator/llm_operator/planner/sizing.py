"""GPU memory and tensor-parallel sizing for one replica (pure arithmetic).

The model follows how vLLM spends a GPU (docs/sizing.md walks through it with numbers):

    budget per GPU   = memoryGiB x gpuMemoryUtilization
    weights per GPU  = (quantized linear weights + 16-bit embeddings) / (TP x PP)
    KV cache per GPU = budget - weights per GPU - RUNTIME_OVERHEAD_GIB
    KV bytes/token   = 2 (K and V) x layers/PP x max(1, kv_heads/TP) x head_dim x kv bytes
    KV tokens        = KV cache per GPU / KV bytes per token (every GPU holds its slice of
                       every token, so one GPU's count is the replica's)

vLLM refuses to start when one max-model-len sequence does not fit in the KV cache, so that
is the hard limit, with HEADROOM for what this estimate does not see. `tensor: auto` also
wants room to batch (AUTO_MIN_KV_TOKENS) and takes the smallest power of two that gives both;
when none does but one fits the hard limit, it takes that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Final

from llm_operator.api.v1alpha1 import (
    TENSOR_PARALLEL_SIZES,
    LLMDeploymentSpec,
    ModelArchitecture,
    SizingPlan,
)
from llm_operator.planner.catalog import ModelInfo, lookup_model

GIB: Final = 1024**3

RUNTIME_OVERHEAD_GIB: Final = 2.0
"""GPU memory per GPU that is neither weights nor KV cache, inside vLLM's budget: the
activation peak vLLM profiles at start (about 0.5-1 GiB for 8192 batched tokens on 7B-70B
models), CUDA graphs (0.5-1 GiB) and allocations outside PyTorch (cuBLAS workspaces, NCCL
buffers). Measured values on H100 sit between 1 and 3 GiB; 2 GiB is the middle."""

HEADROOM: Final = 1.25
"""A replica must hold one maxModelLen sequence plus 25 percent: the margin covers block
rounding, the parameter-count and overhead approximations above, and vLLM's own reserve."""

AUTO_MIN_KV_TOKENS: Final = 32768
"""`tensor: auto` also wants at least this many tokens of KV cache so a replica can batch
(for example 16 requests of 2K tokens). A replica that holds only a few sequences serves
them a batch at a time and preempts under load; auto buys the next tensor-parallel size
instead. Explicit sizes are held only to the hard limit."""

DEFAULT_QUANTIZATION_GROUP: Final = 128
"""Weights per scale in AWQ/GPTQ checkpoints unless the catalog knows better (AutoAWQ's and
AutoGPTQ's default, and what nearly every published 4-bit checkpoint uses)."""

_GROUP_QUANTIZED = frozenset({"awq", "awq_marlin", "gptq", "gptq_marlin"})

# Bytes per weight of the quantized linear layers. 4-bit group quantization stores a 16-bit
# scale and a packed 4-bit zero point per group of 128 weights: 0.5 + 2.5/128.
_GROUP_4BIT_BYTES: Final = 0.5 + 2.5 / DEFAULT_QUANTIZATION_GROUP
_QUANTIZED_WEIGHT_BYTES: Final[dict[str, float]] = {
    "fp8": 1.0,
    "awq": _GROUP_4BIT_BYTES,
    "awq_marlin": _GROUP_4BIT_BYTES,
    "gptq": _GROUP_4BIT_BYTES,
    "gptq_marlin": _GROUP_4BIT_BYTES,
    # NF4 with one fp32 absmax per 64 weights.
    "bitsandbytes": 0.5 + 4 / 64,
    # compressed-tensors covers w4a16 to w8a8; assume 8 bits so the estimate errs large.
    "compressed-tensors": 1.0,
}
_DTYPE_BYTES: Final[dict[str, int]] = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}
_PRECISION_NAMES: Final[dict[str, str]] = {
    "fp8": "fp8",
    "awq": "4-bit AWQ",
    "awq_marlin": "4-bit AWQ",
    "gptq": "4-bit GPTQ",
    "gptq_marlin": "4-bit GPTQ",
    "bitsandbytes": "4-bit bitsandbytes",
    "compressed-tensors": "compressed-tensors (sized as 8-bit)",
}


class PlanError(ValueError):
    """A spec that cannot be turned into a working replica: it does not fit the GPUs, breaks
    one of vLLM's tensor-parallel rules, or lacks the numbers to decide. The message says
    what to change; the operator reports it as a condition and leaves running pods alone."""


@dataclass(frozen=True)
class Plan:
    """What the planner decided for one replica, with everything it knew and did not."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    model: ModelInfo
    """The numbers used: the catalog entry merged with model.architecture."""
    in_catalog: bool
    quantization: str
    """Effective weight quantization (the spec's, or the checkpoint's when the spec says none)."""
    max_model_len: int | None
    """Sequence length planned for (the spec's, else the model's context), None if unknown."""
    weight_bytes_total: float | None
    weight_bytes_per_gpu: float | None
    kv_cache_bytes_per_gpu: float | None
    kv_bytes_per_token_per_gpu: int | None
    kv_cache_tokens: int | None
    notes: tuple[str, ...] = field(default=())
    """Things a person may want to know (unknown numbers, a fallback auto took)."""

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def capacity_known(self) -> bool:
        return self.kv_cache_tokens is not None

    def sizing_plan(self) -> SizingPlan:
        """The plan as status carries it; numbers the planner could not know stay unset."""

        def gib(value: float | None) -> float | None:
            return None if value is None else round(value / GIB, 2)

        return SizingPlan(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            gpus_per_replica=self.gpus_per_replica,
            weight_gi_b_per_gpu=gib(self.weight_bytes_per_gpu),
            kv_cache_gi_b_per_gpu=gib(self.kv_cache_bytes_per_gpu),
            kv_cache_tokens=self.kv_cache_tokens,
            max_model_len=self.max_model_len,
        )


def resolve_model(spec: LLMDeploymentSpec) -> tuple[ModelInfo, bool]:
    """The catalog entry for the spec's model with model.architecture laid over it, and
    whether the catalog knew the model."""
    entry = lookup_model(spec.model.name)
    base = entry or ModelInfo(name=spec.model.name, source="spec.model.architecture")
    arch = spec.model.architecture or ModelArchitecture()
    overrides = {
        key: value
        for key, value in {
            "parameters": arch.parameters,
            "num_layers": arch.num_layers,
            "num_attention_heads": arch.num_attention_heads,
            "num_key_value_heads": arch.num_key_value_heads,
            "head_dim": arch.head_dim,
            "hidden_size": arch.hidden_size,
            "intermediate_size": arch.intermediate_size,
            "max_position_embeddings": arch.max_position_embeddings,
        }.items()
        if value is not None
    }
    if not overrides:
        return base, entry is not None
    source = base.source + " with overrides from spec.model.architecture" if entry else base.source
    merged = replace(base, source=source, **overrides)  # type: ignore[arg-type]
    if entry is not None and ("hidden_size" in overrides or "parameters" in overrides):
        # The catalog's vocabulary no longer describes an overridden shape: size everything
        # as quantized weights instead of guessing the embedding split.
        merged = replace(merged, vocab_size=None)
    return merged, entry is not None


@dataclass(frozen=True)
class _Inputs:
    """Everything the arithmetic needs, taken from the spec once."""

    model: ModelInfo
    quantization: str
    dtype_bytes: int
    kv_bytes: int
    gpu_gib: float
    utilization: float
    per_node: int
    pipeline: int
    max_model_len: int | None
    max_model_len_from_spec: bool


def _inputs(spec: LLMDeploymentSpec, model: ModelInfo) -> _Inputs:
    engine = spec.engine
    quantization: str = engine.quantization
    if quantization == "none" and model.quantization is not None:
        quantization = model.quantization  # vLLM reads it from the checkpoint
    dtype_bytes = _DTYPE_BYTES[engine.dtype]
    kv_bytes = 1 if engine.kv_cache_dtype.startswith("fp8") else dtype_bytes
    max_len = engine.max_model_len or model.max_position_embeddings
    return _Inputs(
        model=model,
        quantization=quantization,
        dtype_bytes=dtype_bytes,
        kv_bytes=kv_bytes,
        gpu_gib=spec.resources.gpu.memory_gi_b,
        utilization=engine.gpu_memory_utilization,
        per_node=spec.resources.gpu.per_node,
        pipeline=spec.parallelism.pipeline,
        max_model_len=max_len,
        max_model_len_from_spec=engine.max_model_len is not None,
    )


def weight_bytes(model: ModelInfo, quantization: str, dtype_bytes: int) -> float | None:
    """Bytes of all weights of one replica. Quantized kernels leave the embedding and the LM
    head in 16 bits; without a vocabulary size every parameter is sized as quantized."""
    if model.parameters is None:
        return None
    per_weight = _QUANTIZED_WEIGHT_BYTES.get(quantization)
    if per_weight is None:
        return model.parameters * dtype_bytes
    embedding = model.embedding_parameters or 0.0
    embedding = min(embedding, model.parameters)
    return (model.parameters - embedding) * per_weight + embedding * dtype_bytes


def kv_bytes_per_token(model: ModelInfo, tensor: int, pipeline: int, kv_bytes: int) -> int | None:
    """KV-cache bytes one token takes on each GPU of a replica. With more ranks than KV
    heads, vLLM replicates a head on each rank rather than splitting it."""
    kv_heads = model.effective_kv_heads
    head_dim = model.effective_head_dim
    if model.num_layers is None or kv_heads is None or head_dim is None:
        return None
    layers_per_stage = math.ceil(model.num_layers / pipeline)
    heads_per_rank = max(1, kv_heads // tensor)
    return 2 * layers_per_stage * heads_per_rank * head_dim * kv_bytes


def tensor_rule_violation(model: ModelInfo, tensor: int, quantization: str) -> str | None:
    """Why vLLM would refuse this tensor-parallel size for this model, or None."""
    heads = model.num_attention_heads
    if heads is not None and heads % tensor:
        return f"tensor {tensor} does not divide the model's {heads} attention heads"
    kv_heads = model.num_key_value_heads
    if kv_heads is not None and kv_heads % tensor and tensor % kv_heads:
        return (
            f"tensor {tensor} and the model's {kv_heads} key/value heads do not divide one another"
        )
    inter = model.intermediate_size
    if quantization in _GROUP_QUANTIZED and inter is not None:
        group = model.quantization_group_size or DEFAULT_QUANTIZATION_GROUP
        if inter % tensor or (inter // tensor) % group:
            return (
                f"with {quantization}, the MLP width {inter} over tensor {tensor} is "
                f"{inter / tensor:g} per rank, not a multiple of the quantization group {group}"
            )
    return None


@dataclass(frozen=True)
class _Fit:
    """The memory arithmetic at one tensor-parallel size."""

    tensor: int
    weight_total: float | None
    weight_per_gpu: float | None
    kv_per_gpu: float | None
    per_token: int | None
    tokens: int | None

    def holds(self, tokens_needed: int) -> bool:
        return self.tokens is not None and self.tokens >= tokens_needed


def _fit(inputs: _Inputs, tensor: int) -> _Fit:
    gpus = tensor * inputs.pipeline
    total = weight_bytes(inputs.model, inputs.quantization, inputs.dtype_bytes)
    per_gpu = None if total is None else total / gpus
    budget = inputs.gpu_gib * GIB * inputs.utilization
    kv = None if per_gpu is None else budget - per_gpu - RUNTIME_OVERHEAD_GIB * GIB
    per_token = kv_bytes_per_token(inputs.model, tensor, inputs.pipeline, inputs.kv_bytes)
    tokens = None
    if kv is not None and per_token is not None:
        # vLLM allocates the cache in blocks of 16 tokens.
        tokens = max(0, int(kv // per_token) // 16 * 16)
    return _Fit(tensor, total, per_gpu, kv, per_token, tokens)


def _needed_tokens(max_model_len: int) -> int:
    return math.ceil(max_model_len * HEADROOM)


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def _precision(inputs: _Inputs) -> str:
    if inputs.quantization in _PRECISION_NAMES:
        return _PRECISION_NAMES[inputs.quantization]
    return {1: "fp8", 2: "bfloat16", 4: "float32"}.get(inputs.dtype_bytes, "16-bit")


def _unfit_message(inputs: _Inputs, fit: _Fit, fixes: list[str]) -> str:
    """The numbers of a replica that does not fit, and the ways out."""
    assert inputs.max_model_len is not None and fit.weight_total is not None
    assert fit.weight_per_gpu is not None and fit.kv_per_gpu is not None
    params = inputs.model.parameters or 0.0
    gpus = fit.tensor * inputs.pipeline
    budget = inputs.gpu_gib * GIB * inputs.utilization
    needed = _needed_tokens(inputs.max_model_len)
    each = " each" if gpus > 1 else ""
    head = (
        f"{params / 1e9:.1f}B parameters in {_precision(inputs)} need "
        f"{_gib(fit.weight_total)} of weights; {gpus} GPU{'s' if gpus > 1 else ''} of "
        f"{inputs.gpu_gib:g} GiB at {inputs.utilization:.2f} ({_gib(budget)}{each})"
    )
    if fit.kv_per_gpu <= 0 or fit.tokens is None or fit.per_token is None:
        body = (
            f" cannot hold {_gib(fit.weight_per_gpu)} of weights{each} plus "
            f"{RUNTIME_OVERHEAD_GIB:g} GiB of runtime overhead"
        )
    else:
        body = (
            f" leave {_gib(fit.kv_per_gpu)}{each} for the KV cache after "
            f"{_gib(fit.weight_per_gpu)} of weights and {RUNTIME_OVERHEAD_GIB:g} GiB of runtime "
            f"overhead: {fit.tokens} tokens, less than one {inputs.max_model_len}-token "
            f"sequence with headroom ({needed} tokens, {_gib(needed * fit.per_token)})"
        )
    way_out = "; use " + _or_list(fixes) if fixes else "; use GPUs with more memory"
    return head + body + way_out


def _or_list(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def _candidate_sizes(inputs: _Inputs) -> list[int]:
    limit = inputs.per_node // inputs.pipeline
    return [t for t in TENSOR_PARALLEL_SIZES if t <= limit]


def _fixes(inputs: _Inputs, tensor: int, *, tensor_is_auto: bool) -> list[str]:
    """Changes that would make this spec fit, each checked by re-running the arithmetic."""
    assert inputs.max_model_len is not None
    needed = _needed_tokens(inputs.max_model_len)
    fixes: list[str] = []
    if not tensor_is_auto:
        for bigger in _candidate_sizes(inputs):
            if bigger <= tensor:
                continue
            if tensor_rule_violation(inputs.model, bigger, inputs.quantization) is None and _fit(
                inputs, bigger
            ).holds(needed):
                fixes.append(f"tensor: {bigger}")
                break
    if inputs.quantization == "none" and inputs.dtype_bytes >= 2:
        fp8 = replace(inputs, quantization="fp8")
        if _fit(fp8, tensor).holds(needed):
            fixes.append("quantization: fp8")
    if inputs.kv_bytes > 1 and _fit(replace(inputs, kv_bytes=1), tensor).holds(needed):
        fixes.append("kvCacheDtype: fp8")
    fit = _fit(inputs, tensor)
    if fit.tokens is not None and fit.tokens > 0:
        longest = int(fit.tokens / HEADROOM) // 1024 * 1024
        if longest >= 1024:
            fixes.append(f"maxModelLen: {longest} or less")
    return fixes


def _missing_for_auto(model: ModelInfo, max_model_len: int | None) -> list[str]:
    missing = []
    if model.parameters is None:
        missing.append("model.architecture.parameters")
    if model.num_layers is None:
        missing.append("model.architecture.numLayers")
    if model.num_attention_heads is None:
        missing.append("model.architecture.numAttentionHeads")
    if model.num_key_value_heads is None:
        missing.append("model.architecture.numKeyValueHeads")
    if model.effective_head_dim is None:
        missing.append("model.architecture.headDim (or hiddenSize)")
    if max_model_len is None:
        missing.append("engine.maxModelLen (or model.architecture.maxPositionEmbeddings)")
    return missing


def _plan_at(inputs: _Inputs, fit: _Fit, in_catalog: bool, notes: list[str]) -> Plan:
    return Plan(
        tensor_parallel_size=fit.tensor,
        pipeline_parallel_size=inputs.pipeline,
        model=inputs.model,
        in_catalog=in_catalog,
        quantization=inputs.quantization,
        max_model_len=inputs.max_model_len,
        weight_bytes_total=fit.weight_total,
        weight_bytes_per_gpu=fit.weight_per_gpu,
        kv_cache_bytes_per_gpu=fit.kv_per_gpu,
        kv_bytes_per_token_per_gpu=fit.per_token,
        kv_cache_tokens=fit.tokens,
        notes=tuple(notes),
    )


def plan(spec: LLMDeploymentSpec) -> Plan:
    """Size one replica of `spec`: resolve `tensor: auto`, check vLLM's tensor-parallel rules
    and that one maxModelLen sequence fits. Raises PlanError with the numbers and a fix."""
    model, in_catalog = resolve_model(spec)
    inputs = _inputs(spec, model)
    notes: list[str] = []
    if not in_catalog and spec.model.architecture is None:
        notes.append(
            f"{spec.model.name} is not in the built-in catalog and model.architecture is "
            "not set: GPU memory is not checked"
        )
    max_pos = model.max_position_embeddings
    length = inputs.max_model_len
    if inputs.max_model_len_from_spec and max_pos and length and length > max_pos:
        raise PlanError(
            f"engine.maxModelLen {inputs.max_model_len} exceeds the {max_pos}-token context "
            f"of {model.name}; use maxModelLen: {max_pos} or less"
        )
    pipeline = inputs.pipeline
    if pipeline > inputs.per_node:
        raise PlanError(
            f"parallelism.pipeline {pipeline} needs more GPUs than a node has "
            f"(resources.gpu.perNode {inputs.per_node}); replicas run on one node"
        )

    requested = spec.parallelism.tensor
    if isinstance(requested, int):
        return _plan_explicit(inputs, requested, in_catalog, notes)
    return _plan_auto(inputs, in_catalog, notes)


def _plan_explicit(inputs: _Inputs, tensor: int, in_catalog: bool, notes: list[str]) -> Plan:
    gpus = tensor * inputs.pipeline
    if gpus > inputs.per_node:
        raise PlanError(
            f"tensor {tensor} x pipeline {inputs.pipeline} = {gpus} GPUs per replica, more than "
            f"a node has (resources.gpu.perNode {inputs.per_node}); replicas run on one node"
        )
    violation = tensor_rule_violation(inputs.model, tensor, inputs.quantization)
    if violation is not None:
        valid = [
            t
            for t in _candidate_sizes(inputs)
            if tensor_rule_violation(inputs.model, t, inputs.quantization) is None
        ]
        raise PlanError(
            f"parallelism.tensor {tensor} is refused by vLLM: {violation} ({inputs.model.name})"
            + ("; use tensor: " + _or_list([str(t) for t in valid]) if valid else "")
        )
    fit = _fit(inputs, tensor)
    if fit.tokens is None or inputs.max_model_len is None:
        notes.append("KV-cache capacity is unknown: the model's numbers are incomplete")
        return _plan_at(inputs, fit, in_catalog, notes)
    needed = _needed_tokens(inputs.max_model_len)
    if fit.tokens < needed:
        raise PlanError(_unfit_message(inputs, fit, _fixes(inputs, tensor, tensor_is_auto=False)))
    if fit.tokens < AUTO_MIN_KV_TOKENS:
        notes.append(
            f"the KV cache holds {fit.tokens} tokens, little room to batch requests "
            f"(tensor: auto would want {AUTO_MIN_KV_TOKENS})"
        )
    return _plan_at(inputs, fit, in_catalog, notes)


def _plan_auto(inputs: _Inputs, in_catalog: bool, notes: list[str]) -> Plan:
    missing = _missing_for_auto(inputs.model, inputs.max_model_len)
    if missing:
        what = "is not in the built-in catalog" if not in_catalog else "lacks numbers"
        raise PlanError(
            f"parallelism.tensor auto cannot size {inputs.model.name}: the model {what}; set "
            + ", ".join(missing)
            + " - or set parallelism.tensor to a number"
        )
    assert inputs.max_model_len is not None
    needed = _needed_tokens(inputs.max_model_len)
    refused: list[str] = []
    fits: list[_Fit] = []
    for tensor in _candidate_sizes(inputs):
        violation = tensor_rule_violation(inputs.model, tensor, inputs.quantization)
        if violation is not None:
            refused.append(violation)
            continue
        fits.append(_fit(inputs, tensor))
    for fit in fits:
        if fit.holds(max(needed, AUTO_MIN_KV_TOKENS)):
            return _plan_at(inputs, fit, in_catalog, notes)
    for fit in fits:
        if fit.holds(needed):
            notes.append(
                f"no tensor-parallel size up to {inputs.per_node // inputs.pipeline} gives "
                f"{AUTO_MIN_KV_TOKENS} tokens of KV cache; tensor {fit.tensor} holds "
                f"{fit.tokens}"
            )
            return _plan_at(inputs, fit, in_catalog, notes)
    if not fits:
        raise PlanError(
            f"parallelism.tensor auto found no size vLLM accepts for {inputs.model.name} on "
            f"{inputs.per_node // inputs.pipeline} GPUs: " + "; ".join(refused)
        )
    largest = fits[-1]
    prefix = (
        f"parallelism.tensor auto: {inputs.model.name} does not fit at tensor {largest.tensor}, "
        f"the most resources.gpu.perNode {inputs.per_node} allows: "
    )
    return_fixes = _fixes(inputs, largest.tensor, tensor_is_auto=True)
    raise PlanError(prefix + _unfit_message(inputs, largest, return_fixes))
