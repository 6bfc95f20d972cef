"""`llm-operator run` settings: every RenderConfig field (and the canary analysis Prometheus)
has a flag and an environment variable, reaches the RenderConfig the operator renders with,
is validated with a message naming the flag and the variable, and is in docs/install.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_operator.api.v1alpha1 import LLMDeployment
from llm_operator.controller import main as run
from llm_operator.controller.main import SETTINGS, ControllerSettings, Setting, parse_args, show
from llm_operator.render import RenderConfig, render_all

REPO = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((REPO / "charts" / "llm-operator" / "values.yaml").read_text())

#: A value other than the default for each setting: the text given, the value expected.
EXAMPLES: dict[str, tuple[str, Any]] = {
    "cluster_domain": ("corp.example", "corp.example"),
    "gateway_namespace": ("llm-gateway", "llm-gateway"),
    "default_engine_image": ("mirror.example/vllm@sha256:" + "a" * 64, None),
    "model_cache_mount_path": ("/cache", "/cache"),
    "model_source_mount_path": ("/weights", "/weights"),
    "hpa_enabled": ("false", False),
    "keda_enabled": ("true", True),
    "prometheus_operator_enabled": ("true", True),
    "runbook_base_url": ("https://wiki.example/llm", "https://wiki.example/llm"),
    "hpa_metric_name": ("queue_depth", "queue_depth"),
    "keda_prometheus_address": ("http://prom.mon:9090", "http://prom.mon:9090"),
    "metric_namespace_label": ("kubernetes_namespace", "kubernetes_namespace"),
    "metric_pod_label": ("kubernetes_pod_name", "kubernetes_pod_name"),
    "gateway_queue_metric": ("llm_proxy_requests_held", "llm_proxy_requests_held"),
    "startup_timeout_seconds": ("600", 600),
    "run_as_user": ("1000", 1000),
    "network_policy_enabled": ("true", True),
    "network_policy_gateway_pod_selector": ("app=my-gateway", "app=my-gateway"),
    "network_policy_prometheus_namespace_selector": (
        "kubernetes.io/metadata.name=obs",
        "kubernetes.io/metadata.name=obs",
    ),
    "network_policy_prometheus_pod_selector": ("app=prom", "app=prom"),
    "prometheus_url": ("http://127.0.0.1:9090", "http://127.0.0.1:9090"),
    "stall_timeout_seconds": ("45", 45),
    "stall_restarts_per_minute": ("3", 3),
    "gpu_hour_price": ("2.5", 2.5),
    "cost_status_interval_seconds": ("60", 60),
    "preflight_nodes": ("false", False),
}


def expected(setting: Setting) -> Any:
    text, value = EXAMPLES[setting.field]
    return text if value is None else value


def value_of(args: Any, setting: Setting) -> Any:
    model = args.config if setting.target == "render" else args.controller
    return getattr(model, setting.field)


def test_every_field_of_both_models_is_a_setting_with_a_unique_flag_and_variable() -> None:
    fields = {(s.target, s.field) for s in SETTINGS}
    assert fields == {("render", f) for f in RenderConfig.model_fields} | {
        ("controller", f) for f in ControllerSettings.model_fields
    }
    assert set(EXAMPLES) == {s.field for s in SETTINGS}
    for attribute in ("flag", "env", "value"):
        names = [getattr(s, attribute) for s in SETTINGS]
        assert len(names) == len(set(names)), f"{attribute} twice: {names}"
    assert all(s.env.startswith("LLMOP_") and s.flag.startswith("--") for s in SETTINGS)
    assert all(s.help for s in SETTINGS)


def test_the_defaults_are_the_models_defaults_but_keda_is_off() -> None:
    args = parse_args([], {})
    assert args.config == RenderConfig(keda_enabled=False)
    assert args.controller == ControllerSettings()
    assert args.keda_enabled is False and args.gateway_namespace is None


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.field)
def test_each_setting_by_environment(setting: Setting) -> None:
    text, _ = EXAMPLES[setting.field]
    args = parse_args([], {setting.env: text})
    assert value_of(args, setting) == expected(setting)
    assert getattr(args, setting.field) == expected(setting)
    # Nothing else moved.
    for other in SETTINGS:
        if other is not setting:
            assert value_of(args, other) == value_of(parse_args([], {}), other), other.field


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.field)
def test_each_setting_by_flag_and_the_flag_wins_over_the_environment(setting: Setting) -> None:
    text, _ = EXAMPLES[setting.field]
    assert value_of(parse_args([setting.flag, text], {}), setting) == expected(setting)
    assert value_of(parse_args([f"{setting.flag}={text}"], {}), setting) == expected(setting)
    default = show(setting.default)
    if default:  # the flag given as its default overrides a different environment value
        args = parse_args([f"{setting.flag}={default}"], {setting.env: text})
        assert value_of(args, setting) == setting.default


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.is_bool], ids=lambda s: s.field)
def test_a_boolean_flag_alone_means_true(setting: Setting) -> None:
    assert value_of(parse_args([setting.flag], {setting.env: "false"}), setting) is True
    assert value_of(parse_args([f"{setting.flag}=false"], {}), setting) is False


def test_an_empty_variable_means_the_default() -> None:
    env = {s.env: "" for s in SETTINGS}
    args = parse_args([], env)
    assert args.config == parse_args([], {}).config


@pytest.mark.parametrize(
    ("env", "text", "complaint"),
    [
        ("LLMOP_RUN_AS_USER", "0", "greater than or equal to 1"),
        ("LLMOP_RUN_AS_USER", "root", "valid integer"),
        ("LLMOP_STARTUP_TIMEOUT_SECONDS", "30", "greater than or equal to 60"),
        ("LLMOP_STARTUP_TIMEOUT_SECONDS", "100000", "less than or equal to 86400"),
        ("LLMOP_HPA_ENABLED", "maybe", "valid boolean"),
        ("LLMOP_KEDA", "sometimes", "valid boolean"),
        ("LLMOP_PROMETHEUS_URL", "prometheus:9090", "pattern"),
        ("LLMOP_NETWORK_POLICY_PROMETHEUS_POD_SELECTOR", "app in (prom)", "is not key=value"),
        ("LLMOP_NETWORK_POLICY_GATEWAY_POD_SELECTOR", "app=a b", "is not key=value"),
        ("LLMOP_NETWORK_POLICY_PROMETHEUS_NAMESPACE_SELECTOR", "A.b/app!=x", "not a label key"),
    ],
)
def test_a_bad_value_stops_the_operator_naming_flag_and_variable(
    env: str, text: str, complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    [setting] = [s for s in SETTINGS if s.env == env]
    with pytest.raises(SystemExit) as stopped:
        parse_args([], {env: text})
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert setting.flag in message and env in message and complaint in message, message
    assert repr(text) in message
    # The same through the flag.
    with pytest.raises(SystemExit):
        parse_args([f"{setting.flag}={text}"], {})
    assert setting.flag in capsys.readouterr().err


def test_every_bad_value_is_reported_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--run-as-user=0"], {"LLMOP_STARTUP_TIMEOUT_SECONDS": "1"})
    message = capsys.readouterr().err
    assert "--run-as-user" in message and "--startup-timeout-seconds" in message


# -- main() hands them on --------------------------------------------------------------------


class Started:
    """What `main` built, with kopf, the API client and the metrics server left out."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.child_kinds: list[str] = []
        self.controller: Any = None
        self.day2: Any = None

        def register(registry: Any, controller: Any, namespaces: Any, kinds: list[str]) -> None:
            self.controller, self.child_kinds = controller, kinds

        def no_loop(coroutine: Any) -> None:
            coroutine.close()

        monkeypatch.setattr(run, "KubeClient", lambda: object())
        monkeypatch.setattr(run, "register", register)
        day2 = run.Day2

        def built_day2(**kwargs: Any) -> Any:
            self.day2 = day2(**kwargs)
            return self.day2

        monkeypatch.setattr(run, "Day2", built_day2)
        monkeypatch.setattr(run.asyncio, "run", no_loop)


