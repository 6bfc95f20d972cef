"""Drill: bad input (issue 17). Generated LLMDeployments against the real API server and the
running operator.

The specs come from the CRD's own openAPIV3Schema (hypothesis-jsonschema), then one in two gets
an edge value dropped somewhere in it (huge and tiny numbers, empty and very long strings,
unicode, a wrong type), and the names range from one letter to the 253 characters the API
server allows. Each one is either

- rejected by the API server with a message that names the field (``spec.x.y`` or
  ``metadata.name``), or
- accepted, and then reconciled by the operator to a status with a phase for its generation;
  when Failed or Degraded a condition says why in words, never Python's (no traceback, no
  "object has no attribute", no NaN).

The operator's log holds no traceback at the end. A second drill edits a Ready LLMDeployment
into specs the operator cannot realize: its Deployment and Service stay (same uid).

``LLMOP_DRILL_INPUT_EXAMPLES`` sets the count: 100 by default (``make test``), 1000 under
``make chaos``. Figures go to bench/results/reliability.md (printed with -s).
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import _from_schema, from_schema
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube
from test_operator import SPEC, OperatorProcess, children, create, custom, get, wait_ready

pytestmark = pytest.mark.drill


class _Many:
    """The ``many.more()``/``reject()`` protocol hypothesis-jsonschema 0.23 draws objects with.

    Hypothesis 6.170 replaced it with an iterator (``for _ in many(...)``), so the generator
    fails with "'many' object has no attribute 'more'"; this stands in for the old one.
    """

    def __init__(self, data: Any, min_size: int, max_size: float, average_size: float) -> None:
        self.data, self.min_size, self.max_size = data, min_size, max_size
        spread = max(average_size - min_size, 0.0)
        self.p_continue = spread / (spread + 1) if spread else 0.0
        self.count = 0
        self.rejections = 0

    def more(self) -> bool:
        if self.count < self.min_size:
            go = True
        elif self.count >= self.max_size or self.rejections > 20:
            go = False
        else:
            go = bool(self.data.draw_boolean(self.p_continue))
        self.count += go
        return go

    def reject(self) -> None:
        self.count -= 1
        self.rejections += 1


_from_schema.cu = type("cu", (), {"many": _Many})  # type: ignore[attr-defined,assignment]

GROUP, VERSION, PLURAL = "llmoperator.io", "v1alpha1", "llmdeployments"
REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "llmdeployments.llmoperator.io.yaml"
EXAMPLES = int(os.environ.get("LLMOP_DRILL_INPUT_EXAMPLES", "100"))
#: Words of Python, not of a person: a status carrying one leaked an exception.
PYTHON_TEXT = re.compile(
    r"Traceback|object has no attribute|\bNaN\b|\bnan\b|\binf\b|NoneType|KeyError|TypeError|"
    r"ValueError|IndexError|unsupported operand|invalid literal|not subscriptable"
)
#: The API server names the field it refuses: spec.resources.cpu, metadata.name, ...
FIELD = re.compile(r"\b(spec(\.[A-Za-z][\w\[\]]*)+|spec|metadata\.name)\b")

EDGE_VALUES: list[Any] = [
    1e308, -1e308, 1e-300, -1, 0, 2**63, 2**53 + 1, 1.5, "", " ", "0", "-0", "1e400",
    "\u00e9\u4e2d\U0001f680", "\u202eRTL", "a" * 4096, "x" * 70_000, True, [], {},
]  # fmt: skip

#: Models the sizing catalog knows: with a generated name every spec stops at "not in the
#: built-in catalog", and the rest of the operator (render, apply, status) is never reached.
KNOWN_MODELS = ["Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"]

NAMES = st.one_of(
    st.from_regex(r"\A[a-z]([-a-z0-9]{0,20}[a-z0-9])?\Z"),
    st.from_regex(r"\A[a-z]([-a-z0-9]{0,20}[a-z0-9])?\Z"),
    st.from_regex(r"\A[a-z]([-a-z0-9]{0,20}[a-z0-9])?\Z"),
    st.just("m"),
    st.just("a" * 63),
    st.just("a" * 64),
    st.just("b" * 253),
    st.just("dotted.name.x"),
    st.just("9starts-with-digit"),
    st.just("UPPER"),
    st.just("under_score"),
    st.just("-lead"),
)


def to_json_schema(node: Any) -> Any:
    """The CRD's structural schema as plain JSON Schema (draft 4) for hypothesis-jsonschema."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "description":
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(child) for name, child in value.items()}
        else:
            out[key] = to_json_schema(value)
    if node.get("x-kubernetes-int-or-string"):
        return {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 16}]}
    if node.get("x-kubernetes-preserve-unknown-fields") and "type" not in node:
        return {}
    # The API server prunes unknown fields (structural schema): generating them is waste.
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    # Small objects: the generator would otherwise spend its budget on lists of 100 items.
    if out.get("type") == "array":
        out["maxItems"] = min(int(out.get("maxItems", 3)), 3)
    if out.get("type") == "string" and "pattern" not in out and "enum" not in out:
        out["maxLength"] = min(int(out.get("maxLength", 64)), 64)
    return out


def spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return to_json_schema(root["properties"]["spec"])  # type: ignore[no-any-return]


def tame(spec: dict[str, Any]) -> dict[str, Any]:
    """Replica counts capped at 2: 1,000 objects asking for 1,000 pods each would test kwok."""
    for key in ("replicas",):
        if isinstance(spec.get(key), int) and spec[key] > 2:
            spec[key] = 2
    scaling = spec.get("autoscaling")
    if isinstance(scaling, dict):
        for key in ("minReplicas", "maxReplicas"):
            if isinstance(scaling.get(key), int) and scaling[key] > 2:
                scaling[key] = 2
    return spec


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += paths(value, (*prefix, index))
    return found


def put(spec: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = spec
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


def generate(count: int) -> list[tuple[str, dict[str, Any], str]]:
    """``count`` (name, spec, what was done) triples, deterministic for one CRD."""
    out: list[tuple[str, dict[str, Any], str]] = []

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        name=NAMES,
        spec=from_schema(spec_schema()),
        known=st.sampled_from([None, *KNOWN_MODELS, *KNOWN_MODELS]),
        edge=st.one_of(st.none(), st.tuples(st.integers(0, 10_000), st.sampled_from(EDGE_VALUES))),
    )
    def collect(
        name: str, spec: dict[str, Any], known: str | None, edge: tuple[int, Any] | None
    ) -> None:
        spec = tame(copy.deepcopy(spec))
        if known is not None:
            spec["model"]["name"] = known
        how = "schema"
        where = paths(spec)
        if edge is not None and where:
            path = where[edge[0] % len(where)]
            put(spec, path, edge[1])
            shown = repr(edge[1]) if len(repr(edge[1])) < 40 else f"{repr(edge[1])[:20]}..."
            how = f"{'.'.join(map(str, path))}={shown}"
        out.append((name, spec, how))

    collect()
    return out


def body(name: str, spec: dict[str, Any], index: int) -> dict[str, Any]:
    # The index keeps names unique; long names keep their length (63, 64, 253 characters).
    if len(name) >= 63:
        unique = f"{name[: len(name) - len(str(index))]}{index}"
    else:
        unique = f"{name}-{index}"
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": unique},
        "spec": spec,
    }


def reason(err: ApiException) -> str:
    try:
        return str(json.loads(err.body or "").get("message", err.body))
    except (TypeError, ValueError):
        return str(err.body)


def settled(api: client.ApiClient, namespace: str, names: set[str]) -> dict[str, dict[str, Any]]:
    """The accepted objects whose status is for their generation, by name."""
    listed: dict[str, Any] = custom(api).list_namespaced_custom_object(  # type: ignore[assignment]
        GROUP, VERSION, namespace, PLURAL
    )
    done = {}
    for item in listed["items"]:
        status = item.get("status") or {}
        if (
            item["metadata"]["name"] in names
            and status.get("phase")
            and (status.get("observedGeneration") == item["metadata"]["generation"])
        ):
            done[item["metadata"]["name"]] = item
    return done


