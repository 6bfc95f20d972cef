"""Routing state, precomputed at table load: which backend answers the next request.

No I/O here: the proxy asks `ModelState.pick()` for a backend and reports each attempt's
outcome back (`Backend.on_success`, `on_failure`, `on_busy`), so every decision — the exact
canary split, least-outstanding choice, breakers, 429 steering, the retry budget — can be
unit-tested with a fake clock.

Backends are shared by address across models and across table reloads (`BackendRegistry`),
so a reload keeps breaker state, outstanding counts and pooled connections.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from llm_operator.api.gateway_config import (
    ClientKey,
    Edge,
    Fallback,
    FallbackTrigger,
    GatewayConfig,
    ModelRoute,
    Track,
)
from llm_operator.gateway.limits import Budget

CircuitState = Literal["closed", "open", "half_open"]
CIRCUIT_STATE_VALUE: dict[CircuitState, int] = {"closed": 0, "open": 1, "half_open": 2}

Clock = Callable[[], float]


class Backend:
    """One upstream endpoint (host:port, or an external base URL) and its live state."""

    __slots__ = (
        "busy_until",
        "circuit",
        "consecutive_failures",
        "cooldown",
        "failure_threshold",
        "host",
        "key",
        "opened_at",
        "outstanding",
        "port",
        "probe_in_flight",
        "tls",
    )

    def __init__(self, key: str, host: str, port: int, tls: bool = False) -> None:
        self.key = key
        """host:port (or scheme://host:port for external endpoints); the `backend` label."""
        self.host = host
        self.port = port
        self.tls = tls
        self.outstanding = 0
        self.consecutive_failures = 0
        self.circuit: CircuitState = "closed"
        self.opened_at = 0.0
        self.probe_in_flight = False
        # 429 means "busy now": skip this backend until then, without touching the breaker.
        self.busy_until = 0.0
        # Breaker settings come from the model that routes here; a shared backend takes the
        # settings of the last model loaded, which the operator keeps equal anyway.
        self.failure_threshold = 3
        self.cooldown = 5.0

    def available(self, now: float) -> bool:
        """Whether a new request may go here now (breaker and 429 steering; not the limit)."""
        if self.busy_until > now:
            return False
        if self.circuit == "closed":
            return True
        if self.circuit == "open":
            if now - self.opened_at < self.cooldown:
                return False
            self.circuit = "half_open"
        # half-open: exactly one probe at a time.
        return not self.probe_in_flight

    def begin(self) -> bool:
        """Count an attempt as started; returns whether it is the half-open probe."""
        self.outstanding += 1
        if self.circuit == "half_open" and not self.probe_in_flight:
            self.probe_in_flight = True
            return True
        return False

    def end(self, probe: bool) -> None:
        self.outstanding -= 1
        if probe:
            self.probe_in_flight = False

    def on_success(self) -> None:
        self.consecutive_failures = 0
        if self.circuit != "closed":
            self.circuit = "closed"

    def on_failure(self, now: float) -> None:
        """A connect error, timeout or 5xx: count toward opening the breaker."""
        self.consecutive_failures += 1
        if self.circuit == "half_open" or (
            self.circuit == "closed" and self.consecutive_failures >= self.failure_threshold
        ):
            self.circuit = "open"
            self.opened_at = now

    def on_busy(self, now: float, retry_after: float) -> None:
        """A 429: steer away at once for Retry-After seconds; the backend is not broken."""
        self.busy_until = now + retry_after

    def state(self, now: float) -> CircuitState:
        if self.circuit == "open" and now - self.opened_at >= self.cooldown:
            return "half_open"
        return self.circuit


class BackendRegistry:
    """Backends by key, kept across reloads so their state survives a table change."""

    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}

    def prune(self, keep: set[str]) -> None:
        """Forget idle backends no table refers to (pod IPs churn; state must not pile up)."""
        for key in [k for k, b in self.backends.items() if k not in keep and b.outstanding == 0]:
            del self.backends[key]

    def get(self, key: str, host: str, port: int, tls: bool = False) -> Backend:
        backend = self.backends.get(key)
        if backend is None:
            backend = self.backends[key] = Backend(key, host, port, tls)
        return backend


