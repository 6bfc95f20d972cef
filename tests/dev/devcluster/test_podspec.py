"""What the local cluster's pod runner makes of a pod's spec (``devcluster/podspec.py``), with
no cluster: images, ``$(VAR)`` expansion, the environment in a kubelet's order, command lines,
volume files, ports, probe defaults and the crash-loop back-off."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from llm_operator_dev.devcluster import podspec
from llm_operator_dev.devcluster.podspec import ConfigError, EnvSources, Image, ImageError, Probe

KNOWN = podspec.images(Path("/venv/bin"))
NS = "ml"

POD: dict[str, Any] = {
    "metadata": {
        "name": "engine-0",
        "namespace": NS,
        "uid": "0123-4567",
        "labels": {"app": "vllm", "llmoperator.io/track": "canary"},
        "annotations": {"note": "hi"},
    },
    "spec": {"nodeName": "gpu-0", "serviceAccountName": "engine"},
    "status": {
        "podIP": "127.1.1.5",
        "podIPs": [{"ip": "127.1.1.5"}],
        "hostIP": "127.0.0.1",
    },
}


def objects(**by_name: Mapping[str, str]) -> podspec.Lookup:
    """A lookup that only knows objects of the pod's namespace (as the runner's cache)."""
    return lambda namespace, name: by_name.get(name) if namespace == NS else None


def sources(
    configmaps: dict[str, Mapping[str, str]] | None = None,
    secrets: dict[str, Mapping[str, str]] | None = None,
) -> EnvSources:
    return EnvSources(configmaps=objects(**(configmaps or {})), secrets=objects(**(secrets or {})))


def env_of(
    container: dict[str, Any],
    image: Image | None = None,
    srcs: EnvSources | None = None,
    injected: Mapping[str, str] | None = None,
) -> dict[str, str]:
    return podspec.container_env(
        POD, {"name": "c", **container}, image or Image(("x",)), srcs or sources(), injected or {}
    )


# -- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "repo"),
    [
        ("vllm/vllm-openai", "vllm/vllm-openai"),
        ("vllm/vllm-openai:v0.11.0", "vllm/vllm-openai"),
        ("vllm/vllm-openai:latest", "vllm/vllm-openai"),
        ("vllm/vllm-openai@sha256:" + "a" * 64, "vllm/vllm-openai"),
        ("vllm/vllm-openai:v0.11.0@sha256:" + "b" * 64, "vllm/vllm-openai"),
        ("docker.io/vllm/vllm-openai:v0.10.2", "vllm/vllm-openai"),
        ("index.docker.io/vllm/vllm-openai", "vllm/vllm-openai"),
        ("docker.io/library/nginx:1.27", "nginx"),
        ("nginx", "nginx"),
        ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause"),
        ("ghcr.io/llm-operator/llm-operator:0.3.0", "ghcr.io/llm-operator/llm-operator"),
        # A registry's port is not a tag.
        ("localhost:5000/team/app", "localhost:5000/team/app"),
        ("localhost:5000/team/app:v1", "localhost:5000/team/app"),
    ],
)
def test_repository_drops_tags_digests_and_docker_hub_prefixes(image: str, repo: str) -> None:
    assert podspec.repository(image) == repo


@pytest.mark.parametrize(
    ("image", "entrypoint"),
    [
        ("vllm/vllm-openai:v0.11.0", ("vllm", "serve")),
        ("docker.io/vllm/vllm-openai@sha256:" + "c" * 64, ("vllm", "serve")),
        ("ghcr.io/llm-operator/llm-operator:dev", ("llm-operator",)),
        ("registry.k8s.io/pause:3.10", ("/pause",)),
    ],
)
def test_known_images_resolve_at_any_tag(image: str, entrypoint: tuple[str, ...]) -> None:
    assert podspec.resolve_image(KNOWN, image).entrypoint == entrypoint


@pytest.mark.parametrize(
    "image", ["nginx:1.27", "vllm/vllm-openai-rocm:v0.11.0", "quay.io/vllm/vllm-openai", "pause"]
)
def test_an_unknown_image_is_refused_naming_the_known_ones(image: str) -> None:
    with pytest.raises(ImageError) as err:
        podspec.resolve_image(KNOWN, image)
    message = str(err.value)
    assert repr(image) in message
    for repo in ("vllm/vllm-openai", "ghcr.io/llm-operator/llm-operator", "registry.k8s.io/pause"):
        assert repo in message


def test_the_vllm_image_runs_the_simulator_from_the_venv() -> None:
    vllm = KNOWN["vllm/vllm-openai"]
    assert vllm.programs["vllm"] == 'exec /venv/bin/llm-operator sim "$@"'
    assert KNOWN["ghcr.io/llm-operator/llm-operator"].cmd == ("--help",)


# -- $(VAR) expansion -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "1"),
        ("x-$(A)-$(B)-y", "x-1-two-y"),
        ("$(A)$(A)", "11"),
        ("$(MISSING)", "$(MISSING)"),  # undefined: left as it is
        ("$(A)/$(MISSING)", "1/$(MISSING)"),
        ("$$(A)", "$(A)"),  # $$ escapes: no expansion
        ("$$$(A)", "$1"),
        ("$$", "$"),
        ("cost: $5", "cost: $5"),  # a lone $ is not special
        ("$(A", "$(A"),  # unterminated
        ("$A", "$A"),  # shell syntax is not Kubernetes syntax
        ("${A}", "${A}"),
        ("$(DOTTED.NAME-1)", "ok"),
        ("", ""),
    ],
)
def test_expand(text: str, expected: str) -> None:
    env = {"A": "1", "B": "two", "DOTTED.NAME-1": "ok"}
    assert podspec.expand(text, env) == expected


# -- the environment --------------------------------------------------------------------------


def test_env_order_image_injected_envfrom_env() -> None:
    image = Image(("x",), env={"X": "image", "HOME": "/root", "ONLY_IMAGE": "i"})
    srcs = sources(configmaps={"base": {"X": "cm", "Y": "cm-y"}, "pre": {"X": "prefixed"}})
    env = env_of(
        {
            "envFrom": [
                {"configMapRef": {"name": "base"}},
                {"prefix": "P_", "configMapRef": {"name": "pre"}},
            ],
            "env": [
                {"name": "Y", "value": "env-y"},
                {"name": "Z", "value": "$(X)+$(Y)+$(P_X)+$(HOSTNAME)"},
            ],
        },
        image,
        srcs,
        injected={"X": "injected", "HOSTNAME": "engine-0"},
    )
    assert env["ONLY_IMAGE"] == "i"  # the image's, unless overridden
    assert env["HOME"] == "/root"
    assert env["X"] == "cm"  # envFrom overrides the injected, which overrode the image's
    assert env["P_X"] == "prefixed"
    assert env["Y"] == "env-y"  # env overrides envFrom
    assert env["Z"] == "cm+env-y+prefixed+engine-0"  # expanded against what came before
    assert list(env)[:3] == ["X", "HOME", "ONLY_IMAGE"]


def test_env_expands_only_against_earlier_variables() -> None:
    env = env_of(
        {
            "env": [
                {"name": "FIRST", "value": "a"},
                {"name": "USES_LATER", "value": "$(LATER)-$(FIRST)"},
                {"name": "LATER", "value": "b"},
                {"name": "ESCAPED", "value": "$$(FIRST)"},
                {"name": "EMPTY"},
            ]
        }
    )
    assert env["USES_LATER"] == "$(LATER)-a"
    assert env["ESCAPED"] == "$(FIRST)"
    assert env["EMPTY"] == ""


def test_envfrom_secret_with_prefix() -> None:
    srcs = sources(secrets={"hf": {"token": "hf_x", "user": "me"}})
    env = env_of({"envFrom": [{"secretRef": {"name": "hf"}, "prefix": "HF_"}]}, srcs=srcs)
    assert env["HF_token"] == "hf_x"
    assert env["HF_user"] == "me"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.name", "engine-0"),
        ("metadata.namespace", NS),
        ("metadata.uid", "0123-4567"),
        ("metadata.labels['app']", "vllm"),
        ("metadata.labels['llmoperator.io/track']", "canary"),
        ("metadata.labels['absent']", ""),
        ("metadata.annotations['note']", "hi"),
        ("metadata.labels", 'app="vllm"\nllmoperator.io/track="canary"'),
        ("spec.nodeName", "gpu-0"),
        ("spec.serviceAccountName", "engine"),
        ("status.podIP", "127.1.1.5"),
        ("status.podIPs", "127.1.1.5"),
        ("status.hostIP", "127.0.0.1"),
    ],
)
def test_fieldref(path: str, expected: str) -> None:
    env = env_of({"env": [{"name": "V", "valueFrom": {"fieldRef": {"fieldPath": path}}}]})
    assert env["V"] == expected


def test_an_unsupported_fieldref_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unsupported fieldRef 'spec\.containers'"):
        env_of(
            {"env": [{"name": "V", "valueFrom": {"fieldRef": {"fieldPath": "spec.containers"}}}]}
        )


def test_key_refs_read_the_pods_namespace() -> None:
    srcs = sources(configmaps={"cfg": {"level": "debug"}}, secrets={"hf": {"token": "hf_x"}})
    env = env_of(
        {
            "env": [
                {
                    "name": "LEVEL",
                    "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "level"}},
                },
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                {"name": "BOTH", "value": "$(LEVEL):$(TOKEN)"},
            ]
        },
        srcs=srcs,
    )
    assert (env["LEVEL"], env["TOKEN"], env["BOTH"]) == ("debug", "hf_x", "debug:hf_x")


@pytest.mark.parametrize("kind", ["configMapKeyRef", "secretKeyRef"])
@pytest.mark.parametrize(
    "ref",
    [
        {"name": "absent", "key": "k", "optional": True},  # no such object
        {"name": "present", "key": "absent", "optional": True},  # no such key
    ],
)
def test_an_optional_ref_that_is_missing_leaves_the_variable_unset(
    kind: str, ref: dict[str, Any]
) -> None:
    srcs = sources(configmaps={"present": {"k": "v"}}, secrets={"present": {"k": "v"}})
    env = env_of(
        {
            "env": [
                {"name": "V", "valueFrom": {kind: ref}},
                {"name": "W", "value": "$(V)"},
            ],
            "envFrom": [
                {"configMapRef": {"name": "absent", "optional": True}},
                {"secretRef": {"name": "absent", "optional": True}},
            ],
        },
        srcs=srcs,
    )
    assert "V" not in env
    assert env["W"] == "$(V)"


@pytest.mark.parametrize(
    ("container", "message"),
    [
        (
            {"env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}]},
            'secret "hf" not found (env TOKEN)',
        ),
        (
            {"env": [{"name": "LVL", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]},
            'configmap "c" not found (env LVL)',
        ),
        (
            {
                "env": [
                    {"name": "T", "valueFrom": {"secretKeyRef": {"name": "present", "key": "no"}}}
                ]
            },
            f"couldn't find key no in Secret {NS}/present",
        ),
        (
            {
                "env": [
                    {
                        "name": "T",
                        "valueFrom": {
                            "configMapKeyRef": {"name": "present", "key": "no", "optional": False}
                        },
                    }
                ]
            },
            f"couldn't find key no in ConfigMap {NS}/present",
        ),
        ({"envFrom": [{"secretRef": {"name": "creds"}}]}, 'secret "creds" not found (envFrom)'),
        ({"envFrom": [{"configMapRef": {"name": "cfg"}}]}, 'configmap "cfg" not found (envFrom)'),
        (
            {"env": [{"name": "V", "valueFrom": {"fileKeyRef": {"path": "x"}}}]},
            "env V: unsupported valueFrom ['fileKeyRef']",
        ),
    ],
)
def test_a_missing_required_source_is_a_config_error(
    container: dict[str, Any], message: str
) -> None:
    srcs = sources(configmaps={"present": {"k": "v"}}, secrets={"present": {"k": "v"}})
    with pytest.raises(ConfigError) as err:
        env_of(container, srcs=srcs)
    assert str(err.value) == message


def test_objects_of_another_namespace_are_not_found() -> None:
    # The lookup is asked for the pod's own namespace, never another.
    asked: list[tuple[str, str]] = []

    def lookup(namespace: str, name: str) -> Mapping[str, str] | None:
        asked.append((namespace, name))
        return None

    ref = {"secretKeyRef": {"name": "hf", "key": "t", "optional": True}}
    podspec.container_env(
        POD,
        {"name": "c", "env": [{"name": "V", "valueFrom": ref}]},
        Image(("x",)),
        EnvSources(configmaps=lookup, secrets=lookup),
        {},
    )
    assert asked == [(NS, "hf")]


def test_resource_field_ref_without_a_limit_falls_back_to_the_node() -> None:
    env = env_of(
        {"env": [{"name": "C", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]}
    )
    assert env["C"] == "192"


@pytest.mark.parametrize(
    ("resource", "divisor", "expected"),
    [
        ("limits.cpu", None, "1"),  # 500m rounded up to whole cores
        ("limits.cpu", "1m", "500"),
        ("limits.memory", None, str(2**30)),
        ("limits.memory", "1Mi", "1024"),
    ],
)
def test_resource_field_ref_applies_the_divisor(
    resource: str, divisor: str | None, expected: str
) -> None:
    container = {"resources": {"limits": {"cpu": "500m", "memory": "1Gi"}}}
    ref: dict[str, Any] = {"resource": resource}
    if divisor:
        ref["divisor"] = divisor
    assert podspec.resource_value(container, ref) == expected


# -- command lines --------------------------------------------------------------------------

VLLM = Image(("vllm", "serve"), cmd=("--default",))


@pytest.mark.parametrize(
    ("container", "argv"),
    [
        ({}, ["vllm", "serve", "--default"]),
        ({"args": ["m", "--port", "8000"]}, ["vllm", "serve", "m", "--port", "8000"]),
        ({"command": ["python3", "-m", "x"]}, ["python3", "-m", "x"]),  # cmd dropped
        ({"command": ["vllm"], "args": ["serve", "m"]}, ["vllm", "serve", "m"]),
        ({"args": ["$(MODEL)", "--tp=$(TP)"]}, ["vllm", "serve", "meta/llama", "--tp=2"]),
        ({"command": ["echo", "$(MODEL)", "$$(MODEL)"]}, ["echo", "meta/llama", "$(MODEL)"]),
        ({"args": ["$(UNDEFINED)"]}, ["vllm", "serve", "$(UNDEFINED)"]),
    ],
)
def test_command_line(container: dict[str, Any], argv: list[str]) -> None:
    env = {"MODEL": "meta/llama", "TP": "2"}
    assert podspec.command_line(container, VLLM, env) == argv


def test_command_line_of_the_known_images() -> None:
    ours = KNOWN["ghcr.io/llm-operator/llm-operator"]
    assert podspec.command_line({}, ours, {}) == ["llm-operator", "--help"]
    assert podspec.command_line({"args": ["run", "-A"]}, ours, {}) == ["llm-operator", "run", "-A"]
    assert podspec.command_line({}, KNOWN["registry.k8s.io/pause"], {}) == ["/pause"]


# -- volume files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "optional", "files"),
    [
        (None, False, {"a": "1", "b": "2"}),
        ([], False, {"a": "1", "b": "2"}),
        ([{"key": "a", "path": "conf/a.yaml"}], False, {"conf/a.yaml": "1"}),
        ([{"key": "a", "path": "x"}, {"key": "b", "path": "y"}], False, {"x": "1", "y": "2"}),
        ([{"key": "b"}], False, {"b": "2"}),
        ([{"key": "a", "path": "x"}, {"key": "absent", "path": "y"}], True, {"x": "1"}),
    ],
)
def test_key_files(
    items: list[dict[str, Any]] | None, optional: bool, files: dict[str, str]
) -> None:
    assert podspec.key_files({"a": "1", "b": "2"}, items, "volume v", optional) == files


def test_key_files_missing_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="volume routes: no key 'absent'"):
        podspec.key_files({"a": "1"}, [{"key": "absent", "path": "p"}], "volume routes", False)


def test_decoded_secret_merges_string_data() -> None:
    secret = {
        "data": {"token": base64.b64encode(b"hf_x").decode(), "same": "b2xk"},
        "stringData": {"same": "new"},
    }
    assert podspec.decoded(secret) == {"token": b"hf_x", "same": b"new"}
    assert podspec.decoded({}) == {}


def test_downward_files() -> None:
    items = [
        {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}},
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
    ]
    assert podspec.downward_files(POD, items) == {
        "namespace": NS.encode(),
        "labels": b'app="vllm"\nllmoperator.io/track="canary"',
    }


def test_configmap_bytes_decodes_binary_data() -> None:
    blob = b"\x00\x01binary\xff"
    configmap = {"data": {"text": "v1"}, "binaryData": {"blob": base64.b64encode(blob).decode()}}
    assert podspec.configmap_bytes(configmap) == {"text": b"v1", "blob": blob}
    assert podspec.as_text({"blob": blob}) == {"blob": "\x00\x01binary\ufffd"}


# -- ports and probes -----------------------------------------------------------------------

CONTAINER = {
    "name": "engine",
    "ports": [{"name": "http", "containerPort": 8000}, {"name": "metrics", "containerPort": 9090}],
}


@pytest.mark.parametrize(
    ("port", "number"), [(8000, 8000), ("8001", 8001), ("http", 8000), ("metrics", 9090)]
)
def test_port_number(port: int | str, number: int) -> None:
    assert podspec.port_number(CONTAINER, port) == number


@pytest.mark.parametrize("port", ["grpc", "HTTP"])
def test_an_unknown_named_port_is_a_config_error(port: str) -> None:
    with pytest.raises(ConfigError, match=f"port '{port}' is not a named port of container engine"):
        podspec.port_number(CONTAINER, port)
    with pytest.raises(ConfigError):
        podspec.port_number({"name": "bare"}, port)


@pytest.mark.parametrize("spec", [None, {}])
def test_no_probe(spec: dict[str, Any] | None) -> None:
    assert Probe.of(spec) is None


def test_probe_defaults_are_the_apis() -> None:
    action = {"httpGet": {"path": "/health", "port": 8000}}
    assert Probe.of(action) == Probe(action, 0.0, 10.0, 1.0, 1, 3)


def test_probe_fields_override_the_defaults() -> None:
    spec = {
        "exec": {"command": ["true"]},
        "initialDelaySeconds": 5,
        "periodSeconds": 2,
        "timeoutSeconds": 3,
        "successThreshold": 2,
        "failureThreshold": 30,
    }
    probe = Probe.of(spec)
    assert probe is not None
    assert probe.action is spec
    assert (probe.initial_delay, probe.period, probe.timeout) == (5.0, 2.0, 3.0)
    assert (probe.success_threshold, probe.failure_threshold) == (2, 30)


# -- crash-loop back-off ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("restarts", "seconds"),
    [(-1, 0.0), (0, 0.0), (1, 10.0), (2, 20.0), (3, 40.0), (5, 160.0), (6, 300.0), (50, 300.0)],
)
def test_backoff_seconds(restarts: int, seconds: float) -> None:
    assert podspec.backoff_seconds(restarts) == seconds


def test_backoff_seconds_base_and_cap() -> None:
    assert [podspec.backoff_seconds(n, base=1, cap=5) for n in range(6)] == [0, 1, 2, 4, 5, 5]
