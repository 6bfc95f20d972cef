"""Request admission at the edge: the client key, its rate limit, the body's model.

Everything here answers before any backend is chosen: a refusal is one complete response
and one `edge_rejections` count; an admitted request becomes a `Call`.
"""

from __future__ import annotations

import hashlib
import time

from llm_operator import http11
from llm_operator.gateway.bodyscan import BodyError, scan
from llm_operator.gateway.metrics import Metrics
from llm_operator.gateway.request import Call, Request, error_body
from llm_operator.gateway.routing import RoutingTable


class Refused(Exception):
    """The request is answered at the edge with `response`."""

    def __init__(self, response: bytes) -> None:
        super().__init__()
        self.response = response


def authorize(table: RoutingTable, metrics: Metrics, req: Request) -> str:
    """Client key check and rate limit: the key's name ("" without keys); raises `Refused`
    with a 401 or 429."""
    keys = table.keys
    if not keys:
        return ""
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
            )
        )
    wait = state.allow(time.monotonic())
    if wait > 0:
        metrics.inc(metrics.edge_rejections, "429")
        retry = max(1, int(wait + 0.999))
        raise Refused(
            http11.response(
                429,
                error_body("rate limit exceeded for this API key", "rate_limit_error", 429),
                extra=b"retry-after: %d\r\n" % retry,
                keep_alive=req.keep_alive,
            )
        )
    return state.name


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
    """An API request the gateway will route; raises `Refused` with the edge's answer."""
    key_name = authorize(table, metrics, req) if table.keys else ""
    try:
        sc = scan(req.body)
    except BodyError as e:
        metrics.inc(metrics.edge_rejections, "400")
        raise Refused(
            http11.response(
                400, error_body(str(e), "invalid_request_error", 400), keep_alive=req.keep_alive
            )
        ) from None
    model = table.models.get(sc.model)
    if model is None:
        raise Refused(unknown_model(metrics, sc.model, req.keep_alive))
    return Call(req, sc, model, key_name, t0=req.start)
