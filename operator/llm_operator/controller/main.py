"""`llm-operator run`: the operator process.

Settings come from flags, each with an environment variable for Deployments:
namespaces to watch (or all), log level and format, liveness and metrics ports, peering, and
the installation settings of `SETTINGS` (every `RenderConfig` field, and the Prometheus of
canary analysis). A flag wins over its environment variable; an empty value means the default.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import random
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

import kopf
from prometheus_client import start_http_server
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from llm_operator.controller.day2 import Day2
from llm_operator.controller.reconciler import Controller
from llm_operator.controller.routes import RoutesWriter
from llm_operator.controller.standby import Standby
from llm_operator.controller.watches import register
from llm_operator.kube.client import API_CONCURRENCY, KubeClient
from llm_operator.kube.resources import CHILD_KINDS, OPTIONAL_KINDS
from llm_operator.render import RenderConfig


class ControllerSettings(BaseModel):
    """Settings of the controller itself (not of what it renders), validated like RenderConfig."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    prometheus_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+\S*$")] | None = None
    """Prometheus that canary analysis queries (http:// or https://). Empty: no analysis."""
    stall_timeout_seconds: Annotated[float, Field(ge=0, le=86400)] = 300
    """Restart an engine pod whose requests run or wait while no token is generated for this
    long (needs --prometheus-url). 0: never."""
    stall_restarts_per_minute: Annotated[int, Field(ge=1, le=1000)] = 1
    """At most this many stalled engine pods restarted per minute in the whole cluster."""
    gpu_hour_price: Annotated[float, Field(ge=0)] | None = None
    """Price of one GPU-hour, for status.cost.perMillionTokens. Empty: no price."""
    cost_status_interval_seconds: Annotated[float, Field(ge=10, le=86400)] = 600
    """Write status.cost at most this often while only the seconds grow (a pod starting or
    stopping writes at once)."""
    preflight_nodes: bool = True
    """Before a new revision replaces pods that serve, check that some node has the labels of
    its nodeSelector (the GPU product), and keep the running revision if none has (needs list
    on nodes). Turn off where nodes are created on demand (Karpenter, a cluster autoscaler
    that scales GPU pools from zero)."""


Target = Literal["render", "controller"]
_MODELS: dict[Target, type[BaseModel]] = {"render": RenderConfig, "controller": ControllerSettings}


@dataclass(frozen=True)
class Setting:
    """One installation setting: a field of RenderConfig or ControllerSettings, its flag of
    `llm-operator run`, its environment variable and its Helm chart value."""

    field: str
    """The model field, and the attribute of the parsed arguments."""
    target: Target
    flag: str
    env: str
    value: str
    """Chart value that sets it (a dotted path of values.yaml)."""
    default: Any
    """The operator's default when neither the flag nor the variable is given."""
    help: str

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)


#: RenderConfig fields whose flag, variable, chart value, default or help differ from the rule
#: (flag --field-name, variable LLMOP_FIELD_NAME, chart value operator.fieldName).
_OVERRIDES: dict[str, dict[str, Any]] = {
    # KEDA's CRDs must exist before ScaledObjects can be watched: off unless asked for.
    "keda_enabled": {
        "flag": "--keda",
        "env": "LLMOP_KEDA",
        "value": "keda.enabled",
        "default": False,
        "help": "KEDA's CRDs are installed: allow autoscaling.provider keda and watch "
        "ScaledObjects.",
    },
    # The monitoring.coreos.com CRDs must exist before PodMonitors can be watched.
    "prometheus_operator_enabled": {
        "flag": "--prometheus-operator",
        "env": "LLMOP_PROMETHEUS_OPERATOR",
        "value": "operator.prometheusOperator",
        "help": "prometheus-operator's CRDs are installed: allow spec.monitoring (a PodMonitor "
        "and a PrometheusRule per LLMDeployment) and watch them.",
    },
    "runbook_base_url": {"value": "metrics.prometheusRule.runbookBaseUrl"},
    # Help differs from the field docstring, which is out of date: the renderer refuses
    # provider hpa when off (RenderError), and render/engine.py is now render/vllm_deployment.py.
    "hpa_enabled": {
        "help": "Render a HorizontalPodAutoscaler for autoscaling.provider hpa (needs "
        "prometheus-adapter). Off: LLMDeployments asking for provider hpa are refused (Degraded).",
    },
    "run_as_user": {
        "help": "Run the engine as this non-root UID (also GID and fsGroup) with a writable "
        "HOME. None: the image's user, which is root for vllm/vllm-openai.",
    },
    # The chart sets it to the release namespace when it deploys the gateway.
    "gateway_namespace": {
        "value": "gateway.enabled",
        "help": "Write the gateway's routing table into a ConfigMap in this namespace (off "
        "when empty; the chart sets the release namespace when gateway.enabled).",
    },
    # The chart's own section, networkPolicy: (docs/install.md, "Network policy").
    "network_policy_enabled": {"value": "networkPolicy.enabled"},
    "network_policy_gateway_pod_selector": {"value": "networkPolicy.gatewayPodSelector"},
    "network_policy_prometheus_namespace_selector": {
        "value": "networkPolicy.prometheus.namespaceSelector"
    },
    "network_policy_prometheus_pod_selector": {"value": "networkPolicy.prometheus.podSelector"},
}


