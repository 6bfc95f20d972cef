"""The gateway's routing table rendered from LLMDeployments."""

from __future__ import annotations

from typing import Any

import yaml

from llm_operator.api import LLMDeployment
from llm_operator.api.gateway_config import GatewayConfig
from llm_operator.render import render_all
from llm_operator.render.routes import (
    ROUTES_KEY,
    render_routes,
    render_routes_configmap,
    routes_yaml,
)


def llmd(name: str, namespace: str = "ml", **spec: Any) -> LLMDeployment:
    body = {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": {"name": f"org/{name}"}, **spec},
    }
    return LLMDeployment.model_validate(body)


def test_each_llmdeployment_routes_its_served_name_to_its_stable_pods() -> None:
    table, problems = render_routes(
        [llmd("big", model={"name": "org/big", "servedName": "big-chat"}), llmd("small")]
    )
    assert problems == []
    big = table.model("big-chat")
    assert big is not None
    [track] = big.tracks
    assert (track.name, track.weight) == ("stable", 100)
    assert track.pods is not None
    assert (track.pods.namespace, track.pods.port) == ("ml", "http")
    assert track.pods.match_labels == {
        "llmoperator.io/deployment": "big",
        "llmoperator.io/track": "stable",
    }
    assert table.model("org/small") is not None


def test_the_stable_track_picks_the_pods_the_deployment_runs() -> None:
    # The same labels as the stable Deployment's selector and the port its engine container
    # names: whatever the name (dots, length), the gateway finds exactly those pods.
    long = llmd(
        "meta-llama-3.1-8b-instruct-" + "x" * 60,
        model={"name": "meta-llama/Llama-3.1-8B-Instruct"},
    )
    table, _ = render_routes([long])
    [track] = table.models[0].tracks
    [deployment] = [o for o in render_all(long) if o["kind"] == "Deployment"]
    template = deployment["spec"]["template"]
    assert track.pods is not None
    assert track.pods.match_labels == deployment["spec"]["selector"]["matchLabels"]
    assert track.pods.match_labels.items() <= template["metadata"]["labels"].items()
    [engine] = template["spec"]["containers"]
    assert track.pods.port in {p["name"] for p in engine["ports"]}


def test_fallbacks_become_a_chain_of_models_and_external_urls() -> None:
    primary = llmd(
        "big",
        routing={
            "fallbacks": [
                {"llmDeployment": "small"},
                {"url": "https://api.example.com/v1", "model": "gpt-x",
                 "apiKeySecretRef": {"name": "ext", "key": "token"}},
            ],
            "fallbackOn": ["429", "5xx"],
            "requestTimeout": "2m",
            "firstByteTimeout": "15s",
        },
        engine={"maxNumSeqs": 64},
    )  # fmt: skip
    table, problems = render_routes([primary, llmd("small")])
    assert problems == []
    route = table.model("org/big")
    assert route is not None
    assert [f.model for f in route.fallbacks] == ["org/small", None]
    external = route.fallbacks[1]
    assert (external.url, external.target_model) == ("https://api.example.com/v1", "gpt-x")
    assert external.api_key_file == "/etc/llm-gateway-keys/ml_ext_token"
    assert route.fallback_on == ["429", "5xx"]
    assert (route.timeouts.first_byte, route.timeouts.total) == (15, 120)
    assert route.max_concurrency == 64


def test_a_fallback_model_is_the_name_sent_to_an_llmdeployment_step() -> None:
    # fallbacks[].model on an llmDeployment step: the name its engines get (a LoRA adapter,
    # an alias); without it, the target's served name.
    primary = llmd(
        "big",
        routing={"fallbacks": [{"llmDeployment": "small", "model": "small-lora"},
                               {"llmDeployment": "tiny"}]},
    )  # fmt: skip
    table, problems = render_routes([primary, llmd("small"), llmd("tiny")])
    assert problems == []
    route = table.model("org/big")
    assert route is not None
    assert [(f.model, f.target_model) for f in route.fallbacks] == [
        ("org/small", "small-lora"),
        ("org/tiny", None),
    ]
    wire = yaml.safe_load(routes_yaml(table))
    assert wire["models"][0]["fallbacks"] == [
        {"model": "org/small", "targetModel": "small-lora"},
        {"model": "org/tiny"},
    ]


