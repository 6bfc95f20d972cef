"""LLMDeployment v1alpha1: the one custom resource a user writes.

These models are the single source of the CRD schema (`llm-operator crd`): field docstrings
become the CRD's descriptions, `Rule`s become its CEL validations. Defaults live here, not in
the CRD, so the API server never adds fields that a GitOps tool would see as drift.
"""

from __future__ import annotations

import itertools
import re
from typing import Annotated, ClassVar, Literal

from pydantic import ConfigDict, Field, StrictInt

from llm_operator.api.affinity import Affinity
from llm_operator.api.base import ApiModel, Rule
from llm_operator.api.gateway_config import ClientLimits
from llm_operator.api.patterns import (
    CONTAINER_ENV_NAME_PATTERN,
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    DURATION_PATTERN,
    QUANTITY_PATTERN,
    SERVED_NAME_PATTERN,
)

GROUP = "llmoperator.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
SINGULAR = "llmdeployment"
SHORT_NAMES = ("llmd",)
CATEGORIES = ("llm",)

TENSOR_PARALLEL_SIZES = (1, 2, 4, 8, 16, 32, 64)
# `vllm serve` flags the operator sets from typed fields; extraArgs must not fight them.
MANAGED_ENGINE_FLAGS = (
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--served-model-name",
    "--max-model-len",
    "--gpu-memory-utilization",
    "--dtype",
    "--quantization",
    "--kv-cache-dtype",
    "--port",
    "--host",
    "--model",
    "--revision",
    "--max-num-seqs",
)
# vLLM's parser takes `--tensor_parallel_size` as `--tensor-parallel-size`, and -tp/-pp.
_MANAGED_FLAG_RE = (
    "^(-tp|-pp|"
    + "|".join("--" + re.escape(f[2:]).replace("\\-", "[-_]") for f in MANAGED_ENGINE_FLAGS)
    # [\\s\\S]: a value with a newline is still a value (Python's int() strips it).
    + ")(=[\\s\\S]*)?$"
)

Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=32)]
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=32)]
DnsSubdomainName = Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]
DnsLabelName = Annotated[str, Field(pattern=DNS_LABEL_PATTERN, max_length=63)]

Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]


def parse_duration_seconds(value: str) -> float:
    """Seconds in a duration such as `1h30m` or `500ms` (already validated by the pattern)."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(
        float(number) * units[unit]
        for number, unit in re.findall(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)", value)
    )


def positive_duration(json_name: str, attr: str, where: str) -> Rule:
    """A rule that a duration field, when set, is above zero (the pattern allows `0s`)."""
    return Rule(
        cel=f"!has(self.{json_name}) || duration(self.{json_name}) > duration('0s')",
        message=f"{where}.{json_name} must be above 0",
        holds=lambda m: parse_duration_seconds(getattr(m, attr)) > 0,
        field_path=f".{json_name}",
    )


class SecretKeyRef(ApiModel):
    """A key in a Secret in the LLMDeployment's namespace."""

    name: DnsSubdomainName
    """Name of the Secret."""
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
    """Key within the Secret whose value is used."""