@dataclass
class TrackState:
    """One track (stable/canary) of a model with its current backends."""

    name: str
    weight: int
    backends: list[Backend]
    current: int = 0
    """Smooth weighted round robin's running score."""
    rotate: int = 0
    """Start offset for least-outstanding ties, so idle backends share the load."""

    def least_outstanding(
        self, now: float, limit: int | None, exclude: Sequence[Backend]
    ) -> tuple[Backend | None, bool]:
        """The available backend with the fewest outstanding requests below `limit`.

        Returns (backend, saturated): saturated is True when some backend was available
        but every available one was at its limit.
        """
        backends = self.backends
        n = len(backends)
        if n == 0:
            return None, False
        self.rotate = start = (self.rotate + 1) % n
        best: Backend | None = None
        best_load = 1 << 62
        at_limit = False
        for i in range(n):
            b = backends[(start + i) % n]
            if b.outstanding >= best_load or (exclude and b in exclude):
                continue
            if not b.available(now):
                continue
            if limit is not None and b.outstanding >= limit:
                at_limit = True
                continue
            best, best_load = b, b.outstanding
        return best, (best is None and at_limit)


class RetryBudgetState:
    """Token bucket of extra attempts: `ratio` tokens per request, `min_per_second` per second."""

    __slots__ = ("cap", "last", "min_per_second", "ratio", "tokens")

    def __init__(self, ratio: float, min_per_second: float, now: float) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        # A burst allowance of ten seconds' worth of the floor (at least 10), so a short
        # failure burst can still fail over while a long outage is bounded by the ratio.
        self.cap = max(10.0, 10.0 * min_per_second)
        self.tokens = self.cap
        self.last = now

    def on_request(self) -> None:
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.cap else self.cap

    def try_spend(self, now: float) -> bool:
        elapsed = now - self.last
        self.last = now
        tokens = self.tokens + elapsed * self.min_per_second
        if tokens > self.cap:
            tokens = self.cap
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


@dataclass
class ExternalTarget:
    """A fallback to an external OpenAI-compatible endpoint."""

    backend: Backend
    base_path: str
    """Path of the base URL without a trailing slash, for example /v1."""
    host_header: str
    target_model: str
    api_key: str | None = field(repr=False)
    """Bearer token sent upstream; never logged (repr=False keeps it out of reprs too)."""


@dataclass
class FallbackStep:
    """A resolved fallback: another model of this table, or an external target."""

    label: str
    """`model:NAME` or the external URL: the `target` label on metrics."""
    model: ModelState | None = None
    external: ExternalTarget | None = None
    target_model: str = ""


@dataclass
class ModelState:
    """Everything the hot path needs for one served model, built once per table load."""

    route: ModelRoute
    name: str
    tracks: list[TrackState]
    total_weight: int
    triggers: frozenset[FallbackTrigger]
    budget: RetryBudgetState
    fallbacks: list[FallbackStep] = field(default_factory=list)
    limit: int | None = None
    queue_depth: int = 0
    """Requests that may wait for a slot: `saturationQueueDepth` x the backends."""
    waiting: int = 0
    """Requests waiting at the gateway for a free backend slot (saturation queue)."""
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    connect_timeout: float = 2.0
    first_byte_timeout: float = 30.0
    total_timeout: float = 600.0
    retry_after: int = 1
    track_of: dict[str, str] = field(default_factory=dict)
    """Backend key -> track name, for labels."""
    cold: bool = False
    """No track with a weight above 0 has a backend (scaled to zero, or every pod still
    starting): requests are held (`hold.py`)."""
    clients: dict[str, Budget] = field(default_factory=dict)
    """Key name -> its budgets on this model (`clientLimits`), made on first use."""

    def client_budget(self, key_name: str, now: float) -> Budget:
        budget = self.clients.get(key_name)
        if budget is None:
            budget = self.clients[key_name] = Budget(key_name, self.route.client_limits, now)
        return budget

    def choose_track(self) -> TrackState:
        """Smooth weighted round robin (nginx's): exact split over every total_weight picks,
        and the minority track's picks are spread out instead of bunched."""
        tracks = self.tracks
        if len(tracks) == 1:
            return tracks[0]
        best = tracks[0]
        for t in tracks:
            t.current += t.weight
            if t.current > best.current:
                best = t
        best.current -= self.total_weight
        return best

    def pick(self, now: float, exclude: Sequence[Backend] = ()) -> tuple[Backend | None, str, bool]:
        """A backend for the next attempt: (backend, track name, saturated).

        The first attempt follows the weighted track choice; when that track has nothing
        available (or on a retry, with `exclude` set) the other tracks with weight > 0 are
        tried, since answering beats keeping the split exact.
        """
        first = self.choose_track() if not exclude else None
        saturated = False
        if first is not None:
            b, sat = first.least_outstanding(now, self.limit, exclude)
            if b is not None:
                return b, first.name, False
            saturated = sat
        for t in self.tracks:
            if t is first or t.weight <= 0:
                continue
            b, sat = t.least_outstanding(now, self.limit, exclude)
            if b is not None:
                return b, t.name, False
            saturated = saturated or sat
        return None, "", saturated

    def release_slot(self) -> None:
        """A backend slot was freed: wake one request waiting in the saturation queue."""
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return


