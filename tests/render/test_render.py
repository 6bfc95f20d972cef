"""What the renderers promise, one behaviour at a time."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from llm_operator.api import LLMDeployment
from llm_operator.planner import plan
from llm_operator.render import (
    RenderConfig,
    RenderError,
    object_name,
    pod_template_hash,
    render_all,
    render_deployment,
    status_extras,
)
from llm_operator.render.names import dns_label, label_value
from llm_operator.render.vllm_deployment import (
    DRAIN_SETTLE_SECONDS,
    SHUTDOWN_SECONDS,
    STARTUP_MAX_SECONDS,
    STARTUP_MIN_SECONDS,
)
from tests.render.schemas import validate

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def llmd(spec: dict[str, Any] | None = None, **metadata: Any) -> LLMDeployment:
    body: dict[str, Any] = {
        "metadata": {"name": "llama", "namespace": "ml", **metadata},
        "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, **(spec or {})},
    }
    return LLMDeployment.model_validate(body)


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {obj["kind"]: obj for obj in objects}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only  # type: ignore[no-any-return]


def deployment_of(resource: LLMDeployment, config: RenderConfig | None = None) -> dict[str, Any]:
    return by_kind(render_all(resource, config))["Deployment"]


def test_objects_come_in_apply_order() -> None:
    kinds = [o["kind"] for o in render_all(llmd({"autoscaling": {"maxReplicas": 3}}))]
    assert kinds == ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
    assert [o["kind"] for o in render_all(llmd())] == ["Deployment", "Service"]


def test_vllm_serve_takes_the_model_as_its_positional_argument_and_extra_args_last() -> None:
    resource = llmd(
        {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "revision": "main"},
            "engine": {
                "quantization": "fp8",
                "kvCacheDtype": "fp8",
                "maxModelLen": 4096,
                "maxNumSeqs": 64,
                "gpuMemoryUtilization": 0.85,
                "extraArgs": ["--enable-prefix-caching", "--max-num-batched-tokens=4096"],
            },
        }
    )
    engine = container(deployment_of(resource))
    args = engine["args"]
    assert "command" not in engine  # the image's entrypoint is `vllm serve`
    assert args[0] == "meta-llama/Llama-3.1-8B-Instruct"
    assert "--model" not in args and "serve" not in args
    assert args[-2:] == ["--enable-prefix-caching", "--max-num-batched-tokens=4096"]
    flags = dict(zip(args[1:-2:2], args[2:-2:2], strict=True))
    assert flags == {
        "--served-model-name": "meta-llama/Llama-3.1-8B-Instruct",
        "--port": "8000",
        "--tensor-parallel-size": "1",
        "--pipeline-parallel-size": "1",
        "--dtype": "auto",
        "--gpu-memory-utilization": "0.85",
        "--max-model-len": "4096",
        "--quantization": "fp8",
        "--kv-cache-dtype": "fp8",
        "--revision": "main",
        "--max-num-seqs": "64",
    }


def test_optional_flags_are_left_to_vllm_when_unset() -> None:
    args = container(deployment_of(llmd()))["args"]
    for flag in ("--max-model-len", "--quantization", "--kv-cache-dtype", "--revision"):
        assert flag not in args


def test_gpu_limit_is_tensor_times_pipeline_on_the_configured_resource() -> None:
    resource = llmd(
        {
            "model": {"name": "meta-llama/Llama-3.1-70B-Instruct"},
            "engine": {"maxModelLen": 8192},
            "resources": {"gpu": {"resourceName": "amd.com/gpu", "memoryGiB": 192}},
            "parallelism": {"tensor": 2, "pipeline": 2},
        }
    )
    deployment = deployment_of(resource)
    resources = container(deployment)["resources"]
    assert resources["limits"]["amd.com/gpu"] == "4"
    assert "nvidia.com/gpu" not in resources["limits"]
    assert resources["requests"]["amd.com/gpu"] == "4"
    tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_shared_memory_is_a_memory_backed_empty_dir_at_dev_shm() -> None:
    deployment = deployment_of(llmd({"resources": {"sharedMemorySize": "8Gi"}}))
    pod = deployment["spec"]["template"]["spec"]
    (dshm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(deployment)["volumeMounts"]


def test_token_cache_and_user_env() -> None:
    resource = llmd(
        {
            "model": {
                "name": "meta-llama/Llama-3.1-8B-Instruct",
                "tokenSecretRef": {"name": "hf", "key": "token"},
                "cache": {"claimName": "weights"},
            },
            "engine": {"env": [{"name": "HF_HOME", "value": "/elsewhere"}]},
        }
    )
    deployment = deployment_of(resource)
    env = container(deployment)["env"]
    names = [item["name"] for item in env]
    assert len(names) == len(set(names))  # server-side apply keys env by name
    assert {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
    } in env
    assert {"name": "HF_HOME", "value": "/elsewhere"} in env  # the user's value wins
    assert "HF_HUB_OFFLINE" not in names  # the cache is writable
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    cache = {"claimName": "weights", "readOnly": False}
    assert {"name": "model-cache", "persistentVolumeClaim": cache} in volumes


def test_probes_give_large_models_tens_of_minutes_to_start() -> None:
    small = container(deployment_of(llmd()))
    large = container(
        deployment_of(
            llmd(
                {
                    "model": {"name": "meta-llama/Llama-3.1-405B-Instruct"},
                    "engine": {"quantization": "fp8", "maxModelLen": 8192},
                }
            )
        )
    )

    def budget(c: dict[str, Any]) -> int:
        probe = c["startupProbe"]
        return int(probe["periodSeconds"] * probe["failureThreshold"])

    assert STARTUP_MIN_SECONDS <= budget(small) < budget(large) <= STARTUP_MAX_SECONDS
    assert budget(small) >= 15 * 60
    for probe in ("startupProbe", "readinessProbe"):
        assert small[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert small["livenessProbe"]["httpGet"] == {"path": "/version", "port": "http"}
    configured = container(deployment_of(llmd(), RenderConfig(startup_timeout_seconds=7200)))
    assert budget(configured) == 7200


def test_pre_stop_drains_within_the_request_timeout_and_the_grace_period_covers_it() -> None:
    deployment = deployment_of(llmd({"routing": {"requestTimeout": "15m"}}))
    script = container(deployment)["lifecycle"]["preStop"]["exec"]["command"][2]
    assert "deadline = time.monotonic() + 900" in script
    assert "vllm:num_requests_running" in script and "vllm:num_requests_waiting" in script
    compile(script, "preStop", "exec")  # the hook is valid Python
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == DRAIN_SETTLE_SECONDS + 900 + SHUTDOWN_SECONDS


def test_ordinary_request_timeout_edits_do_not_restart_pods() -> None:
    config = RenderConfig()
    hashes = {
        pod_template_hash(resource, config, plan(resource.spec))
        for timeout in ("30s", "2m", "10m")
        for resource in [llmd({"routing": {"requestTimeout": timeout}})]
    }
    assert len(hashes) == 1


def test_security_context_is_tight_and_non_root_only_when_configured() -> None:
    default = deployment_of(llmd())
    pod = default["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # VLLM_PORT from a Service named vllm breaks vLLM
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    security = container(default)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "runAsNonRoot" not in security

    non_root = deployment_of(llmd(), RenderConfig(run_as_user=1001))
    pod = non_root["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1001
    assert pod["securityContext"]["fsGroup"] == 1001
    assert {"name": "HOME", "value": "/home/vllm"} in container(non_root)["env"]
    # PyTorch names its compile cache after getpass.getuser(), which needs USER for a UID
    # the image's passwd does not know.
    assert {"name": "USER", "value": "vllm"} in container(non_root)["env"]
    assert "USER" not in {e["name"] for e in container(default)["env"]}
    assert {"name": "home", "emptyDir": {}} in pod["volumes"]


def test_scheduling_on_the_gpu_product_with_the_users_tolerations() -> None:
    resource = llmd(
        {
            "resources": {"gpu": {"product": "NVIDIA-H100-80GB-HBM3"}},
            "scheduling": {
                "nodeSelector": {"pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-A10G"},
                "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoExecute"}],
            },
        }
    )
    pod = deployment_of(resource)["spec"]["template"]["spec"]
    # The typed field wins over a nodeSelector entry for the same label.
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "gpu"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists", "effect": "NoExecute"},
    ]


def test_rollout_strategy_defaults_to_no_surge_and_honours_recreate() -> None:
    strategy = deployment_of(llmd())["spec"]["strategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    recreate = deployment_of(llmd({"rollout": {"strategy": "Recreate"}}))["spec"]["strategy"]
    assert recreate == {"type": "Recreate"}


def test_replicas_belong_to_the_autoscaler_when_there_is_one() -> None:
    assert deployment_of(llmd({"replicas": 3}))["spec"]["replicas"] == 3
    assert deployment_of(llmd())["spec"]["replicas"] == 1
    autoscaled = deployment_of(llmd({"autoscaling": {"minReplicas": 2, "maxReplicas": 4}}))
    assert "replicas" not in autoscaled["spec"]


def test_every_object_carries_the_design_labels() -> None:
    objects = render_all(llmd({"autoscaling": {"maxReplicas": 2}}))
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "vllm"
        assert labels["app.kubernetes.io/instance"] == "llama"
        assert labels["app.kubernetes.io/managed-by"] == "llm-operator"
        assert labels["llmoperator.io/deployment"] == "llama"
        assert obj["metadata"]["namespace"] == "ml"
    components = {
        o["kind"]: o["metadata"]["labels"]["app.kubernetes.io/component"] for o in objects
    }
    assert components == {
        "Deployment": "engine",
        "Service": "service",
        "PodDisruptionBudget": "engine",
        "HorizontalPodAutoscaler": "autoscaler",
    }
    deployment = objects[0]
    assert deployment["metadata"]["labels"]["llmoperator.io/track"] == "stable"
    assert deployment["spec"]["template"]["metadata"]["labels"]["llmoperator.io/track"] == "stable"


def test_service_selects_the_stable_track_only() -> None:
    resource = llmd()
    config = RenderConfig()
    sizing = plan(resource.spec)
    service = by_kind(render_all(resource))["Service"]
    assert service["spec"]["ports"] == [
        {
            "name": "http",
            "port": 8000,
            "targetPort": "http",
            "protocol": "TCP",
            "appProtocol": "http",
        }
    ]
    selector = service["spec"]["selector"].items()
    stable = render_deployment(resource, config, sizing)
    canary = render_deployment(resource, config, sizing, track="canary", replicas=1)
    assert selector <= stable["spec"]["template"]["metadata"]["labels"].items()
    assert not selector <= canary["spec"]["template"]["metadata"]["labels"].items()


def test_canary_track_has_its_own_name_labels_selector_and_replicas() -> None:
    resource = llmd({"autoscaling": {"maxReplicas": 4}})
    config = RenderConfig()
    sizing = plan(resource.spec)
    canary = render_deployment(resource, config, sizing, track="canary", replicas=2)
    assert canary["metadata"]["name"] == "llama-canary"
    assert canary["metadata"]["labels"]["llmoperator.io/track"] == "canary"
    assert canary["spec"]["selector"]["matchLabels"] == {
        "llmoperator.io/deployment": "llama",
        "llmoperator.io/track": "canary",
    }
    assert canary["spec"]["replicas"] == 2
    validate(canary)


def test_pod_template_hash_identifies_the_spec_not_the_track() -> None:
    resource = llmd()
    config = RenderConfig()
    sizing = plan(resource.spec)
    stable = render_deployment(resource, config, sizing)
    canary = render_deployment(resource, config, sizing, track="canary", replicas=1)
    key = "llmoperator.io/pod-template-hash"
    assert stable["metadata"]["annotations"][key] == canary["metadata"]["annotations"][key]
    assert stable["metadata"]["annotations"][key] == pod_template_hash(resource, config, sizing)
    changed = llmd({"engine": {"image": "vllm/vllm-openai:v0.11.1"}})
    assert pod_template_hash(changed, config, plan(changed.spec)) != pod_template_hash(
        resource, config, sizing
    )
    # Replica counts are not part of the pod template.
    scaled = llmd({"replicas": 5})
    assert pod_template_hash(scaled, config, plan(scaled.spec)) == pod_template_hash(
        resource, config, sizing
    )


def test_hpa_targets_queue_depth_per_pod_with_fast_up_and_slow_down() -> None:
    resource = llmd(
        {
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 8,
                "targetQueueDepth": 0.5,
                "scaleDown": {"stabilizationSeconds": 900, "maxPodsPerStep": 2},
            }
        }
    )
    hpa = by_kind(render_all(resource, RenderConfig(hpa_metric_name="queue")))[
        "HorizontalPodAutoscaler"
    ]
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "llama",
    }
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 8)
    assert spec["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "queue"},
                "target": {"type": "AverageValue", "averageValue": "500m"},
            },
        }
    ]
    up, down = spec["behavior"]["scaleUp"], spec["behavior"]["scaleDown"]
    assert up["stabilizationWindowSeconds"] == 0
    assert up["policies"] == [{"type": "Pods", "value": 4, "periodSeconds": 30}]
    assert down["stabilizationWindowSeconds"] == 900
    assert down["policies"] == [{"type": "Pods", "value": 2, "periodSeconds": 60}]


def test_keda_scaled_object_queries_the_stable_pods() -> None:
    resource = llmd({"autoscaling": {"provider": "keda", "minReplicas": 0, "maxReplicas": 2}})
    scaled = by_kind(render_all(resource))["ScaledObject"]
    validate(scaled)
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["metadata"]["query"] == (
        'sum(vllm:num_requests_waiting{namespace="ml",pod=~"llama-[a-z0-9]+-[a-z0-9]+"})'
    )
    assert trigger["metadata"]["serverAddress"] == RenderConfig().keda_prometheus_address
    assert trigger["metadata"]["threshold"] == "4"
    # The canary's pods (llama-canary-<hash>-<id>) do not match the stable regex.
    pattern = re.compile(r"llama-[a-z0-9]+-[a-z0-9]+")
    assert pattern.fullmatch("llama-7d9f8c6b5-x2k4q")
    assert not pattern.fullmatch("llama-canary-7d9f8c6b5-x2k4q")


def pod_name(replica_set: str) -> str:
    """What the API server names a ReplicaSet's pod: the prefix cut to 58, then 5 characters."""
    return f"{replica_set}-"[:58] + "x2k4q"


