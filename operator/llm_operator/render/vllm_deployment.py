"""The vLLM Deployment of one track (stable or canary) of an LLMDeployment.

Choices a reviewer will ask about, and why:

- Arguments only, no command: the vllm/vllm-openai image's entrypoint is `vllm serve`, which
  takes the model as its first positional argument (`--model` is deprecated there).
- `enableServiceLinks: false`: Kubernetes would inject `<SERVICE>_PORT=tcp://...` variables,
  and a Service called `vllm` in the namespace sets VLLM_PORT, which vLLM reads as its own
  setting and fails on. The engine needs none of those variables.
- Security context: no privilege escalation, all capabilities dropped, RuntimeDefault
  seccomp, no service-account token (vLLM never calls the API). The official image runs as
  root and writes caches under /root (Hugging Face, torch.compile, Triton, FlashInfer), so
  runAsNonRoot is set only when the operator is configured with `runAsUser`, which also
  gives the engine a writable HOME and a USER name (the UID is not in the image's passwd).
  The root filesystem stays writable for the same caches.
- Resources: CPU, memory and ephemeral storage always set, from the plan unless the spec
  gives CPU or memory (planner/pod_resources.py): an engine without requests is BestEffort, the
  first pod a busy GPU node evicts.
- Probes: startup and readiness on /health, which fails when the engine core is dead (vLLM's
  check_health) and so takes the pod out of the gateway's backends within 15 seconds.
  Liveness on /version, answered by the API server alone, and lenient (2 minutes): it restarts
  only an API server that no longer answers at all. A slow /health on a saturated node then
  costs traffic, never a restart that reloads the weights; and a dead engine core makes vLLM
  exit by itself. Both paths are outside /v1, so `--api-key` does not guard them.
- Rollout: maxSurge 0 and maxUnavailable 1 by default, so a new revision never waits for
  GPUs that a full cluster does not have; Recreate when asked.
- A preStop hook drains: it waits until vLLM reports no running or waiting requests (at most
  routing.requestTimeout, at least 10 minutes), and the grace period covers that plus vLLM's
  own shutdown. Nothing in the pod template depends on the replica count, so scaling never
  restarts pods.
"""

from __future__ import annotations

import math
import re
from typing import Any

from llm_operator.api.patterns import DNS_SUBDOMAIN_PATTERN
from llm_operator.api.v1alpha1 import (
    EngineSpec,
    LLMDeployment,
    parse_duration_seconds,
)
from llm_operator.constants import ANNOTATION_POD_TEMPLATE_HASH, LABEL_TRACK
from llm_operator.planner import GIB, Plan, PlanError, pod_resources
from llm_operator.render.config import RenderConfig
from llm_operator.render.names import (
    Track,
    common_labels,
    content_hash,
    object_metadata,
    object_name,
    selector_labels,
)

ENGINE_PORT = 8000
PORT_NAME = "http"
HEALTH_PATH = "/health"
LIVENESS_PATH = "/version"
METRICS_PATH = "/metrics"

STARTUP_MIN_SECONDS = 15 * 60
STARTUP_MAX_SECONDS = 60 * 60
STARTUP_SECONDS_PER_GIB = 12
"""Start-up budget per GiB of weights: a download at roughly 100 MiB/s plus loading. A 70B
model in bfloat16 (131 GiB) gets 15 + 26 minutes; nothing gets less than 15 or more than 60."""
STARTUP_UNKNOWN_SECONDS = 30 * 60
STARTUP_PERIOD_SECONDS = 10

DRAIN_SETTLE_SECONDS = 5
"""Time for endpoint removal to reach the gateway before the drain starts counting."""
MIN_DRAIN_SECONDS = 600
MAX_DRAIN_SECONDS = 3600
SHUTDOWN_SECONDS = 30
"""vLLM's own shutdown after SIGTERM (engine processes, NCCL teardown)."""
HOME_DIR = "/home/vllm"
RUN_AS_USER_NAME = "vllm"

# Polls vLLM's metrics until nothing runs or waits, for at most the drain budget. Stdlib only:
# the image has python3 but not necessarily curl. A failed hook only skips the drain.
_DRAIN_SCRIPT = """\
import time, urllib.request
time.sleep({settle})
deadline = time.monotonic() + {drain}
while time.monotonic() < deadline:
    try:
        text = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=2).read().decode()
    except Exception:
        break
    busy = sum(float(line.rsplit(' ', 1)[1]) for line in text.splitlines()
               if line.startswith(('vllm:num_requests_running', 'vllm:num_requests_waiting')))
    if busy == 0:
        break
    time.sleep(2)
"""