class ModelArchitecture(ApiModel):
    """Numbers that size GPU memory. Known models come from the built-in catalog; set these
    for other models, or to override the catalog."""

    parameters: Annotated[float, Field(gt=0, le=1e15)] | None = None
    """Total parameter count, for example 70.6e9."""
    num_layers: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Transformer layers (num_hidden_layers in the model's config.json)."""
    num_attention_heads: Annotated[int, Field(ge=1, le=4096)] | None = None
    """Attention (query) heads; the tensor-parallel size must divide it."""
    num_key_value_heads: Annotated[int, Field(ge=1, le=4096)] | None = None
    """Key/value heads (grouped-query attention); equals numAttentionHeads without GQA."""
    head_dim: Annotated[int, Field(ge=1, le=4096)] | None = None
    """Size of one attention head; defaults to hiddenSize / numAttentionHeads."""
    hidden_size: Annotated[int, Field(ge=1)] | None = None
    """Model (embedding) width."""
    intermediate_size: Annotated[int, Field(ge=1)] | None = None
    """MLP width; with quantization it must split evenly across tensor-parallel ranks."""
    max_position_embeddings: Annotated[int, Field(ge=1)] | None = None
    """The longest context the model supports; used when engine.maxModelLen is not set."""


class ModelCache(ApiModel):
    """A PersistentVolumeClaim that holds downloaded weights across pod restarts."""

    claim_name: DnsSubdomainName
    """Name of an existing PersistentVolumeClaim, mounted at /models (HF_HOME)."""
    read_only: bool = False
    """Mount the claim read-only (weights pre-loaded, for example by a Job)."""


class ModelSpec(ApiModel):
    """Which model to serve and what clients call it."""

    name: Annotated[str, Field(min_length=1, max_length=512, pattern=r"^\S+$")]
    """A Hugging Face id (meta-llama/Llama-3.1-8B-Instruct), pvc://claim/path or s3://bucket/path."""
    revision: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^\S+$")] | None = None
    """Branch, tag or commit of the Hugging Face repository. Defaults to the repository's main."""
    served_name: (
        Annotated[str, Field(min_length=1, max_length=128, pattern=SERVED_NAME_PATTERN)] | None
    ) = None
    """The "model" clients send. Defaults to the model name."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret holding a Hugging Face token (HF_TOKEN) for gated models."""
    architecture: ModelArchitecture | None = None
    """Architecture numbers for sizing; known models need none."""
    cache: ModelCache | None = None
    """Optional model cache volume; without it weights download into the pod on every start."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!self.name.startsWith('pvc://') || self.name.matches("
            "'^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(/.*)?$')",
            message="model.name pvc://CLAIM/PATH needs CLAIM to be a PersistentVolumeClaim name "
            "(lowercase letters, digits, '-' and '.')",
            holds=lambda m: (
                not m.name.startswith("pvc://")
                or re.match(
                    r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(/.*)?$",
                    m.name,
                )
                is not None
            ),
            field_path=".name",
        ),
    )

    @property
    def effective_served_name(self) -> str:
        return self.served_name or self.name


class EnvVar(ApiModel):
    """An environment variable for the engine container."""

    name: Annotated[str, Field(min_length=1, max_length=256, pattern=CONTAINER_ENV_NAME_PATTERN)]
    """Variable name."""
    value: Annotated[str, Field(max_length=32768)] | None = None
    """Literal value."""
    secret_key_ref: SecretKeyRef | None = None
    """Take the value from a Secret key instead."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!(has(self.value) && has(self.secretKeyRef))",
            message="an env entry takes either value or secretKeyRef, not both",
            holds=lambda e: not (e.value is not None and e.secret_key_ref is not None),
        ),
    )