@pytest.mark.parametrize("length", [5, 40, 47, 50, 56, 63, 80])
def test_keda_matches_stable_pods_but_not_canary_pods_whatever_the_name_length(
    length: int,
) -> None:
    name = ("l" + "a" * 100)[:length]
    resource = llmd({"autoscaling": {"provider": "keda", "maxReplicas": 2}}, name=name)
    scaled = by_kind(render_all(resource))["ScaledObject"]
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    matchers = re.findall(r'pod(=~|!~)"((?:[^"\\]|\\.)*)"', query)
    assert matchers

    def selected(pod: str) -> bool:
        # PromQL regex matchers are anchored at both ends.
        return all((re.fullmatch(rx, pod) is not None) == (op == "=~") for op, rx in matchers)

    stable, canary = object_name(resource), object_name(resource, "canary")
    assert selected(pod_name(f"{stable}-7d9f8c6b5"))
    assert selected(pod_name(f"{stable}-7d9f8c6b5d"))
    assert not selected(pod_name(f"{canary}-7d9f8c6b5"))


def test_autoscaling_the_installation_cannot_provide_is_refused() -> None:
    keda = llmd({"autoscaling": {"provider": "keda", "maxReplicas": 2}})
    with pytest.raises(RenderError, match="kedaEnabled: false"):
        render_all(keda, RenderConfig(keda_enabled=False))
    hpa = llmd({"autoscaling": {"maxReplicas": 2}})
    with pytest.raises(RenderError, match="hpaEnabled: false"):
        render_all(hpa, RenderConfig(hpa_enabled=False))


