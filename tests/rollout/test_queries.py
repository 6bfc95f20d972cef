"""The PromQL canary analysis asks, checked as text and by promtool where it is installed."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from llm_operator.rollout import analysis_queries


def test_queries_select_one_model_and_track_over_the_interval() -> None:
    q = analysis_queries("org/llama:8b", "canary", 30)
    selector = 'model="org/llama:8b",track="canary"'
    failed = (
        f"(sum(increase(llm_gateway_attempt_failures_total{{{selector},"
        f'reason=~"5xx|timeout|connectError"}}[30s])) or vector(0))'
    )
    broken = (
        f"(sum(increase(llm_gateway_requests_total{{{selector},"
        f'outcome="stream_error"}}[30s])) or vector(0))'
    )
    success = (
        f"(sum(increase(llm_gateway_requests_total{{{selector},"
        f'outcome="success"}}[30s])) or vector(0))'
    )
    assert q.errors == f"{failed} + {broken}"
    assert q.requests == f"{success} + {failed} + {broken}"
    assert q.ttft_p95 == (
        "histogram_quantile(0.95, sum by (le) "
        f"(rate(llm_gateway_time_to_first_token_seconds_bucket{{{selector}}}[30s])))"
    )
    assert "llm_gateway_time_per_output_token_seconds_bucket" in q.tpot_p95


def test_a_name_cannot_break_out_of_its_label() -> None:
    q = analysis_queries('a"b\\c', "stable", 0.2)
    assert 'model="a\\"b\\\\c"' in q.requests
    assert "[1s]" in q.requests  # at least a second


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus)")
def test_promtool_parses_every_query(tmp_path) -> None:  # type: ignore[no-untyped-def]
    q = analysis_queries("llama-8b", "canary", 30)
    rules = tmp_path / "rules.yaml"
    lines = ["groups:", "  - name: canary", "    rules:"]
    for name in ("requests", "errors", "ttft_p95", "tpot_p95"):
        expr = getattr(q, name).replace("'", "''")
        lines += [f"      - record: canary:{name}", f"        expr: '{expr}'"]
    rules.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_print_the_queries_the_operator_asks() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "canary.md").read_text()
    q = analysis_queries("MODEL", "canary", 30)
    for name in ("requests", "errors", "ttft_p95", "tpot_p95"):
        assert f"# {name}\n{getattr(q, name)}\n" in doc, name
