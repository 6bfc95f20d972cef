"""Kubernetes wire formats, without I/O: quantities, RFC 3339 times, owner references."""

from __future__ import annotations

import datetime
from decimal import Decimal, InvalidOperation, Overflow
from typing import Any

_SUFFIXES: dict[str, int | Decimal] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip


def quantity(value: Any) -> Decimal | None:
    """A Kubernetes quantity as a number (the API server rewrites 4 as "4", 0.5 as "500m");
    None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    text = str(value).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            number, multiplier = text[: -len(suffix)], Decimal(_SUFFIXES[suffix])
            break
    else:
        number, multiplier = text, Decimal(1)
    try:
        return Decimal(number) * multiplier
    except (InvalidOperation, Overflow):
        # Overflow too: a hex hash such as "0123456e78901234" reads as a huge exponent.
        return None


def rfc3339_now() -> str:
    """Now, as the API's timestamps are written (UTC, whole seconds)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339(epoch_seconds: float) -> str:
    """A Unix time as the API writes timestamps (UTC, whole seconds)."""
    moment = datetime.datetime.fromtimestamp(epoch_seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Any) -> datetime.datetime | None:
    """An API timestamp (RFC 3339) as an aware datetime; None when it is not one."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def parse_rfc3339(text: Any) -> float | None:
    """An API timestamp as a Unix time; None when it is not one."""
    moment = parse_time(text)
    return None if moment is None else moment.timestamp()


def owner_reference(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    """The controller ownerReference a child carries."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