class EngineSpec(ApiModel):
    """The inference engine and its settings."""

    kind: Literal["vllm"] = "vllm"
    """Inference engine. Only vllm today; the API leaves room for sglang, tgi and triton."""
    image: Annotated[str, Field(min_length=1, max_length=512, pattern=r"^\S+$")] = (
        "vllm/vllm-openai:v0.11.0"
    )
    """Container image of the engine."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """Image pull policy. Defaults to Kubernetes' own default for the tag."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weight and activation dtype; auto takes the model's (bfloat16 for current models)."""
    quantization: Literal[
        "none",
        "fp8",
        "awq",
        "awq_marlin",
        "gptq",
        "gptq_marlin",
        "bitsandbytes",
        "compressed-tensors",
    ] = "none"
    """Weight quantization; awq and gptq need a checkpoint quantized that way."""
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    """KV-cache dtype; fp8 halves KV memory per token."""
    max_model_len: Annotated[int, Field(gt=0, le=10_000_000)] | None = None
    """Longest sequence (prompt plus output) in tokens. Defaults to the model's own context."""
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    """Share of each GPU's memory vLLM may use, in (0, 1]."""
    max_num_seqs: Annotated[int, Field(ge=1, le=65536)] | None = None
    """Most sequences running at once per replica (vLLM's default: 256)."""
    extra_args: Annotated[list[Annotated[str, Field(max_length=512)]], Field(max_length=64)] = []
    """Further `vllm serve` arguments, appended last. Flags the operator sets from typed
    fields (tensor-parallel size, served name, port, ...) are refused here."""
    env: Annotated[list[EnvVar], Field(max_length=100)] = []
    """Extra environment variables for the engine container."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=(
                "!has(self.extraArgs) || !self.extraArgs.exists(a, a.matches('"
                + _MANAGED_FLAG_RE.replace("\\", "\\\\")
                + "'))"
            ),
            message=(
                "engine.extraArgs must not set flags the operator manages (tensor/pipeline "
                "parallel size, served name, max model len, gpu memory utilization, dtype, "
                "quantization, kv cache dtype, port, host, model, revision, max num seqs): "
                "use the typed fields instead"
            ),
            holds=lambda e: not any(re.match(_MANAGED_FLAG_RE, a) for a in e.extra_args),
            field_path=".extraArgs",
        ),
        Rule(
            cel="!has(self.env) || self.env.all(e, self.env.exists_one(f, f.name == e.name))",
            message="engine.env names must be unique",
            holds=lambda e: len({v.name for v in e.env}) == len(e.env),
            field_path=".env",
        ),
    )


class GPUSpec(ApiModel):
    """The GPUs each replica runs on."""

    resource_name: Annotated[str, Field(min_length=1, max_length=253)] = "nvidia.com/gpu"
    """Extended resource the device plugin advertises."""
    product: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """GPU product label value (nvidia.com/gpu.product), for example NVIDIA-H100-80GB-HBM3.
    Pods are scheduled only onto nodes with this product when set."""
    memory_gi_b: Annotated[float, Field(gt=0, le=4096)] = 80
    """Memory of one GPU in GiB, for sizing."""
    per_node: Annotated[int, Field(ge=1, le=64)] = 8
    """GPUs one node has; bounds the tensor-parallel size of a single-node replica."""


class ResourcesSpec(ApiModel):
    """Compute resources per replica besides the GPUs the parallelism asks for."""

    gpu: GPUSpec = GPUSpec()
    """GPU type and memory."""
    cpu: Quantity | None = None
    """CPU request and limit per replica, for example "8"."""
    memory: Quantity | None = None
    """Memory request and limit per replica, for example 64Gi."""
    shared_memory_size: Quantity = "16Gi"
    """Size of the memory-backed /dev/shm that tensor-parallel workers share."""


class ParallelismSpec(ApiModel):
    """How one replica is split across GPUs."""

    tensor: StrictInt | Annotated[str, Field(max_length=16)] = "auto"
    """Tensor-parallel size: 1, 2, 4, 8, ... or auto (the smallest that fits the model and
    divides its attention heads)."""
    pipeline: Annotated[int, Field(ge=1, le=64)] = 1
    """Pipeline-parallel size (stages)."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=(
                "!has(self.tensor) || (type(self.tensor) == string ? self.tensor == 'auto' : "
                "self.tensor in [1, 2, 4, 8, 16, 32, 64])"
            ),
            message="parallelism.tensor must be auto or a power of two from 1 to 64",
            holds=lambda p: p.tensor == "auto" or p.tensor in TENSOR_PARALLEL_SIZES,
            field_path=".tensor",
        ),
    )


class ScalingBehavior(ApiModel):
    """How fast the autoscaler may move in one direction."""

    stabilization_seconds: Annotated[int, Field(ge=0, le=3600)] | None = None
    """Window over which the autoscaler takes the safest recommendation."""
    max_pods_per_step: Annotated[int, Field(ge=1, le=1000)] | None = None
    """Most replicas added or removed per period."""
    period_seconds: Annotated[int, Field(ge=1, le=1800)] | None = None
    """Length of one step."""


