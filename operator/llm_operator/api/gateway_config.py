"""The gateway's routing table: the file the operator renders into a ConfigMap.

Pure (pydantic only, no I/O): the operator builds a `GatewayConfig` from its LLMDeployments
and writes `to_wire()` as YAML or JSON; the gateway reads the same file and validates it
with these models. Field names are camelCase on the wire; unknown fields are rejected so a
typo in a hand-written table fails loudly instead of being ignored.

Shape: models -> tracks (stable/canary, integer weights) -> backends (static `host:port`
addresses or the ready Kubernetes Pods a label selector picks), plus per model a
fallback chain, the triggers that take it, timeouts, a retry budget and a circuit breaker;
and edge settings (request and header size, client keys, per-key budgets).
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field

from llm_operator.api.base import ApiModel, Rule
from llm_operator.api.patterns import (
    ADDRESS_PATTERN,
    DNS_LABEL_PATTERN,
    LABEL_KEY_PATTERN,
    LABEL_PREFIX_MAX,
    LABEL_VALUE_PATTERN,
    PORT_NAME_PATTERN,
    PROCESS_ENV_NAME_PATTERN,
    SERVED_NAME_PATTERN,
    SHA256_HEX_PATTERN,
)

FallbackTrigger = Literal["connectError", "timeout", "429", "5xx", "saturated"]
ALL_TRIGGERS: tuple[FallbackTrigger, ...] = ("connectError", "timeout", "429", "5xx", "saturated")


ServedName = Annotated[str, Field(pattern=SERVED_NAME_PATTERN, min_length=1, max_length=256)]
EnvName = Annotated[str, Field(pattern=PROCESS_ENV_NAME_PATTERN, max_length=253)]
Seconds = Annotated[float, Field(gt=0, le=86400)]


def _label_key(key: str) -> str:
    prefix, _, _ = key.rpartition("/")
    if len(prefix) > LABEL_PREFIX_MAX:
        raise ValueError(f"the prefix of label key {key!r} is longer than {LABEL_PREFIX_MAX}")
    return key


def _port_name(name: str) -> str:
    # What the pattern cannot say of Kubernetes' IANA_SVC_NAME: a letter somewhere, no "--".
    # A name no container port can have would leave the track empty without a word.
    if not re.search("[a-z]", name) or "--" in name:
        raise ValueError(
            f"port name {name!r} needs a letter and no '--' (or give the port as a number)"
        )
    return name


LabelKey = Annotated[
    str,
    Field(pattern=LABEL_KEY_PATTERN, max_length=LABEL_PREFIX_MAX + 1 + 63),
    AfterValidator(_label_key),
]
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)]
PortName = Annotated[
    str, Field(pattern=PORT_NAME_PATTERN, min_length=1, max_length=15), AfterValidator(_port_name)
]


class PodSelectorRef(ApiModel):
    """The Pods of one namespace, picked by labels, whose ready pod IPs are this track's
    backends. A pod counts while it is Running and Ready, has a pod IP, and is not being
    deleted."""

    namespace: Annotated[str, Field(pattern=DNS_LABEL_PATTERN, max_length=63)]
    """Namespace of the Pods."""
    match_labels: Annotated[dict[LabelKey, LabelValue], Field(min_length=1, max_length=32)]
    """Labels a pod must carry, every one with this value (a Kubernetes equality selector).
    At least one: an empty selector would pick every pod of the namespace."""
    port: Annotated[int, Field(ge=1, le=65535)] | PortName
    """Port number on the pod IP, or the name of a TCP container port (for example http),
    looked up in each pod's spec.containers[].ports[]; a pod without that port is skipped."""

    def label_selector(self) -> str:
        """The selector as the API server's labelSelector parameter takes it (keys sorted,
        so equal selectors give equal strings)."""
        return ",".join(f"{key}={value}" for key, value in sorted(self.match_labels.items()))


