"""Client budgets: requests per second, tokens per minute, requests in flight.

One `Budget` per client key (gateway-wide), and one per key on each model that sets
`clientLimits`. Admission asks every budget of the request first (`wait`) and takes from
them only when all agree (`take`), so a refusal by one budget costs the others nothing.
Tokens are charged when the request ends, from the usage its answer reported: a request is
admitted while the minute's budget is above zero, and one long answer may take it below
zero (the key then waits until the refill has paid it back), as OpenAI's own limits do.
"""

from __future__ import annotations

import math

from llm_operator.api.gateway_config import ClientLimits


class Budget:
    """The budgets of one client on one scope; `name` is the key's name."""

    __slots__ = (
        "burst",
        "in_flight",
        "last",
        "level",
        "limits",
        "max_concurrent",
        "name",
        "rate",
        "requests",
        "tokens_per_second",
        "tpm",
    )

    def __init__(self, name: str, limits: ClientLimits | None, now: float) -> None:
        self.name = name
        self.limits = limits
        lim = limits or ClientLimits()
        self.rate = lim.requests_per_second
        self.burst = float(lim.burst or max(1.0, self.rate or 1.0))
        self.requests = self.burst
        self.tpm = lim.tokens_per_minute
        self.tokens_per_second = (self.tpm or 0) / 60.0
        self.level = float(self.tpm or 0)
        self.max_concurrent = lim.max_concurrent_requests
        self.in_flight = 0
        self.last = now

    @property
    def limited(self) -> bool:
        return self.rate is not None or self.tpm is not None or self.max_concurrent is not None

    def _refill(self, now: float) -> None:
        elapsed = now - self.last
        if elapsed > 0:
            if self.rate is not None:
                self.requests = min(self.burst, self.requests + elapsed * self.rate)
            if self.tpm is not None:
                self.level = min(float(self.tpm), self.level + elapsed * self.tokens_per_second)
            self.last = now

    def wait(self, now: float) -> tuple[float, str]:
        """(0, "") when one more request may go now; else (seconds to wait, why)."""
        self._refill(now)
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            return 1.0, f"{self.max_concurrent} concurrent requests"
        if self.tpm is not None and self.level <= 0:
            return (1.0 - self.level) / self.tokens_per_second, f"{self.tpm} tokens per minute"
        if self.rate is not None and self.requests < 1.0:
            return (1.0 - self.requests) / self.rate, f"{self.rate:g} requests per second"
        return 0.0, ""

    def take(self) -> None:
        """One request admitted (after `wait` said 0)."""
        if self.rate is not None:
            self.requests -= 1.0
        self.in_flight += 1

    def finish(self, tokens: int, now: float) -> None:
        """The request ended having used `tokens` (prompt plus completion)."""
        self.in_flight -= 1
        if self.tpm is not None and tokens > 0:
            self._refill(now)
            self.level -= tokens

    def same_limits(self, limits: ClientLimits | None) -> bool:
        return self.limits == limits


def retry_after(wait: float) -> int:
    """Whole seconds for a Retry-After header: never 0, never early."""
    return max(1, math.ceil(wait))
