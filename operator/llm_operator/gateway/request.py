"""What the gateway knows about one request: the parsed request, the per-request `Call`,
one attempt's report, and the names of failure reasons.

A module of plain data that every stage imports and that imports no stage: the connection
builds a `Request`, admission makes it a `Call`, the fallback loop and the response relay
update it, and the access log reads it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from llm_operator.gateway.bodyscan import Scanned
from llm_operator.gateway.limits import Budget
from llm_operator.gateway.routing import ExternalTarget, ModelState

if TYPE_CHECKING:
    from llm_operator.gateway.resume import Resume


class Failure(StrEnum):
    """Why an attempt failed. The values are the fallback trigger names of the routing
    config (`connectError`, `timeout`, `429`, `5xx`, `saturated`) and the gateway's own;
    they appear as they are in metric labels and access-log fields."""

    CONNECT_ERROR = "connectError"
    TIMEOUT = "timeout"
    STATUS_429 = "429"
    STATUS_5XX = "5xx"
    SATURATED = "saturated"
    TOTAL = "total"
    """The request's own total timeout: never a trigger, never charged to a backend."""
    UNAVAILABLE = "unavailable"
    """No backend of the model is available (none listed, or every breaker open)."""
    CLIENT_CLOSED = "client_closed"


def error_body(message: str, type_: str, code: str | int | None, param: str | None = None) -> bytes:
    """An OpenAI-style error object."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()


@dataclass(slots=True)
class Request:
    """One client request as read off the connection."""

    method: bytes
    path: bytes
    fwd: bytes
    """Client headers to forward upstream, already serialized."""
    auth: bytes | None
    body: bytes
    keep_alive: bool
    start: float
    peer: str


@dataclass(slots=True)
class Call:
    """One admitted API request on its way through the fallback chain."""

    req: Request
    scanned: Scanned
    model: ModelState
    """The model the client asked for: its metrics, budget and timeouts rule the request."""
    key_name: str
    """The client key's name ("" when the gateway has no keys)."""
    t0: float = 0.0
    """When the request set out for the backends: its arrival, or its release from the hold
    queue. Timeouts count from here; latencies the client saw count from `req.start`."""
    budgets: Sequence[Budget] = ()
    """The client budgets this call holds a place in (`limits.py`), released by `finish`."""
    step_model: ModelState | None = None
    """The model of the current fallback step (None for an external URL step)."""
    body: bytes = b""
    """The request body for the current step (its `model` rewritten on fallback steps)."""
    target: str = ""
    """The `model` the current step's backends are sent."""
    # `admit` builds the per-request `Call` field by field, without this `__init__`: a
    # field added here is set there too (tests/gateway/test_fields.py).
    attempts: int = 0
    external: ExternalTarget | None = None
    step_label: str = ""
    """The current fallback step's label ("" on the first step)."""
    note: str = ""
    """Why the model could not answer, when the gateway knows better than "no backend"
    (a full hold queue, an expired cold start): the message of a 503."""
    resume: Resume | None = None
    """A stream the model resumes on the next route if its backend fails (`resume.py`)."""
    strip_usage: bool = False
    """The gateway asked the engine for a stream's usage block the client did not ask for:
    it is read and not relayed."""
    tokens_in: int | None = None
    tokens_out: int | None = None
    """Prompt and completion tokens of the answer, from its `usage` (None: not reported)."""
    path: tuple[str, ...] = ()
    """The fallback steps taken after the model's own backends, in order."""

    def finish(self, now: float) -> None:
        """The call ended: give back its places, charge the tokens it used."""
        tokens = (self.tokens_in or 0) + (self.tokens_out or 0)
        for b in self.budgets:
            b.finish(tokens, now)

    @property
    def resuming(self) -> bool:
        """A resumable stream is under way at the client: a failure now is resumed."""
        return self.resume is not None and self.resume.committed

    @property
    def limits(self) -> ModelState:
        """Whose timeouts and concurrency limit the current attempt uses."""
        return self.step_model or self.model


class Attempt:
    """What one attempt reports back to the fallback loop when it did not answer."""

    __slots__ = ("complete_error", "detail", "reason")

    def __init__(
        self,
        reason: Failure,
        detail: str = "",
        complete_error: tuple[int, bytes, bytes] | None = None,
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.complete_error = complete_error
        """(status, head, body) of a discarded error answer, passed through if nothing else
        can answer."""
