"""The gateway's routing table from every LLMDeployment (pure).

One table for the whole installation: each LLMDeployment becomes a model route named by its
served name, whose stable track is its stable engine pods (picked by the same labels as the
Deployment's selector; the gateway watches them and sends to the ready ones), with its
fallback chain, triggers, timeouts and hold settings (scale from zero). The operator writes
the table into the ConfigMap the gateway mounts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import yaml

from llm_operator.api.gateway_config import (
    Fallback,
    GatewayConfig,
    Hold,
    ModelRoute,
    PodSelectorRef,
    Timeouts,
    Track,
)
from llm_operator.api.v1alpha1 import LLMDeployment, parse_duration_seconds
from llm_operator.constants import LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_NAME, MANAGED_BY
from llm_operator.render.names import selector_labels
from llm_operator.render.vllm_deployment import PORT_NAME

ROUTES_KEY = "routes.yaml"
# Where the gateway finds an external fallback's API key: the chart mounts the keys Secret
# there, the operator's copy of exactly the keys LLMDeployments reference.
API_KEY_DIR = "/etc/llm-gateway-keys"
MAX_TIMEOUT_SECONDS = 86400.0


KEYS_SECRET_SUFFIX = "-keys"


def api_key_file(namespace: str, secret: str, key: str) -> str:
    """The key's name in the gateway's keys Secret (and so its file). Namespaces and Secret
    names never hold `_`, so the name maps back to one (namespace, secret, key)."""
    return f"{namespace}_{secret}_{key}"


def api_key_path(namespace: str, secret: str, key: str) -> str:
    return f"{API_KEY_DIR}/{api_key_file(namespace, secret, key)}"


def key_references(llmds: Sequence[LLMDeployment]) -> set[tuple[str, str, str]]:
    """Every (namespace, Secret, key) an external fallback of these LLMDeployments names."""
    refs = set()
    for llmd in llmds:
        for step in llmd.spec.routing.fallbacks:
            ref = step.api_key_secret_ref
            if ref is not None:
                refs.add((llmd.metadata.namespace or "default", ref.name, ref.key))
    return refs


def render_keys_secret(data: dict[str, str], namespace: str, name: str) -> dict[str, Any]:
    """The one Secret the gateway mounts at API_KEY_DIR: a copy of exactly the keys that
    LLMDeployments reference (`data` as the API holds it: base64), nothing else."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                LABEL_NAME: "llm-operator",
                LABEL_COMPONENT: "gateway-keys",
                LABEL_MANAGED_BY: MANAGED_BY,
            },
        },
        "data": dict(sorted(data.items())),
    }


def _fallbacks(
    llmd: LLMDeployment, served: dict[tuple[str, str], str]
) -> tuple[list[Fallback], list[str]]:
    namespace = llmd.metadata.namespace or "default"
    chain: list[Fallback] = []
    problems: list[str] = []
    for step in llmd.spec.routing.fallbacks:
        if step.llm_deployment is not None:
            target = served.get((namespace, step.llm_deployment))
            if target is None:
                problems.append(
                    f"{namespace}/{llmd.metadata.name}: fallback llmDeployment "
                    f"{step.llm_deployment!r} does not exist (yet); the step is left out"
                )
                continue
            chain.append(Fallback(model=target, target_model=step.model))
        else:
            secret = step.api_key_secret_ref
            chain.append(
                Fallback(
                    url=step.url,
                    target_model=step.model,
                    api_key_file=None
                    if secret is None
                    else api_key_path(namespace, secret.name, secret.key),
                )
            )
    return chain, problems


def _seconds(duration: str) -> float:
    """A duration as the gateway takes it: above 0 and at most a day."""
    return min(max(parse_duration_seconds(duration), 0.001), MAX_TIMEOUT_SECONDS)


def canary_weight(llmd: LLMDeployment) -> int:
    """The canary's share as the operator last decided it (status.canary.weight): the status
    is where the rollout's state lives, so the table follows each step as it is written."""
    canary = llmd.status.canary if llmd.status is not None else None
    if canary is None or not canary.weight or llmd.spec.rollout.strategy != "Canary":
        return 0
    return max(0, min(100, canary.weight))


