"""vLLM's Prometheus metrics, with vLLM's (v1 engine, 0.10/0.11) names, labels and buckets.

Every vLLM series carries `model_name` (the first served name) and `engine` ("0"),
as vLLM's v1 `PrometheusStatLogger` does. The HTTP counter mimics
prometheus-fastapi-instrumentator as vLLM configures it: status grouped ("2xx"), and
/metrics, /health, /ping, /load and /version left out.

Each simulator owns its own `CollectorRegistry`, so tests can run several in one
process. The three gauges are read from the scheduler at scrape time rather than
updated on every change: a scrape is rare, a change happens on every token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Buckets as in vllm/v1/metrics/loggers.py.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


def _token_buckets(max_model_len: int) -> tuple[float, ...]:
    # vLLM's build_1_2_5_buckets(max_model_len).
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return tuple(out)
            out.append(float(value))
        exponent += 1


HTTP_EXCLUDED_HANDLERS = frozenset({"/metrics", "/health", "/ping", "/load", "/version"})
FINISH_REASONS = ("stop", "length", "abort")


class SimMetrics:
    """The metric objects, pre-bound to this simulator's labels."""

    def __init__(
        self,
        model_name: str,
        max_model_len: int,
        gauges: Callable[[], tuple[int, int, float]],
    ) -> None:
        """`gauges()` returns (running, waiting, kv_cache_usage) at scrape time."""
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name", "engine"]
        values = {"model_name": model_name, "engine": "0"}
        reg = self.registry
        self.registry.register(_GaugeCollector(model_name, gauges))

        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=reg
        ).labels(**values)
        self.generation_tokens = Counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            labels,
            registry=reg,
        ).labels(**values)
        self.num_preemptions = Counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
            labels, registry=reg,
        ).labels(**values)  # fmt: skip
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=reg,
        )
        self.request_success = {
            reason: success.labels(finished_reason=reason, **values) for reason in FINISH_REASONS
        }
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=reg,
        ).labels(**values)
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            labels,
            buckets=ITL_BUCKETS,
            registry=reg,
        ).labels(**values)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=reg,
        ).labels(**values)
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            labels,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=reg,
        ).labels(**values)
        self.inference_time = Histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            labels,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=reg,
        ).labels(**values)
        self.prefill_time = Histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            labels,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=reg,
        ).labels(**values)
        self.decode_time = Histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            labels,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=reg,
        ).labels(**values)
        token_buckets = _token_buckets(max_model_len)
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            labels,
            buckets=token_buckets,
            registry=reg,
        ).labels(**values)
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            labels,
            buckets=token_buckets,
            registry=reg,
        ).labels(**values)
        self._http = Counter(
            "http_requests",
            "Total number of requests by method, status and handler.",
            ["handler", "method", "status"],
            registry=reg,
        )
        self._http_children: dict[tuple[str, str, str], Counter] = {}

    def http_request(self, handler: str, method: str, status: int) -> None:
        if handler in HTTP_EXCLUDED_HANDLERS:
            return
        key = (handler, method, f"{status // 100}xx")
        child = self._http_children.get(key)
        if child is None:
            child = self._http.labels(*key)
            self._http_children[key] = child
        child.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _GaugeCollector(Collector):
    def __init__(self, model_name: str, read: Callable[[], tuple[int, int, float]]) -> None:
        self._model_name = model_name
        self._read = read

    def collect(self) -> Iterable[Metric]:
        running, waiting, kv = self._read()
        labels = ["model_name", "engine"]
        values = [self._model_name, "0"]
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv),
        ):  # fmt: skip
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, float(value))
            yield family

    def describe(self) -> Iterable[Metric]:
        # Describing without reading keeps registration free of side effects.
        for name in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
        ):
            yield GaugeMetricFamily(name, "", labels=["model_name", "engine"])
