"""The check before a new pod template replaces one that serves."""

from __future__ import annotations

from typing import Any

from llm_operator.preflight import Needs, cannot_start, needs, replaces_serving_template


def deployment(pod: dict[str, Any], available: int | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "kind": "Deployment",
        "metadata": {"name": "chat"},
        "spec": {"template": {"metadata": {"labels": {"a": "b"}}, "spec": pod}},
    }
    if available is not None:
        obj["status"] = {"availableReplicas": available}
    return obj


POD = {
    "initContainers": [
        {"name": "fetch", "envFrom": [{"secretRef": {"name": "s3"}}]},
    ],
    "containers": [
        {
            "name": "vllm",
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                {
                    "name": "OPTIONAL",
                    "valueFrom": {"secretKeyRef": {"name": "maybe", "key": "x", "optional": True}},
                },
                {"name": "PLAIN", "value": "1"},
            ],
        }
    ],
    "volumes": [
        {
            "name": "tls",
            "secret": {"secretName": "tls", "items": [{"key": "tls.crt", "path": "c"}]},
        },
        {"name": "all", "projected": {"sources": [{"secret": {"name": "bundle"}}]}},
        {"name": "cache", "emptyDir": {}},
    ],
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
}


def test_needs_lists_every_required_secret_and_key_and_the_node_labels() -> None:
    wanted = needs(deployment(POD))
    assert wanted.secret_keys == (
        ("bundle", None),
        ("hf", "token"),
        ("s3", None),
        ("tls", "tls.crt"),
    )
    assert wanted.secrets == ["bundle", "hf", "s3", "tls"]
    assert wanted.node_selector == (("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"),)


def test_what_exists_passes() -> None:
    wanted = needs(deployment(POD))
    found = {
        "bundle": frozenset({"a"}),
        "hf": frozenset({"token"}),
        "s3": frozenset(),
        "tls": frozenset({"tls.crt", "tls.key"}),
    }
    assert cannot_start(wanted, found, nodes_match=True) is None
    assert cannot_start(wanted, found, nodes_match=None) is None


def test_a_missing_secret_a_missing_key_and_no_matching_node_are_each_said() -> None:
    wanted = needs(deployment(POD))
    found = {"bundle": frozenset(), "hf": frozenset({"other"}), "s3": None, "tls": None}
    message = cannot_start(wanted, found, nodes_match=False)
    assert message is not None
    assert "Secret s3 does not exist" in message
    assert "Secret tls does not exist" in message
    assert "Secret hf has no key token" in message
    assert "no node has the labels nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3" in message
    assert "keeps serving" in message
    # A Secret that does not exist is said once, not once more per key.
    assert "tls has no key" not in message


def test_only_a_template_change_of_a_serving_deployment_is_checked() -> None:
    old = deployment(POD, available=1)
    edited_pod = {**POD, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-B200"}}
    assert replaces_serving_template(deployment(edited_pod), old)
    assert not replaces_serving_template(deployment(POD), old)  # replicas, labels: no new pods
    assert not replaces_serving_template(deployment(edited_pod), deployment(POD, available=0))
    assert not replaces_serving_template(deployment(edited_pod), None)
    service = {"kind": "Service", "spec": {"template": {}}}
    assert not replaces_serving_template(service, old)


def test_empty_needs_never_block() -> None:
    assert cannot_start(Needs((), ()), {}, nodes_match=None) is None