def test_pdb_only_when_more_than_one_replica_can_run() -> None:
    assert "PodDisruptionBudget" not in by_kind(render_all(llmd({"replicas": 1})))
    pdb = by_kind(render_all(llmd({"replicas": 2})))["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["llmoperator.io/track"] == "stable"


def test_default_engine_image_applies_only_when_the_spec_leaves_it_unset() -> None:
    config = RenderConfig(default_engine_image="mirror.example/vllm:v0.11.0")
    assert container(deployment_of(llmd(), config))["image"] == "mirror.example/vllm:v0.11.0"
    pinned = llmd({"engine": {"image": "vllm/vllm-openai:v0.10.2"}})
    assert container(deployment_of(pinned, config))["image"] == "vllm/vllm-openai:v0.10.2"


def test_models_on_volumes_and_object_storage() -> None:
    on_pvc = deployment_of(
        llmd({"model": {"name": "pvc://weights/llama/8b"}, "parallelism": {"tensor": 1}})
    )
    assert container(on_pvc)["args"][0] == "/mnt/model/llama/8b"
    volumes = on_pvc["spec"]["template"]["spec"]["volumes"]
    source = {"claimName": "weights", "readOnly": True}
    assert {"name": "model-source", "persistentVolumeClaim": source} in volumes
    on_s3 = container(
        deployment_of(llmd({"model": {"name": "s3://b/m"}, "parallelism": {"tensor": 1}}))
    )
    assert on_s3["args"][0] == "s3://b/m"
    assert on_s3["args"][-2:] == ["--load-format", "runai_streamer"]
    own_format = llmd(
        {
            "model": {"name": "s3://b/m"},
            "parallelism": {"tensor": 1},
            "engine": {"extraArgs": ["--load-format=safetensors"]},
        }
    )
    assert container(deployment_of(own_format))["args"].count("--load-format") == 0


@pytest.mark.parametrize("name", ["pvc://", "pvc:///path", "pvc://Claim_1/x"])
def test_a_pvc_model_needs_a_valid_claim_name(name: str) -> None:
    # The API (and the CRD's CEL rule) refuses these before anything renders.
    with pytest.raises(ValidationError, match="needs CLAIM to be a PersistentVolumeClaim name"):
        llmd({"model": {"name": name}, "parallelism": {"tensor": 1}})


def test_names_are_valid_and_distinct_however_the_llmdeployment_is_named() -> None:
    assert dns_label("llama") == "llama"
    dotted, dashed = dns_label("llama-3.1-8b"), dns_label("llama-3-1-8b")
    assert dotted != dashed
    assert DNS_1035.match(dotted) and dotted.startswith("llama-3-1-8b-")
    digit = dns_label("3b-model")
    assert DNS_1035.match(digit)
    long = "a" * 200 + ".example"
    for name in (dns_label(long), dns_label(long, "canary")):
        assert len(name) <= 63 and DNS_1035.match(name)
    assert dns_label(long, "canary").endswith("-canary")
    value = label_value(long)
    assert len(value) <= 63 and value != label_value(long + "x")


def test_owner_references_once_the_llmdeployment_has_a_uid() -> None:
    assert all("ownerReferences" not in o["metadata"] for o in render_all(llmd()))
    owned = render_all(llmd(uid="1234"))
    for obj in owned:
        (reference,) = obj["metadata"]["ownerReferences"]
        assert reference == {
            "apiVersion": "llmoperator.io/v1alpha1",
            "kind": "LLMDeployment",
            "name": "llama",
            "uid": "1234",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_status_extras_describe_the_plan_and_endpoint() -> None:
    resource = llmd({"model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "l8"}})
    config = RenderConfig(cluster_domain="corp.local")
    extras = status_extras(resource, config)
    assert extras["gpusPerReplica"] == 1
    assert extras["endpoint"] == "http://llama.ml.svc.corp.local:8000/v1"
    assert extras["servedName"] == "l8"
    assert extras["revision"] == pod_template_hash(resource, config, plan(resource.spec))
    assert extras["plan"]["tensorParallelSize"] == 1
    assert extras["plan"]["maxModelLen"] == 131072
    unknown = llmd({"model": {"name": "acme/x"}, "parallelism": {"tensor": 2}})
    assert status_extras(unknown)["plan"] == {
        "tensorParallelSize": 2,
        "pipelineParallelSize": 1,
        "gpusPerReplica": 2,
    }
    assert status_extras(unknown)["gpusPerReplica"] == 2


def test_object_name_is_shared_by_the_stable_objects() -> None:
    resource = llmd({"autoscaling": {"maxReplicas": 3}}, name="llama.v2")
    names = {o["metadata"]["name"] for o in render_all(resource)}
    assert names == {object_name(resource)}
    assert object_name(resource, "canary") == object_name(resource) + "-canary"
