"""kopf's peering rule as the operator's own loops apply it (llm_operator.peering), checked
against kopf's own decision on the same peering status."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any
from unittest import mock

import kopf
import pytest
from kopf._cogs.aiokits import aiotoggles
from kopf._core.engines import peering as kopf_peering

from llm_operator.peering import outranked, peering_path

NOW = datetime.datetime(2026, 12, 2, 12, 0, 0, tzinfo=datetime.UTC)


def seen(seconds_ago: float, priority: int, lifetime: int = 60) -> dict[str, Any]:
    lastseen = NOW - datetime.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": lastseen.isoformat()}


CASES = {
    "alone": ({"me": seen(1, 5)}, False),
    "lower live peer": ({"me": seen(1, 5), "other": seen(1, 3)}, False),
    "higher live peer": ({"me": seen(1, 5), "other": seen(1, 9)}, True),
    "equal live peer": ({"me": seen(1, 5), "other": seen(1, 5)}, True),
    "higher dead peer": ({"me": seen(1, 5), "other": seen(61, 9)}, False),
    "higher peer with a short lifetime, dead": ({"other": seen(11, 9, lifetime=10)}, False),
    "no status": ({}, False),
}


@pytest.mark.parametrize("name", CASES)
def test_the_rule_is_kopfs(name: str) -> None:
    status, expected = CASES[name]
    assert outranked(status, "me", 5, NOW.timestamp()) is expected
    # kopf's own processing of the same event (at the same now) pauses exactly then.
    toggle = kopf_toggle()
    settings = kopf_settings(priority=5)
    event = {"type": "MODIFIED", "object": {"metadata": {"name": "p"}, "status": status}}

    async def process() -> bool:
        task = asyncio.create_task(
            kopf_peering.process_peering_event(
                raw_event=event,  # type: ignore[arg-type]
                namespace=None,
                resource=None,  # type: ignore[arg-type]
                identity=kopf_peering.Identity("me"),
                settings=settings,
                autoclean=False,
                conflicts_found=toggle,
            )
        )
        await asyncio.sleep(0.05)  # it sleeps until the blocking peers expire: not waited for
        task.cancel()
        return toggle.is_on()

    with mock.patch("datetime.datetime", wraps=datetime.datetime) as fake:
        fake.now.return_value = NOW
        fake.utcnow.return_value = NOW.replace(tzinfo=None)
        paused = asyncio.run(process())
    assert paused is expected


def kopf_toggle() -> aiotoggles.Toggle:
    return aiotoggles.Toggle(False)


def kopf_settings(priority: int) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.peering.name = "p"
    settings.peering.priority = priority
    return settings


def test_an_unreadable_entry_counts_as_a_live_peer() -> None:
    assert outranked({"other": "garbage"}, "me", 5, NOW.timestamp())
    assert outranked({"other": {"priority": "x"}}, "me", 5, NOW.timestamp())


def test_peering_paths() -> None:
    assert peering_path("llm", None) == "/apis/kopf.dev/v1/clusterkopfpeerings/llm"
    assert peering_path("llm", "ml") == "/apis/kopf.dev/v1/namespaces/ml/kopfpeerings/llm"
