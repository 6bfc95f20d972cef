"""The response side of an attempt: at the backend's response head, fail over or commit;
once committed, relay the answer (whole, or streamed chunk by chunk) to the client.

Once committed there is no second answer: a backend failure mid-stream ends an SSE stream
with an error event and closes the connection; unless the model resumes streams
(`resume.py`): then the failed attempt goes back to the fallback loop, and the next route's
continuation is relayed into the same client stream.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from llm_operator import http11
from llm_operator.gateway.accesslog import AccessLog
from llm_operator.gateway.connection import ClientConnection
from llm_operator.gateway.metrics import Series
from llm_operator.gateway.report import report
from llm_operator.gateway.request import Attempt, Call, Failure, error_body
from llm_operator.gateway.resume import Resume
from llm_operator.gateway.routing import Backend
from llm_operator.gateway.upstream import Exchange, Pool, UpstreamConnection, UpstreamError, expire

DROP_RESPONSE_HEADERS = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"trailer"}
)


@dataclass(slots=True)
class Try:
    """One attempt on one backend; `upc` and `ex` are set once the request is sent."""

    backend: Backend
    track: str
    series: Series
    pool: Pool
    upc: UpstreamConnection | None = None
    ex: Exchange | None = None

    def give_back(self, upc: UpstreamConnection, ex: Exchange) -> None:
        """Return the connection to the pool after a complete exchange, or drop it."""
        if ex.keep_alive:
            self.pool.release(upc)
        else:
            upc.abort()


class _Head:
    """The backend's response head, rewritten for the client: framing is redone
    (`_read_head` builds it)."""

    __slots__ = ("content_length", "parts", "retry_after", "sse")

    parts: list[bytes]
    sse: bool
    content_length: bytes | None
    retry_after: float


_new = object.__new__


def _read_head(ex: Exchange, keep_alive: bool) -> _Head:
    """The head of `ex` for the client. A function, not `_Head.__init__`: a Python
    `__init__` is a frame entered from C (~600 instructions more, once per attempt)."""
    head = _new(_Head)
    head.parts = parts = [http11.status_line(ex.status)]
    head.sse = False
    head.content_length = None
    head.retry_after = 0.0
    for name, value in ex.headers:
        lname = name.lower()
        if lname in DROP_RESPONSE_HEADERS:
            if lname == b"content-length":
                head.content_length = value
            continue
        # A slice compare: `startswith` parses its arguments (~500 instructions).
        if lname == b"content-type" and value[:17] == b"text/event-stream":
            head.sse = True
        elif lname == b"retry-after":
            try:
                head.retry_after = float(value)
            except ValueError:
                head.retry_after = 0.0
        parts.append(name + b": " + value + b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    return head


# The outcome of a relayed answer by its status class (status // 100: httptools reads three
# digits): below 400 "success", 4xx "client_error", 5xx and above "server_error". A
# subscript, not a call, once per answer.
_OUTCOME = ("success",) * 4 + ("client_error",) + ("server_error",) * 5

_DONE = b"data: [DONE]\n\n"
_USAGE = b'"usage":{'
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
# The order vLLM and OpenAI write: one search instead of two.
_BOTH_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)[^}]*?"completion_tokens":\s*(\d+)')


def usage_at(data: bytes, i: int) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens of the usage object at `data[i:]` (`"usage":{`)."""
    both = _BOTH_TOKENS.search(data, i)
    if both is not None:
        return int(both[1]), int(both[2])
    p = _PROMPT_TOKENS.search(data, i)
    c = _COMPLETION_TOKENS.search(data, i)
    return (int(p[1]) if p else None), (int(c[1]) if c else None)


def without_usage_event(events: bytes) -> tuple[bytes, int]:
    """Whole SSE events less the one that carries `usage`: (the rest, the usage's index in
    `events`, -1 if none). A literal `"usage":{` is always the key: inside a JSON string
    the quotes would be escaped, and no raw newline can be in an event's JSON."""
    i = events.find(_USAGE)
    if i < 0:
        return events, -1
    start = events.rfind(b"\n\n", 0, i)
    start = 0 if start < 0 else start + 2
    end = events.find(b"\n\n", i)
    end = len(events) if end < 0 else end + 2
    return events[:start] + events[end:], i