def _shares(weight: int) -> tuple[tuple[Literal["stable", "canary"], int], ...]:
    return (("stable", 100 - weight), ("canary", weight))


def _tracks(llmd: LLMDeployment) -> list[Track]:
    namespace = llmd.metadata.namespace or "default"
    weight = canary_weight(llmd)
    tracks = [
        Track(
            name=track,
            weight=share,
            pods=PodSelectorRef(
                namespace=namespace, match_labels=selector_labels(llmd, track), port=PORT_NAME
            ),
        )
        for track, share in _shares(weight)
        if share > 0 or track == "stable"
    ]
    return tracks


def model_route(
    llmd: LLMDeployment, served: dict[tuple[str, str], str]
) -> tuple[ModelRoute, list[str]]:
    routing = llmd.spec.routing
    fallbacks, problems = _fallbacks(llmd, served)
    route = ModelRoute(
        name=llmd.spec.model.effective_served_name,
        tracks=_tracks(llmd),
        fallbacks=fallbacks,
        fallback_on=list(routing.fallback_on),
        timeouts=Timeouts(
            first_byte=_seconds(routing.first_byte_timeout),
            total=_seconds(routing.request_timeout),
        ),
        max_concurrency=llmd.spec.engine.max_num_seqs,
        saturation_queue_depth=routing.saturation_queue_depth or 0,
        hold=Hold(
            max_queue=routing.hold.max_queue,
            timeout=_seconds(routing.hold.cold_start_timeout),
            fallback_while_cold=routing.hold.fallback_while_cold,
        ),
    )
    if routing.resume_streams:
        route.resume_streams = True  # on the wire only when asked for
    if routing.client_limits is not None and routing.client_limits.is_limited():
        route.client_limits = routing.client_limits
    return route, problems


def render_routes(llmds: Sequence[LLMDeployment]) -> tuple[GatewayConfig, list[str]]:
    """The table, plus what could not go in it (said to a person, never fatal)."""
    # The oldest LLMDeployment keeps a contested served name: a newcomer never takes traffic.
    ordered = sorted(
        llmds,
        key=lambda d: (
            str((d.metadata.model_extra or {}).get("creationTimestamp") or ""),
            d.metadata.namespace or "",
            d.metadata.name or "",
        ),
    )
    served: dict[tuple[str, str], str] = {}
    owner_of: dict[str, str] = {}
    problems: list[str] = []
    kept: list[LLMDeployment] = []
    for llmd in ordered:
        namespace, name = llmd.metadata.namespace or "default", llmd.metadata.name or ""
        served_name = llmd.spec.model.effective_served_name
        if llmd.status is not None and llmd.status.phase == "Failed":
            # Failed: nothing of it runs (no Deployment, no Service). Routing it would send its
            # name to nowhere, and hold the name from an LLMDeployment that serves it.
            problems.append(f"{namespace}/{name}: not routed while Failed")
            continue
        if served_name in owner_of:
            problems.append(
                f"{namespace}/{name}: served name {served_name!r} is already routed to "
                f"{owner_of[served_name]}; pick another model.servedName"
            )
            continue
        owner_of[served_name] = f"{namespace}/{name}"
        served[(namespace, name)] = served_name
        kept.append(llmd)
    routes = []
    for llmd in kept:
        try:
            route, route_problems = model_route(llmd, served)
        except ValueError as error:  # a spec the gateway's table cannot express
            problems.append(f"{llmd.metadata.namespace}/{llmd.metadata.name}: not routed: {error}")
            continue
        routes.append(route)
        problems += route_problems
    return GatewayConfig(models=routes), problems


def routes_yaml(table: GatewayConfig) -> str:
    wire = table.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")
    return str(yaml.safe_dump(wire, sort_keys=False))


def render_routes_configmap(table: GatewayConfig, namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                LABEL_NAME: "llm-operator",
                LABEL_COMPONENT: "gateway-routes",
                LABEL_MANAGED_BY: MANAGED_BY,
            },
        },
        "data": {ROUTES_KEY: routes_yaml(table)},
    }