@pytest.mark.parametrize("keda", [False, True])
def test_main_watches_scaled_objects_only_with_keda(
    monkeypatch: pytest.MonkeyPatch, keda: bool
) -> None:
    started = Started(monkeypatch)
    monkeypatch.setenv("LLMOP_KEDA", str(keda).lower())
    assert run.main(["--metrics-port=0", "--liveness-port=0"]) == 0
    assert ("ScaledObject" in started.child_kinds) is keda
    assert "Deployment" in started.child_kinds
    assert started.controller.config.keda_enabled is keda


#: Controller settings the reconciler holds; the others are the day-2 loop's.
CONTROLLER_FIELDS = {"prometheus_url", "preflight_nodes"}


def test_main_renders_with_the_settings_and_passes_the_prometheus_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = Started(monkeypatch)
    for setting in SETTINGS:
        if setting.field != "gateway_namespace":  # would write the routing table
            monkeypatch.setenv(setting.env, EXAMPLES[setting.field][0])
    assert run.main(["--metrics-port=0", "--liveness-port=0"]) == 0
    for setting in SETTINGS:
        if setting.field == "gateway_namespace":
            continue
        model = started.controller.config if setting.target == "render" else started.controller
        if setting.target == "controller" and setting.field not in CONTROLLER_FIELDS:
            model = started.day2  # the day-2 loop's settings
        assert getattr(model, setting.field) == expected(setting), setting.field
    assert started.controller.prometheus_url == "http://127.0.0.1:9090"
    assert started.controller.routes is None


