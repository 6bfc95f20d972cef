"""The Argo CD health check (argocd/health.lua), run in Lua 5.1 as Argo CD's gopher-lua runs it,
against LLMDeployment statuses the operator writes."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import lupa.lua51 as lua51
import pytest
import yaml

from llm_operator.api import v1alpha1 as api
from llm_operator.engine_health import engine_problems
from llm_operator.reconcile import compute_status

REPO = Path(__file__).resolve().parents[2]
SCRIPT = (REPO / "argocd" / "health.lua").read_text()
DOC = REPO / "docs" / "argocd.md"
HEALTH_KEY = "resource.customizations.health.llmoperator.io_LLMDeployment"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def to_lua(runtime: Any, value: Any) -> Any:
    """A Python value as Argo CD hands JSON to the script: objects and arrays become tables
    (arrays 1-based), nulls are absent."""
    if isinstance(value, dict):
        return runtime.table_from(
            {k: to_lua(runtime, v) for k, v in value.items() if v is not None}
        )
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v) for v in value if v is not None])
    return value


def health(obj: dict[str, Any]) -> tuple[str, str]:
    runtime = lua51.LuaRuntime(register_eval=False, register_builtins=False)
    # Argo CD's sandbox has no io/os/require: make sure the script does not lean on them.
    runtime.execute("io = nil; os = nil; require = nil; dofile = nil; loadfile = nil")
    runtime.globals().obj = to_lua(runtime, obj)
    result = runtime.execute(SCRIPT)
    return str(result.status), str(result.message)


def llmd(status: dict[str, Any] | None = None, generation: int = 3, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "llmoperator.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "llama", "namespace": "ml", "generation": generation},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
            "resources": {"gpu": {"product": "NVIDIA-H100-80GB-HBM3", "memoryGiB": 80}},
            **spec,
        },
    }
    if status is not None:
        # The operator's status must fit the API model: field names are a contract.
        api.LLMDeploymentStatus.model_validate(status)
        body["status"] = status
    # The whole object must be a valid LLMDeployment too.
    api.LLMDeployment.model_validate(copy.deepcopy(body))
    return body


def cond(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": 3,
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }


READY = cond("Ready", "True", "AllReplicasReady", "2/2 replicas ready")


def test_no_status_yet_is_progressing() -> None:
    assert health(llmd()) == ("Progressing", "Waiting for the operator to report status")


def test_status_of_an_older_generation_is_progressing_even_if_it_said_ready() -> None:
    obj = llmd({"phase": "Ready", "observedGeneration": 2, "conditions": [READY]})
    assert health(obj) == ("Progressing", "Waiting for the operator to observe generation 3")
    no_generation = llmd({"phase": "Ready", "conditions": [READY]})
    assert health(no_generation)[0] == "Progressing"


def test_ready_is_healthy() -> None:
    obj = llmd(
        {"phase": "Ready", "observedGeneration": 3, "conditions": [READY], "replicas": 2,
         "readyReplicas": 2},
    )  # fmt: skip
    assert health(obj) == ("Healthy", "2/2 replicas ready")


def test_phase_ready_without_conditions_is_healthy() -> None:
    assert health(llmd({"phase": "Ready", "observedGeneration": 3}))[0] == "Healthy"


def test_rolling_out_is_progressing_with_the_replica_count() -> None:
    obj = llmd(
        {
            "phase": "Progressing",
            "observedGeneration": 3,
            "conditions": [cond("Ready", "False", "ReplicasNotReady")],
            "replicas": 2,
            "readyReplicas": 1,
        }
    )
    assert health(obj) == ("Progressing", "ReplicasNotReady")
    bare = llmd(
        {"phase": "Progressing", "observedGeneration": 3, "replicas": 4, "readyReplicas": 1}
    )
    assert health(bare) == ("Progressing", "1 of 4 replicas ready")
    told = llmd(
        {
            "phase": "Progressing",
            "observedGeneration": 3,
            "conditions": [
                cond("Ready", "False", "ReplicasNotReady"),
                cond("Progressing", "True", "RollingOut", "new revision: 1 of 2 replicas updated"),
            ],
        }
    )
    assert health(told) == ("Progressing", "new revision: 1 of 2 replicas updated")


def test_degraded_condition_is_degraded_with_its_message_even_while_serving() -> None:
    message = "parallelism.tensor 3 does not divide the 32 attention heads"
    obj = llmd(
        {
            "phase": "Degraded",
            "observedGeneration": 3,
            "conditions": [READY, cond("Degraded", "True", "InvalidSpec", message)],
        }
    )
    assert health(obj) == ("Degraded", message)


def engine_status(pod_status: dict[str, Any]) -> dict[str, Any]:
    """The status the operator writes for one engine pod that is not turning ready."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "llama", "generation": 1},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"llmoperator.io/track": "stable"}}},
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
                   "unavailableReplicas": 1},
    }  # fmt: skip
    pod = {
        "metadata": {
            "name": "llama-6b7f9c-x2x4z",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"llmoperator.io/track": "stable"},
        },
        "status": pod_status,
    }
    now = "2026-01-01T00:05:00Z"
    return compute_status(
        previous=None, generation=3, deployments=[deployment], problem=None, extra={}, now=now,
        engine=engine_problems([deployment], [pod], now=now),
    )  # fmt: skip