class AutoscalingSpec(ApiModel):
    """Replicas follow the request queue (vllm:num_requests_waiting per replica)."""

    provider: Literal["hpa", "keda"] = "hpa"
    """hpa: a HorizontalPodAutoscaler on a prometheus-adapter Pods metric; keda: a KEDA
    ScaledObject with a Prometheus trigger (allows minReplicas 0)."""
    min_replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    """Fewest replicas."""
    max_replicas: Annotated[int, Field(ge=1, le=1000)]
    """Most replicas."""
    target_queue_depth: Annotated[float, Field(gt=0, le=10000)] = 4
    """Waiting requests per replica at which the autoscaler adds replicas."""
    prometheus_address: Annotated[str, Field(max_length=512, pattern=r"^https?://\S+$")] | None = (
        None
    )
    """Prometheus server for the KEDA trigger. Defaults to the operator's setting."""
    scale_up: ScalingBehavior | None = None
    """Scale-up behaviour. Defaults: no stabilization, up to 4 replicas per 30 s."""
    scale_down: ScalingBehavior | None = None
    """Scale-down behaviour. Defaults: 300 s stabilization, 1 replica per 60 s."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
            message="autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
            holds=lambda a: a.min_replicas <= a.max_replicas,
            field_path=".minReplicas",
        ),
        Rule(
            cel="(has(self.provider) && self.provider == 'keda') || !has(self.minReplicas) "
            "|| self.minReplicas >= 1",
            message="autoscaling.minReplicas 0 (scale to zero) needs provider: keda",
            holds=lambda a: a.provider == "keda" or a.min_replicas >= 1,
            field_path=".minReplicas",
        ),
    )


class CanaryStep(ApiModel):
    """One step of a canary: a traffic weight held for a pause while analysis runs."""

    weight: Annotated[int, Field(ge=1, le=100)]
    """Percent of requests sent to the canary, 1 to 100."""
    pause: Duration = "5m"
    """How long to hold this weight (analysis runs throughout), for example 5m."""


class CanaryAnalysis(ApiModel):
    """Thresholds that promote or roll back a canary; missing data never promotes."""

    interval: Duration = "30s"
    """How often metrics are queried."""
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.01
    """Highest share of failed canary requests (5xx and timeouts), 0 to 1."""
    max_ttft_p95_ratio: Annotated[float, Field(ge=1, le=100, alias="maxTTFTp95Ratio")] = 1.25
    """Highest canary/stable ratio of p95 time to first token."""
    min_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 50
    """Fewest canary requests in an interval for it to count."""
    failure_limit: Annotated[int, Field(ge=1, le=100)] = 3
    """Failed intervals that roll the canary back."""

    rules: ClassVar[tuple[Rule, ...]] = (
        positive_duration("interval", "interval", "rollout.canary.analysis"),
    )


class CanarySpec(ApiModel):
    """Canary steps and the analysis that gates them."""

    steps: Annotated[list[CanaryStep], Field(min_length=1, max_length=20)]
    """Weights in increasing order; promotion follows the last step."""
    analysis: CanaryAnalysis = CanaryAnalysis()
    """Promotion and rollback thresholds."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.steps.all(s, s.weight >= 1 && s.weight <= 100)",
            message="rollout.canary.steps weights must each be between 1 and 100",
            holds=lambda c: all(1 <= s.weight <= 100 for s in c.steps),
            field_path=".steps",
        ),
        Rule(
            cel="self.steps.map(s, s.weight).isSorted() && "
            "self.steps.all(s, self.steps.exists_one(t, t.weight == s.weight))",
            message="rollout.canary.steps weights must be strictly increasing",
            holds=lambda c: all(a.weight < b.weight for a, b in itertools.pairwise(c.steps)),
            field_path=".steps",
        ),
    )


