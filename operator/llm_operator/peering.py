"""kopf's peering rule, for the operator's own loops (pure).

kopf pauses its handlers while a live peer outranks this process in the peering object's
status, but the loops the operator runs beside kopf (progress-based liveness, GPU cost) are
not kopf's: they read the same peering object and apply the same rule, so a standby replica
neither restarts stalled pods nor writes cost while the active one does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm_operator.kubeformat import parse_rfc3339


def outranked(status: Mapping[str, Any] | None, identity: str, priority: int, now: float) -> bool:
    """True when kopf would pause this peer: another live peer has a higher priority, or the
    same one (kopf then pauses every peer of that priority). A peer is live until its
    `lastseen` plus `lifetime` seconds; an entry that cannot be read counts as live, so a
    malformed status never lets two replicas act at once."""
    for peer_id, info in (status or {}).items():
        if peer_id == identity:
            continue
        if not isinstance(info, Mapping):
            return True
        try:
            peer_priority = int(info.get("priority", 0))
            lifetime = float(info.get("lifetime", 60))
        except (TypeError, ValueError):
            return True
        lastseen = parse_rfc3339(info.get("lastseen"))
        if lastseen is not None and lastseen + lifetime < now:
            continue  # dead: kopf ignores it (and cleans it up)
        if peer_priority >= priority:
            return True
    return False


def peering_path(name: str, namespace: str | None) -> str:
    """The peering object kopf uses: a ClusterKopfPeering when cluster-wide, else a
    KopfPeering in each watched namespace."""
    if namespace is None:
        return f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}"
    return f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/{name}"
