"""Unit tests of routing decisions: no sockets, a fake clock."""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

import pytest

from llm_operator.api.gateway_config import GatewayConfig
from llm_operator.gateway.bodyscan import BodyError, scan
from llm_operator.gateway.routing import (
    Backend,
    BackendRegistry,
    RetryBudgetState,
    build_table,
)


def _table(models: list[dict[str, Any]], **extra: Any) -> Any:
    cfg = GatewayConfig.model_validate({"models": models, **extra})
    return build_table(cfg, BackendRegistry(), lambda f: "sk-secret-value", clock=lambda: 0.0)


def _model(weights: dict[str, int], per_track: int = 1, **kw: Any) -> dict[str, Any]:
    port = iter(range(9000, 9100))
    return {
        "name": "m",
        "tracks": [
            {
                "name": n,
                "weight": w,
                "addresses": [f"10.0.0.1:{next(port)}" for _ in range(per_track)],
            }
            for n, w in weights.items()
        ],
        **kw,
    }


@pytest.mark.parametrize(("stable", "canary"), [(90, 10), (50, 50), (99, 1), (3, 1)])
def test_weighted_split_is_exact_over_every_window(stable: int, canary: int) -> None:
    m = _table([_model({"stable": stable, "canary": canary})]).models["m"]
    total = stable + canary
    picks = [m.pick(0.0)[1] for _ in range(total * 20)]
    for w in range(20):
        window = picks[w * total : (w + 1) * total]
        assert window.count("canary") == canary
    # Spread out, not bunched: a 10% canary never gets two requests in a row.
    if canary * 2 <= stable:
        assert all(not (a == b == "canary") for a, b in itertools.pairwise(picks))


def test_zero_weight_track_gets_nothing_even_on_retry() -> None:
    m = _table([_model({"stable": 100, "canary": 0})]).models["m"]
    assert {m.pick(0.0)[1] for _ in range(50)} == {"stable"}
    stable_backend = m.tracks[0].backends[0]
    assert m.pick(0.0, exclude=[stable_backend])[0] is None


def test_least_outstanding_within_a_track() -> None:
    m = _table([_model({"stable": 1}, per_track=3)]).models["m"]
    a, b, c = m.tracks[0].backends
    a.outstanding, b.outstanding, c.outstanding = 5, 1, 3
    assert m.pick(0.0)[0] is b
    b.outstanding = 9
    assert m.pick(0.0)[0] is c


def test_idle_backends_share_load() -> None:
    m = _table([_model({"stable": 1}, per_track=3)]).models["m"]
    seen = {m.pick(0.0)[0] for _ in range(6)}
    assert len(seen) == 3


def test_unavailable_track_falls_to_the_other_track() -> None:
    m = _table([_model({"stable": 90, "canary": 10})]).models["m"]
    for b in m.tracks[1].backends:
        b.circuit, b.opened_at = "open", 0.0
    assert {m.pick(1.0)[1] for _ in range(100)} == {"stable"}


def test_concurrency_limit_reports_saturation() -> None:
    m = _table([_model({"stable": 1}, per_track=2, maxConcurrency=2)]).models["m"]
    for b in m.tracks[0].backends:
        b.outstanding = 2
    backend, _, saturated = m.pick(0.0)
    assert backend is None and saturated
    m.tracks[0].backends[0].outstanding = 1
    assert m.pick(0.0)[0] is m.tracks[0].backends[0]


def test_the_saturation_queue_holds_its_depth_per_backend_that_takes_traffic() -> None:
    # saturationQueueDepth is per replica: 3 stable backends count, the 0-weight canary not.
    table = _table(
        [_model({"stable": 1, "canary": 0}, per_track=3, maxConcurrency=4, saturationQueueDepth=5)]
    )
    assert table.models["m"].queue_depth == 15
    alone = _table([_model({"stable": 1}, per_track=1, saturationQueueDepth=5)]).models["m"]
    assert alone.queue_depth == 5
    assert _table([_model({"stable": 1}, per_track=2)]).models["m"].queue_depth == 0


def test_circuit_opens_after_consecutive_failures_and_half_opens_after_cooldown() -> None:
    b = Backend("x:1", "x", 1)
    b.failure_threshold, b.cooldown = 3, 5.0
    b.on_failure(0.0)
    b.on_failure(0.0)
    b.on_success()  # a success in between resets the count
    b.on_failure(1.0)
    b.on_failure(1.0)
    assert b.available(1.0)
    b.on_failure(1.0)
    assert b.state(1.0) == "open" and not b.available(2.0)
    # After the cooldown exactly one probe goes through.
    assert b.available(6.5)
    probe = b.begin()
    assert probe and b.state(6.5) == "half_open"
    assert not b.available(6.6)
    # The probe fails: open again for another cooldown.
    b.on_failure(6.7)
    b.end(probe)
    assert not b.available(7.0) and b.state(7.0) == "open"
    assert b.available(11.8)
    probe = b.begin()
    b.on_success()
    b.end(probe)
    assert b.state(12.0) == "closed" and b.available(12.0)


def test_429_steers_away_for_retry_after_without_opening_the_breaker() -> None:
    b = Backend("x:1", "x", 1)
    for _ in range(10):
        b.on_busy(0.0, 2.0)
    assert not b.available(1.9)
    assert b.available(2.1)
    assert b.state(2.1) == "closed"