def test_resume_streams_is_rendered_only_when_asked_for() -> None:
    table, _ = render_routes([llmd("a", routing={"resumeStreams": True}), llmd("b")])
    a, b = table.model("org/a"), table.model("org/b")
    assert a is not None and b is not None
    assert (a.resume_streams, b.resume_streams) == (True, False)
    wire = yaml.safe_load(routes_yaml(table))
    assert wire["models"][0]["resumeStreams"] is True
    assert "resumeStreams" not in wire["models"][1]
    assert GatewayConfig.model_validate(wire) == table


def test_a_missing_fallback_target_is_left_out_and_said() -> None:
    table, problems = render_routes(
        [llmd("big", routing={"fallbacks": [{"llmDeployment": "gone"}]})]
    )
    route = table.model("org/big")
    assert route is not None and route.fallbacks == []
    assert problems == [
        "ml/big: fallback llmDeployment 'gone' does not exist (yet); the step is left out"
    ]


def test_a_served_name_taken_twice_keeps_the_first_and_says_so() -> None:
    same = {"name": "org/x", "servedName": "chat"}
    table, problems = render_routes([llmd("b", model=same), llmd("a", model=same)])
    assert [m.name for m in table.models] == ["chat"]
    [track] = table.models[0].tracks
    assert track.pods is not None and track.pods.match_labels["llmoperator.io/deployment"] == "a"
    assert problems == [
        "ml/b: served name 'chat' is already routed to ml/a; pick another model.servedName"
    ]


def test_fallbacks_do_not_cross_namespaces() -> None:
    table, problems = render_routes(
        [
            llmd("big", routing={"fallbacks": [{"llmDeployment": "small"}]}),
            llmd("small", namespace="other"),
        ]
    )
    assert problems and "does not exist" in problems[0]
    big = table.model("org/big")
    assert big is not None and big.fallbacks == []


def test_the_configmap_holds_a_table_the_gateway_accepts() -> None:
    table, _ = render_routes(
        [llmd("big", routing={"fallbacks": [{"llmDeployment": "small"}]}), llmd("small")]
    )
    configmap = render_routes_configmap(table, "llm-operator", "llm-operator-routes")
    assert configmap["metadata"]["namespace"] == "llm-operator"
    parsed = GatewayConfig.model_validate(yaml.safe_load(configmap["data"][ROUTES_KEY]))
    assert parsed == table
    assert "null" not in configmap["data"][ROUTES_KEY]


def test_the_table_is_deterministic_whatever_the_order() -> None:
    a, b = llmd("a"), llmd("b")
    assert render_routes([a, b]) == render_routes([b, a])


def test_the_oldest_llmdeployment_keeps_a_contested_served_name() -> None:
    same = {"name": "org/x", "servedName": "chat"}
    older, newer = llmd("zzz", model=same), llmd("aaa", model=same)
    older.metadata.model_extra["creationTimestamp"] = "2026-01-01T00:00:00Z"  # type: ignore[index]
    newer.metadata.model_extra["creationTimestamp"] = "2026-06-01T00:00:00Z"  # type: ignore[index]
    table, problems = render_routes([newer, older])
    [track] = table.models[0].tracks
    assert track.pods is not None
    assert track.pods.match_labels["llmoperator.io/deployment"] == "zzz"
    assert "ml/aaa" in problems[0]


def test_a_route_the_table_cannot_express_is_left_out_alone() -> None:
    odd = llmd("odd", routing={"fallbacks": [{"url": "https://x.example/v1", "model": "m@2024"}]})
    table, problems = render_routes([odd, llmd("fine")])
    assert [m.name for m in table.models] == ["org/fine"]
    assert problems and problems[0].startswith("ml/odd: not routed:")


def test_timeouts_outside_what_the_gateway_takes_are_clamped() -> None:
    table, problems = render_routes([llmd("a", routing={"requestTimeout": "48h"})])
    assert problems == [] and table.models[0].timeouts.total == 86400


CANARY_ROLLOUT = {"strategy": "Canary", "canary": {"steps": [{"weight": 20}]}}


