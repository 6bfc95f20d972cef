"""One canary analysis: the canary's and the stable's numbers over an interval, judged
against the spec's thresholds. Missing data is Inconclusive, never Pass."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from llm_operator.api.v1alpha1 import CanaryAnalysis


class Verdict(StrEnum):
    PASS = "Pass"
    FAIL = "Fail"
    INCONCLUSIVE = "Inconclusive"


@dataclass(frozen=True)
class TrackSample:
    """What Prometheus said about one track over the interval; None where it had no value
    (no series, or NaN: a quantile of no observations)."""

    requests: float | None
    errors: float | None
    ttft_p95: float | None
    tpot_p95: float | None = None


@dataclass(frozen=True)
class Sample:
    canary: TrackSample
    stable: TrackSample


@dataclass(frozen=True)
class Result:
    verdict: Verdict
    message: str
    requests: int | None = None
    error_rate: float | None = None
    ttft_p95_ratio: float | None = None
    ttft_p95_seconds: float | None = None
    stable_ttft_p95_seconds: float | None = None
    stable_error_rate: float | None = None
    failed_check: str | None = None
    """error-rate or ttft-ratio, on a Fail."""


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _rate(errors: float | None, requests: float | None) -> float | None:
    if not requests:
        return None
    return (errors or 0.0) / requests


def evaluate(spec: CanaryAnalysis, sample: Sample | None, unavailable: str = "") -> Result:
    """The verdict of one interval. `sample` None: Prometheus could not be asked
    (`unavailable` says why)."""
    if sample is None:
        return Result(Verdict.INCONCLUSIVE, f"no metrics: {unavailable or 'Prometheus unset'}")
    canary, stable = sample.canary, sample.stable
    requests = _finite(canary.requests) or 0.0
    count = round(requests)
    error_rate = _rate(_finite(canary.errors), requests)
    stable_rate = _rate(_finite(stable.errors), _finite(stable.requests))
    ttft, stable_ttft = _finite(canary.ttft_p95), _finite(stable.ttft_p95)
    ratio = ttft / stable_ttft if ttft is not None and stable_ttft else None

    def result(verdict: Verdict, message: str, failed_check: str | None = None) -> Result:
        return Result(
            verdict,
            message,
            requests=count,
            error_rate=error_rate,
            ttft_p95_ratio=ratio,
            ttft_p95_seconds=ttft,
            stable_ttft_p95_seconds=stable_ttft,
            stable_error_rate=stable_rate,
            failed_check=failed_check,
        )

    if count < spec.min_requests:
        return result(
            Verdict.INCONCLUSIVE,
            f"{count} canary requests in the interval, fewer than minRequests {spec.min_requests}",
        )
    assert error_rate is not None  # count >= min_requests >= 1
    if error_rate > spec.max_error_rate:
        return result(
            Verdict.FAIL,
            f"error rate {error_rate:.2%} of {count} canary requests is above maxErrorRate "
            f"{spec.max_error_rate:.2%} (stable {_percent(stable_rate)})",
            "error-rate",
        )
    if ratio is None:
        return result(
            Verdict.INCONCLUSIVE,
            f"no TTFT p95 to compare (canary {_seconds(ttft)}, stable {_seconds(stable_ttft)})",
        )
    if ratio > spec.max_ttft_p95_ratio:
        return result(
            Verdict.FAIL,
            f"TTFT p95 {_seconds(ttft)} is {ratio:.2f}x the stable's {_seconds(stable_ttft)}, "
            f"above maxTTFTp95Ratio {spec.max_ttft_p95_ratio:g}",
            "ttft-ratio",
        )
    return result(
        Verdict.PASS,
        f"error rate {error_rate:.2%} of {count} requests, TTFT p95 {ratio:.2f}x the stable's",
    )


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}s"