def _settings() -> tuple[Setting, ...]:
    out = []
    for target, model in _MODELS.items():
        for name, info in model.model_fields.items():
            over = _OVERRIDES.get(name, {})
            default = over.get("default", info.default)
            out.append(
                Setting(
                    field=name,
                    target=target,
                    flag=over.get("flag", "--" + name.replace("_", "-")),
                    env=over.get("env", "LLMOP_" + name.upper()),
                    value=over.get("value", "operator." + to_camel(name)),
                    default=default,
                    help=over.get("help", " ".join((info.description or "").split())),
                )
            )
    return tuple(out)


SETTINGS: tuple[Setting, ...] = _settings()
"""Every installation setting, in the order of the models' fields: drives the flags, the
environment variables, the validation messages, and the tests of docs and chart."""


def show(value: Any) -> str:
    """A default as it is written on the command line and in the environment."""
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def _add_settings(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    group = parser.add_argument_group(
        "installation settings", "each also set by its environment variable; empty: the default"
    )
    for s in SETTINGS:
        shown = "" if s.default is None else f", default {show(s.default)}"
        extra: dict[str, Any] = {}
        if s.is_bool:  # `--keda` alone means true; `--keda=false` too is accepted
            extra = {"nargs": "?", "const": "true", "metavar": "true|false"}
        group.add_argument(
            s.flag,
            dest=s.field,
            default=env.get(s.env),
            help=f"{s.help} (env {s.env}{shown})",
            **extra,
        )


def _validate(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[RenderConfig, ControllerSettings]:
    """The models from the raw texts; a bad value ends the program naming flag and variable."""
    by_field = {s.field: s for s in SETTINGS}
    built: dict[Target, BaseModel] = {}
    for target, model in _MODELS.items():
        raw: dict[str, Any] = {}
        for s in SETTINGS:
            if s.target != target:
                continue
            text = getattr(args, s.field)
            if text is None or text == "":
                if s.default != model.model_fields[s.field].default:
                    raw[s.field] = s.default
                continue
            raw[s.field] = text
        try:
            built[target] = model.model_validate(raw)
        except ValidationError as err:
            problems = []
            for e in err.errors():
                s = by_field[str(e["loc"][0])]
                problems.append(f"{s.flag} (env {s.env}): {e['msg']}, got {raw.get(s.field)!r}")
            parser.error("; ".join(problems))
    render, controller = built["render"], built["controller"]
    assert isinstance(render, RenderConfig) and isinstance(controller, ControllerSettings)
    return render, controller


def parse_args(argv: list[str], environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The arguments; ``args.config`` is the RenderConfig and ``args.controller`` the
    ControllerSettings, and each setting's attribute holds its validated value."""
    env = (os.environ if environ is None else environ).get
    parser = argparse.ArgumentParser(prog="llm-operator run", description=__doc__)
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[n for n in env("LLMOP_NAMESPACES", "").split(",") if n],
        help="namespace to watch; repeat for several (env LLMOP_NAMESPACES, comma-separated)",
    )
    parser.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="watch every namespace (the default when no --namespace is given)",
    )
    parser.add_argument("--log-level", default=env("LLMOP_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format", choices=["json", "text"], default=env("LLMOP_LOG_FORMAT", "text")
    )
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=int(env("LLMOP_LIVENESS_PORT", "8080")),
        help="serve /healthz here (0 to disable)",
    )
    parser.add_argument(
        "--liveness-host",
        default=env("LLMOP_LIVENESS_HOST", "") or "0.0.0.0",
        help="address /healthz listens on (env LLMOP_LIVENESS_HOST; default 0.0.0.0, every "
        "interface, which a pod's probe needs; 127.0.0.1 outside a pod)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env("LLMOP_METRICS_PORT", "9090")),
        help="serve Prometheus /metrics here (0 to disable)",
    )
    parser.add_argument(
        "--metrics-host",
        default=env("LLMOP_METRICS_HOST", "") or "0.0.0.0",
        help="address /metrics listens on (env LLMOP_METRICS_HOST; default 0.0.0.0, every "
        "interface, for Prometheus to scrape the pod)",
    )
    parser.add_argument(
        "--peering",
        default=env("LLMOP_PEERING", ""),
        help="kopf peering name for a second replica (needs kopf's peering CRDs); "
        "without it the operator runs standalone",
    )
    parser.add_argument(
        "--routes-configmap",
        default=env("LLMOP_ROUTES_CONFIGMAP", "llm-operator-routes"),
        help="name of the routing-table ConfigMap",
    )
    _add_settings(parser, os.environ if environ is None else environ)
    args = parser.parse_args(argv)
    args.config, args.controller = _validate(parser, args)
    for s in SETTINGS:
        setattr(
            args,
            s.field,
            getattr(args.config if s.target == "render" else args.controller, s.field),
        )
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    kopf.configure(
        debug=args.log_level.upper() == "DEBUG",
        # kopf's INFO lines say "handler succeeded" for every watch event: noise at scale.
        verbose=False,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    logging.getLogger().setLevel(args.log_level.upper())
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_host)
    client = KubeClient()
    config: RenderConfig = args.config
    routes = (
        RoutesWriter(client, args.gateway_namespace, args.routes_configmap)
        if args.gateway_namespace
        else None
    )
    controller = Controller(
        client=client,
        config=config,
        routes=routes,
        prometheus_url=args.prometheus_url,
        preflight_nodes=args.preflight_nodes,
    )
    # Progress-based liveness (stalls are seen in Prometheus only) and GPU cost.
    day2 = Day2(
        controller=controller,
        namespace_label=config.metric_namespace_label,
        pod_label=config.metric_pod_label,
        stall_timeout_seconds=args.stall_timeout_seconds,
        stall_restarts_per_minute=args.stall_restarts_per_minute,
        gpu_hour_price=args.gpu_hour_price,
        cost_status_interval_seconds=args.cost_status_interval_seconds,
    )
    # kopf's identity in the peering (the pod's name in the chart) and this replica's priority:
    # the day-2 loop applies kopf's rule to the same peering object (controller/standby.py).
    identity = os.environ.get("POD_ID") or f"{socket.gethostname()}/{os.getpid()}"
    priority = random.SystemRandom().randint(1, 1_000_000) if args.peering else 0
    namespaces = [] if args.all_namespaces else list(dict.fromkeys(args.namespace))
    day2.standby = Standby(
        client=client,
        peering_name=args.peering or None,
        identity=identity,
        priority=priority,
        clusterwide=not namespaces,
    )
    registry = kopf.OperatorRegistry()
    child_kinds = [
        k.kind
        for k in CHILD_KINDS
        if k.kind not in OPTIONAL_KINDS or getattr(config, OPTIONAL_KINDS[k.kind])
    ]
    register(registry, controller, namespaces, child_kinds)
    host = f"[{args.liveness_host}]" if ":" in args.liveness_host else args.liveness_host  # IPv6
    liveness = f"http://{host}:{args.liveness_port}/healthz" if args.liveness_port else None

    async def operate() -> None:
        # Blocking API calls run in this pool, as many at once as the client has connections.
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(API_CONCURRENCY, "llm-operator-api")
        )
        controller.tasks.add(asyncio.ensure_future(day2.run()))  # referenced while it runs
        await kopf.operator(
            registry=registry,
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=not args.peering,
            peering_name=args.peering or None,
            # Distinct priorities make a real standby (kopf pauses peers of equal priority).
            priority=priority if args.peering else None,
            identity=cast(Any, identity),  # kopf's Identity: a NewType of str it does not export
            liveness_endpoint=liveness,
        )

    try:
        asyncio.run(operate())
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
