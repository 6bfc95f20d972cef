"""prometheus-operator objects of one LLMDeployment (spec.monitoring): a PodMonitor for its
engine pods, and a PrometheusRule with the chart's alerts (charts/llm-operator/files/alerts.yaml)
scoped to it, with its own thresholds.

The expressions are the chart's with every selector fixed to this LLMDeployment: engine series
by `namespace` and `llmoperator_io_deployment` (the PodMonitor's podTargetLabels), the
operator's gauges by `llmdeployment_namespace` and `llmoperator_io_deployment`, the gateway's
by `model` (the served name). Aggregations drop every label (and so two operator replicas'
gauges count once), so each alert carries the LLMDeployment as static labels instead. The
operator's own reconcile-error alert stays in the chart: it is not any one model's.
tests/render/test_monitoring.py runs promtool on them.
"""

from __future__ import annotations

from typing import Any

from llm_operator.api.v1alpha1 import LLMDeployment
from llm_operator.constants import LABEL_COMPONENT, LABEL_DEPLOYMENT, LABEL_MANAGED_BY, MANAGED_BY
from llm_operator.render.config import RenderConfig, RenderError
from llm_operator.render.names import (
    common_labels,
    label_value,
    llmd_name,
    object_metadata,
    object_name,
)
from llm_operator.render.vllm_deployment import PORT_NAME

#: The gateway's outcomes that count as its failures (client errors and hang-ups do not).
FAILED_OUTCOMES = "server_error|stream_error|unavailable|timeout"
#: Labels the PodMonitor copies from the pods onto every engine series.
POD_TARGET_LABELS = [LABEL_DEPLOYMENT, "llmoperator.io/track", "app.kubernetes.io/instance"]