class RolloutSpec(ApiModel):
    """How a new revision (image, model, args) replaces the running one."""

    strategy: Literal["RollingUpdate", "Recreate", "Canary"] = "RollingUpdate"
    """RollingUpdate: replace pods a few at a time; Recreate: stop all, then start;
    Canary: run the new revision beside the old and shift traffic by steps with analysis."""
    max_surge: Annotated[int, Field(ge=0, le=100)] = 0
    """RollingUpdate: extra pods during a rollout. 0 needs no spare GPUs."""
    max_unavailable: Annotated[int, Field(ge=0, le=100)] = 1
    """RollingUpdate: pods that may be down during a rollout."""
    canary: CanarySpec | None = None
    """Canary steps and analysis; required when strategy is Canary."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.strategy) || self.strategy != 'Canary' || has(self.canary)",
            message="rollout.strategy Canary needs rollout.canary.steps",
            holds=lambda r: r.strategy != "Canary" or r.canary is not None,
        ),
        Rule(
            cel="!has(self.canary) || (has(self.strategy) && self.strategy == 'Canary')",
            message="rollout.canary is set but rollout.strategy is not Canary: "
            "set strategy: Canary or remove canary",
            holds=lambda r: r.canary is None or r.strategy == "Canary",
        ),
        Rule(
            cel="(has(self.maxSurge) ? self.maxSurge : 0) + "
            "(has(self.maxUnavailable) ? self.maxUnavailable : 1) > 0",
            message="rollout.maxSurge and rollout.maxUnavailable cannot both be 0: "
            "a rollout could never start",
            holds=lambda r: r.max_surge + r.max_unavailable > 0,
        ),
    )


FallbackTrigger = Literal["connectError", "timeout", "429", "5xx", "saturated"]


class Fallback(ApiModel):
    """One step of a fallback chain: another LLMDeployment, or an external
    OpenAI-compatible endpoint."""

    llm_deployment: DnsSubdomainName | None = None
    """Name of another LLMDeployment in the same namespace."""
    url: Annotated[str, Field(max_length=2048, pattern=r"^https?://[^\s/]+(/\S*)?$")] | None = None
    """Base URL of an external OpenAI-compatible API, for example https://api.example.com/v1."""
    model: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^\S+$")] | None = None
    """Model name sent to this fallback. Defaults to the target's served name
    (llmDeployment) and is required for url."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret with the API key sent as a bearer token to url."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.llmDeployment) != has(self.url)",
            message="each routing.fallbacks entry needs exactly one of llmDeployment or url",
            holds=lambda f: (f.llm_deployment is None) != (f.url is None),
        ),
        Rule(
            cel="!has(self.url) || has(self.model)",
            message="a routing.fallbacks entry with url needs model "
            "(the name that endpoint serves)",
            holds=lambda f: f.url is None or f.model is not None,
        ),
        Rule(
            cel="!has(self.apiKeySecretRef) || has(self.url)",
            message="apiKeySecretRef applies only to a url fallback",
            holds=lambda f: f.api_key_secret_ref is None or f.url is not None,
        ),
    )


class RoutingHold(ApiModel):
    """Scale from zero: while this model has no ready replica (scaled to 0, or every pod
    still starting), the gateway holds its requests in arrival order until one turns ready."""

    max_queue: Annotated[int, Field(ge=0, le=100000)] = 100
    """Requests held at most; one more is answered at once with 503 and Retry-After (or goes
    down the fallback chain). 0 holds nothing."""
    cold_start_timeout: Duration = "10m"
    """Longest a request waits for a ready replica; then 503 with Retry-After, or the fallback
    chain. requestTimeout counts from the end of the wait."""
    fallback_while_cold: bool = False
    """With fallbacks: while no replica is ready, send requests down the fallback chain at once
    instead of holding them (they still wake the model up)."""

    rules: ClassVar[tuple[Rule, ...]] = (
        positive_duration("coldStartTimeout", "cold_start_timeout", "routing.hold"),
    )


class RoutingSpec(ApiModel):
    """Gateway routing for this model: timeouts and fallback routes."""

    fallbacks: Annotated[list[Fallback], Field(max_length=10)] = []
    """Ordered fallback chain, tried when this model fails before the first byte."""
    fallback_on: Annotated[list[FallbackTrigger], Field(max_length=5)] = [
        "connectError",
        "timeout",
        "429",
        "5xx",
        "saturated",
    ]
    """Failures that send a request down the chain."""
    request_timeout: Duration = "120s"
    """Longest a request may take end to end."""
    first_byte_timeout: Duration = "30s"
    """Longest wait for the first byte before a request counts as timed out (and may fall back)."""
    saturation_queue_depth: Annotated[int, Field(ge=1, le=100000)] | None = None
    """Waiting requests per replica above which the model counts as saturated: with
    engine.maxNumSeqs set, a request that finds every replica running maxNumSeqs waits at
    the gateway, up to this many per ready replica; one more falls back (saturated).
    Without engine.maxNumSeqs the gateway does not count slots and never saturates."""
    resume_streams: bool | None = None
    """Continue a streamed chat or text completion whose replica fails after the first
    byte on the next route (another replica, then the fallbacks): the text streamed so
    far is sent as an assistant prefix (vLLM's continue_final_message) and max_tokens is
    reduced by the tokens already sent; the client sees one stream. Default false: the
    stream ends with an error event."""
    hold: RoutingHold = RoutingHold()
    """Holding requests while no replica is ready (scale from zero, cold starts)."""
    client_limits: ClientLimits | None = None
    """Budgets of each client key on this model, on top of the key's own gateway-wide ones
    (the chart's gateway.edge): requests per second, tokens per minute (counted from the
    usage the answers report) and requests in flight. Without client keys at the gateway
    they bound all of this model's traffic together. Over a budget the gateway answers 429
    with Retry-After."""

    rules: ClassVar[tuple[Rule, ...]] = (
        positive_duration("requestTimeout", "request_timeout", "routing"),
        positive_duration("firstByteTimeout", "first_byte_timeout", "routing"),
        Rule(
            cel="!has(self.fallbacks) || self.fallbacks.all(f, !has(f.llmDeployment) || "
            "self.fallbacks.filter(g, has(g.llmDeployment) && "
            "g.llmDeployment == f.llmDeployment).size() == 1)",
            message="routing.fallbacks lists the same llmDeployment twice",
            holds=lambda r: (
                len({f.llm_deployment for f in r.fallbacks if f.llm_deployment})
                == len([f for f in r.fallbacks if f.llm_deployment])
            ),
            field_path=".fallbacks",
        ),
        Rule(
            cel="!has(self.fallbackOn) || self.fallbackOn.all(t, "
            "self.fallbackOn.filter(u, u == t).size() == 1)",
            message="routing.fallbackOn lists a trigger twice",
            holds=lambda r: len(set(r.fallback_on)) == len(r.fallback_on),
            field_path=".fallbackOn",
        ),
    )


class Toleration(ApiModel):
    """A Kubernetes toleration."""

    key: Annotated[str, Field(max_length=317)] | None = None
    """Taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (the default)."""
    value: Annotated[str, Field(max_length=63)] | None = None
    """Taint value for Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value)",
            message="a toleration with operator Exists takes no value",
            holds=lambda t: t.operator != "Exists" or t.value is None,
        ),
    )