# -- what the settings do to the rendered objects -------------------------------------------

SPEC: dict[str, Any] = {
    "apiVersion": "llmoperator.io/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": "qwen", "namespace": "team-a"},
    "spec": {
        "model": {"name": "Qwen/Qwen2.5-7B-Instruct"},
        "resources": {"gpu": {"product": "NVIDIA-H100-80GB-HBM3", "memoryGiB": 80}},
        "parallelism": {"tensor": 1},
        "autoscaling": {"provider": "keda", "minReplicas": 0, "maxReplicas": 2},
    },
}


def test_run_as_user_and_the_engine_settings_reach_the_pod() -> None:
    env = {
        "LLMOP_RUN_AS_USER": "1000",
        "LLMOP_DEFAULT_ENGINE_IMAGE": "mirror.example/vllm:1",
        "LLMOP_STARTUP_TIMEOUT_SECONDS": "600",
        "LLMOP_KEDA": "true",
        "LLMOP_KEDA_PROMETHEUS_ADDRESS": "http://prom.mon:9090",
        "LLMOP_GATEWAY_QUEUE_METRIC": "llm_gateway_requests_held",
    }
    config = parse_args([], env).config
    objs = {o["kind"]: o for o in render_all(LLMDeployment.model_validate(SPEC), config)}
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsUser"] == 1000 and security["runAsNonRoot"] is True
    assert security["runAsGroup"] == 1000 and security["fsGroup"] == 1000
    [container] = pod["containers"]
    assert container["image"] == "mirror.example/vllm:1"
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600
    trigger = objs["ScaledObject"]["spec"]["triggers"][0]["metadata"]
    assert trigger["serverAddress"] == "http://prom.mon:9090"
    assert 'llm_gateway_requests_held{model="' in trigger["query"]


def test_by_default_the_engine_runs_as_the_images_user() -> None:
    config = parse_args([], {"LLMOP_KEDA": "true"}).config
    [deployment, *_] = render_all(LLMDeployment.model_validate(SPEC), config)
    assert "runAsUser" not in deployment["spec"]["template"]["spec"]["securityContext"]


# -- the documentation ---------------------------------------------------------------------------


def chart_default(setting: Setting) -> str:
    node: Any = VALUES
    for key in setting.value.split("."):
        node = node[key]
    if setting.field == "gateway_namespace":
        return "the release namespace"
    return "null" if node is None else show(node) or '""'


def settings_table() -> str:
    """The table of docs/install.md, from SETTINGS and values.yaml."""
    rows = [
        "| value | flag | env | default | chart default | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in SETTINGS:
        default = f"`{show(s.default)}`" if show(s.default) else "none"
        rows.append(
            f"| `{s.value}` | `{s.flag}` | `{s.env}` | {default} | `{chart_default(s)}` "
            f"| {s.help} |"
        )
    return "\n".join(rows) + "\n"


def test_docs_install_has_the_settings_table() -> None:
    docs = (REPO / "docs" / "install.md").read_text()
    table = settings_table()
    assert table in docs, f"docs/install.md should contain this table:\n{table}"


def test_listener_addresses_are_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """--liveness-host and --metrics-host (and their variables) choose the interface."""
    assert parse_args([], {}).liveness_host == "0.0.0.0"  # a pod's probe needs it
    assert parse_args([], {}).metrics_host == "0.0.0.0"
    env = {"LLMOP_LIVENESS_HOST": "127.0.0.2", "LLMOP_METRICS_HOST": "127.0.0.3"}
    assert parse_args([], env).liveness_host == "127.0.0.2"
    assert parse_args(["--metrics-host=::1"], env).metrics_host == "::1"

    served: dict[str, Any] = {}
    monkeypatch.setattr(run, "KubeClient", lambda: object())
    monkeypatch.setattr(run, "register", lambda *a: None)

    class NoDay2:
        standby: Any = None

        def __init__(self, **_: Any) -> None:
            pass

        async def run(self) -> None:
            pass

    async def operator(**kwargs: Any) -> None:
        served["liveness"] = kwargs["liveness_endpoint"]

    monkeypatch.setattr(run, "Day2", NoDay2)
    monkeypatch.setattr(run.kopf, "operator", operator)
    monkeypatch.setattr(
        run, "start_http_server", lambda port, addr: served.update(metrics=(addr, port))
    )
    argv = ["--metrics-port=9999", "--liveness-port=8888", "--metrics-host=127.0.0.3"]
    assert run.main([*argv, "--liveness-host=127.0.0.2"]) == 0
    assert served == {"metrics": ("127.0.0.3", 9999), "liveness": "http://127.0.0.2:8888/healthz"}
    assert run.main([*argv, "--liveness-host=::1"]) == 0
    assert served["liveness"] == "http://[::1]:8888/healthz"
