"""HTTP/1.1 wire pieces shared by the gateway's client side and the vLLM simulator.

Both hand-write their servers on asyncio protocols and httptools (aiohttp's per-request
overhead is what each of them exists to avoid, see their module docstrings); what they
write on the wire is the same and lives here: status lines, complete responses,
`100 Continue`, chunk framing, and the socket option. The connection classes stay apart:
the gateway's forwards raw header lines and counts head bytes, the simulator's hands
decoded exchanges to handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from http import HTTPStatus

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"

_REASONS: dict[int, bytes] = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
    431: b"Request Header Fields Too Large",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def reason(status: int) -> bytes:
    """The reason phrase of `status` (cached: the gateway writes one per proxied answer)."""
    phrase = _REASONS.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b"Unknown"
        _REASONS[status] = phrase
    return phrase


class _StatusLines(dict[int, bytes]):
    """`HTTP/1.1 <status> <reason>` and CRLF per status, made on first use."""

    def __missing__(self, status: int) -> bytes:
        line = self[status] = b"HTTP/1.1 %d %s\r\n" % (status, reason(status))
        return line


status_line: Callable[[int], bytes] = _StatusLines().__getitem__
"""The status line of `status` (cached: one per proxied answer, and a hit is a dict
subscript, not a Python call)."""


def response(
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    extra: bytes = b"",
    keep_alive: bool = True,
) -> bytes:
    """A complete response with a content-length; `extra` is serialized header lines."""
    return b"".join(
        (
            status_line(status),
            b"content-type: ",
            content_type,
            b"\r\ncontent-length: %d\r\n" % len(body),
            extra,
            b"" if keep_alive else b"connection: close\r\n",
            b"\r\n",
            body,
        )
    )


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(data: bytes) -> bytes:
    """`data` as the final chunk, with the terminating empty chunk, in one write."""
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Small answers and SSE events go out at once, not after Nagle's delay."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
