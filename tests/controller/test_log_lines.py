"""The default INFO log says what changed, not one line per watch event (issue 17)."""

from __future__ import annotations

import logging

import kopf
import pytest

from llm_operator.controller import watches
from llm_operator.controller.reconciler import Controller
from llm_operator.render import RenderConfig


def kopf_lines(caplog: pytest.LogCaptureFixture, level: int, events: int) -> list[str]:
    caplog.clear()
    logging.getLogger().setLevel(level)
    kopf_log = logging.getLogger("kopf.objects")
    for _ in range(events):  # what kopf's execution says after every event handler
        kopf_log.info("Handler 'llmdeployment' succeeded.")
    kopf_log.info("Activity 'prime_cache' succeeded.")
    kopf_log.warning("Handler 'llmdeployment' failed temporarily: boom")
    return [f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.name == "kopf.objects"]


def test_per_event_lines_are_debug(caplog: pytest.LogCaptureFixture) -> None:
    controller = Controller(client=object(), config=RenderConfig())  # type: ignore[arg-type]
    watches.register(kopf.OperatorRegistry(), controller, ["ns"], ["Deployment"])
    caplog.set_level(logging.DEBUG, logger="kopf.objects")
    root = logging.getLogger().level
    try:
        # INFO: 100 events cost no line; a start-up step and a problem still show.
        assert kopf_lines(caplog, logging.INFO, 100) == [
            "INFO Activity 'prime_cache' succeeded.",
            "WARNING Handler 'llmdeployment' failed temporarily: boom",
        ]
        # DEBUG: every one, said at DEBUG.
        lines = kopf_lines(caplog, logging.DEBUG, 3)
        assert lines.count("DEBUG Handler 'llmdeployment' succeeded.") == 3
    finally:
        logging.getLogger().setLevel(root)
        logging.getLogger("kopf.objects").removeFilter(watches.PER_EVENT_LINES)
