"""Names, labels and hashes of rendered objects: deterministic and always valid.

An LLMDeployment's name is a DNS subdomain of up to 253 characters, and may contain dots
(`llama-3.1-8b`). Its children need less: Service names are DNS-1035 labels (63 characters,
no dots, starting with a letter) and label values stop at 63 characters. Every child gets
the same name, made valid once here; a name that had to change carries a hash of the
original, so two LLMDeployments never collide.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from llm_operator import kubeformat
from llm_operator.api.v1alpha1 import LLMDeployment
from llm_operator.constants import (
    LABEL_COMPONENT,
    LABEL_DEPLOYMENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_TRACK,
    MANAGED_BY,
)

Track = Literal["stable", "canary"]

MAX_NAME = 63
HASH_LENGTH = 8
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def short_hash(text: str, length: int = HASH_LENGTH) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def dns_label(base: str, suffix: str = "") -> str:
    """`base` + `suffix` as a DNS-1035 label of at most 63 characters. Returned unchanged
    when already valid; otherwise cleaned, trimmed and given a hash of the original."""
    wanted = f"{base}-{suffix}" if suffix else base
    if len(wanted) <= MAX_NAME and _DNS_1035.match(wanted):
        return wanted
    cleaned = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = "m-" + cleaned if cleaned else "m"
    tail = f"-{suffix}" if suffix else ""
    digest = short_hash(wanted)
    room = MAX_NAME - len(tail) - len(digest) - 1
    trimmed = cleaned[:room].rstrip("-")
    return f"{trimmed}-{digest}{tail}"


def label_value(value: str) -> str:
    """`value` as a label value (at most 63 characters), hashed when it has to be trimmed."""
    if len(value) <= MAX_NAME and _LABEL_VALUE.match(value):
        return value
    digest = short_hash(value)
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)
    trimmed = cleaned[: MAX_NAME - len(digest) - 1].strip("-_.")
    return f"{trimmed}-{digest}" if trimmed else digest


def llmd_name(llmd: LLMDeployment) -> str:
    return llmd.metadata.name or "llmdeployment"


def object_name(llmd: LLMDeployment, track: Track = "stable") -> str:
    """Name of the Deployment (and of the Service, HPA and PDB for the stable track); the
    canary track's is the stable name plus `-canary`."""
    stable = dns_label(llmd_name(llmd))
    if track == "stable":
        return stable
    return dns_label(stable, "canary")


def selector_labels(llmd: LLMDeployment, track: Track = "stable") -> dict[str, str]:
    """The labels that select one track's pods. Deliberately few: a Deployment's selector
    is immutable, so nothing that a spec edit can change belongs here."""
    return {LABEL_DEPLOYMENT: label_value(llmd_name(llmd)), LABEL_TRACK: track}


def common_labels(
    llmd: LLMDeployment, component: str, track: Track | None = None
) -> dict[str, str]:
    """The labels of DESIGN.md, on every child; `track` only on per-track objects."""
    labels = {
        LABEL_NAME: llmd.spec.engine.kind,
        LABEL_INSTANCE: label_value(llmd_name(llmd)),
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_DEPLOYMENT: label_value(llmd_name(llmd)),
    }
    if track is not None:
        labels[LABEL_TRACK] = track
    return labels


def content_hash(obj: Any) -> str:
    """A stable hash of JSON-ready data (key order does not matter)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return short_hash(canonical, 16)


def object_metadata(
    llmd: LLMDeployment,
    name: str,
    labels: dict[str, str],
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """metadata of a child: its name, the LLMDeployment's namespace, labels, annotations,
    and an ownerReference to the LLMDeployment once it has a uid (so garbage collection
    removes children with it; a spec read from a file has none, and gets none)."""
    metadata: dict[str, Any] = {"name": name}
    if llmd.metadata.namespace:
        metadata["namespace"] = llmd.metadata.namespace
    metadata["labels"] = labels
    if annotations:
        metadata["annotations"] = annotations
    if llmd.metadata.uid:
        metadata["ownerReferences"] = [owner_reference(llmd)]
    return metadata


def owner_reference(llmd: LLMDeployment) -> dict[str, Any]:
    """The controller ownerReference children carry (needs metadata.uid)."""
    if not llmd.metadata.uid:
        raise ValueError("an ownerReference needs the LLMDeployment's metadata.uid")
    uid = llmd.metadata.uid
    return kubeformat.owner_reference(llmd.api_version, llmd.kind, llmd_name(llmd), uid)