class SchedulingSpec(ApiModel):
    """Where replicas may run, besides the GPU product."""

    node_selector: Annotated[dict[str, str], Field(max_length=64)] = {}
    """Node labels every replica's node must carry."""
    tolerations: Annotated[list[Toleration], Field(max_length=64)] = []
    """Tolerations added to the nvidia.com/gpu toleration the operator always sets."""
    affinity: Affinity | None = None
    """A Kubernetes Affinity (nodeAffinity, podAffinity, podAntiAffinity), passed through to
    the pods."""
    priority_class_name: DnsSubdomainName | None = None
    """PriorityClass of the pods."""
    service_account_name: DnsSubdomainName | None = None
    """ServiceAccount the pods run as. Defaults to the namespace's default."""


class PodMonitorSpec(ApiModel):
    """A prometheus-operator PodMonitor for this LLMDeployment's engine pods (both tracks)."""

    enabled: bool = False
    """Render it (the operator must run with prometheus-operator's CRDs: --prometheus-operator)."""
    interval: Duration = "15s"
    """Scrape interval."""
    labels: Annotated[dict[str, str], Field(max_length=32)] = {}
    """Labels on the PodMonitor, for example the one your Prometheus' podMonitorSelector picks."""

    rules: ClassVar[tuple[Rule, ...]] = (
        positive_duration("interval", "interval", "monitoring.podMonitor"),
    )


class AlertsSpec(ApiModel):
    """A prometheus-operator PrometheusRule with this model's own objectives: the chart's
    alerts (docs/runbooks.md) scoped to this LLMDeployment, with the thresholds set here."""

    enabled: bool = False
    """Render it (the operator must run with prometheus-operator's CRDs: --prometheus-operator)."""
    ttft_p95_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=2.0, alias="ttftP95Seconds"
    )
    """Objective for the gateway's TTFT p95 of this model, seconds (LLMTTFTp95AboveObjective)."""
    error_ratio: Annotated[float, Field(gt=0, le=1)] = 0.05
    """Share of failed requests above which LLMErrorRateHigh fires."""
    stalled_for: Duration = "5m"
    """How long an engine with requests may generate no token before LLMEngineStalled."""
    idle_for: Duration = "1h"
    """How long ready replicas may generate no token before LLMGPUsIdle."""
    labels: Annotated[dict[str, str], Field(max_length=32)] = {}
    """Labels on the PrometheusRule, for example the one your Prometheus' ruleSelector picks."""

    rules: ClassVar[tuple[Rule, ...]] = (
        positive_duration("stalledFor", "stalled_for", "monitoring.alerts"),
        positive_duration("idleFor", "idle_for", "monitoring.alerts"),
    )


class MonitoringSpec(ApiModel):
    """prometheus-operator objects for this LLMDeployment, opt-in. The chart's own PodMonitor
    and PrometheusRule cover every engine with one set of thresholds; these serve a team's own
    Prometheus, or a model whose objectives differ."""

    pod_monitor: PodMonitorSpec = PodMonitorSpec()
    """A PodMonitor for the engine pods."""
    alerts: AlertsSpec = AlertsSpec()
    """A PrometheusRule with this model's alerts."""