def with_canary_status(deployment: LLMDeployment, weight: int) -> LLMDeployment:
    wire = deployment.model_dump(by_alias=True, exclude_none=True)
    wire["status"] = {"canary": {"phase": "Progressing", "revision": "r2", "weight": weight}}
    return LLMDeployment.model_validate(wire)


def test_a_running_canary_gets_its_weight_and_its_own_pods() -> None:
    table, _ = render_routes([with_canary_status(llmd("m", rollout=CANARY_ROLLOUT), 20)])
    stable, canary = table.models[0].tracks
    assert (stable.name, stable.weight, canary.name, canary.weight) == (
        "stable",
        80,
        "canary",
        20,
    )
    assert canary.pods is not None
    assert canary.pods.match_labels["llmoperator.io/track"] == "canary"


def test_weight_zero_or_no_canary_strategy_routes_only_the_stable() -> None:
    for deployment in (
        with_canary_status(llmd("m", rollout=CANARY_ROLLOUT), 0),
        with_canary_status(llmd("m"), 30),  # a stale status of an earlier strategy
    ):
        table, _ = render_routes([deployment])
        assert [(t.name, t.weight) for t in table.models[0].tracks] == [("stable", 100)]


def test_hold_settings_reach_the_table() -> None:
    hold = {"maxQueue": 5, "coldStartTimeout": "90s", "fallbackWhileCold": True}
    table, problems = render_routes([llmd("a", routing={"hold": hold})])
    assert problems == []
    route = table.models[0]
    assert (route.hold.max_queue, route.hold.timeout, route.hold.fallback_while_cold) == (
        5,
        90.0,
        True,
    )
    wire = yaml.safe_load(render_routes_configmap(table, "ns", "r")["data"][ROUTES_KEY])
    assert wire["models"][0]["hold"] == {"maxQueue": 5, "timeout": 90.0, "fallbackWhileCold": True}


def test_hold_defaults_are_the_gateways_and_zero_holds_nothing() -> None:
    table, _ = render_routes([llmd("a"), llmd("b", routing={"hold": {"maxQueue": 0}})])
    a, b = table.models
    assert (a.hold.max_queue, a.hold.timeout, a.hold.fallback_while_cold) == (100, 600.0, False)
    assert b.hold.max_queue == 0
    # A cold start longer than the gateway takes is clamped, like the other timeouts.
    table, problems = render_routes([llmd("c", routing={"hold": {"coldStartTimeout": "48h"}})])
    assert problems == [] and table.models[0].hold.timeout == 86400


def test_client_limits_reach_the_table() -> None:
    limits = {"tokensPerMinute": 50000, "maxConcurrentRequests": 4}
    table, _ = render_routes([llmd("a", routing={"clientLimits": limits}), llmd("b")])
    a, b = table.models
    assert a.client_limits is not None and a.client_limits.tokens_per_minute == 50000
    assert a.client_limits.max_concurrent_requests == 4 and b.client_limits is None
    wire = table.to_wire()
    assert wire["models"][0]["clientLimits"] == limits
    assert "clientLimits" not in wire["models"][1]


def test_a_failed_llmdeployment_is_not_routed_and_holds_no_served_name() -> None:
    # Issue 17's defect: a Failed LLMDeployment (nothing of it runs) kept its served name,
    # pointing at a Service that does not exist, and a Ready one of the same name got nothing.
    failed = LLMDeployment.model_validate(
        {
            "metadata": {
                "name": "old",
                "namespace": "ml",
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": {"model": {"name": "org/x", "servedName": "chat"}},
            "status": {"phase": "Failed"},
        }
    )
    ready = LLMDeployment.model_validate(
        {
            "metadata": {
                "name": "new",
                "namespace": "ml",
                "creationTimestamp": "2026-02-01T00:00:00Z",
            },
            "spec": {"model": {"name": "org/y", "servedName": "chat"}},
            "status": {"phase": "Ready"},
        }
    )
    table, problems = render_routes([failed, ready])
    [route] = table.models
    assert route.name == "chat"
    assert route.tracks[0].pods is not None and "new" in route.tracks[0].pods.label_selector()
    assert problems == ["ml/old: not routed while Failed"]
