"""Request admission at the edge: the client key, the body's model, the key's budgets.

Everything here answers before any backend is chosen: a refusal is one complete response
and one `edge_rejections` count; an admitted request becomes a `Call`.
"""

from __future__ import annotations

import hashlib
import time

from llm_operator import http11
from llm_operator.gateway.bodyscan import BodyError, scan, with_usage
from llm_operator.gateway.limits import Budget, retry_after
from llm_operator.gateway.metrics import Metrics
from llm_operator.gateway.request import Call, Request, error_body
from llm_operator.gateway.routing import ModelState, RoutingTable

_new = object.__new__


class Refused(Exception):
    """The request is answered at the edge with `response` (`status`; the model and the
    key's name when known, for the audit log)."""

    def __init__(self, response: bytes, status: int, model: str = "", key_name: str = "") -> None:
        super().__init__()
        self.response = response
        self.status = status
        self.model = model
        self.key_name = key_name


def identify(table: RoutingTable, metrics: Metrics, req: Request) -> Budget | None:
    """The client key's budgets (None when the gateway has no keys); raises `Refused` with
    a 401 when keys are required and the request has none of them."""
    if not table.keys_required:
        return None
    keys = table.keys
    auth = req.auth
    token = auth[7:].strip() if auth and auth[:7].lower() == b"bearer " else None
    state = keys.get(hashlib.sha256(token).hexdigest()) if token else None
    if state is None:
        metrics.inc(metrics.edge_rejections, "401")
        raise Refused(
            http11.response(
                401,
                error_body(
                    "invalid or missing API key", "invalid_request_error", "invalid_api_key"
                ),
                extra=b'www-authenticate: Bearer realm="llm-gateway"\r\n',
                keep_alive=req.keep_alive,
            ),
            401,
        )
    return state


def _over_budget(
    metrics: Metrics, req: Request, wait: float, why: str, model: str, key_name: str, scoped: bool
) -> Refused:
    metrics.inc(metrics.edge_rejections, "429")
    retry = retry_after(wait)
    scope = f" on model `{model}`" if scoped else ""
    return Refused(
        http11.response(
            429,
            error_body(
                f"rate limit reached for this API key{scope}: {why}; retry after {retry} s",
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            extra=b"retry-after: %d\r\n" % retry,
            keep_alive=req.keep_alive,
        ),
        429,
        model,
        key_name,
    )


def unknown_model(metrics: Metrics, name: str, keep_alive: bool) -> bytes:
    metrics.inc(metrics.edge_rejections, "404")
    return http11.response(
        404,
        error_body(
            f"The model `{name}` does not exist.",
            "invalid_request_error",
            "model_not_found",
            "model",
        ),
        keep_alive=keep_alive,
    )


def admit(table: RoutingTable, metrics: Metrics, req: Request) -> Call:
    """An API request the gateway will route; raises `Refused` with the edge's answer (401,
    400, 404, 429). An admitted call holds a place in its budgets until `Call.finish`."""
    key = identify(table, metrics, req) if table.keys_required else None
    key_name = key.name if key is not None else ""
    try:
        sc = scan(req.body)
    except BodyError as e:
        raise _bad_body(metrics, req, e, key_name) from None
    model = table.models.get(sc.model)
    if model is None:
        raise Refused(unknown_model(metrics, sc.model, req.keep_alive), 404, sc.model, key_name)
    budgets: list[Budget] | tuple[()] = ()
    if (key is not None and key.limited) or model.route.client_limits is not None:
        budgets = _take_budgets(metrics, req, model, key, key_name)
    # The `Call`, every field set here, without the dataclass `__init__` (a Python
    # `__init__` is a frame entered from C: ~1.2k instructions more per request);
    # tests/gateway/test_fields.py checks that none is left out.
    call = _new(Call)
    call.req = req
    call.scanned = sc
    call.model = model
    call.key_name = key_name
    call.t0 = req.start
    call.budgets = budgets
    call.step_model = model
    call.body = sc.body
    call.target = sc.model
    call.attempts = 0
    call.external = None
    call.step_label = ""
    call.note = ""
    call.resume = None
    call.strip_usage = False
    call.tokens_in = None
    call.tokens_out = None
    call.path = ()
    if sc.stream and (key is not None or budgets) and not model.route.resume_streams:
        # Audited or budgeted traffic counts the tokens of streams too: ask the engine for
        # the final usage block (and hide it from a client that did not ask for it).
        call.scanned, call.strip_usage = with_usage(sc)
        call.body = call.scanned.body
    return call


def _bad_body(metrics: Metrics, req: Request, e: BodyError, key_name: str) -> Refused:
    metrics.inc(metrics.edge_rejections, "400")
    return Refused(
        http11.response(
            400, error_body(str(e), "invalid_request_error", 400), keep_alive=req.keep_alive
        ),
        400,
        key_name=key_name,
    )


def _take_budgets(
    metrics: Metrics, req: Request, model: ModelState, key: Budget | None, key_name: str
) -> list[Budget]:
    """The key's and the model's per-client budgets of a call, a place taken in each; raises
    `Refused` (429) when one of them has none now (and then takes none)."""
    budgets = [key] if key is not None and key.limited else []
    if model.route.client_limits is not None:
        budgets.append(model.client_budget(key_name, req.start))
    now = time.monotonic()
    for b in budgets:
        wait, why = b.wait(now)
        if wait > 0:
            raise _over_budget(metrics, req, wait, why, model.name, key_name, b is not key)
    for b in budgets:
        b.take()
    return budgets