class LLMDeploymentSpec(ApiModel):
    """Desired state of an LLMDeployment."""

    model: ModelSpec
    """The model and the name it is served as."""
    engine: EngineSpec = EngineSpec()
    """Inference engine settings."""
    resources: ResourcesSpec = ResourcesSpec()
    """GPU type and per-replica resources."""
    parallelism: ParallelismSpec = ParallelismSpec()
    """Tensor and pipeline parallelism."""
    replicas: Annotated[int, Field(ge=0, le=1000)] | None = None
    """Fixed replica count when autoscaling is not set. Defaults to 1."""
    autoscaling: AutoscalingSpec | None = None
    """Queue-depth autoscaling; when set, the autoscaler owns the replica count."""
    rollout: RolloutSpec = RolloutSpec()
    """How new revisions replace old ones."""
    routing: RoutingSpec = RoutingSpec()
    """Gateway routing and fallbacks."""
    scheduling: SchedulingSpec = SchedulingSpec()
    """Node placement."""
    monitoring: MonitoringSpec = MonitoringSpec()
    """prometheus-operator monitoring objects for this LLMDeployment (opt-in)."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!(has(self.replicas) && has(self.autoscaling))",
            message="set either replicas or autoscaling, not both: with autoscaling the "
            "autoscaler owns the replica count",
            holds=lambda s: not (s.replicas is not None and s.autoscaling is not None),
        ),
        Rule(
            cel="!has(self.parallelism) || !has(self.parallelism.tensor) || "
            "type(self.parallelism.tensor) == string || "
            "self.parallelism.tensor <= (has(self.resources) && has(self.resources.gpu) && "
            "has(self.resources.gpu.perNode) ? self.resources.gpu.perNode : 8)",
            message="parallelism.tensor must not exceed resources.gpu.perNode: one replica's "
            "tensor-parallel group runs on one node",
            holds=lambda s: (
                s.parallelism.tensor == "auto" or s.parallelism.tensor <= s.resources.gpu.per_node
            ),
            field_path=".parallelism.tensor",
        ),
    )

    @property
    def desired_replicas(self) -> int:
        if self.autoscaling is not None:
            return self.autoscaling.min_replicas
        return 1 if self.replicas is None else self.replicas


class Condition(ApiModel):
    """A condition in the Kubernetes API conventions' shape."""

    type: Annotated[str, Field(max_length=316)]
    """Ready, Progressing, Degraded, ScalingReady, CanaryProgressing or FallbackActive."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: Annotated[str, Field(max_length=1024)] = ""
    """CamelCase reason."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """What happened, for a person."""
    observed_generation: int | None = None
    """The generation this condition describes."""
    last_transition_time: str | None = None
    """When status last changed (RFC 3339)."""


class SizingPlan(ApiModel):
    """What the planner decided for one replica."""

    tensor_parallel_size: int
    """Resolved tensor-parallel size."""
    pipeline_parallel_size: int
    """Pipeline-parallel size."""
    gpus_per_replica: int
    """GPUs one replica uses."""
    weight_gi_b_per_gpu: float | None = None
    """Model weights on each GPU, GiB."""
    kv_cache_gi_b_per_gpu: float | None = None
    """Memory left for the KV cache on each GPU, GiB."""
    kv_cache_tokens: int | None = None
    """Tokens of KV cache one replica holds; unset while the model's numbers are unknown."""
    max_model_len: int | None = None
    """Sequence length the plan was made for."""


class CanaryAnalysisResult(ApiModel):
    """The last canary analysis."""

    time: str | None = None
    """When it ran (RFC 3339)."""
    verdict: Literal["Pass", "Fail", "Inconclusive"] | None = None
    """Pass, Fail, or Inconclusive (too little data)."""
    error_rate: float | None = None
    """Canary error rate in the interval."""
    ttft_p95_ratio: float | None = None
    """Canary/stable p95 time-to-first-token ratio."""
    requests: int | None = None
    """Canary requests in the interval."""
    stable_error_rate: float | None = None
    """Stable error rate in the interval, for comparison."""
    ttft_p95_seconds: float | None = Field(default=None, alias="ttftP95Seconds")
    """Canary p95 time to first token, seconds."""
    stable_ttft_p95_seconds: float | None = Field(default=None, alias="stableTtftP95Seconds")
    """Stable p95 time to first token, seconds."""
    failed_check: Literal["error-rate", "ttft-ratio"] | None = None
    """On a Fail, the check that failed."""
    message: str | None = None
    """Why, for a person."""