class Track(ApiModel):
    """One rollout track of a model (stable or canary) and the backends that serve it."""

    name: Literal["stable", "canary"]
    """Track name; used as the `track` label on metrics."""
    weight: Annotated[int, Field(ge=0, le=1_000_000)]
    """Share of the model's requests, relative to the other tracks' weights (10 and 90 make a
    10% canary). The split is exact over every sum-of-weights consecutive requests."""
    addresses: Annotated[
        list[Annotated[str, Field(pattern=ADDRESS_PATTERN)]], Field(max_length=1024)
    ] = []
    """Static backends as host:port (vLLM's OpenAI server, plain HTTP)."""
    pods: PodSelectorRef | None = None
    """Pods whose ready IPs are added to the addresses (the gateway lists and watches them
    when it runs in a cluster)."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="size(self.addresses) > 0 || has(self.pods)",
            message="a track needs addresses or pods",
            holds=lambda t: bool(t.addresses) or t.pods is not None,
        ),
    )


class Fallback(ApiModel):
    """One step of a fallback chain: another model of this gateway, or an external endpoint."""

    model: ServedName | None = None
    """Another model in this table, tried with its own backends (and without its own chain)."""
    url: Annotated[str, Field(max_length=2048, pattern=r"^https?://[^\s/]+(/\S*)?$")] | None = None
    """Base URL of an external OpenAI-compatible API, for example https://api.example.com/v1;
    the request path after /v1 is appended to it."""
    target_model: ServedName | None = None
    """Model name written into the request body for this step. Required for url; defaults to
    `model` for a model step."""
    api_key_env: EnvName | None = None
    """Environment variable holding the API key sent as `Authorization: Bearer` to url."""
    api_key_file: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    """File holding that API key (a mounted Secret); read at load and on every table reload.
    The key is never logged."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.model) != has(self.url)",
            message="each fallback needs exactly one of model or url",
            holds=lambda f: (f.model is None) != (f.url is None),
        ),
        Rule(
            cel="!has(self.url) || has(self.targetModel)",
            message="a url fallback needs targetModel (the name that endpoint serves)",
            holds=lambda f: f.url is None or f.target_model is not None,
        ),
        Rule(
            cel="!(has(self.apiKeyEnv) && has(self.apiKeyFile))",
            message="set at most one of apiKeyEnv and apiKeyFile",
            holds=lambda f: f.api_key_env is None or f.api_key_file is None,
        ),
        Rule(
            cel="has(self.url) || (!has(self.apiKeyEnv) && !has(self.apiKeyFile))",
            message="an API key applies only to a url fallback",
            holds=lambda f: f.url is not None or (f.api_key_env is None and f.api_key_file is None),
        ),
    )


class Timeouts(ApiModel):
    """How long each phase of one attempt may take, in seconds."""

    connect: Seconds = 2.0
    """Opening a TCP connection to a backend; past it the attempt fails with connectError."""
    first_byte: Seconds = 30.0
    """From sending the request to the backend's response headers; past it: timeout."""
    total: Seconds = 600.0
    """Whole request, including streaming; past it the response is cut off."""


class RetryBudget(ApiModel):
    """Bounds extra attempts (retries and fallback steps) so a failing model cannot multiply
    the load on the rest: at most `ratio` extra attempts per request over time, plus a floor."""

    ratio: Annotated[float, Field(ge=0, le=10)] = 0.2
    """Extra attempts allowed per request received (0.2: one retry per five requests)."""
    min_per_second: Annotated[float, Field(ge=0, le=100000)] = 10.0
    """Extra attempts always allowed per second, so a quiet model can still retry."""


class CircuitBreaker(ApiModel):
    """Per-backend breaker: stop sending to a backend that keeps failing, probe it later."""

    consecutive_failures: Annotated[int, Field(ge=1, le=1000)] = 3
    """Consecutive failures (connect error, timeout, 5xx) that open the circuit."""
    cooldown: Seconds = 5.0
    """Seconds the circuit stays open before one half-open probe request is let through."""


