"""The simulator's HTTP routes: vLLM's OpenAI API, health, metrics and the admin endpoint.

Order of checks for a generation request, as in vLLM: API key, then loading (503),
then the body (400), the model (404) and the context length (400). Injected failures
come after validation, so an invalid request is still refused the way vLLM refuses
it, and a forced failure only ever hits a request that would otherwise have run.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from llm_operator import __version__
from llm_operator.sim import protocol
from llm_operator.sim.config import SIM_FLAGS, ConfigError, SimConfig
from llm_operator.sim.engine import Engine, Sequence
from llm_operator.sim.http import Exchange
from llm_operator.sim.latency import LatencyModel
from llm_operator.sim.metrics import SimMetrics
from llm_operator.sim.protocol import RequestError, dumps, error_body

log = logging.getLogger("llm_operator.sim")

FAIL_HEADER = "x-sim-fail"

# Settings POST /sim/admin may change, mapped to the flag that validates them.
ADMIN_FIELDS = {
    "error_rate_500": "--sim-error-rate-500",
    "error_rate_429": "--sim-error-rate-429",
    "retry_after": "--sim-retry-after",
    "hang": "--sim-hang",
    "ttft_base": "--sim-ttft-base",
    "prefill_per_token": "--sim-prefill-per-token",
    "itl": "--sim-itl",
    "jitter": "--sim-jitter",
    "load_slowdown": "--sim-load-slowdown",
    "output_tokens": "--sim-output-tokens",
    "disconnect_after": "--sim-disconnect-after",
}
_LATENCY_FIELDS = {"ttft_base", "prefill_per_token", "itl", "jitter", "load_slowdown"}


class SimApp:
    """State and request handling of one simulator (one "vLLM pod")."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.served = cfg.served_names
        self.model_name = self.served[0]
        self.model_json = dumps(self.model_name)
        self.rng = random.Random(cfg.seed)
        self.latency = LatencyModel(
            ttft_base=cfg.ttft_base,
            prefill_per_token=cfg.prefill_per_token,
            itl=cfg.itl,
            jitter=cfg.jitter,
            load_slowdown=cfg.load_slowdown,
            max_num_seqs=cfg.max_num_seqs,
        )
        self.metrics = SimMetrics(self.model_name, cfg.max_model_len, self._gauges)
        self.engine = Engine(
            self.latency, cfg.max_num_seqs, cfg.kv_capacity, self.metrics, self.rng
        )
        self.ready = cfg.startup_delay <= 0
        self.health_status: int | None = None  # admin override of /health
        self.draining = False  # SIGTERM received: finish what runs, take nothing new
        self.started_at = time.monotonic()
        self._bearer = {f"Bearer {key}" for key in cfg.api_keys}
        get, post = "GET", "POST"
        self.routes: dict[str, dict[str, Callable[[Exchange], None]]] = {
            "/health": {get: self.health},
            "/ping": {get: self.health, post: self.health},
            "/version": {get: self.version},
            "/metrics": {get: self.prometheus},
            "/v1/models": {get: self.models},
            "/v1/chat/completions": {post: self.chat},
            "/v1/completions": {post: self.completions},
            "/sim/admin": {get: self.admin, post: self.admin},
        }
        if cfg.hang:
            self.engine.pause()

    def _gauges(self) -> tuple[int, int, float]:
        return self.engine.gauges()

    def start_loading(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin the start-up delay: /health answers 503 until it ends."""
        if not self.ready:
            loop.call_later(self.cfg.startup_delay, self._loaded)

    def _loaded(self) -> None:
        self.ready = True
        log.info("model %s loaded (simulated start-up delay over)", self.cfg.model)

    # -- dispatch ------------------------------------------------------------------

    def handle(self, ex: Exchange) -> None:
        methods = self.routes.get(ex.path)
        if methods is None:
            ex.on_done = self._counter("none")
            ex.respond(404, b'{"detail":"Not Found"}')
            return
        ex.on_done = self._counter(ex.path)
        handler = methods.get(ex.method)
        if handler is None:
            ex.respond(
                405, b'{"detail":"Method Not Allowed"}', headers=[("allow", ", ".join(methods))]
            )
            return
        handler(ex)

    def _counter(self, handler: str) -> Callable[[Exchange], None]:
        metrics = self.metrics

        def done(ex: Exchange) -> None:
            if ex.status:
                metrics.http_request(handler, ex.method, ex.status)

        return done

    # -- simple routes -------------------------------------------------------------

    def health(self, ex: Exchange) -> None:
        if self.health_status is not None:
            status = self.health_status
        else:
            status = 200 if self.ready and not self.draining else 503
        ex.respond(status, b"", content_type="application/json")

    def version(self, ex: Exchange) -> None:
        ex.respond(
            200,
            dumps(
                {"version": self.cfg.vllm_version, "simulator": f"llm-operator {__version__}"}
            ).encode(),
        )

    def prometheus(self, ex: Exchange) -> None:
        ex.respond(200, self.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")

    def models(self, ex: Exchange) -> None:
        if not self._authorized(ex):
            return
        ex.respond(
            200, protocol.models_response(self.served, self.cfg.model, self.cfg.max_model_len)
        )

    def admin(self, ex: Exchange) -> None:
        if ex.method == "POST" and ex.body.strip():
            try:
                changes = protocol.parse_body(ex.body)
                self._apply_admin(changes)
            except RequestError as err:
                ex.respond(err.status, error_body(err.status, err.message, err.err_type))
                return
        ex.respond(200, dumps(self.admin_state()).encode())

    def admin_state(self) -> dict[str, Any]:
        running, waiting, kv = self.engine.gauges()
        return {
            "error_rate_500": self.cfg.error_rate_500,
            "error_rate_429": self.cfg.error_rate_429,
            "retry_after": self.cfg.retry_after,
            "hang": self.engine.paused,
            "health_status": self.health_status,
            "ready": self.ready,
            "ttft_base": self.latency.ttft_base,
            "prefill_per_token": self.latency.prefill_per_token,
            "itl": self.latency.itl,
            "jitter": self.latency.jitter,
            "load_slowdown": self.latency.load_slowdown,
            "output_tokens": self.cfg.output_tokens,
            "disconnect_after": self.cfg.disconnect_after,
            "running": running,
            "waiting": waiting,
            "kv_cache_usage": kv,
        }

    def _apply_admin(self, changes: dict[str, Any]) -> None:
        # Validate everything first so a bad field changes nothing.
        parsed: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "health_status":
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599
                ):
                    raise RequestError(
                        400, "health_status must be an HTTP status or null", "Bad Request", key
                    )
                parsed[key] = value
                continue
            if key == "disconnect_after" and value is None:
                parsed[key] = None
                continue
            if key == "ready":
                if not isinstance(value, bool):
                    raise RequestError(400, "ready must be a boolean", "Bad Request", key)
                parsed[key] = value
                continue
            flag = ADMIN_FIELDS.get(key)
            if flag is None:
                known = sorted([*ADMIN_FIELDS, "health_status", "ready"])
                raise RequestError(
                    400, f"unknown admin field {key!r}; known: {known}", "Bad Request", key
                )
            convert = SIM_FLAGS[flag].convert
            assert convert is not None
            try:
                parsed[key] = convert(str(value))
            except (ConfigError, ValueError) as err:
                raise RequestError(400, f"{key}: {err}", "Bad Request", key) from None
        for key, value in parsed.items():
            if key == "health_status":
                self.health_status = value
            elif key == "ready":
                self.ready = value
            elif key == "hang":
                if value:
                    self.engine.pause()
                else:
                    self.engine.resume()
            elif key in _LATENCY_FIELDS:
                setattr(self.latency, key, value)
            else:
                setattr(self.cfg, key, value)
        log.info("admin: %s", parsed)

    # -- generation ----------------------------------------------------------------

    def chat(self, ex: Exchange) -> None:
        self._generate(ex, chat=True)

    def completions(self, ex: Exchange) -> None:
        self._generate(ex, chat=False)

    def _authorized(self, ex: Exchange) -> bool:
        if not self._bearer or ex.headers.get("authorization") in self._bearer:
            return True
        # vLLM's AuthenticationMiddleware answers exactly this.
        ex.respond(401, b'{"error":"Unauthorized"}')
        return False

    def _fail(
        self, ex: Exchange, err: RequestError, headers: list[tuple[str, str]] | None = None
    ) -> None:
        ex.respond(
            err.status,
            error_body(err.status, err.message, err.err_type, err.param),
            headers=headers,
        )

    def _generate(self, ex: Exchange, chat: bool) -> None:
        if not self._authorized(ex):
            return
        if not self.ready or self.draining:
            message = "The server is shutting down." if self.draining else "The model is loading."
            self._fail(ex, RequestError(503, message, "Service Unavailable"))
            return
        try:
            media_type = ex.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media_type != "application/json":
                raise RequestError(
                    400, "Unsupported Media Type: Only 'application/json' is allowed", "Bad Request"
                )
            body = protocol.parse_body(ex.body)
            req = protocol.parse_chat(body) if chat else protocol.parse_completion(body)
            if req.model is not None and req.model not in self.served:
                raise RequestError(
                    404, f"The model `{req.model}` does not exist.", "NotFoundError", "model"
                )
            max_tokens = protocol.check_length(req, self.cfg.max_model_len)
        except RequestError as err:
            self._fail(ex, err)
            return

        forced = ex.headers.get(FAIL_HEADER, "").strip().lower()
        cut_after = -1
        hang = False
        if forced:
            if forced == "hang":
                hang = True
            elif forced == "disconnect":
                ex.drop_connection()
                return
            elif forced.startswith("disconnect-after:"):
                try:
                    cut_after = int(forced.partition(":")[2])
                except ValueError:
                    cut_after = -1
                if cut_after < 0:
                    self._fail(ex, RequestError(400, f"bad {FAIL_HEADER}: {forced}", "Bad Request"))
                    return
            elif forced.isdigit() and 400 <= int(forced) <= 599:
                self._injected(ex, int(forced))
                return
            else:
                self._fail(ex, RequestError(400, f"bad {FAIL_HEADER}: {forced!r}", "Bad Request"))
                return
        else:
            if self.cfg.error_rate_500 or self.cfg.error_rate_429:
                draw = self.rng.random()
                if draw < self.cfg.error_rate_500:
                    self._injected(ex, 500)
                    return
                if draw < self.cfg.error_rate_500 + self.cfg.error_rate_429:
                    self._injected(ex, 429)
                    return
            if self.cfg.disconnect_after is not None:
                cut_after = self.cfg.disconnect_after

        target, stop = self._plan_length(req, max_tokens)
        request_id = protocol.new_request_id(chat, ex.headers.get("x-request-id"))
        created = int(time.time())
        sink: StreamSink | JsonSink
        if req.stream:
            sink = StreamSink(ex, req, request_id, self.model_json, created, cut_after)
        else:
            sink = JsonSink(ex, req, request_id, self.model_name, created, cut_after)
        seq = Sequence(req.prompt_tokens, target, stop, sink, hang=hang)
        engine = self.engine
        ex.on_close = lambda: engine.abort(seq)
        if req.stream:
            ex.start_stream()
            if cut_after == 0:
                ex.drop_connection()
                return
        engine.submit(seq)

    def _plan_length(self, req: protocol.GenRequest, max_tokens: int) -> tuple[int, bool]:
        """How many tokens to produce, and whether the last one is EOS ("stop")."""
        if req.ignore_eos:
            return max_tokens, False
        mean = self.cfg.output_tokens
        # With the request's seed the length depends on nothing but the seed and the prompt
        # (the continued answer left out), so a continued answer ends where the whole one
        # would have. A str seed is hashed with SHA-512: the same in every process.
        rng = self.rng if req.seed is None else random.Random(f"{req.seed}|{req.length_key}")
        natural = max(1, req.min_tokens + req.offset, round(mean * (0.5 + rng.random())))
        remaining = max(1, natural - req.offset)
        if remaining <= max_tokens:
            return remaining, True
        return max_tokens, False

    def _injected(self, ex: Exchange, status: int) -> None:
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        headers = [("retry-after", str(self.cfg.retry_after))] if status == 429 else None
        self._fail(
            ex, RequestError(status, f"Simulated failure: {status} {phrase}", phrase), headers
        )


class StreamSink:
    """Writes a sequence's tokens as SSE chunks, in vLLM's format."""

    __slots__ = ("continuous", "cut_after", "events", "ex", "fmt", "include_usage", "offset")

    def __init__(
        self,
        ex: Exchange,
        req: protocol.GenRequest,
        request_id: str,
        model_json: str,
        created: int,
        cut_after: int,
    ) -> None:
        self.ex = ex
        self.fmt = protocol.ChunkFormat(req.chat, request_id, model_json, created)
        self.include_usage = req.include_usage
        self.continuous = req.continuous_usage
        self.offset = req.offset
        self.cut_after = cut_after  # drop the connection after this many events (-1: never)
        self.events = 0

    def _event(self, data: bytes) -> bool:
        """Write one SSE event; False once the connection is (being) dropped."""
        if self.ex.closed:
            return False
        self.ex.write_chunk(data)
        self.events += 1
        if self.events == self.cut_after:
            self.ex.drop_connection()
            return False
        return True

    def _usage(self, event: bytes, seq: Sequence, generated: int) -> bytes:
        if not self.continuous:
            return event
        return self.fmt.with_usage(event, seq.prompt_tokens, generated)

    def on_token(self, seq: Sequence) -> None:
        index = seq.generated - 1
        if index == 0 and self.fmt.head and not self._event(self._usage(self.fmt.head, seq, 0)):
            return
        if seq.finish_reason is None:
            self._event(self._usage(self.fmt.token(self.offset + index), seq, seq.generated))

    def on_finish(self, seq: Sequence) -> None:
        if self.ex.closed:
            return
        finish = seq.finish_reason or "stop"
        final = self.fmt.final(self.offset + seq.generated - 1, finish)
        if not self._event(self._usage(final, seq, seq.generated)):
            return
        if self.include_usage and not self._event(self.fmt.usage(seq.prompt_tokens, seq.generated)):
            return
        if self.cut_after == self.events + 1:
            self._event(protocol.DONE)
            return
        self.ex.end_stream(protocol.DONE)


class JsonSink:
    """Collects nothing but the count; answers with one JSON body at the end."""

    __slots__ = ("chat", "created", "cut_after", "ex", "model", "offset", "request_id")

    def __init__(
        self,
        ex: Exchange,
        req: protocol.GenRequest,
        request_id: str,
        model: str,
        created: int,
        cut_after: int,
    ) -> None:
        self.ex = ex
        self.chat = req.chat
        self.request_id = request_id
        self.model = model
        self.created = created
        self.offset = req.offset
        self.cut_after = cut_after  # drop the connection after this many tokens (-1: never)

    def on_token(self, seq: Sequence) -> None:
        if seq.generated == self.cut_after and not self.ex.closed:
            self.ex.drop_connection()

    def on_finish(self, seq: Sequence) -> None:
        if self.ex.closed:
            return
        build = protocol.chat_response if self.chat else protocol.completion_response
        body = build(
            self.request_id,
            self.model,
            self.created,
            seq.prompt_tokens,
            seq.generated,
            seq.finish_reason or "stop",
            self.offset,
        )
        self.ex.respond(200, body)
