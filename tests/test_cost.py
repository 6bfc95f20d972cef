"""GPU cost (llm_operator.cost): GPU-seconds from pods' run time x GPUs, tokens from their
counters across restarts, the price of a million tokens, when status may be written, and the
`llm-operator cost` table, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from llm_operator.cost import (
    Ledger,
    cost_rows,
    cost_status,
    format_rows,
    gpus_of,
    per_million_tokens,
    pod_run,
    status_due,
)

T0 = "2026-01-01T00:00:00Z"  # 1767225600


def pod(uid: str, gpus: int = 2, start: str | None = T0, **status: Any) -> dict[str, Any]:
    limits = {"nvidia.com/gpu": str(gpus), "memory": "8Gi"} if gpus else {"memory": "8Gi"}
    return {
        "metadata": {"uid": uid, "name": uid},
        "spec": {"containers": [{"name": "engine", "resources": {"limits": limits}}]},
        "status": {"startTime": start, "phase": "Running", **status},
    }


S0 = 1767225600.0


def test_gpus_are_the_pods_gpu_limits_of_any_vendor() -> None:
    assert gpus_of(pod("a", gpus=4)) == 4
    assert gpus_of(pod("a", gpus=0)) == 0
    amd = {"spec": {"containers": [{"resources": {"limits": {"amd.com/gpu": 1}}}, {}]}}
    assert gpus_of(amd) == 1


def test_a_pending_pod_holds_nothing_and_a_finished_one_ends_at_its_finish() -> None:
    assert pod_run(pod("a", start=None)) is None
    done = pod(
        "a",
        phase="Failed",
        containerStatuses=[{"state": {"terminated": {"finishedAt": "2026-01-01T00:10:00Z"}}}],
    )
    run = pod_run(done)
    assert run is not None and run.end == S0 + 600 and run.start == S0


def test_gpu_seconds_are_run_time_times_gpus_and_a_gone_pod_counts_until_last_seen() -> None:
    ledger = Ledger()
    assert ledger.observe_pods([pod_run(pod("a"))], S0 + 100) is True  # type: ignore[list-item]
    assert ledger.gpu_seconds(S0 + 100) == 200
    assert ledger.observe_pods([pod_run(pod("a"))], S0 + 160) is False  # type: ignore[list-item]
    # Gone by the next look: counted until it was last seen (160 s x 2).
    assert ledger.observe_pods([], S0 + 175) is True
    assert ledger.gpu_seconds(S0 + 1000) == 320


def test_after_an_operator_restart_pods_count_from_the_last_written_status() -> None:
    ledger = Ledger(base_gpu_seconds=1000, counted_from=S0 + 300)
    ledger.observe_pods([pod_run(pod("a"))], S0 + 400)  # type: ignore[list-item]
    assert ledger.gpu_seconds(S0 + 400) == 1000 + 100 * 2


def test_tokens_count_a_new_pods_whole_counter_an_old_pods_growth_and_survive_resets() -> None:
    ledger = Ledger(counted_from=S0 + 50)
    old, new = pod_run(pod("old")), pod_run(pod("new", start="2026-01-01T00:01:40Z"))
    ledger.observe_pods([old, new], S0 + 100)  # type: ignore[list-item]
    ledger.observe_tokens("old", 5000)  # served before counting began: not ours
    ledger.observe_tokens("new", 30)  # started after: all of it
    assert ledger.total_tokens() == 30
    ledger.observe_tokens("old", 5100)
    ledger.observe_tokens("new", 10)  # container restarted: 10 new ones
    assert ledger.total_tokens() == 30 + 100 + 10
    ledger.observe_tokens("unknown", 99)
    assert ledger.total_tokens() == 140


def test_price_per_million_tokens() -> None:
    # 2 GPU-hours at 3.0 for 1.5M tokens: 6.0 / 1.5 = 4.0 per million.
    assert per_million_tokens(7200.0, 1_500_000, 3.0) == 4.0
    assert per_million_tokens(7200.0, 0, 3.0) is None
    status = cost_status(
        gpu_seconds=7200.0, tokens=1_500_000, gpu_hour_price=3.0, counted_since=T0, updated_at=T0
    )
    assert status == {
        "gpuSeconds": 7200.0,
        "tokens": 1500000,
        "countedSince": T0,
        "updatedAt": T0,
        "gpuHourPrice": 3.0,
        "perMillionTokens": 4.0,
    }
    no_price = cost_status(
        gpu_seconds=1, tokens=1, gpu_hour_price=None, counted_since=T0, updated_at=T0
    )
    assert "gpuHourPrice" not in no_price and "perMillionTokens" not in no_price


def test_status_is_written_on_a_pod_change_or_after_the_interval_never_when_unmoved() -> None:
    written = {"gpuSeconds": 100.0, "tokens": 10, "updatedAt": T0}
    due = {"now": S0 + 60, "interval_seconds": 600.0}
    assert not status_due(written, 100.0, 10, pods_changed=True, **due)  # nothing moved
    assert not status_due(written, 160.0, 10, pods_changed=False, **due)  # only seconds grew
    assert status_due(written, 160.0, 10, pods_changed=True, **due)  # a pod started or stopped
    late = {"now": S0 + 600, "interval_seconds": 600.0}
    assert status_due(written, 1300.0, 10, pods_changed=False, **late)
    # Never written: as soon as there is something to say.
    assert status_due({}, 5.0, 0, pods_changed=False, **due)
    assert not status_due({}, 0.0, 0, pods_changed=False, **due)


LLMDS = [
    {
        "metadata": {"namespace": "team-b", "name": "small"},
        "status": {"gpusPerReplica": 1, "replicas": 1, "cost": {"gpuSeconds": 3600, "tokens": 0}},
    },
    {
        "metadata": {"namespace": "team-a", "name": "big"},
        "status": {
            "gpusPerReplica": 4,
            "replicas": 2,
            "cost": {"gpuSeconds": 28800, "tokens": 4_000_000, "gpuHourPrice": 2.0},
        },
    },
    {"metadata": {"namespace": "team-a", "name": "new"}, "status": {}},
]


def test_rows_use_the_operators_price_or_the_one_given() -> None:
    rows = cost_rows(LLMDS, None)
    assert [(r["namespace"], r["name"]) for r in rows] == [
        ("team-a", "big"),
        ("team-a", "new"),
        ("team-b", "small"),
    ]
    assert rows[0] == {
        "namespace": "team-a",
        "name": "big",
        "gpus": 8,
        "gpuHours": 8.0,
        "tokens": 4000000,
        "gpuHourPrice": 2.0,
        "perMillionTokens": 4.0,
    }
    assert rows[2]["perMillionTokens"] is None  # no price, no tokens
    assert cost_rows(LLMDS, 1.0)[0]["perMillionTokens"] == 2.0


def test_table_csv_and_json() -> None:
    rows = cost_rows(LLMDS, None)
    table = format_rows(rows, "table").splitlines()
    assert table[0].split() == [
        "NAMESPACE", "NAME", "GPUS", "GPU-HOURS", "TOKENS", "$/GPU-HOUR", "$/1M", "TOKENS"
    ]  # fmt: skip
    assert table[1].split() == ["team-a", "big", "8", "8.0", "4000000", "2.0", "4.0"]
    assert table[3].split() == ["team-a", "(total)", "8.0000", "4000000"]
    assert table[5].split() == ["team-b", "(total)", "1.0000", "0"]
    parsed = list(csv.DictReader(io.StringIO(format_rows(rows, "csv"))))
    assert parsed[0]["perMillionTokens"] == "4.0" and parsed[2]["gpuHourPrice"] == ""
    assert json.loads(format_rows(rows, "json")) == rows