def _received(
    conn: ClientConnection, call: Call, t: Try, ex: Exchange, head: _Head, now: float
) -> Attempt | None:
    """The head is in (at `now`): an `Attempt` when it is one to fail over. (No tuple
    returned with the head and the time: building and unpacking one costs ~370 instructions.)"""
    status = ex.status
    if status == 429 or status >= 500:
        return _fail_over(conn, call, t, head, now)
    t.backend.on_success()
    return None


def respond_complete(conn: ClientConnection, call: Call, t: Try, log: AccessLog) -> Attempt | None:
    """`respond` for an answer that came whole with its head (most non-streamed ones), and
    not the continuation of a resumable stream: a plain call, no coroutine to create and
    run on every request."""
    ex = t.ex
    assert ex is not None
    now = time.monotonic()
    head = _read_head(ex, call.req.keep_alive)
    status = ex.status
    if status == 429 or status >= 500:  # `_received`, inline: one call less per request
        failed = _fail_over(conn, call, t, head, now)
        if failed is not None:
            return failed
    else:
        t.backend.on_success()
    ttfb = now - call.req.start
    ok = 200 <= status < 300
    nbytes = _write_complete(conn, call, t, head, ok)
    # By position (once per request: keywords cost more to match than the call itself);
    # the whole answer came with the head, so its first token did too.
    outcome = _OUTCOME[status // 100]
    ttft = ttfb if ok else None
    report(log, call, t.series, status, outcome, t.backend.key, t.track, "", nbytes, ttfb, ttft)
    return None


async def respond(conn: ClientConnection, call: Call, t: Try, log: AccessLog) -> Attempt | None:
    """The head is in: an `Attempt` to fail over, or None once the answer is relayed."""
    upc, ex = t.upc, t.ex
    assert upc is not None and ex is not None
    resume = call.resume
    if resume is not None and resume.committed:
        return await _continue(conn, call, t, log, resume)
    if ex.complete:
        return respond_complete(conn, call, t, log)
    now = time.monotonic()
    head = _read_head(ex, call.req.keep_alive)
    failed = _received(conn, call, t, ex, head, now)
    if failed is not None:
        return failed
    ttfb = now - call.req.start
    status = ex.status
    # Commit: from here on there is no failover (but a resumable stream's continuation).
    if resume is not None and _streams(ex, head):
        return await _commit_resumable(conn, call, t, head, log, resume, ttfb)
    ttft = tpot = None
    relay = await _relay(conn, call, t, head)
    if 200 <= status < 300:
        ttft, tpot = relay.token_times(call.req.start)
        relay.read_usage(call)
    report(
        log,
        call,
        t.series,
        status,
        relay.outcome,
        t.backend.key,
        t.track,
        "",
        relay.nbytes,
        ttfb,
        ttft,
        tpot,
    )
    return None


def _fail_over(
    conn: ClientConnection, call: Call, t: Try, head: _Head, now: float
) -> Attempt | None:
    """A 429 or 5xx: charge the backend; fail over if the model's triggers say so."""
    upc, ex = t.upc, t.ex
    assert upc is not None and ex is not None
    status = ex.status
    model = call.model
    if status == 429:
        reason = Failure.STATUS_429
        retry = head.retry_after if head.retry_after > 0 else float(model.retry_after)
        t.backend.on_busy(now, retry)
    else:
        reason = Failure.STATUS_5XX
        t.backend.on_failure(now)
    if reason not in model.triggers:
        return None
    # Keep a complete small error answer to pass through if nothing else can answer;
    # drop the connection if the body is still coming.
    kept: tuple[int, bytes, bytes] | None = None
    if ex.complete:
        b = b"".join(ex.buffered)
        kept = (status, b"".join(head.parts) + b"content-length: %d\r\n\r\n" % len(b), b)
        t.give_back(upc, ex)
    else:
        upc.abort()
    conn.upstream = None
    return Attempt(reason, f"backend answered {status}", kept)


def _write_complete(conn: ClientConnection, call: Call, t: Try, head: _Head, ok: bool) -> int:
    """The whole answer arrived with its head: one write, with a content-length. The
    tokens of a 2xx answer are read from its usage object."""
    upc, ex = t.upc, t.ex
    assert upc is not None and ex is not None
    body = ex.buffered[0] if len(ex.buffered) == 1 else b"".join(ex.buffered)
    parts = head.parts
    if ok:
        if call.strip_usage and head.sse:
            body, i = without_usage_event(body)
            # The index is into the unstripped body: read the numbers from that.
            if i >= 0:
                whole = ex.buffered[0] if len(ex.buffered) == 1 else b"".join(ex.buffered)
                call.tokens_in, call.tokens_out = usage_at(whole, i)
        else:
            i = body.rfind(_USAGE)
            if i >= 0:
                call.tokens_in, call.tokens_out = usage_at(body, i)
    parts.append(b"content-length: %d\r\n\r\n" % len(body))
    parts.append(body)
    conn.write(b"".join(parts))
    if ex.keep_alive:  # `t.give_back`, inline: once per request
        t.pool.release(upc)
    else:
        upc.abort()
    conn.upstream = None
    return len(body)


class _Relay:
    """The sink of a committed exchange: body pieces straight to the client's transport,
    the pieces of one read batched into one write.

    For an SSE answer it also counts `data:` events (not `data: [DONE]`, which carries no
    token) and stamps the first and last read that brought any: the time to first token
    and the time per output token. One `bytes.count` per piece and one clock read per
    read that had events; an event whose `data:` is split across two reads is not counted.
    """

    __slots__ = (
        "at_line_start",
        "carry",
        "chunked",
        "conn",
        "end",
        "events",
        "first",
        "last",
        "nbytes",
        "new_events",
        "outcome",
        "pending",
        "previous",
        "sse",
        "strip",
        "tail",
        "transport",
        "usage",
    )

    def __init__(
        self, conn: ClientConnection, chunked: bool, sse: bool, strip: bool = False
    ) -> None:
        self.conn = conn
        transport = conn.transport
        assert transport is not None
        self.transport = transport
        self.chunked = chunked
        self.sse = sse
        self.nbytes = 0
        self.pending: list[bytes] = []
        self.outcome = ""
        self.events = 0
        self.new_events = 0
        """Data events of the read being parsed, stamped at its end (`flush`)."""
        self.at_line_start = True
        self.first = 0.0
        self.last = 0.0
        self.end = 0.0
        """When the body ended (0 if it did not end)."""
        self.strip = strip
        """Drop the usage event (the gateway asked for it, the client did not)."""
        self.carry = b""
        """While stripping: the start of an event whose end has not arrived yet."""
        self.usage: tuple[int | None, int | None] | None = None
        self.tail = self.previous = b""
        """The last two pieces of a body that is not SSE: where its usage object is."""

    def count_events(self, data: bytes) -> None:
        """The data events of `data` (a piece that came with the head); `sink` does the
        same inline for each piece read after it."""
        n = data.count(b"\ndata:")
        if self.at_line_start and data[:5] == b"data:":  # cheaper than startswith
            n += 1
        self.at_line_start = data[-1] == 10  # b"\n"; a subscript is cheaper than endswith
        if n and data[-14:] == _DONE:
            n -= 1
        self.new_events += n

    def token_times(self, start: float) -> tuple[float | None, float | None]:
        """(time to first token, time per output token) of a 2xx answer, where known."""
        if not self.sse:
            return (self.end - start, None) if self.outcome == "success" else (None, None)
        if not self.events:
            return None, None
        tpot = (self.last - self.first) / (self.events - 1) if self.events > 1 else None
        return self.first - start, tpot

    def read_usage(self, call: Call) -> None:
        """The answer's tokens, from its usage object (a 2xx answer that has ended). The
        object is at the end (a JSON answer's last key, a stream's last event before
        [DONE]): it is looked for there once, not in every piece."""
        usage = self.usage
        if usage is None:
            body = self.previous + self.tail
            i = body.rfind(_USAGE)
            if i >= 0:
                usage = usage_at(body, i)
        if usage is not None:
            call.tokens_in, call.tokens_out = usage

    def screen(self, data: bytes) -> bytes:
        """One piece's usage bookkeeping; what of it goes to the client now."""
        if self.strip:
            return self._without_usage(data)
        self.previous, self.tail = self.tail, data
        return data

    def _without_usage(self, data: bytes) -> bytes:
        """Whole events of what has come, less the usage event; the rest waits."""
        buf = self.carry + data if self.carry else data
        cut = buf.rfind(b"\n\n") + 2
        if cut < 2:
            self.carry = buf
            return b""
        self.carry = buf[cut:]
        events = buf[:cut] if cut < len(buf) else buf
        if events.find(_USAGE) < 0:
            return events
        out, i = without_usage_event(events)
        self.usage = usage_at(events, i)
        return out

    def sink(self, data: bytes | None, err: UpstreamError | None) -> None:
        if self.conn.closed:
            return
        if data is not None:
            if self.strip:
                data = self._without_usage(data)
                if not data:
                    return  # an empty chunk would end the chunked body
            else:  # `screen`, inline: this runs once per piece read
                self.previous, self.tail = self.tail, data
            self.nbytes += len(data)
            if self.sse:  # `count_events`, inline: this runs once per piece read
                n = data.count(b"\ndata:")
                if self.at_line_start and data[:5] == b"data:":  # cheaper than startswith
                    n += 1
                self.at_line_start = data[-1] == 10
                if n and data[-14:] == _DONE:
                    n -= 1
                self.new_events += n
            self.pending.append(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        elif err is None:
            self._ended()  # once per answer, not per piece: out of line
        else:
            self._failed(err)

    def _ended(self) -> None:
        """The body is whole: what is left of it, the last chunk, all written now (also
        when the end is the backend closing, which no read follows to flush)."""
        self.end = time.monotonic()
        if self.carry:  # an unfinished last event: the backend's, as it sent it
            carry, self.carry = self.carry, b""
            self.nbytes += len(carry)
            self.pending.append(http11.chunk(carry) if self.chunked else carry)
        if self.chunked:
            self.pending.append(http11.LAST_CHUNK)
        self.flush()

    def _failed(self, err: UpstreamError) -> None:
        """The backend failed mid-answer: what came goes out, then (SSE) an error event."""
        self.flush()
        if self.sse and self.chunked:
            msg = str(err) if err.reason == "total" else f"the backend failed mid-stream: {err}"
            event = b"data: " + error_body(msg, "server_error", 502) + b"\n\n"
            self.transport.write(http11.last_chunk(event))

    def flush(self) -> None:
        """The end of a read: its pieces in one write; its events, if any, arrived now (the
        first and last such read give the time to first token and per output token)."""
        if self.new_events:
            now = time.monotonic()
            if not self.events:
                self.first = now
            self.last = now
            self.events += self.new_events
            self.new_events = 0
        pending = self.pending
        if pending and not self.conn.closed:
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        pending.clear()


async def _relay(conn: ClientConnection, call: Call, t: Try, head: _Head) -> _Relay:
    """Stream the answer as it comes; the relay tells bytes, outcome and token times."""
    upc, ex = t.upc, t.ex
    assert upc is not None and ex is not None
    relay = _open_relay(conn, call, head, ex)
    loop = conn.loop
    done = loop.create_future()
    ex.done = done
    ex.sink = relay.sink
    ex.on_read_done = relay.flush
    if ex.error is not None:
        # The backend failed between its head and our commit: same as mid-stream.
        relay.sink(None, ex.error)
    if conn.paused:
        upc.pause_reading()
    left = call.t0 + call.model.total_timeout - time.monotonic()
    timer = loop.call_at(loop.time() + max(0.0, left), expire, ex, upc, "total")
    try:
        if not ex.complete and ex.error is None:
            await done
    finally:
        timer.cancel()
    _settle(conn, t, upc, ex)
    relay.outcome = _stream_outcome(conn, t.backend, ex.error, ex.status)
    return relay


def _open_relay(conn: ClientConnection, call: Call, head: _Head, ex: Exchange) -> _Relay:
    """The head, framed anew, and the pieces that came with it: one write to the client."""
    parts = head.parts
    chunked = head.content_length is None
    if head.content_length is None:
        parts.append(b"transfer-encoding: chunked\r\n\r\n")
    else:
        parts.append(b"content-length: " + head.content_length + b"\r\n\r\n")
    relay = _Relay(conn, chunked, head.sse, call.strip_usage and head.sse)
    for piece in ex.buffered:
        piece = relay.screen(piece)
        if not piece:
            continue
        if relay.sse:
            relay.count_events(piece)
        relay.nbytes += len(piece)
        parts.append(http11.chunk(piece) if chunked else piece)
    relay.flush()  # stamps their events, if any: they came with (or just after) the head
    ex.buffered = []
    conn.write(b"".join(parts))
    return relay


def _settle(conn: ClientConnection, t: Try, upc: UpstreamConnection, ex: Exchange) -> None:
    """After a committed answer: its connection back to the pool when the exchange is whole
    and the client is still there, dropped when the answer did not end."""
    conn.upstream = None
    if ex.complete and ex.keep_alive and not conn.closed:
        t.pool.release(upc)
    elif not ex.complete:
        upc.abort()


def _stream_outcome(
    conn: ClientConnection, backend: Backend, err: UpstreamError | None, status: int
) -> str:
    if err is None:
        return "client_closed" if conn.closed else _OUTCOME[status // 100]
    if conn.closed:
        return "client_closed"
    # No second answer: the error event (if SSE) was the last thing sent.
    conn.close()
    if err.reason == Failure.TOTAL:
        # A long answer, not a broken backend: the breaker is not charged.
        return "timeout"
    backend.on_failure(time.monotonic())
    return "stream_error"


def _streams(ex: Exchange, head: _Head) -> bool:
    """A 2xx SSE answer still coming, chunked: what a resumable stream needs."""
    return 200 <= ex.status < 300 and head.sse and not ex.complete and head.content_length is None


class _ResumeRelay(_Relay):
    """The relay of a resumable stream: the backend's bytes go through `Resume.feed` (whole
    events, re-written) and a failure is kept for the fallback loop instead of ending the
    client's stream."""

    __slots__ = ("failure", "resume")

    def __init__(self, conn: ClientConnection, resume: Resume) -> None:
        super().__init__(conn, True, True)
        self.resume = resume
        self.failure: UpstreamError | None = None

    def sink(self, data: bytes | None, err: UpstreamError | None) -> None:
        if self.conn.closed:
            return
        resume = self.resume
        if data is not None:
            out = resume.feed(data)
            if out:
                _Relay.sink(self, out, None)
        elif err is None and resume.done:
            _Relay.sink(self, None, None)
        else:
            if err is None:
                what = resume.error or "the stream ended before [DONE]"
                err = UpstreamError(Failure.STATUS_5XX, f"the backend failed mid-stream: {what}")
            self.failure = err
            self.flush()


async def _commit_resumable(
    conn: ClientConnection,
    call: Call,
    t: Try,
    head: _Head,
    log: AccessLog,
    resume: Resume,
    ttfb: float,
) -> Attempt | None:
    """The first answer of a resumable stream: its head goes to the client once."""
    resume.committed = True
    resume.ttfb = ttfb
    resume.relay = _ResumeRelay(conn, resume)
    head.parts.append(b"transfer-encoding: chunked\r\n\r\n")
    conn.write(b"".join(head.parts))
    return await _stream_resumable(conn, call, t, log, resume)


async def _continue(
    conn: ClientConnection, call: Call, t: Try, log: AccessLog, resume: Resume
) -> Attempt | None:
    """The head of a continuation: relay it into the client's stream, or fail the attempt
    (a 429 or 5xx: the next route continues; anything else ends the stream)."""
    upc, ex = t.upc, t.ex
    assert upc is not None and ex is not None
    status = ex.status
    head = _read_head(ex, call.req.keep_alive)
    if _streams(ex, head):
        t.backend.on_success()
        resume.resumes += 1
        return await _stream_resumable(conn, call, t, log, resume)
    now = time.monotonic()
    upc.abort()
    conn.upstream = None
    if status == 429:
        t.backend.on_busy(now, head.retry_after or float(call.model.retry_after))
        return Attempt(Failure.STATUS_429, "backend answered 429")
    if status >= 500:
        t.backend.on_failure(now)
        return Attempt(Failure.STATUS_5XX, f"backend answered {status}")
    end_resumed(conn, call, log, t.series, t.backend.key, t.track, f"continuation got {status}")
    return None


async def _stream_resumable(
    conn: ClientConnection, call: Call, t: Try, log: AccessLog, resume: Resume
) -> Attempt | None:
    """Relay one attempt of a resumable stream; an `Attempt` when its backend failed
    before the answer was whole (the fallback loop then continues it elsewhere)."""
    upc, ex = t.upc, t.ex
    assert upc is not None and ex is not None
    relay: _ResumeRelay = resume.relay
    await _pump(conn, call, t, relay)
    failure = relay.failure
    if conn.closed or failure is None:
        outcome = "client_closed" if conn.closed else "success"
        _report_resumed(log, call, t, resume, outcome)
        return None
    if failure.reason == Failure.TOTAL:
        end_resumed(conn, call, log, t.series, t.backend.key, t.track, str(failure), total=True)
        return None
    t.backend.on_failure(time.monotonic())
    if resume.finished:
        # The last token went out: the answer is whole but for its usage block and [DONE].
        conn.write(http11.chunk(resume.ending()) + http11.LAST_CHUNK)
        _report_resumed(log, call, t, resume, "success")
        return None
    return Attempt(failure.reason, str(failure))


async def _pump(conn: ClientConnection, call: Call, t: Try, relay: _ResumeRelay) -> None:
    """The backend's answer through the relay until it ends, fails or the total passes."""
    upc, ex = t.upc, t.ex
    assert upc is not None and ex is not None
    relay.failure = None
    relay.resume.begin()
    for piece in ex.buffered:
        relay.sink(piece, None)
    ex.buffered = []
    relay.flush()
    loop = conn.loop
    done = loop.create_future()
    ex.done = done
    ex.sink = relay.sink
    ex.on_read_done = relay.flush
    if ex.error is not None:
        relay.sink(None, ex.error)
    elif ex.complete:
        relay.sink(None, None)
    if conn.paused:
        upc.pause_reading()
    left = call.t0 + call.model.total_timeout - time.monotonic()
    timer = loop.call_at(loop.time() + max(0.0, left), expire, ex, upc, "total")
    try:
        if not ex.complete and ex.error is None:
            await done
    finally:
        timer.cancel()
    _settle(conn, t, upc, ex)


def _report_resumed(log: AccessLog, call: Call, t: Try, resume: Resume, outcome: str) -> None:
    relay: _ResumeRelay = resume.relay
    ttft, tpot = relay.token_times(call.req.start)
    report(
        log,
        call,
        t.series,
        status=200,
        outcome=outcome,
        backend=t.backend.key,
        track=t.track,
        nbytes=relay.nbytes,
        ttfb=resume.ttfb,
        ttft=ttft if outcome == "success" else None,
        tpot=tpot if outcome == "success" else None,
    )


def end_resumed(
    conn: ClientConnection,
    call: Call,
    log: AccessLog,
    series: Series,
    backend: str,
    track: str,
    detail: str,
    *,
    total: bool = False,
) -> None:
    """A resumable stream nothing could continue: it ends as an unresumed one would, with
    the error event, and the connection closes."""
    resume = call.resume
    assert resume is not None
    if not conn.closed:
        msg = detail if total else f"the backend failed mid-stream: {detail}"
        event = b"data: " + error_body(msg, "server_error", 502) + b"\n\n"
        conn.write(http11.last_chunk(event))
        conn.close()
    relay: _ResumeRelay = resume.relay
    report(
        log,
        call,
        series,
        status=200,
        outcome="timeout" if total else "stream_error",
        backend=backend,
        track=track,
        nbytes=relay.nbytes,
        ttfb=resume.ttfb,
    )
