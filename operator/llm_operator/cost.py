"""GPU cost per LLMDeployment (pure): GPU-seconds from the engine pods' run time, tokens from
their counters, and the price of a million tokens.

Run time is read from the pods themselves (status.startTime, when the kubelet admitted the
pod and its devices were allocated, to the last container's finishedAt, or the last time the
operator saw the pod): the Deployment's status only counts replicas, and a GPU is held by a
pod that is not Ready yet (loading weights) as much as by one that serves. GPUs per pod are
the pod's own limits of a `*/gpu` resource, which is what the plan asked for and what the
scheduler allocated, canary pods included.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_operator.kubeformat import parse_rfc3339

#: How often a changed cost may be written to status at most (a pod starting or stopping
#: writes at once): the metric grows every check, status must not churn.
STATUS_INTERVAL_SECONDS = 600.0


def gpus_of(pod: Mapping[str, Any]) -> int:
    """GPUs the pod holds: its containers' limits of any `<vendor>/gpu` resource."""
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        limits = (container.get("resources") or {}).get("limits") or {}
        for name, value in limits.items():
            if name.endswith("/gpu"):
                total += int(str(value))
    return total


@dataclass(frozen=True)
class PodRun:
    uid: str
    start: float
    end: float | None
    """When its last container finished (phase Succeeded or Failed); None while it runs."""
    gpus: int


def pod_run(pod: Mapping[str, Any]) -> PodRun | None:
    """The pod's run, or None before the kubelet started it (pending pods hold no GPU)."""
    status = pod.get("status") or {}
    start = parse_rfc3339(status.get("startTime"))
    if start is None:
        return None
    end = None
    if status.get("phase") in {"Succeeded", "Failed"}:
        finished = [
            parse_rfc3339((s.get("state") or {}).get("terminated", {}).get("finishedAt"))
            for s in status.get("containerStatuses") or []
        ]
        end = max((f for f in finished if f is not None), default=start)
    return PodRun(str(pod["metadata"]["uid"]), start, end, gpus_of(pod))


@dataclass
class Ledger:
    """One LLMDeployment's account since the operator started keeping it here.

    `base_*` and `counted_from` come from the status last written (updatedAt): after an
    operator restart, pods are counted from that moment on, so nothing is counted twice.
    """

    base_gpu_seconds: float = 0.0
    base_tokens: float = 0.0
    counted_from: float = 0.0
    closed: float = 0.0
    tokens: float = 0.0
    runs: dict[str, tuple[PodRun, float]] = field(default_factory=dict)
    """Pods seen, with when each was last seen."""
    token_last: dict[str, float] = field(default_factory=dict)

    def _seconds(self, run: PodRun, until: float) -> float:
        end = until if run.end is None else min(run.end, until)
        return max(0.0, end - max(run.start, self.counted_from)) * run.gpus

    def observe_pods(self, runs: Iterable[PodRun], now: float) -> bool:
        """Record the pods listed now; a pod gone since counts until it was last seen.
        True when a pod started or stopped (a reason to write status at once)."""
        current = {run.uid: run for run in runs if run.end is None or run.end > self.counted_from}
        changed = False
        for uid, (run, seen) in list(self.runs.items()):
            ended = current.get(uid)
            if ended is None or ended.end is not None:
                final = ended or run
                self.closed += self._seconds(final, seen if final.end is None else final.end)
                del self.runs[uid]
                self.token_last.pop(uid, None)
                current.pop(uid, None)
                changed = True
        for uid, run in current.items():
            if run.end is not None:
                continue  # started and finished between two looks: counted once, here
            changed = changed or uid not in self.runs
            self.runs[uid] = (run, now)
        return changed

    def observe_tokens(self, uid: str, counter: float) -> None:
        """A pod's token counter now. A pod first seen after counting began served all its
        tokens in the count; one already running when it began counts from now. A counter
        lower than before is a restarted container: all of it is new."""
        entry = self.runs.get(uid)
        if entry is None:
            return
        last = self.token_last.get(uid)
        if last is None:
            last = 0.0 if entry[0].start >= self.counted_from else counter
        self.tokens += counter if counter < last else counter - last
        self.token_last[uid] = counter

    def gpu_seconds(self, now: float) -> float:
        # A copy: the metrics server's thread calls this while the loop may change `runs`.
        live = sum(self._seconds(run, now) for run, _ in list(self.runs.values()))
        return self.base_gpu_seconds + self.closed + live

    def total_tokens(self) -> float:
        return self.base_tokens + self.tokens


