"""Hypothesis strategies for LLMDeployments as users write them (wire form, camelCase).

They cover every field of the spec with values the models accept, leaning toward the edges
(names of 253 characters with dots, tiny GPUs, unknown models, partial architectures). Bodies
the models still refuse (a cross-field rule) are filtered out by the tests with `assume`.
"""

from __future__ import annotations

import typing
from typing import Any

from hypothesis import strategies as st

from llm_operator.api.v1alpha1 import EngineSpec
from llm_operator.planner import CATALOG


def choices(model: type[Any], field: str) -> st.SearchStrategy[Any]:
    """Every value a Literal field of the API accepts, read from the model itself."""
    annotation = model.model_fields[field].annotation
    literals = [a for a in typing.get_args(annotation) if a is not type(None)]
    if literals and not isinstance(literals[0], str):  # Optional[Literal[...]]
        literals = list(typing.get_args(literals[0]))
    assert literals, f"{model.__name__}.{field} is not a Literal"
    return st.sampled_from(literals)


_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


def _dns_label(max_size: int = 20) -> st.SearchStrategy[str]:
    inner = st.text(_ALNUM + "-", max_size=max_size)
    edge = st.sampled_from(_ALNUM)
    return st.builds(lambda a, m, b: a + m + b if m or b else a, edge, inner, edge | st.just(""))


dns_labels = _dns_label().filter(lambda s: not s.endswith("-"))
dns_subdomains = (
    st.lists(dns_labels, min_size=1, max_size=14).map(".".join).filter(lambda s: len(s) <= 253)
)

_catalog_names = st.sampled_from(sorted(entry.name for entry in CATALOG.values()))
model_names = st.one_of(
    _catalog_names,
    _catalog_names.map(lambda n: n.upper()),
    st.builds(lambda c, n: f"pvc://{c}/{n.rsplit('/', 1)[1]}", dns_labels, _catalog_names),
    st.builds(lambda b, p: f"s3://{b}/{p}", dns_labels, dns_labels),
    st.builds(lambda c, p: f"pvc://{c}/{p}", dns_labels, dns_labels),
    st.builds(lambda o, m: f"{o}/{m}", dns_labels, dns_labels),
)

architectures = st.fixed_dictionaries(
    {},
    optional={
        "parameters": st.floats(min_value=1e8, max_value=1e12),
        "numLayers": st.integers(1, 160),
        "numAttentionHeads": st.sampled_from([1, 8, 12, 14, 16, 28, 32, 40, 64, 96, 128]),
        "numKeyValueHeads": st.sampled_from([1, 2, 4, 8, 16, 32]),
        "headDim": st.sampled_from([64, 80, 128, 256]),
        "hiddenSize": st.sampled_from([1024, 2048, 4096, 5120, 8192]),
        "intermediateSize": st.integers(1024, 60000),
        "maxPositionEmbeddings": st.sampled_from([2048, 4096, 8192, 32768, 131072]),
    },
)

secret_refs = st.fixed_dictionaries(
    {
        "name": dns_subdomains.filter(lambda s: len(s) <= 60),
        "key": st.from_regex(r"[a-z_.-]{1,20}", fullmatch=True),
    }
)

models = st.fixed_dictionaries(
    {"name": model_names},
    optional={
        "revision": st.sampled_from(["main", "v2", "0123456789abcdef"]),
        "servedName": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,40}", fullmatch=True),
        "tokenSecretRef": secret_refs,
        "architecture": architectures,
        "cache": st.fixed_dictionaries(
            {"claimName": dns_labels}, optional={"readOnly": st.booleans()}
        ),
    },
)

_env_names = st.from_regex(r"[A-Z_][A-Z0-9_]{0,15}", fullmatch=True)
env_vars = st.lists(
    st.one_of(
        st.fixed_dictionaries({"name": _env_names, "value": st.text(max_size=30)}),
        st.fixed_dictionaries({"name": _env_names, "secretKeyRef": secret_refs}),
        st.sampled_from([{"name": "HF_HOME", "value": "/data"}, {"name": "HOME", "value": "/tmp"}]),
    ),
    max_size=4,
    unique_by=lambda e: e["name"],
)

engines = st.fixed_dictionaries(
    {},
    optional={
        "image": st.sampled_from(
            ["vllm/vllm-openai:v0.11.0", "registry.example/vllm@sha256:" + "a" * 64]
        ),
        "imagePullPolicy": choices(EngineSpec, "image_pull_policy"),
        "dtype": choices(EngineSpec, "dtype"),
        "quantization": choices(EngineSpec, "quantization"),
        "kvCacheDtype": choices(EngineSpec, "kv_cache_dtype"),
        "maxModelLen": st.integers(1, 200_000),
        "gpuMemoryUtilization": st.floats(min_value=0.05, max_value=1.0),
        "maxNumSeqs": st.integers(1, 1024),
        "extraArgs": st.lists(
            st.sampled_from(
                [
                    "--enable-prefix-caching",
                    "--load-format=safetensors",
                    "--enforce-eager",
                    "--seed",
                    "7",
                ]
            ),
            max_size=3,
        ),
        "env": env_vars,
    },
)

quantities = st.sampled_from(["1", "8", "500m", "16Gi", "64Gi", "1.5", "2G"])

