"""The scheduler: vLLM's running batch and FIFO waiting queue, driven by one timer.

At most `max_num_seqs` sequences run at once (and only while their prompts fit the
KV cache); the rest wait in arrival order, as in vLLM's scheduler. A running sequence
has an absolute due time for its next token, drawn from the latency model. All due
times sit in one heap and a single loop timer is armed for the earliest one; each
wake-up emits every token that is due (within `EMIT_TOLERANCE`), so 500 streams cost
one timer, not 500.

Due times are absolute: token k is due at due(k-1) + ITL, not at "when token k-1
actually went out" + ITL. Timer lateness therefore does not accumulate into the
model's throughput, while a simulator that cannot keep up still shows it: its tokens
fall further and further behind and the measured latencies grow (the benchmark
looks for exactly that).

The loop's own clock is not used for the comparison because uvloop's `loop.time()`
has millisecond resolution; `time.monotonic()` is read instead.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections import deque
from typing import Protocol

from llm_operator.sim.latency import LatencyModel
from llm_operator.sim.metrics import SimMetrics

# Tokens due within this many seconds of "now" go out in the current wake-up. The
# loop's timers have ~1 ms resolution, so waking up for less than that is wasted.
EMIT_TOLERANCE = 0.001


class Sink(Protocol):
    """Where a sequence's tokens go (an SSE stream, or a buffer for a JSON answer)."""

    def on_token(self, seq: Sequence) -> None:
        """One more token; `seq.generated` counts it, `seq.finish_reason` is set on the last."""

    def on_finish(self, seq: Sequence) -> None: ...


WAITING, RUNNING, FINISHED, ABORTED = 0, 1, 2, 3