class ClientLimits(ApiModel):
    """Budgets of one client key (or, on a model, of each key on that model). Unset fields
    are unlimited. Over a budget the gateway answers 429 in OpenAI's error shape with
    Retry-After."""

    requests_per_second: Annotated[float, Field(gt=0, le=1_000_000)] | None = None
    """Sustained requests per second (a token bucket)."""
    burst: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """Requests allowed at once above the rate; defaults to max(1, requestsPerSecond)."""
    tokens_per_minute: Annotated[int, Field(ge=1, le=1_000_000_000)] | None = None
    """Prompt plus completion tokens per minute, counted from the `usage` the answers
    report. A request is admitted while the key's budget is not used up; its tokens are
    charged when it ends, so one request may take the budget below zero (then the key waits
    until the minute's refill has paid it back)."""
    max_concurrent_requests: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """Requests of the key in flight at once."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.burst) || has(self.requestsPerSecond)",
            message="burst needs requestsPerSecond (it is the request rate's burst)",
            holds=lambda c: c.burst is None or c.requests_per_second is not None,
            field_path=".burst",
        ),
    )

    def is_limited(self) -> bool:
        budgets = (self.requests_per_second, self.tokens_per_minute, self.max_concurrent_requests)
        return any(v is not None for v in budgets)


class Hold(ApiModel):
    """Scale from zero: a request for a model with no ready backend (its Deployment at 0
    replicas, or every pod still starting) waits at the gateway, in a per-model FIFO queue,
    until a backend turns ready; then the held requests go out in arrival order."""

    max_queue: Annotated[int, Field(ge=0, le=100_000)] = 100
    """Requests held at most for this model; one more is answered at once like an expired
    wait (503 with Retry-After, or the fallback chain). 0 holds nothing."""
    timeout: Seconds = 600.0
    """Longest wait for a ready backend (the cold start), in seconds; then 503 with
    Retry-After, or the fallback chain. `timeouts.total` counts from the end of the wait."""
    fallback_while_cold: bool = False
    """With `fallbacks`: while the model has no ready backend, send requests down the fallback
    chain at once instead of holding them (they still count in the held-requests gauge, so
    the autoscaler wakes the model). Without fallbacks it has no effect."""


class ModelRoute(ApiModel):
    """Routing for one served model name."""

    name: ServedName
    """The `model` clients send."""
    tracks: Annotated[list[Track], Field(min_length=1, max_length=2)]
    """Stable and optionally canary track, split by weight."""
    fallbacks: Annotated[list[Fallback], Field(max_length=10)] = []
    """Ordered fallback chain, tried when this model cannot answer before the first byte."""
    fallback_on: Annotated[list[FallbackTrigger], Field(max_length=5)] = list(ALL_TRIGGERS)
    """Failures that make the gateway retry elsewhere or fall back; any other failure is
    passed to the client as the backend sent it."""
    timeouts: Timeouts = Timeouts()
    """Per-attempt timeouts."""
    max_concurrency: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """Outstanding requests per backend at most (typically vLLM's --max-num-seqs); unset: no
    limit. A backend at its limit is skipped."""
    saturation_queue_depth: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    """Requests per backend that may wait at the gateway for a free backend slot when every
    backend is at maxConcurrency (the queue holds this times the model's backends, those of
    tracks with a weight above 0); one more counts as `saturated`."""
    retry_after: Annotated[int, Field(ge=1, le=3600)] = 1
    """Retry-After seconds sent with a 503 when nothing can answer; also the default time a
    backend that answered 429 without Retry-After is avoided."""
    retry_budget: RetryBudget = RetryBudget()
    """Bound on extra attempts."""
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    """Per-backend breaker settings."""
    hold: Hold = Hold()
    """Holding requests while the model has no ready backend (scale from zero)."""
    client_limits: ClientLimits | None = None
    """Budgets of each client key on this model, on top of the key's own (without client
    keys: of all this model's traffic together)."""
    resume_streams: bool = False
    """A streamed chat or text completion whose backend fails after the first byte goes on
    from the next route (another backend, then the fallback chain): the request is sent
    again with the text streamed so far as an assistant prefix (vLLM's
    `continue_final_message`; for completions the prompt plus that text) and `max_tokens`
    reduced by the tokens already sent. The client sees one stream. Off: the stream ends with
    an error event."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.tracks.all(t, self.tracks.filter(u, u.name == t.name).size() == 1)",
            message="a model lists the same track twice",
            holds=lambda m: len({t.name for t in m.tracks}) == len(m.tracks),
        ),
        Rule(
            cel="self.tracks.exists(t, t.weight > 0)",
            message="at least one track needs a weight above 0",
            holds=lambda m: any(t.weight > 0 for t in m.tracks),
        ),
        Rule(
            cel="self.fallbackOn.all(t, self.fallbackOn.filter(u, u == t).size() == 1)",
            message="fallbackOn lists a trigger twice",
            holds=lambda m: len(set(m.fallback_on)) == len(m.fallback_on),
        ),
        Rule(
            cel="!self.fallbacks.exists(f, has(f.model) && f.model == self.name)",
            message="a model cannot fall back to itself",
            holds=lambda m: all(f.model != m.name for f in m.fallbacks),
        ),
    )


class ClientKey(ApiModel):
    """One client API key, stored only as its SHA-256 hash."""

    name: Annotated[str, Field(min_length=1, max_length=253)]
    """Who holds the key; appears in access logs and metrics instead of the key."""
    sha256: Annotated[str, Field(pattern=SHA256_HEX_PATTERN)]
    """Lower-case hex SHA-256 of the key a client sends as `Authorization: Bearer KEY`."""
    limits: ClientLimits | None = None
    """This key's budgets; unset: `edge.defaultLimits`."""


class Edge(ApiModel):
    """What the gateway checks before routing."""

    max_request_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 8 * 1024 * 1024
    """Largest request body accepted; larger ones get 413."""
    max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 64 * 1024
    """Largest request line plus headers; more gets 431 and the connection closed."""
    api_keys: Annotated[list[ClientKey], Field(max_length=100_000)] = []
    """Client keys by hash; when the gateway has any key (here or in `keysDir`) every /v1
    request needs one of them (else 401)."""
    keys_dir: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    """A directory of client keys, typically a mounted Secret: each file is one key, its
    name the key's name. Read and hashed by the gateway; a changed file (a rotated Secret)
    takes effect without a restart. Set, keys are required even while it holds none (every
    /v1 request then gets 401: a missing Secret never opens the gateway)."""
    default_limits: ClientLimits | None = None
    """Budgets of every key that has none of its own."""
    key_limits: Annotated[dict[str, ClientLimits], Field(max_length=100_000)] = {}
    """Budgets by key name, for keys from `keysDir` (a key in `apiKeys` may carry its own)."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.apiKeys.all(k, self.apiKeys.filter(j, j.sha256 == k.sha256).size() == 1)",
            message="edge.apiKeys lists the same key hash twice",
            holds=lambda e: len({k.sha256 for k in e.api_keys}) == len(e.api_keys),
        ),
        Rule(
            cel="self.apiKeys.all(k, self.apiKeys.filter(j, j.name == k.name).size() == 1)",
            message="edge.apiKeys lists the same key name twice",
            holds=lambda e: len({k.name for k in e.api_keys}) == len(e.api_keys),
        ),
    )


class GatewayConfig(ApiModel):
    """The whole routing table."""

    models: Annotated[list[ModelRoute], Field(max_length=10_000)] = []
    """Every model the gateway serves."""
    edge: Edge = Edge()
    """Request limits and client keys."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.models.all(m, self.models.filter(n, n.name == m.name).size() == 1)",
            message="models lists the same name twice",
            holds=lambda c: len({m.name for m in c.models}) == len(c.models),
        ),
        Rule(
            cel="self.models.all(m, m.fallbacks.all(f, !has(f.model) || "
            "self.models.exists(n, n.name == f.model)))",
            message="a fallback names a model that is not in this table",
            holds=lambda c: all(
                f.model is None or f.model in {m.name for m in c.models}
                for m in c.models
                for f in m.fallbacks
            ),
        ),
    )

    def model(self, name: str) -> ModelRoute | None:
        """The route for a served name, or None."""
        return next((m for m in self.models if m.name == name), None)


def split_address(address: str) -> tuple[str, int]:
    """`host:port` -> (host, port); brackets around an IPv6 host are removed."""
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_valid_address(address: str) -> bool:
    """Whether a string is a host:port this table accepts."""
    return re.match(ADDRESS_PATTERN, address) is not None