def per_million_tokens(gpu_seconds: float, tokens: float, gpu_hour_price: float) -> float | None:
    """What a million tokens cost at this price per GPU-hour; None before any token."""
    if tokens <= 0:
        return None
    return gpu_seconds / 3600.0 * gpu_hour_price / tokens * 1_000_000


def cost_status(
    *,
    gpu_seconds: float,
    tokens: float,
    gpu_hour_price: float | None,
    counted_since: str,
    updated_at: str,
) -> dict[str, Any]:
    """status.cost as written."""
    out: dict[str, Any] = {
        "gpuSeconds": round(gpu_seconds, 1),
        "tokens": int(tokens),
        "countedSince": counted_since,
        "updatedAt": updated_at,
    }
    if gpu_hour_price is not None:
        out["gpuHourPrice"] = gpu_hour_price
        per_million = per_million_tokens(gpu_seconds, tokens, gpu_hour_price)
        if per_million is not None:
            out["perMillionTokens"] = round(per_million, 6)
    return out


def status_due(
    previous: Mapping[str, Any] | None,
    gpu_seconds: float,
    tokens: float,
    *,
    pods_changed: bool,
    now: float,
    interval_seconds: float,
) -> bool:
    """Whether status.cost should be written now: the numbers moved, and a pod started or
    stopped, or it was never written, or the interval has passed since the last write. (The
    loop also waits an interval after its own start: no burst of writes at start-up.)"""
    previous = previous or {}
    seconds_moved = round(gpu_seconds, 1) != previous.get("gpuSeconds", 0.0)
    moved = seconds_moved or int(tokens) != previous.get("tokens", 0)
    if not moved:
        return False
    last = parse_rfc3339(previous.get("updatedAt"))
    if pods_changed or last is None:
        return True
    return now - last >= interval_seconds


# -- the `llm-operator cost` table ------------------------------------------------------------

COLUMNS = ("namespace", "name", "gpus", "gpuHours", "tokens", "gpuHourPrice", "perMillionTokens")


def cost_rows(llmds: Sequence[Mapping[str, Any]], price: float | None) -> list[dict[str, Any]]:
    """One row per LLMDeployment from its status; `price` (a GPU-hour) replaces the one
    the operator used, when given."""
    rows = []
    for obj in llmds:
        status = obj.get("status") or {}
        cost = status.get("cost") or {}
        seconds = float(cost.get("gpuSeconds") or 0.0)
        tokens = int(cost.get("tokens") or 0)
        used = price if price is not None else cost.get("gpuHourPrice")
        per_million = None if used is None else per_million_tokens(seconds, tokens, float(used))
        rows.append(
            {
                "namespace": obj["metadata"]["namespace"],
                "name": obj["metadata"]["name"],
                "gpus": (status.get("gpusPerReplica") or 0) * (status.get("replicas") or 0),
                "gpuHours": round(seconds / 3600.0, 4),
                "tokens": tokens,
                "gpuHourPrice": used,
                "perMillionTokens": None if per_million is None else round(per_million, 4),
            }
        )
    return sorted(rows, key=lambda r: (r["namespace"], r["name"]))


def format_rows(rows: Sequence[Mapping[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps(list(rows), indent=2) + "\n"
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if r[k] is None else r[k]) for k in COLUMNS} for r in rows)
        return buffer.getvalue()
    headers = ["NAMESPACE", "NAME", "GPUS", "GPU-HOURS", "TOKENS", "$/GPU-HOUR", "$/1M TOKENS"]
    table = [headers]
    for namespace in sorted({r["namespace"] for r in rows}):
        part = [r for r in rows if r["namespace"] == namespace]
        for r in part:
            table.append(["-" if r[k] is None else str(r[k]) for k in COLUMNS])
        hours = sum(r["gpuHours"] for r in part)
        table.append(
            [namespace, "(total)", "", f"{hours:.4f}", str(sum(r["tokens"] for r in part)), "", ""]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in table
    )
