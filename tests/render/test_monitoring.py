"""spec.monitoring (render/monitoring.py): the PodMonitor selects this LLMDeployment's engine
pods and no other's; the PrometheusRule passes `promtool check rules`, and `promtool test rules`
fires each alert for this LLMDeployment and stays quiet in its near miss and for another
LLMDeployment of the same name in another namespace; both are refused with what to do when the
operator runs without prometheus-operator's CRDs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_operator.api.v1alpha1 import LLMDeployment
from llm_operator.constants import LABEL_DEPLOYMENT, LABEL_TRACK
from llm_operator.planner import plan
from llm_operator.render import PlanError, RenderConfig, render_all, render_deployment
from llm_operator.render.monitoring import alert_rules
from tests.chart.test_alerts import RUNBOOKS, anchors, run

CONFIG = RenderConfig(prometheus_operator_enabled=True, runbook_base_url="https://rb.example")
SERVED = "m-served"


def llmd(monitoring: dict[str, Any], name: str = "m", namespace: str = "ns") -> LLMDeployment:
    return LLMDeployment.model_validate(
        {
            "apiVersion": "llmoperator.io/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": name, "namespace": namespace, "uid": "u-1"},
            "spec": {
                "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": SERVED},
                "monitoring": monitoring,
            },
        }
    )


ALERTS = {
    "enabled": True,
    "ttftP95Seconds": 1.5,
    "errorRatio": 0.05,
    "stalledFor": "5m",
    "idleFor": "20m",
    "labels": {"release": "prom"},
}


def objects(resource: LLMDeployment) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in render_all(resource, CONFIG)}


def test_off_by_default_and_nothing_is_rendered() -> None:
    assert {"PodMonitor", "PrometheusRule"}.isdisjoint(objects(llmd({})))


@pytest.mark.parametrize("part", ["podMonitor", "alerts"])
def test_refused_with_what_to_do_without_the_crds(part: str) -> None:
    with pytest.raises(PlanError, match=r"--prometheus-operator.*operator\.prometheusOperator"):
        render_all(llmd({part: {"enabled": True}}), RenderConfig())


def test_the_pod_monitor_selects_both_tracks_of_this_deployment_only() -> None:
    resource = llmd({"podMonitor": {"enabled": True, "interval": "30s", "labels": {"a": "b"}}})
    monitor = objects(resource)["PodMonitor"]
    assert monitor["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert monitor["metadata"]["labels"]["a"] == "b"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "llm-operator"
    selector = monitor["spec"]["selector"]["matchLabels"]
    for track in ("stable", "canary"):
        deployment = render_deployment(resource, CONFIG, plan(resource.spec), track=track)
        pod = deployment["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert labels[LABEL_TRACK] == track
        assert selector.items() <= labels.items()
    other_llmd = llmd({}, name="other")
    other = render_deployment(other_llmd, CONFIG, plan(other_llmd.spec))["spec"]["template"]
    other = other["metadata"]
    assert not selector.items() <= other["labels"].items()
    assert selector[LABEL_DEPLOYMENT] == "m"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "30s"}
    assert LABEL_DEPLOYMENT in monitor["spec"]["podTargetLabels"]


def test_user_labels_never_replace_the_operators() -> None:
    resource = llmd({"alerts": {"enabled": True, "labels": {"app.kubernetes.io/managed-by": "x"}}})
    labels = objects(resource)["PrometheusRule"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "llm-operator"


def test_a_quote_in_the_served_name_stays_inside_the_promql_string() -> None:
    resource = llmd({"alerts": ALERTS})
    resource.spec.model.served_name = 'a"b'
    ttft = {r["alert"]: r for r in alert_rules(resource, "u")}["LLMTTFTp95AboveObjective"]
    assert 'model="a\\"b"' in ttft["expr"]


# -- promtool ------------------------------------------------------------------------------

ENGINE = 'namespace="ns",llmoperator_io_deployment="m"'
OTHER_ENGINE = 'namespace="other",llmoperator_io_deployment="m"'
OP = 'namespace="op",pod="op-0",llmdeployment_namespace="ns",llmoperator_io_deployment="m"'
OTHER_OP = 'namespace="op",pod="op-0",llmdeployment_namespace="other",llmoperator_io_deployment="m"'
SCOPE = {"namespace": "ns", "llmoperator_io_deployment": "m", "model": SERVED}


def series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{labels}}}", "values": values}


def queue(desired: int, other_at_max: bool = True) -> list[dict[str, str]]:
    out = [
        series("vllm:num_requests_waiting", f'{ENGINE},pod="m-a"', "10x20"),
        series("vllm:num_requests_waiting", f'{ENGINE},pod="m-b"', "10x20"),
        series("llm_operator_target_queue_depth", OP, "4x20"),
        series("llm_operator_desired_replicas", OP, f"{desired}x20"),
        series("llm_operator_max_replicas", OP, "3x20"),
    ]
    if other_at_max:  # another namespace's m at max with a long queue: not this rule's
        out += [
            series("vllm:num_requests_waiting", f'{OTHER_ENGINE},pod="o-a"', "50x20"),
            series("llm_operator_target_queue_depth", OTHER_OP, "1x20"),
            series("llm_operator_desired_replicas", OTHER_OP, "3x20"),
            series("llm_operator_max_replicas", OTHER_OP, "3x20"),
        ]
    return out


def ttft(slow: bool) -> list[dict[str, str]]:
    # 60 answers a minute, all between 1 and 2.5 s (p95 2.425 s) or all under 1 s (0.95 s).
    fast = "0+0x30" if slow else "0+60x30"
    return [
        series("llm_gateway_time_to_first_token_seconds_bucket", f'model="{SERVED}",le="1"', fast),
        series("llm_gateway_time_to_first_token_seconds_bucket", f'model="{SERVED}",le="2.5"',
               "0+60x30"),
        series("llm_gateway_time_to_first_token_seconds_bucket", f'model="{SERVED}",le="+Inf"',
               "0+60x30"),
        # Another model, always slow: not this rule's.
        series("llm_gateway_time_to_first_token_seconds_bucket", 'model="other",le="1"', "0x30"),
        series("llm_gateway_time_to_first_token_seconds_bucket", 'model="other",le="2.5"', "0x30"),
        series("llm_gateway_time_to_first_token_seconds_bucket", 'model="other",le="+Inf"',
               "0+60x30"),
    ]  # fmt: skip


def errors(per_minute: int) -> list[dict[str, str]]:
    return [
        series("llm_gateway_requests_total", f'model="{SERVED}",outcome="ok"',
               f"0+{100 - per_minute}x30"),
        series("llm_gateway_requests_total", f'model="{SERVED}",outcome="server_error"',
               f"0+{per_minute}x30"),
        series("llm_gateway_requests_total", 'model="other",outcome="server_error"', "0+50x30"),
    ]  # fmt: skip


def stalled(tokens: str) -> list[dict[str, str]]:
    return [
        series("vllm:num_requests_running", f'{ENGINE},pod="m-a"', "2x20"),
        series("vllm:num_requests_waiting", f'{ENGINE},pod="m-a"', "1x20"),
        series("vllm:generation_tokens_total", f'{ENGINE},pod="m-a"', tokens),
        series("vllm:num_requests_running", f'{OTHER_ENGINE},pod="o-a"', "2x20"),
        series("vllm:num_requests_waiting", f'{OTHER_ENGINE},pod="o-a"', "1x20"),
        series("vllm:generation_tokens_total", f'{OTHER_ENGINE},pod="o-a"', "100x20"),
    ]


def idle(tokens: str) -> list[dict[str, str]]:
    return [
        series("llm_operator_ready_replicas", OP, "2x60"),
        series("llm_operator_gpus_per_replica", OP, "4x60"),
        series("vllm:generation_tokens_total", f'{ENGINE},pod="m-a"', tokens),
    ]


def fired(summary: str, description: str, name: str, **labels: str) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": SEVERITY[name], **SCOPE, **labels},
        "exp_annotations": {
            "summary": f"ns/m: {summary}",
            "description": description,
            "runbook_url": f"https://rb.example#{name.lower()}",
        },
    }


SEVERITY = {
    "LLMQueueAboveTargetAtMaxReplicas": "warning",
    "LLMTTFTp95AboveObjective": "warning",
    "LLMErrorRateHigh": "critical",
    "LLMCanaryRolledBack": "warning",
    "LLMFallbackActive": "warning",
    "LLMEngineStalled": "critical",
    "LLMGPUsIdle": "info",
}

#: (alert, input series, eval time, expected alert or None for a near miss).
CASES: list[tuple[str, list[dict[str, str]], str, dict[str, Any] | None]] = [
    ("LLMQueueAboveTargetAtMaxReplicas", queue(desired=3), "15m", fired(
        "queue above target at maxReplicas",
        "10.0 requests waiting per replica for 10 minutes, and the autoscaler is already at "
        "maxReplicas.", "LLMQueueAboveTargetAtMaxReplicas")),
    ("LLMQueueAboveTargetAtMaxReplicas", queue(desired=2), "15m", None),
    ("LLMTTFTp95AboveObjective", ttft(slow=True), "20m", fired(
        "TTFT p95 above objective", "TTFT p95 is 2.425s (objective 1.5s) for 10 minutes.",
        "LLMTTFTp95AboveObjective")),
    ("LLMTTFTp95AboveObjective", ttft(slow=False), "20m", None),
    ("LLMErrorRateHigh", errors(10), "15m", fired(
        "error rate high", "10% of requests failed over 5 minutes (threshold 0.05).",
        "LLMErrorRateHigh")),
    ("LLMErrorRateHigh", errors(4), "15m", None),
    ("LLMCanaryRolledBack",
     [series("llm_operator_canary_phase", f'{OP},phase="RolledBack"', "1x5"),
      series("llm_operator_canary_phase", f'{OTHER_OP},phase="RolledBack"', "1x5")],
     "1m", fired("canary rolled back", "The canary failed its analysis and was rolled back; "
                 "the stable revision serves all traffic. It is not retried until the spec "
                 "changes.", "LLMCanaryRolledBack")),
    ("LLMCanaryRolledBack",
     [series("llm_operator_canary_phase", f'{OP},phase="RolledBack"', "0x5"),
      series("llm_operator_canary_phase", f'{OTHER_OP},phase="RolledBack"', "1x5")],
     "1m", None),
    ("LLMFallbackActive",
     [series("llm_operator_condition", f'{OP},type="FallbackActive"', "1x10")], "6m", fired(
        "requests fall back", "The FallbackActive condition has been True for 5 minutes: the "
        "gateway sends part of this model's traffic down its fallback chain.",
        "LLMFallbackActive")),
    ("LLMFallbackActive",  # true for 4 minutes only
     [series("llm_operator_condition", f'{OP},type="FallbackActive"', "0 0 1 1 1 1 1"),
      series("llm_operator_condition", f'{OTHER_OP},type="FallbackActive"', "1x10")], "6m",
     None),
    ("LLMEngineStalled", stalled("100x20"), "12m", fired(
        "engine {{ $labels.pod }} stalled".replace("{{ $labels.pod }}", "m-a"),
        "3 requests running or waiting and no token generated for 5m.", "LLMEngineStalled",
        pod="m-a")),
    ("LLMEngineStalled", stalled("100+10x20"), "12m", None),
    ("LLMGPUsIdle", idle("100x60"), "40m", fired(
        "GPUs allocated but idle", "8 GPUs held by ready replicas that generated no token for "
        "20m.", "LLMGPUsIdle")),
    ("LLMGPUsIdle", idle("100+1x60"), "40m", None),
]  # fmt: skip


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    rule = objects(llmd({"alerts": ALERTS}))["PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "prom"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def test_promtool_checks_the_rules(rules_file: Path) -> None:
    result = run("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(SEVERITY)} rules found" in result.stdout


def test_promtool_fires_each_alert_for_this_deployment_only(rules_file: Path) -> None:
    tests = []
    for alert, inputs, at, expected in CASES:
        tests.append(
            {
                "name": f"{alert} {'fires' if expected else 'quiet'}",
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": alert,
                        "exp_alerts": [expected] if expected else [],
                    }
                ],
            }
        )
    cases = rules_file.with_name("tests.yaml")
    cases.write_text(
        yaml.safe_dump(
            {"rule_files": [rules_file.name], "evaluation_interval": "1m", "tests": tests},
            sort_keys=False,
        )
    )
    result = run("test", "rules", str(cases))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case_and_a_runbook() -> None:
    firing = {alert for alert, _, _, expected in CASES if expected}
    quiet = {alert for alert, _, _, expected in CASES if not expected}
    rules = alert_rules(llmd({"alerts": ALERTS}), "u")
    assert firing == quiet == set(SEVERITY) == {r["alert"] for r in rules}
    assert {r["alert"]: r["labels"]["severity"] for r in rules} == SEVERITY
    assert {name.lower() for name in SEVERITY} <= anchors(RUNBOOKS.read_text())
