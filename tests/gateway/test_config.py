"""The routing table format: the documented example, the rules, and the file loader."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from llm_operator.api.gateway_config import GatewayConfig
from llm_operator.gateway.loader import ConfigError, fingerprint, load, parse, watch

DOC = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"


def doc_example() -> dict[str, Any]:
    text = DOC.read_text()
    block = re.search(r"```yaml\n(models:.*?)```", text, re.S)
    assert block, "docs/gateway.md lost its example table"
    data: dict[str, Any] = yaml.safe_load(block.group(1))
    return data


def test_documented_example_is_a_valid_table() -> None:
    cfg = GatewayConfig.model_validate(doc_example())
    m = cfg.model("llama-70b")
    assert m is not None
    assert [t.weight for t in m.tracks] == [90, 10]
    canary = m.tracks[1].pods
    assert canary is not None and canary.port == "http"
    assert (
        canary.label_selector() == "llmoperator.io/deployment=llama-70b,llmoperator.io/track=canary"
    )
    assert m.fallbacks[1].target_model == "small-model"
    # What the operator writes is what the gateway reads back.
    assert GatewayConfig.model_validate(cfg.to_wire()) == cfg


def test_every_field_has_a_description() -> None:
    def walk(schema: dict[str, Any], defs: dict[str, Any], seen: set[str]) -> None:
        for name, prop in schema.get("properties", {}).items():
            assert prop.get("description"), f"{schema.get('title')}.{name} has no docstring"
        for ref in re.findall(r'"\$ref": "#/\$defs/(\w+)"', json.dumps(schema)):
            if ref not in seen:
                seen.add(ref)
                walk(defs[ref], defs, seen)

    s = GatewayConfig.model_json_schema(by_alias=True)
    walk(s, s.get("$defs", {}), set())
    assert "maxRequestBytes" in json.dumps(s)


def _one(**model: Any) -> dict[str, Any]:
    base = {"name": "m", "tracks": [{"name": "stable", "weight": 1, "addresses": ["h:1"]}]}
    return {"models": [{**base, **model}]}


def _pods(**pods: Any) -> dict[str, Any]:
    ref = {"namespace": "ml", "matchLabels": {"app": "llama"}, "port": "http", **pods}
    return _one(tracks=[{"name": "stable", "weight": 1, "pods": ref}])


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (_one(tracks=[{"name": "stable", "weight": 1}]), "needs addresses or pods"),
        (_one(tracks=[{"name": "stable", "weight": 0, "addresses": ["h:1"]}]), "weight above 0"),
        (
            _one(
                tracks=[
                    {"name": "stable", "weight": 1, "addresses": ["h:1"]},
                    {"name": "stable", "weight": 1, "addresses": ["h:2"]},
                ]
            ),
            "same track twice",
        ),
        (_one(fallbacks=[{"url": "http://x/v1"}]), "needs targetModel"),
        (_one(fallbacks=[{"model": "m"}]), "fall back to itself"),
        (_one(fallbacks=[{"model": "ghost"}]), "not in this table"),
        (_one(fallbacks=[{"model": "x", "url": "http://x"}]), "exactly one of model or url"),
        (_one(fallbacks=[{"model": "m2", "apiKeyEnv": "K"}]), "only to a url fallback"),
        (_one(fallbackOn=["5xx", "5xx"]), "trigger twice"),
        (_one(fallbackOn=["4xx"]), "fallbackOn"),
        (_one(tracks=[{"name": "blue", "weight": 1, "addresses": ["h:1"]}]), "name"),
        (_one(tracks=[{"name": "stable", "weight": 1, "addresses": ["no-port"]}]), "addresses"),
        (_one(timeouts={"firstbyte": 1}), "firstbyte"),
        (_pods(matchLabels={}), "at least 1 item"),
        (_pods(matchLabels={"a/b/c": "x"}), r"matchLabels\.a/b/c"),
        (_pods(matchLabels={"app": "x,y"}), r"matchLabels\.app"),
        (_pods(matchLabels={"app": "v" * 64}), "at most 63"),
        (_pods(matchLabels={".".join(["p" * 60] * 5) + "/app": "x"}), "longer than 253"),
        (_pods(port="a--b"), "needs a letter and no '--'"),
        (_pods(port="70000"), "needs a letter"),
        (_pods(port="HTTP"), "port"),
        (_pods(namespace="ML"), "namespace"),
        (_one(hold={"maxQueue": -1}), r"hold\.maxQueue"),
        (_one(hold={"maxQueue": 100_001}), r"hold\.maxQueue"),
        (_one(hold={"timeout": 0}), r"hold\.timeout"),
        (_one(hold={"timeout": 86401}), r"hold\.timeout"),
        (_one(hold={"maxqueue": 5}), "maxqueue"),
        ({"models": [], "edge": {"apiKeys": [{"name": "a", "sha256": "abc"}]}}, "sha256"),
    ],
)
def test_invalid_tables_are_rejected_with_a_useful_message(
    table: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        GatewayConfig.model_validate(table)


def test_hold_defaults() -> None:
    m = GatewayConfig.model_validate(_one()).models[0]
    assert (m.hold.max_queue, m.hold.timeout, m.hold.fallback_while_cold) == (100, 600.0, False)
    wire = _one(hold={"maxQueue": 5, "timeout": 30, "fallbackWhileCold": True})
    cfg = GatewayConfig.model_validate(wire)
    assert cfg.models[0].to_wire()["hold"] == wire["models"][0]["hold"]


def test_loader_reads_yaml_and_json(tmp_path: Path) -> None:
    table = _one()
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(table))
    (tmp_path / "t.json").write_text(json.dumps(table))
    assert load(tmp_path / "t.yaml") == load(tmp_path / "t.json")
    assert parse("") == GatewayConfig()
    with pytest.raises(ConfigError, match="mapping"):
        parse("- a\n- b\n")
    with pytest.raises(ConfigError, match="not YAML"):
        parse("models: [")
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.yaml")


async def test_watcher_applies_good_tables_and_skips_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_one()))
    applied: list[GatewayConfig] = []
    errors: list[str] = []
    seen = fingerprint(str(path), None)
    task = asyncio.create_task(
        watch(str(path), load(path), applied.append, errors.append, interval=0.02, seen=seen)
    )
    await asyncio.sleep(0.05)
    try:
        path.write_text("models: [")  # broken mid-edit: ignored, the old table stays
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.02)
        assert errors and not applied
        path.write_text(yaml.safe_dump(_one(retryAfter=9)))
        for _ in range(100):
            if applied:
                break
            await asyncio.sleep(0.02)
        assert applied and applied[0].models[0].retry_after == 9
    finally:
        task.cancel()
