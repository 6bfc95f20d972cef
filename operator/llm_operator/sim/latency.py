"""The latency model: how long a GPU running vLLM would take, as plain arithmetic.

    TTFT (after admission) = (ttft_base + prompt_tokens * prefill_per_token) * load * jitter
    ITL                    = itl * load * jitter
    load                   = 1 + load_slowdown * (running - 1) / max(1, max_num_seqs - 1)
    jitter                 ~ uniform(1 - j, 1 + j)          (mean 1)

`running` counts the sequences in the batch when the delay is drawn, this one
included, so a lone request sees `load == 1` and a full batch sees
`1 + load_slowdown`: decode steps of a bigger batch take longer, as on a GPU.
Time spent waiting for a slot (queueing) is not part of this model; the scheduler
adds it. The benchmark compares what clients measure against these formulas.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class LatencyModel:
    ttft_base: float
    prefill_per_token: float
    itl: float
    jitter: float
    load_slowdown: float
    max_num_seqs: int

    def load_factor(self, running: int) -> float:
        span = max(1, self.max_num_seqs - 1)
        return 1.0 + self.load_slowdown * max(0, running - 1) / span

    def mean_ttft(self, prompt_tokens: int, running: int) -> float:
        """Expected time from admission to the first token (jitter averaged out)."""
        return (self.ttft_base + prompt_tokens * self.prefill_per_token) * self.load_factor(running)

    def mean_itl(self, running: int) -> float:
        """Expected time between two tokens of one sequence."""
        return self.itl * self.load_factor(running)

    def draw_ttft(self, rng: random.Random, prompt_tokens: int, running: int) -> float:
        return self.mean_ttft(prompt_tokens, running) * self._jitter(rng)

    def draw_itl(self, rng: random.Random, running: int) -> float:
        return self.mean_itl(running) * self._jitter(rng)

    def _jitter(self, rng: random.Random) -> float:
        if self.jitter <= 0.0:
            return 1.0
        return 1.0 + self.jitter * (2.0 * rng.random() - 1.0)