tolerations = st.one_of(
    st.fixed_dictionaries(
        {"key": dns_labels, "operator": st.just("Exists")},
        optional={"effect": st.sampled_from(["NoSchedule", "PreferNoSchedule"])},
    ),
    st.fixed_dictionaries(
        {
            "key": dns_labels,
            "operator": st.just("Equal"),
            "value": dns_labels.filter(lambda s: len(s) <= 63),
            "effect": st.sampled_from(["NoSchedule", "PreferNoSchedule"]),
        }
    ),
    st.fixed_dictionaries(
        {
            "key": dns_labels,
            "operator": st.just("Exists"),
            "effect": st.just("NoExecute"),
            "tolerationSeconds": st.integers(0, 3600),
        }
    ),
    st.just({"operator": "Exists"}),
)

_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}
            ]
        }
    }
}

schedulings = st.fixed_dictionaries(
    {},
    optional={
        "nodeSelector": st.dictionaries(
            st.sampled_from(["pool", "topology.kubernetes.io/zone", "nvidia.com/gpu.product"]),
            dns_labels,
            max_size=2,
        ),
        "tolerations": st.lists(tolerations, max_size=3),
        "affinity": st.just(_AFFINITY),
        "priorityClassName": dns_labels,
        "serviceAccountName": dns_labels,
    },
)

behaviors = st.fixed_dictionaries(
    {},
    optional={
        "stabilizationSeconds": st.integers(0, 3600),
        "maxPodsPerStep": st.integers(1, 1000),
        "periodSeconds": st.integers(1, 1800),
    },
)


@st.composite
def autoscalings(draw: st.DrawFn) -> dict[str, Any]:
    provider = draw(st.sampled_from(["hpa", "keda"]))
    maximum = draw(st.integers(1, 1000))
    minimum = draw(st.integers(0 if provider == "keda" else 1, maximum))
    body: dict[str, Any] = {"provider": provider, "minReplicas": minimum, "maxReplicas": maximum}
    body |= draw(
        st.fixed_dictionaries(
            {},
            optional={
                "targetQueueDepth": st.floats(min_value=0.001, max_value=10000),
                "prometheusAddress": st.sampled_from(
                    ["http://prom:9090", "https://prom.example/x"]
                ),
                "scaleUp": behaviors,
                "scaleDown": behaviors,
            },
        )
    )
    return body


durations = st.sampled_from(["500ms", "30s", "2m", "1h30m", "90m", "2h", "0.5s"])


@st.composite
def rollouts(draw: st.DrawFn) -> dict[str, Any]:
    strategy = draw(st.sampled_from(["RollingUpdate", "Recreate", "Canary"]))
    surge = draw(st.integers(0, 3))
    body: dict[str, Any] = {
        "strategy": strategy,
        "maxSurge": surge,
        "maxUnavailable": draw(st.integers(0 if surge else 1, 3)),
    }
    if strategy == "Canary":
        weights = sorted(draw(st.sets(st.integers(1, 100), min_size=1, max_size=4)))
        body["canary"] = {"steps": [{"weight": w, "pause": draw(durations)} for w in weights]}
    return body


@st.composite
def llm_deployments(draw: st.DrawFn) -> dict[str, Any]:
    per_node = draw(st.sampled_from([1, 2, 4, 8]))
    gpu: dict[str, Any] = {
        "memoryGiB": draw(st.sampled_from([8, 16, 24, 40, 48, 80, 94, 141, 192])),
        "perNode": per_node,
    }
    gpu |= draw(
        st.fixed_dictionaries(
            {},
            optional={
                "resourceName": st.sampled_from(["nvidia.com/gpu", "amd.com/gpu"]),
                "product": st.sampled_from(
                    ["NVIDIA-H100-80GB-HBM3", "NVIDIA-L4", "NVIDIA-A100-SXM4-40GB"]
                ),
            },
        )
    )
    resources: dict[str, Any] = {"gpu": gpu}
    resources |= draw(
        st.fixed_dictionaries(
            {}, optional={"cpu": quantities, "memory": quantities, "sharedMemorySize": quantities}
        )
    )
    pipeline = draw(st.sampled_from([1, 1, 2]))
    tensor = draw(st.sampled_from(["auto", *[t for t in (1, 2, 4, 8) if t <= per_node]]))
    spec: dict[str, Any] = {
        "model": draw(models),
        "engine": draw(engines),
        "resources": resources,
        "parallelism": {"tensor": tensor, "pipeline": pipeline},
        "rollout": draw(rollouts()),
        "routing": {"requestTimeout": draw(durations)},
        "scheduling": draw(schedulings),
    }
    if draw(st.booleans()):
        spec["autoscaling"] = draw(autoscalings())
    elif draw(st.booleans()):
        spec["replicas"] = draw(st.integers(0, 1000))
    metadata: dict[str, Any] = {"name": draw(dns_subdomains)}
    metadata |= draw(
        st.fixed_dictionaries(
            {},
            optional={
                "namespace": dns_labels.filter(lambda s: len(s) <= 63),
                "uid": st.uuids().map(str),
            },
        )
    )
    return {
        "apiVersion": "llmoperator.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": metadata,
        "spec": spec,
    }


render_configs = st.fixed_dictionaries(
    {},
    optional={
        "runAsUser": st.integers(1, 65535),
        "gatewayQueueMetric": st.just("llm_gateway_requests_held"),
        "defaultEngineImage": st.just("mirror.example/vllm:v0.11.0"),
        "startupTimeoutSeconds": st.integers(60, 86400),
        "clusterDomain": st.just("corp.local"),
    },
)