def human(item: dict[str, Any]) -> list[str]:
    """What is wrong with the status of a settled object, in words ([] when nothing)."""
    status = item["status"]
    problems = []
    text = json.dumps(status)
    if PYTHON_TEXT.search(text):
        problems.append(f"Python in the status: {PYTHON_TEXT.search(text)}: {text[:600]}")
    if status["phase"] in ("Failed", "Degraded"):
        said = [c.get("message") for c in status.get("conditions", []) if c.get("message")]
        if not said:
            problems.append(f"{status['phase']} with no message: {text[:600]}")
    return problems


def test_generated_llmdeployments_are_refused_clearly_or_reconciled(
    cluster: Any, api_client: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    cases = generate(EXAMPLES)
    generated_s = time.monotonic() - started
    operator = OperatorProcess(cluster, namespace, tmp_path / "operator.log")
    accepted: dict[str, str] = {}
    refused: list[tuple[str, str]] = []
    unclear: list[str] = []
    try:
        for index, (name, spec, how) in enumerate(cases):
            manifest = body(name, spec, index)
            try:
                create(api_client, namespace, manifest)
            except ApiException as err:
                message = reason(err)
                refused.append((how, message))
                if err.status not in (400, 422) or not FIELD.search(message):
                    unclear.append(f"{how}: HTTP {err.status} {message[:400]}")
                continue
            accepted[manifest["metadata"]["name"]] = how
        created_s = time.monotonic() - started - generated_s

        names = set(accepted)
        budget = 60 + 0.5 * len(names)
        deadline = time.monotonic() + budget
        done: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            done = settled(api_client, namespace, names)
            if len(done) == len(names):
                break
            assert operator.process.poll() is None, "the operator exited during the drill"
            time.sleep(2)
        settle_s = time.monotonic() - started - generated_s - created_s
        missing = sorted(names - set(done))
        problems = [f"{n} ({accepted[n]}): {p}" for n, item in done.items() for p in human(item)]
        phases: dict[str, int] = {}
        for item in done.values():
            phases[item["status"]["phase"]] = phases.get(item["status"]["phase"], 0) + 1
    finally:
        operator.stop()
    log = operator.log_path.read_text()
    tracebacks = log.count("Traceback")
    print(
        f"\nbad-input drill: {len(cases)} generated ({generated_s:.0f} s), {len(refused)} refused "
        f"by the API server ({len(unclear)} unclear), {len(accepted)} accepted, "
        f"{len(done)} reconciled in {settle_s:.0f} s, phases {phases}, {len(problems)} "
        f"unclear statuses, {tracebacks} tracebacks; created in {created_s:.0f} s"
    )
    said: dict[str, int] = {}
    for item in done.values():
        for c in item["status"].get("conditions", []):
            if (
                c.get("message")
                and c.get("type") in ("Ready", "Degraded")
                and c["status"] != "False"
            ):
                key = re.sub(r"\d+", "N", c["message"])[:90]
                said[key] = said.get(key, 0) + 1
    print(
        "  statuses said: "
        + "; ".join(f"{n}x {m}" for m, n in sorted(said.items(), key=lambda x: -x[1])[:12])
    )
    for n, item in done.items():
        if os.environ.get("LLMOP_DRILL_VERBOSE") and item["status"]["phase"] != "Failed":
            print(
                "  ",
                n[:30],
                item["status"]["phase"],
                [c.get("message", "")[:100] for c in item["status"].get("conditions", [])],
            )
    print("  refusals: " + "; ".join(sorted({m[:120] for _, m in refused})[:8]))
    assert not unclear, "refusals that name no field:\n" + "\n".join(unclear[:20])
    assert not missing, "never reconciled: " + ", ".join(
        f"{n} ({accepted[n]})" for n in missing[:20]
    )
    assert not problems, "\n".join(problems[:20])
    assert tracebacks == 0, log[log.index("Traceback") - 2000 :][:6000]


#: Edits the API server accepts but no cluster can realize: the running model must stay.
#: The last item: the Degraded reason expected when it is the operator's preflight that holds
#: the new revision back (llm_operator/preflight.py); None where the planner refuses it.
UNREALIZABLE: list[tuple[str, dict[str, Any], str | None]] = [
    (
        "a GPU no node has",
        {"resources": {"gpu": {"product": "NVIDIA-NOPE-1GB"}}},
        "RevisionCannotStart",
    ),
    ("model too large", {"model": {"architecture": {"parameters": 1.0e15}}}, None),
    ("tiny GPU", {"resources": {"gpu": {"memoryGiB": 0.001}}}, None),
    (
        "missing token secret",
        {"model": {"tokenSecretRef": {"name": "absent", "key": "HF_TOKEN"}}},
        "RevisionCannotStart",
    ),
]
#: Edits the API server refuses: nothing changes at all.
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("memory not a quantity", {"resources": {"memory": "1.2.3"}}),
    ("negative replicas", {"replicas": -1}),
    ("tensor beyond the node", {"parallelism": {"tensor": 64}}),
    ("parameters 1e308", {"model": {"architecture": {"parameters": 1e308}}}),
]


