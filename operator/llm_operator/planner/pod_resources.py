"""CPU, memory and ephemeral storage of one engine pod, derived from the plan (pure).

An engine pod with no CPU or memory request is BestEffort: the scheduler packs it anywhere and
the kubelet evicts it first when a node runs short. So every amount is always set, request
equal to limit: with the GPUs (an extended resource, requests equal to limits by rule) that
makes the pod Guaranteed, which is what the kubelet's CPU and topology managers need to give
it whole cores on the GPUs' NUMA node, and the last class the OOM killer picks. docs/sizing.md
("Pod resources") has the numbers.

- CPU: vLLM runs an API server, an engine core (a busy loop that starves without a core of its
  own) and one worker per GPU, and asks for at least one physical core each; two Kubernetes
  CPUs per process is one physical core with its hyperthread.
- Memory: a fixed share for the API server and engine core, one per GPU worker (CUDA context,
  PyTorch, NCCL, pinned buffers, torch.compile workers at start-up), plus the host memory the
  engine is told to use for weights (`--cpu-offload-gb`, per GPU). The weights themselves are
  read through the page cache, which the kernel reclaims under the limit.
- Ephemeral storage: compile and kernel caches always; the checkpoint too when it downloads to
  the node's disk (a Hugging Face id without model.cache). The limit is twice the request so a
  download larger than estimated still finishes, while a runaway is evicted before it fills
  the node's disk and gets every pod on it evicted.

The spec's resources.cpu and resources.memory win over the derived amounts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from llm_operator.api.v1alpha1 import LLMDeploymentSpec
from llm_operator.planner.sizing import GIB, Plan, weight_bytes

CPU_PER_PROCESS: Final = 2
"""Kubernetes CPUs per vLLM process: one physical core and its hyperthread."""
HOST_PROCESSES: Final = 2
"""Processes besides the GPU workers: the API server and the engine core."""
MEMORY_BASE_GIB: Final = 8
"""API server (tokenizer, HTTP) and engine core (scheduler, KV-cache bookkeeping)."""
MEMORY_PER_GPU_GIB: Final = 8
"""One GPU worker: CUDA context, PyTorch and NCCL, pinned transfer buffers, and the
torch.compile worker processes that run while the engine starts."""
SCRATCH_GIB: Final = 10
"""Ephemeral storage every engine writes: torch.compile, Triton and FlashInfer caches,
tokenizer files, logs."""
DOWNLOAD_HEADROOM: Final = 1.1
"""The checkpoint on disk is a little larger than the weights: tied or untied heads the
estimate does not see, tokenizer and config files, the Hub client's partial files."""
EPHEMERAL_LIMIT_FACTOR: Final = 2
CHECKPOINT_DTYPE_BYTES: Final = 2
"""Checkpoints are published in 16 bits unless pre-quantized; a spec that quantizes online
(quantization: fp8 on a bfloat16 checkpoint) still downloads the 16-bit weights."""


@dataclass(frozen=True)
class PodResources:
    """CPU, memory and ephemeral storage of one engine pod; each a request and a limit."""

    cpu: str
    memory: str
    ephemeral_storage_request: str
    ephemeral_storage_limit: str
    download_bytes: float | None
    """Bytes of checkpoint written to the node's disk, None when the weights are not
    downloaded there (model.cache, pvc://, s3:// or gs://, a path in the image)."""


def downloads_to_node_disk(spec: LLMDeploymentSpec) -> bool:
    """Whether the weights land on the node's disk: a Hugging Face id without a cache."""
    name = spec.model.name
    streamed_or_mounted = name.startswith(("pvc://", "s3://", "gs://", "/"))
    return spec.model.cache is None and not streamed_or_mounted


def download_bytes(spec: LLMDeploymentSpec, plan: Plan) -> float:
    """Size of the checkpoint vLLM downloads. Without a parameter count: what the replica's
    GPUs hold, which the weights cannot exceed, doubled when the spec quantizes online."""
    model = plan.model
    checkpoint = weight_bytes(model, model.quantization or "none", CHECKPOINT_DTYPE_BYTES)
    if checkpoint is not None:
        return checkpoint
    gpus = plan.gpus_per_replica * spec.resources.gpu.memory_gi_b * GIB
    online = model.quantization is None and spec.engine.quantization != "none"
    return gpus * (2 if online else 1)


def cpu_offload_gib(extra_args: list[str]) -> float:
    """`--cpu-offload-gb N` (GiB of weights per GPU that vLLM keeps in host memory)."""
    for i, arg in enumerate(extra_args):
        value: str | None = None
        if arg.startswith("--cpu-offload-gb="):
            value = arg.partition("=")[2]
        elif arg == "--cpu-offload-gb" and i + 1 < len(extra_args):
            value = extra_args[i + 1]
        if value is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                return 0.0  # vLLM refuses it at start; nothing to size
    return 0.0


def _gib(value: float) -> str:
    return f"{math.ceil(value)}Gi"


def pod_resources(spec: LLMDeploymentSpec, plan: Plan) -> PodResources:
    """What one engine pod asks for, besides its GPUs."""
    gpus = plan.gpus_per_replica
    cpu = spec.resources.cpu or str(CPU_PER_PROCESS * (HOST_PROCESSES + gpus))
    offload = cpu_offload_gib(spec.engine.extra_args) * gpus
    memory = spec.resources.memory or _gib(MEMORY_BASE_GIB + MEMORY_PER_GPU_GIB * gpus + offload)
    download = download_bytes(spec, plan) if downloads_to_node_disk(spec) else None
    ephemeral = SCRATCH_GIB + (download or 0) * DOWNLOAD_HEADROOM / GIB
    return PodResources(
        cpu=cpu,
        memory=memory,
        ephemeral_storage_request=_gib(ephemeral),
        ephemeral_storage_limit=_gib(math.ceil(ephemeral) * EPHEMERAL_LIMIT_FACTOR),
        download_bytes=download,
    )