def test_retry_budget_bounds_extra_attempts_to_the_ratio() -> None:
    budget = RetryBudgetState(ratio=0.1, min_per_second=0.0, now=0.0)
    budget.tokens = 0.0
    spent = 0
    for _ in range(1000):
        budget.on_request()
        if budget.try_spend(0.0):
            spent += 1
    assert 99 <= spent <= 100


def test_retry_budget_floor_refills_with_time() -> None:
    budget = RetryBudgetState(ratio=0.0, min_per_second=2.0, now=0.0)
    budget.tokens = 0.0
    assert not budget.try_spend(0.1)
    assert budget.try_spend(0.6)


def test_table_reload_keeps_backend_state_and_split_phase() -> None:
    reg = BackendRegistry()
    cfg = GatewayConfig.model_validate({"models": [_model({"stable": 90, "canary": 10})]})
    t1 = build_table(cfg, reg, lambda f: None, clock=lambda: 0.0)
    m1 = t1.models["m"]
    picks = [m1.pick(0.0)[1] for _ in range(55)]
    b = m1.tracks[0].backends[0]
    b.consecutive_failures = 2
    t2 = build_table(cfg, reg, lambda f: None, previous=t1, clock=lambda: 0.0)
    assert t2.models["m"].tracks[0].backends[0] is b
    assert b.consecutive_failures == 2
    picks += [t2.models["m"].pick(0.0)[1] for _ in range(45)]
    # The weighted round robin continues where it was: still exactly 10 in 100.
    assert picks.count("canary") == 10
    assert t2.generation == t1.generation + 1


def test_backends_no_table_refers_to_are_forgotten_when_idle() -> None:
    reg = BackendRegistry()
    cfg1 = GatewayConfig.model_validate({"models": [_model({"stable": 1}, per_track=2)]})
    t1 = build_table(cfg1, reg, lambda f: None)
    a, b = t1.models["m"].tracks[0].backends
    cfg2 = GatewayConfig.model_validate(
        {
            "models": [
                {"name": "m", "tracks": [{"name": "stable", "weight": 1, "addresses": [a.key]}]}
            ]
        }
    )
    t2 = build_table(cfg2, reg, lambda f: None, previous=t1)
    assert t2.backend_keys() == {a.key}
    b.outstanding = 1  # still busy: kept until its requests finish
    reg.prune(t2.backend_keys())
    assert set(reg.backends) == {a.key, b.key}
    b.outstanding = 0
    reg.prune(t2.backend_keys())
    assert set(reg.backends) == {a.key} and reg.backends[a.key] is a


def test_client_key_rate_limit() -> None:
    key = "sk-test"
    digest = hashlib.sha256(key.encode()).hexdigest()
    t = _table(
        [_model({"stable": 1})],
        edge={
            "apiKeys": [
                {
                    "name": "team-a",
                    "sha256": digest,
                    "limits": {"requestsPerSecond": 2, "burst": 2},
                }
            ]
        },
    )
    ks = t.keys[digest]
    for _ in range(2):
        assert ks.wait(0.0) == (0.0, "")
        ks.take()
    wait, why = ks.wait(0.0)
    assert wait == pytest.approx(0.5) and why == "2 requests per second"
    assert ks.wait(0.5)[0] == 0


def test_fallback_chain_resolves_models_and_external_targets() -> None:
    t = _table(
        [
            _model(
                {"stable": 1},
                fallbacks=[
                    {"model": "small"},
                    {"url": "https://api.example.com/v1", "targetModel": "ext", "apiKeyEnv": "K"},
                ],
            ),
            {"name": "small", "tracks": [{"name": "stable", "weight": 1, "addresses": ["h:1"]}]},
        ]
    )
    steps = t.models["m"].fallbacks
    assert steps[0].model is t.models["small"] and steps[0].target_model == "small"
    ext = steps[1].external
    assert ext is not None
    assert (ext.backend.host, ext.backend.port, ext.backend.tls) == ("api.example.com", 443, True)
    assert ext.base_path == "/v1" and ext.host_header == "api.example.com"
    assert ext.api_key == "sk-secret-value" and "sk-secret" not in repr(ext)


# --- body scanning


def test_scan_fast_path_reads_model_and_stream() -> None:
    body = b'{"model": "llama-70b", "messages": [{"role":"user","content":"hi"}], "stream" : true}'
    s = scan(body)
    assert (s.model, s.stream, s.obj) == ("llama-70b", True, None)
    assert json.loads(s.with_model("small")) == {**json.loads(body), "model": "small"}


@pytest.mark.parametrize(
    "obj",
    [
        # A nested "model" key (a tool schema) must not confuse routing.
        {"messages": [], "tools": [{"parameters": {"model": {"type": "string"}}}], "model": "a"},
        {"model": "a", "messages": [{"role": "user", "content": 'say "model": x'}]},
        {"model": "a", "stream": False, "stream_options": {"include_usage": True}},
        {"model": "a/é", "messages": []},
        {"messages": [{"role": "user", "content": "model"}], "model": "a"},
    ],
)
def test_scan_agrees_with_json(obj: dict[str, Any]) -> None:
    for body in (json.dumps(obj).encode(), json.dumps(obj, ensure_ascii=False).encode()):
        s = scan(body)
        assert s.model == obj["model"]
        assert s.stream is (obj.get("stream") is True)
        assert json.loads(s.with_model("b")) == {**obj, "model": "b"}


@pytest.mark.parametrize("body", [b"", b"[]", b'{"messages": []}', b'{"model": 3}', b"{nope"])
def test_scan_rejects_bodies_without_a_model(body: bytes) -> None:
    with pytest.raises(BodyError):
        scan(body)
