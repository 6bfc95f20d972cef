"""Prometheus metrics, hand-written for the hot path.

prometheus-client's labelled metrics cost a dict lookup, a lock and several calls per
observation; here each (model, backend, track) target gets its `Series` object once, at table
load, and an observation is a bisect and two increments. The text exposition is rendered only
when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Final, TypeVar

K = TypeVar("K")

# Seconds. Time to first byte of an LLM answer spans ~1 ms (a cached short prompt) to minutes.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

# Seconds. Time to first token, for canary analysis's p95 ratio: finer between 50 ms and 1 s
# (where a ratio of 1.5 or 2 must show between two buckets), then up to a long cold prefill.
TTFT_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

# Seconds. Time per output token of a stream: ~1 ms (a small model, one stream) to ~1 s.
TPOT_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
)

OUTCOMES: Final = (
    "success",
    "client_error",
    "server_error",
    "stream_error",
    "unavailable",
    "timeout",
    "client_closed",
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels(**kv: str) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items())


class Histogram:
    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        # `report.report` does the same inline (per request): change both together.
        self.counts[bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def render(self, name: str, label_str: str, out: list[str]) -> None:
        acc = 0
        sep = "," if label_str else ""
        for bound, c in zip(self.buckets, self.counts, strict=False):
            acc += c
            out.append(f'{name}_bucket{{{label_str}{sep}le="{bound}"}} {acc}')
        acc += self.counts[-1]
        out.append(f'{name}_bucket{{{label_str}{sep}le="+Inf"}} {acc}')
        out.append(f"{name}_sum{{{label_str}}} {self.sum}")
        out.append(f"{name}_count{{{label_str}}} {self.count}")


class Series:
    """Everything recorded for one (model, backend, track)."""

    __slots__ = ("in_flight", "label_str", "outcomes", "total", "tpot", "ttfb", "ttft")

    def __init__(self, label_str: str) -> None:
        self.label_str = label_str
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.ttfb = Histogram()
        self.ttft = Histogram(TTFT_BUCKETS)
        """2xx only: to the first SSE data event of a stream, to the end of any other body."""
        self.tpot = Histogram(TPOT_BUCKETS)
        """2xx streams with at least 2 data events: (last - first) / (events - 1)."""
        self.total = Histogram()
        self.in_flight = 0


class Targets(dict[tuple[str, str, str], Series]):
    """(model, backend, track) -> its `Series`, made on first use. A subscript, not a
    `target()` call, on the hot path: a hit is one dict lookup, no Python frame and no
    branch in the caller (`Proxy._attempt` is at the complexity cap)."""

    def __missing__(self, key: tuple[str, str, str]) -> Series:
        model, backend, track = key
        s = self[key] = Series(labels(model=model, backend=backend, track=track))
        return s


class Metrics:
    """All gateway metrics; one instance per process."""

    def __init__(self) -> None:
        self.series = Targets()
        # (model, target, reason) -> count
        self.fallbacks: dict[tuple[str, str, str], int] = {}
        # (model, backend, track, reason) -> count. The track matters to canary analysis: a
        # canary's 5xx that a retry hid from the client still counts against the canary.
        self.attempt_failures: dict[tuple[str, str, str, str], int] = {}
        self.retries: dict[str, int] = {}
        self.budget_exhausted: dict[str, int] = {}
        self.edge_rejections: dict[str, int] = {}
        self.reloads: dict[str, int] = {"success": 0, "error": 0}
        self.generation = 0
        self.circuit_source: Callable[[], list[tuple[str, int]]] = list
        self.held_source: Callable[[], list[tuple[str, int]]] = list
        """(model, held) for every model of the table in use."""
        # (model, result) -> count; result: released, expired, full, client_closed, fallback
        self.cold_requests: dict[tuple[str, str], int] = {}
        self.hold_seconds: dict[str, Histogram] = {}

    def target(self, model: str, backend: str, track: str) -> Series:
        return self.series[(model, backend, track)]

    @staticmethod
    def inc(table: dict[K, int], key: K) -> None:
        """The one way to bump a labelled counter (`fallbacks`, `retries`, ...)."""
        table[key] = table.get(key, 0) + 1

    def render(self) -> bytes:
        out: list[str] = []
        self._render_targets(out)
        self._render_hold(out)
        self._render_counters(out)
        out.append("")
        return "\n".join(out).encode()

    def _render_targets(self, out: list[str]) -> None:
        """Everything per (model, backend, track)."""
        p = "llm_gateway_"
        out.append(
            f"# HELP {p}requests_total Requests answered, by model, backend, track, outcome."
        )
        out.append(f"# TYPE {p}requests_total counter")
        for s in self.series.values():
            for outcome, n in s.outcomes.items():
                if n:
                    out.append(f'{p}requests_total{{{s.label_str},outcome="{outcome}"}} {n}')
        out.append(f"# HELP {p}in_flight_requests Requests in flight to a backend.")
        out.append(f"# TYPE {p}in_flight_requests gauge")
        for s in self.series.values():
            out.append(f"{p}in_flight_requests{{{s.label_str}}} {s.in_flight}")
        for name, attr, help_ in (
            (
                "time_to_first_byte_seconds",
                "ttfb",
                "Time from request to the backend's response head.",
            ),
            (
                "time_to_first_token_seconds",
                "ttft",
                "2xx answers: time from request to the first SSE data event of a stream, "
                "or to the end of a non-streamed body.",
            ),
            (
                "time_per_output_token_seconds",
                "tpot",
                "2xx streams of at least 2 data events: (last event - first) / (events - 1).",
            ),
            ("request_duration_seconds", "total", "Time from request to the last byte."),
        ):
            out.append(f"# HELP {p}{name} {help_}")
            out.append(f"# TYPE {p}{name} histogram")
            for s in self.series.values():
                h: Histogram = getattr(s, attr)
                if h.count:
                    h.render(p + name, s.label_str, out)

    def _render_hold(self, out: list[str]) -> None:
        """The scale-from-zero hold queues, per model."""
        p = "llm_gateway_"
        out.append(
            f"# HELP {p}requests_held Requests waiting at the gateway: for a model with no "
            "ready backend (or answered by its fallback while it is cold), or for a free slot."
        )
        out.append(f"# TYPE {p}requests_held gauge")
        for model, n in self.held_source():
            out.append(f'{p}requests_held{{model="{_escape(model)}"}} {n}')
        out.append(
            f"# HELP {p}cold_requests_total Requests that found their model with no ready "
            "backend, by result."
        )
        out.append(f"# TYPE {p}cold_requests_total counter")
        for (model, result), n in self.cold_requests.items():
            out.append(f"{p}cold_requests_total{{{labels(model=model, result=result)}}} {n}")
        out.append(f"# HELP {p}hold_seconds Time requests spent held, by model.")
        out.append(f"# TYPE {p}hold_seconds histogram")
        for model, h in self.hold_seconds.items():
            h.render(p + "hold_seconds", labels(model=model), out)

    def _render_counters(self, out: list[str]) -> None:
        p = "llm_gateway_"
        out.append(f"# HELP {p}fallbacks_total Fallback steps taken, by target and reason.")
        out.append(f"# TYPE {p}fallbacks_total counter")
        for (model, target, reason), n in self.fallbacks.items():
            lbl = labels(model=model, target=target, reason=reason)
            out.append(f"{p}fallbacks_total{{{lbl}}} {n}")
        out.append(
            f"# HELP {p}attempt_failures_total Failed attempts, by backend, track and reason."
        )
        out.append(f"# TYPE {p}attempt_failures_total counter")
        for (model, backend, track, reason), n in self.attempt_failures.items():
            lbl = labels(model=model, backend=backend, track=track, reason=reason)
            out.append(f"{p}attempt_failures_total{{{lbl}}} {n}")
        out.append(f"# HELP {p}retries_total Retries to another backend of the same model.")
        out.append(f"# TYPE {p}retries_total counter")
        for model, n in self.retries.items():
            out.append(f'{p}retries_total{{model="{_escape(model)}"}} {n}')
        out.append(f"# HELP {p}retry_budget_exhausted_total Failovers refused by the budget.")
        out.append(f"# TYPE {p}retry_budget_exhausted_total counter")
        for model, n in self.budget_exhausted.items():
            out.append(f'{p}retry_budget_exhausted_total{{model="{_escape(model)}"}} {n}')
        out.append(f"# HELP {p}circuit_state Breaker state: 0 closed, 1 open, 2 half-open.")
        out.append(f"# TYPE {p}circuit_state gauge")
        for backend, v in self.circuit_source():
            out.append(f'{p}circuit_state{{backend="{_escape(backend)}"}} {v}')
        out.append(f"# HELP {p}edge_rejections_total Requests refused before routing.")
        out.append(f"# TYPE {p}edge_rejections_total counter")
        for reason, n in self.edge_rejections.items():
            out.append(f'{p}edge_rejections_total{{reason="{_escape(reason)}"}} {n}')
        out.append(f"# HELP {p}config_reloads_total Routing table loads, by result.")
        out.append(f"# TYPE {p}config_reloads_total counter")
        for result, n in self.reloads.items():
            out.append(f'{p}config_reloads_total{{result="{result}"}} {n}')
        out.append(f"# HELP {p}config_generation Generation of the routing table in use.")
        out.append(f"# TYPE {p}config_generation gauge")
        out.append(f"{p}config_generation {self.generation}")