def test_a_crash_looping_engine_is_degraded_with_the_pods_reason() -> None:
    status = engine_status(
        {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
            "containerStatuses": [
                {
                    "name": "vllm",
                    "ready": False,
                    "started": False,
                    "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
                }
            ],
        }
    )
    assert health(llmd(status)) == (
        "Degraded",
        "pod llama-6b7f9c-x2x4z container vllm: CrashLoopBackOff, restarted 4 times, "
        "last exit OOMKilled (exit code 137)",
    )


def test_an_engine_image_that_cannot_be_pulled_is_degraded() -> None:
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "vllm:nope"'}
    status = engine_status(
        {
            "phase": "Pending",
            "containerStatuses": [
                {"name": "vllm", "ready": False, "restartCount": 0, "state": {"waiting": waiting}}
            ],
        }
    )
    state, message = health(llmd(status))
    assert state == "Degraded" and 'ImagePullBackOff: Back-off pulling image "vllm:nope"' in message


def test_a_pod_waiting_for_a_gpu_node_is_progressing_with_the_schedulers_words() -> None:
    scheduler = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    status = engine_status(
        {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": scheduler},
            ],
        }
    )  # fmt: skip
    assert health(llmd(status)) == (
        "Progressing",
        f"pod llama-6b7f9c-x2x4z: Unschedulable: {scheduler}",
    )


def test_failed_is_degraded() -> None:
    message = "the model needs 140 GiB and one replica has 80 GiB"
    obj = llmd(
        {
            "phase": "Failed",
            "observedGeneration": 3,
            "conditions": [cond("Ready", "False", "DoesNotFit", message)],
        }
    )
    assert health(obj) == ("Degraded", message)
    assert health(llmd({"phase": "Failed", "observedGeneration": 3}))[0] == "Degraded"


def test_a_canary_in_flight_is_progressing_at_its_weight() -> None:
    canary_spec: dict[str, Any] = {
        "rollout": {"strategy": "Canary", "canary": {"steps": [{"weight": 10}, {"weight": 50}]}}
    }
    obj = llmd(
        {
            "phase": "Progressing",
            "observedGeneration": 3,
            "conditions": [READY, cond("CanaryProgressing", "True", "StepPaused")],
            "canary": {"step": 0, "weight": 10},
        },
        **canary_spec,
    )
    # Waiting through a step's own pause is progress, not a suspension.
    assert health(obj) == ("Progressing", "Canary at 10% of traffic")
    told = copy.deepcopy(obj)
    told["status"]["conditions"][1]["message"] = "step 1 of 2: 10% for 5m, analysis passing"
    assert health(told) == ("Progressing", "step 1 of 2: 10% for 5m, analysis passing")


