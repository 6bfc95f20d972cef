"""The pod runner reports a pod's conditions again when another writer overwrote them."""

from __future__ import annotations

from typing import Any

from llm_operator_dev.devcluster.kubelet import conditions_overwritten

WRITTEN = {
    "phase": "Running",
    "conditions": [
        {"type": "Initialized", "status": "True"},
        {"type": "Ready", "status": "True"},
        {"type": "ContainersReady", "status": "True"},
    ],
}


def api_copy(version: str, ready: str, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    conditions = [
        {"type": "Initialized", "status": "True"},
        {"type": "Ready", "status": ready, "reason": "NodeNotReady"},
        {"type": "ContainersReady", "status": "True"},
        *(extra or []),
    ]
    return {"metadata": {"resourceVersion": version}, "status": {"conditions": conditions}}


def test_the_node_lifecycle_controllers_not_ready_is_overwritten() -> None:
    assert conditions_overwritten(WRITTEN, 100, api_copy("140", "False"))


def test_a_copy_that_agrees_or_adds_conditions_of_its_own_is_left_alone() -> None:
    assert not conditions_overwritten(WRITTEN, 100, api_copy("140", "True"))
    scheduled = [{"type": "PodScheduled", "status": "True"}]
    assert not conditions_overwritten(WRITTEN, 100, api_copy("141", "True", scheduled))


def test_copies_from_before_the_runners_own_write_are_not_evidence() -> None:
    # The watch may still deliver the pod as it was before this runner's last write.
    assert not conditions_overwritten(WRITTEN, 100, api_copy("99", "False"))
    assert not conditions_overwritten(WRITTEN, 100, api_copy("100", "False"))


def test_nothing_written_yet_means_nothing_to_defend() -> None:
    assert not conditions_overwritten(None, 0, api_copy("5", "False"))
