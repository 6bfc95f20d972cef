"""`llm-operator rollout`: what it refuses, what it records, what it prints."""

from __future__ import annotations

from typing import Any

from llm_operator.constants import ANNOTATION_ROLLOUT_COMMAND
from llm_operator.rolloutctl import describe, request


class FakeClient:
    def __init__(self, body: dict[str, Any] | None) -> None:
        self.body = body
        self.annotations: list[tuple[str, str, str, str | None]] = []

    def get_llmdeployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.body

    def annotate(self, namespace: str, name: str, annotation: str, value: str | None) -> None:
        self.annotations.append((namespace, name, annotation, value))


def body(phase: str | None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Ready", "revision": "aaa"}
    if phase:
        status["canary"] = {
            "phase": phase,
            "revision": "bbb",
            "step": 1,
            "weight": 50,
            "failedAnalyses": 1,
            "message": "step 2/3 at weight 50%: paused until 2026-12-02T01:00:00Z",
            "lastAnalysis": {"time": "t", "verdict": "Pass", "message": "error rate 0.00%"},
        }
    spec = {"rollout": {"strategy": "Canary", "canary": {"steps": [{}, {}, {}]}}}
    return {"metadata": {"name": "m", "namespace": "ns"}, "spec": spec, "status": status}


def test_a_command_is_the_annotation_and_nothing_else() -> None:
    client = FakeClient(body("Progressing"))
    assert request(client, "ns", "m", "pause") is None  # type: ignore[arg-type]
    assert client.annotations == [("ns", "m", ANNOTATION_ROLLOUT_COMMAND, "pause")]


def test_commands_that_do_not_fit_the_phase_are_refused_with_why() -> None:
    cases = [
        (None, "promote", "it has no canary running"),
        ("Paused", "pause", "its canary is Paused (needs Progressing)"),
        ("Progressing", "resume", "(needs Paused)"),
        ("RolledBack", "abort", "its canary is RolledBack"),
    ]
    for phase, action, why in cases:
        client = FakeClient(body(phase))
        problem = request(client, "ns", "m", action)  # type: ignore[arg-type]
        assert problem is not None and why in problem, problem
        assert client.annotations == []
    missing = request(FakeClient(None), "ns", "gone", "abort")  # type: ignore[arg-type]
    assert missing == "LLMDeployment ns/gone not found"


def test_status_names_step_weight_revisions_and_the_last_analysis() -> None:
    text = describe(body("Progressing"))
    assert "canary: Progressing revision bbb, step 2/3, weight 50%, failed analyses 1" in text
    assert "stable revision: aaa" in text
    assert "last analysis t: Pass: error rate 0.00%" in text
    assert "no canary running" in describe(body(None))