@dataclass
class RoutingTable:
    """One loaded generation of the table; swapped atomically on reload."""

    config: GatewayConfig
    models: dict[str, ModelState]
    keys: dict[str, Budget]
    """sha256 hex -> the key's budgets."""
    keys_required: bool
    """Every /v1 request needs a key: there are keys, or a keys directory (which, empty or
    missing, lets nobody in rather than everybody)."""
    max_request_bytes: int
    max_header_bytes: int
    models_body: bytes
    """The /v1/models answer, rendered once."""
    generation: int = 0

    def backend_keys(self) -> set[str]:
        """Every backend this table can send to, fallbacks included."""
        keys = {b.key for m in self.models.values() for t in m.tracks for b in t.backends}
        for m in self.models.values():
            keys.update(s.external.backend.key for s in m.fallbacks if s.external is not None)
        return keys


KeyReader = Callable[[Fallback], str | None]


def hash_key(key: str) -> str:
    """The table's form of a client key: lower-case hex SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()


def _external_target(registry: BackendRegistry, f: Fallback, api_key: str | None) -> ExternalTarget:
    from urllib.parse import urlsplit

    assert f.url is not None and f.target_model is not None
    parts = urlsplit(f.url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    default_port = (tls and port == 443) or (not tls and port == 80)
    host_header = host if default_port else f"{host}:{port}"
    key = f"{parts.scheme}://{host}:{port}"
    return ExternalTarget(
        backend=registry.get(key, host, port, tls),
        base_path=parts.path.rstrip("/"),
        host_header=host_header,
        target_model=f.target_model,
        api_key=api_key,
    )


def build_table(
    config: GatewayConfig,
    registry: BackendRegistry,
    read_key: KeyReader,
    resolve: Callable[[str, str, int | str], list[tuple[str, int]]] | None = None,
    previous: RoutingTable | None = None,
    clock: Clock = time.monotonic,
) -> RoutingTable:
    """Precompute the routing state for a table.

    `resolve(namespace, label_selector, port)` returns the current (pod IP, port) of the
    ready pods a selector picks (pod discovery); without it, tracks with `pods` have only
    their addresses.
    `previous` carries over weighted-round-robin scores and retry budgets of unchanged models,
    so a reload does not reset the canary split's phase.
    """
    import json

    now = clock()
    models: dict[str, ModelState] = {}
    for route in config.models:
        old = previous.models.get(route.name) if previous else None
        models[route.name] = _model_state(route, registry, resolve, old, now)
    # Fallback steps point at the new generation's model states.
    for route in config.models:
        state = models[route.name]
        for f in route.fallbacks:
            state.fallbacks.append(_fallback_step(f, models, registry, read_key))
    edge = config.edge
    keys = {k.sha256: _key_budget(k, edge, now, previous) for k in edge.api_keys}
    models_body = json.dumps(
        {
            "object": "list",
            "data": [
                {"id": m.name, "object": "model", "created": 0, "owned_by": "llm-operator"}
                for m in config.models
            ],
        },
        separators=(",", ":"),
    ).encode()
    return RoutingTable(
        config=config,
        models=models,
        keys=keys,
        keys_required=bool(keys) or edge.keys_dir is not None,
        max_request_bytes=edge.max_request_bytes,
        max_header_bytes=edge.max_header_bytes,
        models_body=models_body,
        generation=(previous.generation + 1) if previous else 1,
    )


def _track_backends(
    route: ModelRoute,
    addrs: list[tuple[str, int]],
    registry: BackendRegistry,
) -> list[Backend]:
    """The backends of one track's addresses, once each, with the route's breaker."""
    backends: list[Backend] = []
    seen: set[str] = set()
    for host, port in addrs:
        key = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if key in seen:
            continue
        seen.add(key)
        b = registry.get(key, host, port)
        b.failure_threshold = route.circuit_breaker.consecutive_failures
        b.cooldown = route.circuit_breaker.cooldown
        backends.append(b)
    return backends


def _model_state(
    route: ModelRoute,
    registry: BackendRegistry,
    resolve: Callable[[str, str, int | str], list[tuple[str, int]]] | None,
    old: ModelState | None,
    now: float,
) -> ModelState:
    tracks: list[TrackState] = []
    track_of: dict[str, str] = {}
    for t in route.tracks:
        backends = _track_backends(route, _track_addresses(t, resolve), registry)
        track_of.update((b.key, t.name) for b in backends)
        tracks.append(TrackState(name=t.name, weight=t.weight, backends=backends))
    if old is not None:
        _keep_positions(tracks, old)
    return ModelState(
        route=route,
        name=route.name,
        tracks=tracks,
        total_weight=sum(t.weight for t in tracks),
        triggers=frozenset(route.fallback_on),
        budget=_retry_budget(route, old, now),
        limit=route.max_concurrency,
        queue_depth=_queue_bound(route, tracks),
        connect_timeout=route.timeouts.connect,
        first_byte_timeout=route.timeouts.first_byte,
        total_timeout=route.timeouts.total,
        retry_after=route.retry_after,
        track_of=track_of,
        cold=not any(t.backends for t in tracks if t.weight > 0),
        # A reload keeps what each key has used on the model while its limits stay.
        clients=old.clients
        if old is not None and old.route.client_limits == route.client_limits
        else {},
    )


def _track_addresses(
    t: Track, resolve: Callable[[str, str, int | str], list[tuple[str, int]]] | None
) -> list[tuple[str, int]]:
    """A track's static addresses, then its pods' (when a resolver watches pods)."""
    from llm_operator.api.gateway_config import split_address

    addrs: list[tuple[str, int]] = [split_address(a) for a in t.addresses]
    if t.pods is not None and resolve is not None:
        addrs += resolve(t.pods.namespace, t.pods.label_selector(), t.pods.port)
    return addrs


def _keep_positions(tracks: list[TrackState], old: ModelState) -> None:
    """A reload keeps each track's place in the weighted rotation (by track name)."""
    for t_new in tracks:
        for t_old in old.tracks:
            if t_old.name == t_new.name:
                t_new.current = t_old.current