def test_an_invalid_edit_never_tears_down_a_running_model(
    cluster: Any, api_client: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    operator = OperatorProcess(cluster, namespace, tmp_path / "operator.log")
    try:
        # The default rollout (maxSurge 0, maxUnavailable 1: no spare GPU assumed), under which
        # any new revision that reached the Deployment would replace the only pod first: the
        # operator must hold back a revision that could never start.
        running = copy.deepcopy(SPEC)
        assert "rollout" not in running["spec"]
        create(api_client, namespace, running)
        wait_ready(api_client, namespace, "qwen")
        before = children(api_client, namespace, "qwen")
        uids = {o.metadata.uid for kind in before.values() for o in kind}
        assert len(uids) == 2
        seen = []
        for what, edit in REFUSED:
            with pytest.raises(ApiException) as refused:
                custom(api_client).patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, "qwen", {"spec": edit}
                )
            assert refused.value.status == 422 and FIELD.search(reason(refused.value)), what
        for what, edit, held_by in UNREALIZABLE:
            good = get(api_client, namespace, "qwen")["spec"]
            custom(api_client).patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "qwen", {"spec": edit}
            )
            generation = get(api_client, namespace, "qwen")["metadata"]["generation"]

            def observed(generation: int = generation) -> dict[str, Any] | None:
                item = get(api_client, namespace, "qwen")
                ok = (item.get("status") or {}).get("observedGeneration") == generation
                return item if ok else None

            item = kube.wait_until(f"the operator to see {what}", observed, timeout=60)
            after = children(api_client, namespace, "qwen")
            now = {o.metadata.uid for kind in after.values() for o in kind}
            assert uids <= now, f"{what}: children torn down ({uids - now} gone)"
            dep = after["Deployment"][0]
            seen.append(f"{what}: {item['status']['phase']}, {dep.status.ready_replicas} ready")
            assert dep.spec.replicas >= 1 and (dep.status.ready_replicas or 0) >= 1, seen[-1]
            assert not human(item), human(item)
            if held_by is not None:
                degraded = next(c for c in item["status"]["conditions"] if c["type"] == "Degraded")
                assert degraded["reason"] == held_by, (what, degraded)
                assert dep.metadata.generation == before["Deployment"][0].metadata.generation, (
                    f"{what}: the Deployment was changed"
                )
            # Back to the good spec (a JSON merge patch cannot remove keys by replacing).
            custom(api_client).replace_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "qwen", {**item, "spec": good}
            )
            wait_ready(api_client, namespace, "qwen")
    finally:
        operator.stop()
    log = operator.log_path.read_text()
    print("\ninvalid edits of a Ready model: " + "; ".join(seen))
    assert "Traceback" not in log, log[-4000:]