def _quoted(value: str) -> str:
    """A PromQL string literal's contents."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _refuse_without_crds(what: str) -> RenderError:
    return RenderError(
        f"spec.monitoring.{what}.enabled, but this operator runs without prometheus-operator's "
        "CRDs (monitoring.coreos.com); install them and start the operator with "
        "--prometheus-operator (chart: operator.prometheusOperator=true), or turn it off"
    )


def _metadata(llmd: LLMDeployment, extra_labels: dict[str, str]) -> dict[str, Any]:
    # The user's labels are for Prometheus' selectors; the operator's own always win.
    labels = {**extra_labels, **common_labels(llmd, "monitoring")}
    return object_metadata(llmd, object_name(llmd), labels)


def render_pod_monitor(llmd: LLMDeployment, config: RenderConfig) -> dict[str, Any] | None:
    spec = llmd.spec.monitoring.pod_monitor
    if not spec.enabled:
        return None
    if not config.prometheus_operator_enabled:
        raise _refuse_without_crds("podMonitor")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _metadata(llmd, spec.labels),
        "spec": {
            # Both tracks: the canary's series are what its analysis and the alerts compare.
            "selector": {
                "matchLabels": {
                    LABEL_MANAGED_BY: MANAGED_BY,
                    LABEL_COMPONENT: "engine",
                    LABEL_DEPLOYMENT: label_value(llmd_name(llmd)),
                }
            },
            "podTargetLabels": POD_TARGET_LABELS,
            "podMetricsEndpoints": [
                {"port": PORT_NAME, "path": "/metrics", "interval": spec.interval}
            ],
        },
    }


def _alert(
    name: str, expr: str, severity: str, summary: str, description: str, scope: dict[str, str],
    runbook_base_url: str, for_: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **scope}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": f"{runbook_base_url}#{name.lower()}",
    }
    return rule


def alert_rules(llmd: LLMDeployment, runbook_base_url: str) -> list[dict[str, Any]]:
    """The alerts of one LLMDeployment, as PrometheusRule rules."""
    spec = llmd.spec.monitoring.alerts
    namespace = llmd.metadata.namespace or ""
    deployment = label_value(llmd_name(llmd))
    served = llmd.spec.model.effective_served_name
    engine = f'namespace="{namespace}",llmoperator_io_deployment="{deployment}"'
    operator = f'llmdeployment_namespace="{namespace}",llmoperator_io_deployment="{deployment}"'
    model = f'model="{_quoted(served)}"'
    scope = {"namespace": namespace, "llmoperator_io_deployment": deployment, "model": served}
    who = f"{namespace}/{llmd_name(llmd)}"

    def alert(name: str, expr: str, severity: str, summary: str, description: str,
              for_: str | None = None) -> dict[str, Any]:  # fmt: skip
        return _alert(name, expr, severity, f"{who}: {summary}", description, scope,
                      runbook_base_url, for_)  # fmt: skip

    return [
        alert(
            "LLMQueueAboveTargetAtMaxReplicas",
            f"avg(vllm:num_requests_waiting{{{engine}}})\n"
            f"  > on () max(llm_operator_target_queue_depth{{{operator}}})\n"
            f"and on () max(llm_operator_desired_replicas{{{operator}}}"
            f" >= llm_operator_max_replicas{{{operator}}})",
            "warning",
            "queue above target at maxReplicas",
            '{{ $value | printf "%.1f" }} requests waiting per replica for 10 minutes, and '
            "the autoscaler is already at maxReplicas.",
            "10m",
        ),
        alert(
            "LLMTTFTp95AboveObjective",
            "histogram_quantile(0.95, sum by (le) ("
            f"rate(llm_gateway_time_to_first_token_seconds_bucket{{{model}}}[5m])))\n"
            f"  > {spec.ttft_p95_seconds:g}",
            "warning",
            "TTFT p95 above objective",
            "TTFT p95 is {{ $value | humanizeDuration }} (objective "
            f"{spec.ttft_p95_seconds:g}s) for 10 minutes.",
            "10m",
        ),
        alert(
            "LLMErrorRateHigh",
            f'sum(rate(llm_gateway_requests_total{{{model},outcome=~"{FAILED_OUTCOMES}"}}[5m]))\n'
            f"  / sum(rate(llm_gateway_requests_total{{{model}}}[5m]))\n"
            f"  > {spec.error_ratio:g}",
            "critical",
            "error rate high",
            "{{ $value | humanizePercentage }} of requests failed over 5 minutes (threshold "
            f"{spec.error_ratio:g}).",
            "5m",
        ),
        alert(
            "LLMCanaryRolledBack",
            f'max(llm_operator_canary_phase{{{operator},phase="RolledBack"}}) == 1',
            "warning",
            "canary rolled back",
            "The canary failed its analysis and was rolled back; the stable revision serves "
            "all traffic. It is not retried until the spec changes.",
        ),
        alert(
            "LLMFallbackActive",
            f'max(llm_operator_condition{{{operator},type="FallbackActive"}}) == 1',
            "warning",
            "requests fall back",
            "The FallbackActive condition has been True for 5 minutes: the gateway sends part "
            "of this model's traffic down its fallback chain.",
            "5m",
        ),
        alert(
            "LLMEngineStalled",
            f"sum by (pod) (vllm:num_requests_running{{{engine}}}"
            f" + vllm:num_requests_waiting{{{engine}}}) > 0\n"
            f"and on (pod) sum by (pod) "
            f"(increase(vllm:generation_tokens_total{{{engine}}}[{spec.stalled_for}])) == 0",
            "critical",
            "engine {{ $labels.pod }} stalled",
            f"{{{{ $value }}}} requests running or waiting and no token generated for "
            f"{spec.stalled_for}.",
            spec.stalled_for,
        ),
        alert(
            "LLMGPUsIdle",
            f"max(llm_operator_ready_replicas{{{operator}}}"
            f" * llm_operator_gpus_per_replica{{{operator}}}) > 0\n"
            f"and on () sum(increase(vllm:generation_tokens_total{{{engine}}}[15m])) == 0",
            "info",
            "GPUs allocated but idle",
            f"{{{{ $value }}}} GPUs held by ready replicas that generated no token for "
            f"{spec.idle_for}.",
            spec.idle_for,
        ),
    ]


def render_prometheus_rule(llmd: LLMDeployment, config: RenderConfig) -> dict[str, Any] | None:
    spec = llmd.spec.monitoring.alerts
    if not spec.enabled:
        return None
    if not config.prometheus_operator_enabled:
        raise _refuse_without_crds("alerts")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _metadata(llmd, spec.labels),
        "spec": {
            "groups": [
                {
                    "name": f"llm-operator.{llmd.metadata.namespace}.{llmd_name(llmd)}",
                    "rules": alert_rules(llmd, config.runbook_base_url),
                }
            ]
        },
    }