def _retry_budget(route: ModelRoute, old: ModelState | None, now: float) -> RetryBudgetState:
    """The old budget while its settings stay (a reload must not refill it), else a new one."""
    if old is not None and old.route.retry_budget == route.retry_budget:
        return old.budget
    return RetryBudgetState(route.retry_budget.ratio, route.retry_budget.min_per_second, now)


def _queue_bound(route: ModelRoute, tracks: list[TrackState]) -> int:
    """The saturation queue's size: `saturationQueueDepth` per backend that takes traffic."""
    backends = sum(len(t.backends) for t in tracks if t.weight > 0)
    return route.saturation_queue_depth * backends


def _fallback_step(
    f: Fallback,
    models: dict[str, ModelState],
    registry: BackendRegistry,
    read_key: KeyReader,
) -> FallbackStep:
    if f.model is not None:
        return FallbackStep(
            label=f"model:{f.model}", model=models[f.model], target_model=f.target_model or f.model
        )
    ext = _external_target(registry, f, read_key(f))
    return FallbackStep(label=f.url or "", external=ext, target_model=ext.target_model)


def _key_budget(k: ClientKey, edge: Edge, now: float, previous: RoutingTable | None) -> Budget:
    limits = k.limits or edge.key_limits.get(k.name) or edge.default_limits
    old = previous.keys.get(k.sha256) if previous else None
    if old is not None and old.name == k.name and old.same_limits(limits):
        return old  # a reload keeps what the key has used
    return Budget(k.name, limits, now)


def pod_selectors_in(config: GatewayConfig) -> Iterable[tuple[str, str]]:
    """(namespace, label selector) of every set of pods the table routes to."""
    for m in config.models:
        for t in m.tracks:
            if t.pods is not None:
                yield t.pods.namespace, t.pods.label_selector()
