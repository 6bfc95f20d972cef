"""The verdict of one analysis interval."""

from __future__ import annotations

import math

import pytest

from llm_operator.api.v1alpha1 import CanaryAnalysis
from llm_operator.rollout import Sample, TrackSample, Verdict, evaluate

SPEC = CanaryAnalysis(max_error_rate=0.05, max_ttft_p95_ratio=1.5, min_requests=10)


def sample(
    requests: float | None,
    errors: float | None = 0,
    ttft: float | None = 0.1,
    stable_ttft: float | None = 0.1,
) -> Sample:
    return Sample(
        canary=TrackSample(requests=requests, errors=errors, ttft_p95=ttft),
        stable=TrackSample(requests=100, errors=1, ttft_p95=stable_ttft),
    )


@pytest.mark.parametrize(
    ("given", "verdict", "check"),
    [
        (sample(50), Verdict.PASS, None),
        (sample(50, errors=2.5), Verdict.PASS, None),  # exactly at the limit
        (sample(50, errors=3), Verdict.FAIL, "error-rate"),
        (sample(50, ttft=0.15), Verdict.PASS, None),
        (sample(50, ttft=0.16), Verdict.FAIL, "ttft-ratio"),
        (sample(9.6), Verdict.PASS, None),  # increase() extrapolates: 9.6 rounds to 10
        (sample(9), Verdict.INCONCLUSIVE, None),
        (sample(None), Verdict.INCONCLUSIVE, None),
        (sample(math.nan), Verdict.INCONCLUSIVE, None),
        (sample(50, ttft=None), Verdict.INCONCLUSIVE, None),
        (sample(50, stable_ttft=None), Verdict.INCONCLUSIVE, None),
        (sample(50, stable_ttft=0.0), Verdict.INCONCLUSIVE, None),
        (sample(50, errors=None), Verdict.PASS, None),  # no error series: none failed
        (sample(50, errors=30, ttft=None), Verdict.FAIL, "error-rate"),  # errors need no TTFT
    ],
)
def test_verdicts(given: Sample, verdict: Verdict, check: str | None) -> None:
    result = evaluate(SPEC, given)
    assert result.verdict is verdict, result.message
    assert result.failed_check == check


def test_missing_prometheus_says_why() -> None:
    result = evaluate(SPEC, None, "Prometheus at http://p did not answer: connection refused")
    assert result.verdict is Verdict.INCONCLUSIVE
    assert "connection refused" in result.message


def test_a_failure_message_carries_the_numbers() -> None:
    result = evaluate(SPEC, sample(40, errors=4))
    assert result.message.startswith("error rate 10.00% of 40 canary requests")
    assert result.error_rate == pytest.approx(0.1)
    assert result.stable_error_rate == pytest.approx(0.01)