class ModelSource:
    """Where the weights come from: a Hugging Face id, a PVC path, or object storage."""

    def __init__(self, name: str, config: RenderConfig) -> None:
        self.volume: dict[str, Any] | None = None
        self.mount: dict[str, Any] | None = None
        self.streamed = False
        if name.startswith("pvc://"):
            claim, _, path = name[len("pvc://") :].partition("/")
            if len(claim) > 253 or not re.match(DNS_SUBDOMAIN_PATTERN, claim):
                raise PlanError(
                    f"model.name {name}: {claim!r} is not a PersistentVolumeClaim name; "
                    "write pvc://<claim>/<path in the claim>"
                )
            root = config.model_source_mount_path.rstrip("/")
            self.argument = f"{root}/{path.strip('/')}" if path.strip("/") else root
            self.volume = {
                "name": "model-source",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
            self.mount = {"name": "model-source", "mountPath": root, "readOnly": True}
        else:
            self.argument = name
            # vLLM streams s3:// and gs:// weights with the Run:ai model streamer.
            self.streamed = name.startswith(("s3://", "gs://"))


def engine_args(llmd: LLMDeployment, plan: Plan, source: ModelSource) -> list[str]:
    """`vllm serve` arguments: the model, the flags the operator manages, then extraArgs."""
    engine: EngineSpec = llmd.spec.engine
    args = [
        source.argument,
        "--served-model-name",
        llmd.spec.model.effective_served_name,
        "--port",
        str(ENGINE_PORT),
        "--tensor-parallel-size",
        str(plan.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(plan.pipeline_parallel_size),
        "--dtype",
        engine.dtype,
        "--gpu-memory-utilization",
        repr(engine.gpu_memory_utilization),
    ]
    if engine.max_model_len is not None:
        args += ["--max-model-len", str(engine.max_model_len)]
    if engine.quantization != "none":
        args += ["--quantization", engine.quantization]
    if engine.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", engine.kv_cache_dtype]
    if llmd.spec.model.revision is not None:
        args += ["--revision", llmd.spec.model.revision]
    if engine.max_num_seqs is not None:
        args += ["--max-num-seqs", str(engine.max_num_seqs)]
    user_sets_load_format = any(
        a == "--load-format" or a.startswith("--load-format=") for a in engine.extra_args
    )
    if source.streamed and not user_sets_load_format:
        args += ["--load-format", "runai_streamer"]
    return args + list(engine.extra_args)


def startup_budget_seconds(plan: Plan, config: RenderConfig) -> int:
    """How long a pod may take to become healthy: download, load, compile, capture graphs."""
    if config.startup_timeout_seconds is not None:
        return config.startup_timeout_seconds
    if plan.weight_bytes_total is None:
        return STARTUP_UNKNOWN_SECONDS
    budget = STARTUP_MIN_SECONDS + STARTUP_SECONDS_PER_GIB * plan.weight_bytes_total / GIB
    return int(min(STARTUP_MAX_SECONDS, math.ceil(budget / 60) * 60))


def drain_seconds(llmd: LLMDeployment) -> int:
    """In-flight requests get as long as the gateway lets them run, and at least
    MIN_DRAIN_SECONDS. The drain ends as soon as the engine is idle, so the floor costs
    nothing, and it keeps ordinary requestTimeout edits (a gateway setting) out of the pod
    template: changing them must not restart GPU pods that take many minutes to load."""
    timeout = parse_duration_seconds(llmd.spec.routing.request_timeout)
    return int(min(MAX_DRAIN_SECONDS, max(MIN_DRAIN_SECONDS, math.ceil(timeout))))


def _env(llmd: LLMDeployment, config: RenderConfig) -> list[dict[str, Any]]:
    model = llmd.spec.model
    ours: list[dict[str, Any]] = []
    if model.token_secret_ref is not None:
        ref = model.token_secret_ref
        ours.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    if config.run_as_user is not None:
        ours.append({"name": "HOME", "value": HOME_DIR})
        # The UID has no passwd entry in the image, and getpass.getuser() then raises unless
        # USER is set: torch.compile's cache directory (/tmp/torchinductor_<user>) needs it.
        ours.append({"name": "USER", "value": RUN_AS_USER_NAME})
    if model.cache is not None:
        ours.append({"name": "HF_HOME", "value": config.model_cache_mount_path})
        if model.cache.read_only:
            # A read-only cache holds pre-loaded weights; the Hub client must not try to write.
            ours.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    # vLLM reports usage to its maintainers unless told not to; a platform decides that.
    ours.append({"name": "VLLM_NO_USAGE_STATS", "value": "1"})
    user: list[dict[str, Any]] = []
    for var in llmd.spec.engine.env:
        if var.secret_key_ref is not None:
            ref = var.secret_key_ref
            user.append(
                {
                    "name": var.name,
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
                }
            )
        else:
            user.append({"name": var.name, "value": var.value or ""})
    # The user's value wins; a list with one name twice breaks server-side apply.
    user_names = {item["name"] for item in user}
    return [item for item in ours if item["name"] not in user_names] + user


def _resources(llmd: LLMDeployment, plan: Plan) -> dict[str, Any]:
    spec = llmd.spec.resources
    pod = pod_resources(llmd.spec, plan)
    # Requests equal limits: extended resources require it for the GPUs, and the same for
    # CPU and memory makes the pod Guaranteed (planner/pod_resources.py says why).
    amounts: dict[str, str] = {
        spec.gpu.resource_name: str(plan.gpus_per_replica),
        "cpu": pod.cpu,
        "memory": pod.memory,
    }
    return {
        "limits": amounts | {"ephemeral-storage": pod.ephemeral_storage_limit},
        "requests": amounts | {"ephemeral-storage": pod.ephemeral_storage_request},
    }


def _probe(path: str, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _container(
    llmd: LLMDeployment, config: RenderConfig, plan: Plan, source: ModelSource
) -> dict[str, Any]:
    engine = llmd.spec.engine
    image = engine.image
    if "image" not in engine.model_fields_set and config.default_engine_image is not None:
        image = config.default_engine_image
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if llmd.spec.model.cache is not None:
        mounts.append(
            {
                "name": "model-cache",
                "mountPath": config.model_cache_mount_path,
                "readOnly": llmd.spec.model.cache.read_only,
            }
        )
    if source.mount is not None:
        mounts.append(source.mount)
    if config.run_as_user is not None:
        mounts.append({"name": "home", "mountPath": HOME_DIR})
    security: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": False,
    }
    startup = startup_budget_seconds(plan, config)
    drain = drain_seconds(llmd)
    script = _DRAIN_SCRIPT.format(
        settle=DRAIN_SETTLE_SECONDS, drain=drain, port=ENGINE_PORT, path=METRICS_PATH
    )
    container: dict[str, Any] = {"name": engine.kind, "image": image}
    if engine.image_pull_policy is not None:
        container["imagePullPolicy"] = engine.image_pull_policy
    container |= {
        "args": engine_args(llmd, plan, source),
        "env": _env(llmd, config),
        "ports": [{"name": PORT_NAME, "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "resources": _resources(llmd, plan),
        "volumeMounts": mounts,
        "startupProbe": _probe(
            HEALTH_PATH, STARTUP_PERIOD_SECONDS, 5, math.ceil(startup / STARTUP_PERIOD_SECONDS)
        ),
        "readinessProbe": _probe(HEALTH_PATH, 5, 3, 3),
        "livenessProbe": _probe(LIVENESS_PATH, 15, 10, 8),
        "lifecycle": {"preStop": {"exec": {"command": ["python3", "-c", script]}}},
        "securityContext": security,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return container


def _volumes(
    llmd: LLMDeployment, config: RenderConfig, source: ModelSource
) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {
            "name": "dshm",
            "emptyDir": {
                "medium": "Memory",
                "sizeLimit": llmd.spec.resources.shared_memory_size,
            },
        }
    ]
    cache = llmd.spec.model.cache
    if cache is not None:
        volumes.append(
            {
                "name": "model-cache",
                "persistentVolumeClaim": {
                    "claimName": cache.claim_name,
                    "readOnly": cache.read_only,
                },
            }
        )
    if source.volume is not None:
        volumes.append(source.volume)
    if config.run_as_user is not None:
        volumes.append({"name": "home", "emptyDir": {}})
    return volumes


def _tolerations(llmd: LLMDeployment) -> list[dict[str, Any]]:
    gpu = llmd.spec.resources.gpu.resource_name
    tolerations: list[dict[str, Any]] = [{"key": gpu, "operator": "Exists", "effect": "NoSchedule"}]
    for toleration in llmd.spec.scheduling.tolerations:
        rendered = toleration.model_dump(by_alias=True, exclude_none=True, mode="json")
        if rendered not in tolerations:
            tolerations.append(rendered)
    return tolerations


def max_replicas(llmd: LLMDeployment) -> int:
    """The most replicas the stable track can run."""
    if llmd.spec.autoscaling is not None:
        return llmd.spec.autoscaling.max_replicas
    return llmd.spec.desired_replicas


def _pod_spec(
    llmd: LLMDeployment, config: RenderConfig, plan: Plan, track: Track
) -> dict[str, Any]:
    spec = llmd.spec
    source = ModelSource(spec.model.name, config)
    security: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    if config.run_as_user is not None:
        uid = config.run_as_user
        security.update({"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid})
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [_container(llmd, config, plan, source)],
        "securityContext": security,
        "terminationGracePeriodSeconds": DRAIN_SETTLE_SECONDS
        + drain_seconds(llmd)
        + SHUTDOWN_SECONDS,
        "tolerations": _tolerations(llmd),
        "volumes": _volumes(llmd, config, source),
    }
    node_selector = dict(spec.scheduling.node_selector)
    if spec.resources.gpu.product is not None:
        # The typed field wins over a nodeSelector entry for the same label.
        node_selector["nvidia.com/gpu.product"] = spec.resources.gpu.product
    if node_selector:
        pod["nodeSelector"] = dict(sorted(node_selector.items()))
    if spec.scheduling.affinity is not None:
        pod["affinity"] = spec.scheduling.affinity.to_wire()
    if spec.scheduling.priority_class_name is not None:
        pod["priorityClassName"] = spec.scheduling.priority_class_name
    if spec.scheduling.service_account_name is not None:
        pod["serviceAccountName"] = spec.scheduling.service_account_name
    # Spread replicas over nodes when the scheduler can, so one node does not take the whole
    # model down; never block scheduling for it. Always present: anything that depends on the
    # replica count would change the pod template, and scaling would restart every pod.
    pod["topologySpreadConstraints"] = [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels(llmd, track)},
        }
    ]
    return pod


def pod_template(
    llmd: LLMDeployment, config: RenderConfig, plan: Plan, track: Track = "stable"
) -> dict[str, Any]:
    """The pod template, annotated with its own hash. The hash leaves out the track label,
    so a canary that runs the stable spec has the stable revision's hash."""
    template: dict[str, Any] = {
        "metadata": {
            "labels": common_labels(llmd, "engine", track),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(ENGINE_PORT),
                "prometheus.io/path": METRICS_PATH,
            },
        },
        "spec": _pod_spec(llmd, config, plan, track),
    }
    hashed = {
        "metadata": {
            "labels": {k: v for k, v in template["metadata"]["labels"].items() if k != LABEL_TRACK},
            "annotations": template["metadata"]["annotations"],
        },
        "spec": _pod_spec(llmd, config, plan, "stable"),
    }
    template["metadata"]["annotations"][ANNOTATION_POD_TEMPLATE_HASH] = content_hash(hashed)
    return template


def pod_template_hash(llmd: LLMDeployment, config: RenderConfig, plan: Plan) -> str:
    """The revision of this spec: what status.revision and the canary compare."""
    template = pod_template(llmd, config, plan)
    return str(template["metadata"]["annotations"][ANNOTATION_POD_TEMPLATE_HASH])


def _strategy(llmd: LLMDeployment) -> dict[str, Any]:
    rollout = llmd.spec.rollout
    if rollout.strategy == "Recreate":
        return {"type": "Recreate"}
    # RollingUpdate, and the stable track of a Canary rollout (which the rollout controller
    # updates only at promotion, replacing pods the same GPU-frugal way).
    return {
        "type": "RollingUpdate",
        "rollingUpdate": {
            "maxSurge": rollout.max_surge,
            "maxUnavailable": rollout.max_unavailable,
        },
    }


def autoscaler_owns_replicas(llmd: LLMDeployment) -> bool:
    """Whether an HPA (directly or through KEDA) sets the stable Deployment's replicas."""
    return llmd.spec.autoscaling is not None


def render_deployment(
    llmd: LLMDeployment,
    config: RenderConfig,
    plan: Plan,
    *,
    track: Track = "stable",
    replicas: int | None = None,
) -> dict[str, Any]:
    """The engine Deployment of one track. For the stable track `replicas` defaults to the
    spec's (omitted when an autoscaler owns the count); the canary track needs it given."""
    template = pod_template(llmd, config, plan, track)
    spec: dict[str, Any] = {}
    if track == "canary":
        spec["replicas"] = 1 if replicas is None else replicas
    elif replicas is not None:
        spec["replicas"] = replicas
    elif not autoscaler_owns_replicas(llmd):
        spec["replicas"] = llmd.spec.desired_replicas
    startup = startup_budget_seconds(plan, config)
    spec.update(
        {
            "revisionHistoryLimit": 5,
            # Model downloads make start-ups long; Progressing must not time out before the
            # startup probe does.
            "progressDeadlineSeconds": startup + 600,
            "selector": {"matchLabels": selector_labels(llmd, track)},
            "strategy": _strategy(llmd),
            "template": template,
        }
    )
    metadata = object_metadata(
        llmd,
        object_name(llmd, track),
        common_labels(llmd, "engine", track),
        {
            ANNOTATION_POD_TEMPLATE_HASH: template["metadata"]["annotations"][
                ANNOTATION_POD_TEMPLATE_HASH
            ]
        },
    )
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": spec}