class CanaryStatus(ApiModel):
    """Where a canary rollout stands."""

    phase: (
        Literal["Progressing", "Paused", "Promoting", "Draining", "RolledBack", "Aborted"] | None
    ) = None
    """Progressing (steps and analysis), Paused, Promoting (the stable takes the new
    revision), Draining (weight 0, canary pods going), RolledBack or Aborted (the revision
    is remembered and not retried until the spec changes)."""

    step: int | None = None
    """Index of the current step."""
    weight: int | None = None
    """Current canary weight, percent."""
    revision: str | None = None
    """Pod-template hash of the canary."""
    stable_revision: str | None = None
    """Pod-template hash of the stable track."""
    step_started_at: str | None = None
    """When the current step began (RFC 3339)."""
    failed_analyses: int | None = None
    """Failed intervals so far."""
    last_analysis: CanaryAnalysisResult | None = None
    """The latest analysis."""
    paused_at: str | None = None
    """When it was paused (RFC 3339), while Paused."""
    message: str | None = None
    """What it is doing or waiting for, for a person."""


class CostStatus(ApiModel):
    """What the engine pods cost since countedSince (written by the operator's day-2 loop)."""

    gpu_seconds: float | None = None
    """GPU-seconds the engine pods held: each pod's run time (status.startTime to its end)
    times the GPUs in its limits."""
    tokens: int | None = None
    """Prompt and generated tokens the engine pods reported (their vLLM counters)."""
    gpu_hour_price: float | None = None
    """The operator's price of one GPU-hour (--gpu-hour-price), when set."""
    per_million_tokens: float | None = None
    """gpuSeconds / 3600 x gpuHourPrice per million tokens, once tokens were served."""
    counted_since: str | None = None
    """When the operator started counting (RFC 3339)."""
    updated_at: str | None = None
    """When these numbers were taken (RFC 3339)."""


class LLMDeploymentStatus(ApiModel):
    """Observed state, written only by the operator."""

    phase: Phase | None = None
    """Pending, Progressing, Ready, Degraded or Failed."""
    observed_generation: int | None = None
    """The spec generation this status describes."""
    conditions: list[Condition] = []
    """Ready, Progressing, Degraded, ScalingReady, CanaryProgressing, FallbackActive."""
    replicas: int | None = None
    """Replicas of all tracks."""
    ready_replicas: int | None = None
    """Ready replicas of all tracks."""
    desired_replicas: int | None = None
    """Replicas the Deployments of all tracks ask for (with autoscaling: what the autoscaler
    set)."""
    gpus_per_replica: int | None = None
    """GPUs one replica uses."""
    endpoint: str | None = None
    """In-cluster OpenAI base URL."""
    served_name: str | None = None
    """The model name clients send."""
    revision: str | None = None
    """Pod-template hash of the stable track."""
    plan: SizingPlan | None = None
    """GPU sizing."""
    canary: CanaryStatus | None = None
    """Canary progress, while one runs."""
    cost: CostStatus | None = None
    """GPU-seconds and tokens, updated when an engine pod starts or stops and at most every
    --cost-status-interval-seconds otherwise."""


class ObjectMeta(ApiModel):
    """The parts of metadata the operator reads; the rest passes through."""

    model_config = ConfigDict(**{**ApiModel.model_config, "extra": "allow"})

    name: Annotated[str, Field(max_length=253)] | None = None
    """Object name."""
    namespace: str | None = None
    """Namespace."""
    uid: str | None = None
    """UID."""
    generation: int | None = None
    """Spec generation."""
    labels: dict[str, str] = {}
    """Labels."""
    annotations: dict[str, str] = {}
    """Annotations."""


class LLMDeployment(ApiModel):
    """One model served on GPUs: vLLM replicas sized for tensor parallelism, queue-depth
    autoscaling, canary rollouts and fallback routes."""

    api_version: Literal["llmoperator.io/v1alpha1"] = API_VERSION  # type: ignore[assignment]
    """llmoperator.io/v1alpha1"""
    kind: Literal["LLMDeployment"] = KIND  # type: ignore[assignment]
    """LLMDeployment"""
    metadata: ObjectMeta = ObjectMeta()
    """Standard object metadata."""
    spec: LLMDeploymentSpec
    """Desired state."""
    status: LLMDeploymentStatus | None = None
    """Observed state."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.spec.routing) || !has(self.spec.routing.fallbacks) || "
            "self.spec.routing.fallbacks.all(f, !has(f.llmDeployment) || "
            "f.llmDeployment != self.metadata.name)",
            message="routing.fallbacks must not name this LLMDeployment itself",
            holds=lambda d: (
                d.metadata.name is None
                or all(f.llm_deployment != d.metadata.name for f in d.spec.routing.fallbacks)
            ),
        ),
    )