class Sequence:
    """One request inside the engine."""

    __slots__ = (
        "admitted_at",
        "arrival",
        "due",
        "finish_reason",
        "first_token_at",
        "generated",
        "hang",
        "last_token_at",
        "prompt_tokens",
        "sink",
        "state",
        "stop_at",
        "target",
    )

    def __init__(
        self,
        prompt_tokens: int,
        target: int,
        stop_at_target: bool,
        sink: Sink,
        *,
        hang: bool = False,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.target = target  # tokens to produce, the last one included
        # True: the last token is EOS (finish_reason "stop"); False: max_tokens hit.
        self.stop_at = stop_at_target
        self.sink = sink
        self.hang = hang  # admitted, then never produces a token
        self.state = WAITING
        self.generated = 0
        self.finish_reason: str | None = None
        self.arrival = time.monotonic()
        self.admitted_at = 0.0
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self.due = 0.0


class Engine:
    def __init__(
        self,
        model: LatencyModel,
        max_num_seqs: int,
        kv_capacity: int,
        metrics: SimMetrics,
        rng: random.Random,
    ) -> None:
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.kv_capacity = kv_capacity
        self.metrics = metrics
        self.rng = rng
        self.waiting: deque[Sequence] = deque()
        self.running = 0
        self.hung = 0  # running sequences that will never produce a token (x-sim-fail: hang)
        self.kv_used = 0
        self.generated_total = 0  # for the periodic stats line
        self.prompt_total = 0
        self._heap: list[tuple[float, int, Sequence]] = []
        self._counter = 0  # heap tie-breaker: sequences are not comparable
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = float("inf")
        self._paused_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- observation ---------------------------------------------------------------

    def gauges(self) -> tuple[int, int, float]:
        return self.running, len(self.waiting), min(1.0, self.kv_used / self.kv_capacity)

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    @property
    def busy(self) -> bool:
        """Is there work that will finish if we wait (not hung, not paused)?"""
        if self._paused_at is not None:
            return False
        return self.running > self.hung or bool(self.waiting)

    # -- requests ------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._admit()

    def abort(self, seq: Sequence) -> None:
        """The client went away: free the slot (vLLM aborts on disconnect too)."""
        if seq.state == WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                return  # never submitted
        elif seq.state == RUNNING:
            self._release(seq)
        else:
            return
        seq.state = ABORTED
        seq.finish_reason = "abort"
        self.metrics.request_success["abort"].inc()
        self._admit()

    # -- hang mode -----------------------------------------------------------------

    def pause(self) -> None:
        """Stop producing tokens and admitting work (a hung GPU); /health is unaffected."""
        if self._paused_at is None:
            self._paused_at = time.monotonic()
            self._cancel_timer()

    def resume(self) -> None:
        if self._paused_at is None:
            return
        shift = time.monotonic() - self._paused_at
        self._paused_at = None
        # Every pending token slides by the length of the pause.
        self._heap = [(due + shift, n, seq) for due, n, seq in self._heap]
        for _, _, seq in self._heap:
            seq.due += shift
        heapq.heapify(self._heap)
        self._admit()
        self._arm()

    # -- internals -------------------------------------------------------------------

    def _admit(self) -> None:
        if self._paused_at is not None:
            return
        now = time.monotonic()
        admitted = False
        while self.waiting and self.running < self.max_num_seqs:
            seq = self.waiting[0]
            need = seq.prompt_tokens
            # The KV cache must hold the prompt; an empty batch always admits, so a
            # prompt bigger than the cache cannot wedge the queue.
            if self.running and self.kv_used + need > self.kv_capacity:
                break
            self.waiting.popleft()
            self.running += 1
            self.kv_used += need
            seq.state = RUNNING
            seq.admitted_at = now
            self.metrics.queue_time.observe(now - seq.arrival)
            if seq.hang:
                self.hung += 1
                continue
            seq.due = now + self.model.draw_ttft(self.rng, seq.prompt_tokens, self.running)
            self._push(seq)
            admitted = True
        if admitted:
            self._arm()

    def _push(self, seq: Sequence) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (seq.due, self._counter, seq))

    def _release(self, seq: Sequence) -> None:
        self.running -= 1
        if seq.hang:
            self.hung -= 1
        self.kv_used -= seq.prompt_tokens + seq.generated

    def _arm(self) -> None:
        if not self._heap or self._paused_at is not None:
            return
        due = self._heap[0][0]
        if due >= self._timer_due:
            return  # the armed timer fires first anyway
        self._cancel_timer()
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._timer_due = due
        self._timer = self._loop.call_later(max(0.0, due - time.monotonic()), self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_due = float("inf")

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due = float("inf")
        if self._paused_at is not None:
            return
        now = time.monotonic()
        horizon = now + EMIT_TOLERANCE
        heap = self._heap
        freed = False
        metrics = self.metrics
        model = self.model
        rng = self.rng
        while heap and heap[0][0] <= horizon:
            _, _, seq = heapq.heappop(heap)
            if seq.state != RUNNING:
                continue  # aborted while its token was pending
            seq.generated += 1
            self.kv_used += 1
            metrics.generation_tokens.inc()
            self.generated_total += 1
            if seq.generated == 1:
                seq.first_token_at = now
                self.prompt_total += seq.prompt_tokens
                metrics.prompt_tokens.inc(seq.prompt_tokens)
                metrics.ttft.observe(now - seq.arrival)
            else:
                metrics.itl.observe(now - seq.last_token_at)
            seq.last_token_at = now
            if seq.generated >= seq.target:
                seq.finish_reason = "stop" if seq.stop_at else "length"
                self._finish(seq, now)
                freed = True
                continue
            seq.due += model.draw_itl(rng, self.running)
            self._counter += 1
            heapq.heappush(heap, (seq.due, self._counter, seq))
            seq.sink.on_token(seq)
        if freed:
            self._admit()
        self._arm()

    def _finish(self, seq: Sequence, now: float) -> None:
        self._release(seq)
        seq.state = FINISHED
        m = self.metrics
        reason = seq.finish_reason or "stop"
        m.request_success[reason].inc()
        m.e2e.observe(now - seq.arrival)
        m.inference_time.observe(now - seq.admitted_at)
        m.prefill_time.observe(seq.first_token_at - seq.admitted_at)
        m.decode_time.observe(now - seq.first_token_at)
        m.request_prompt_tokens.observe(seq.prompt_tokens)
        m.request_generation_tokens.observe(seq.generated)
        seq.sink.on_token(seq)
        seq.sink.on_finish(seq)