def test_a_paused_canary_is_suspended() -> None:
    obj = llmd(
        {
            "phase": "Progressing",
            "observedGeneration": 3,
            "conditions": [
                READY,
                cond("CanaryProgressing", "False", "Paused", "canary paused at 10% by a person"),
            ],
            "canary": {"step": 0, "weight": 10},
        },
        rollout={"strategy": "Canary", "canary": {"steps": [{"weight": 10}]}},
    )
    assert health(obj) == ("Suspended", "canary paused at 10% by a person")


def test_zero_replicas_is_suspended() -> None:
    obj = llmd(
        {"phase": "Ready", "observedGeneration": 3, "conditions": [READY], "replicas": 0},
        replicas=0,
    )
    assert health(obj) == ("Suspended", "Scaled to 0 replicas")


def test_keda_scaled_to_zero_is_suspended_and_scaled_up_is_healthy() -> None:
    autoscaling = {"provider": "keda", "minReplicas": 0, "maxReplicas": 4}
    idle = llmd(
        {"phase": "Ready", "observedGeneration": 3, "conditions": [READY], "replicas": 0},
        autoscaling=autoscaling,
    )
    assert health(idle) == ("Suspended", "Scaled to zero; the first request scales it up")
    busy = llmd(
        {"phase": "Ready", "observedGeneration": 3, "conditions": [READY], "replicas": 2},
        autoscaling=autoscaling,
    )
    assert health(busy)[0] == "Healthy"


def test_degraded_wins_over_suspended() -> None:
    obj = llmd(
        {
            "phase": "Degraded",
            "observedGeneration": 3,
            "conditions": [cond("Degraded", "True", "InvalidSpec", "bad edit")],
        },
        replicas=0,
    )
    assert health(obj) == ("Degraded", "bad edit")


@pytest.mark.parametrize(
    "sample", sorted((REPO / "manifests" / "samples").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_sample_gets_a_status_argo_cd_knows(sample: Path) -> None:
    for doc in yaml.safe_load_all(sample.read_text()):
        if not doc:
            continue
        doc["metadata"]["generation"] = 1
        states = [
            None,
            {"phase": "Pending", "observedGeneration": 1},
            {"phase": "Ready", "observedGeneration": 1, "conditions": [READY]},
        ]
        for status in states:
            obj = {**doc, **({"status": status} if status else {})}
            state, message = health(obj)
            assert state in ARGO_STATUSES and message


def test_the_fields_the_script_reads_exist_in_the_crd() -> None:
    status_fields = set(api.LLMDeploymentStatus.model_fields)
    aliases = {f.alias or name for name, f in api.LLMDeploymentStatus.model_fields.items()}
    for field in re.findall(r"status\.([a-zA-Z]+)", SCRIPT):
        assert field in aliases or field in status_fields, field
    assert {"weight"} <= {f.alias or n for n, f in api.CanaryStatus.model_fields.items()}
    for field in re.findall(r"spec\.([a-zA-Z]+)", SCRIPT):
        assert field in {f.alias or n for n, f in api.LLMDeploymentSpec.model_fields.items()}


def test_docs_embed_the_script_in_an_argocd_cm_that_parses() -> None:
    text = DOC.read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    configmaps = [
        d
        for block in blocks
        for d in yaml.safe_load_all(block)
        if isinstance(d, dict) and d.get("kind") == "ConfigMap"
    ]
    cm = next(c for c in configmaps if c["metadata"]["name"] == "argocd-cm")
    assert cm["metadata"]["namespace"] == "argocd"
    assert cm["data"][HEALTH_KEY] == SCRIPT
