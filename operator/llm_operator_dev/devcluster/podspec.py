"""What a pod's spec asks of the local cluster's pod runner, decided without I/O.

The runner (``kubelet.py``) starts a process for every container of every pod on a kwok node.
These helpers turn the pod's own spec into that process: which program an image stands for,
the environment (``env``, ``envFrom``, the downward API, ``$(VAR)`` expansion, the variables a
kubelet injects), the files of ConfigMap/Secret/downward-API volumes, probes and ports. Every
lookup of another object (a ConfigMap, a Secret) is passed in, so this module is testable
without a cluster.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from llm_operator import kubeformat

# A kubelet injects the `kubernetes` Service's address into every container; here the
# pods' podnet shim DNATs that ClusterIP to the API server's loopback port.
KUBERNETES_SERVICE_PORT = 443
# The local Prometheus as pods reach it (the operator's canary analysis asks it): a ClusterIP
# the shim maps to Prometheus' loopback port, as kube-proxy maps a Service's.
PROMETHEUS_SERVICE_IP = "10.96.0.90"
PROMETHEUS_SERVICE_PORT = 9090
PROMETHEUS_POD_URL = f"http://{PROMETHEUS_SERVICE_IP}:{PROMETHEUS_SERVICE_PORT}"


class ConfigError(Exception):
    """The container cannot be created yet (CreateContainerConfigError): a missing key, a
    missing ConfigMap or Secret that is not optional. The kubelet retries."""


class ImageError(Exception):
    """The image is not one this machine can run (ErrImagePull / ImagePullBackOff)."""


@dataclass(frozen=True)
class Image:
    """What an image's config would say: its entrypoint, default command and environment,
    and the programs on its PATH (each a shell line run with the container's arguments)."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    programs: Mapping[str, str] = field(default_factory=dict)


def images(venv_bin: Path) -> dict[str, Image]:
    """The images the local cluster can run, by repository (any tag or digest).

    vLLM's image runs the project's simulator with the same command line (`vllm serve MODEL
    --flags`); the project's image runs the real `llm-operator`; pause sleeps until signalled.
    """
    python = f'exec {venv_bin / "python"} "$@"'
    ours = f'exec {venv_bin / "llm-operator"} "$@"'
    return {
        "vllm/vllm-openai": Image(
            entrypoint=("vllm", "serve"),
            env={"HOME": "/root"},
            programs={
                "vllm": f'exec {venv_bin / "llm-operator"} sim "$@"',
                "python3": python,
                "python": python,
            },
        ),
        "ghcr.io/llm-operator/llm-operator": Image(
            entrypoint=("llm-operator",),
            cmd=("--help",),
            env={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "HOME": "/nonexistent"},
            programs={"llm-operator": ours, "python3": python, "python": python},
        ),
        "registry.k8s.io/pause": Image(
            entrypoint=("/pause",),
            programs={"/pause": "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"},
        ),
    }


def repository(image: str) -> str:
    """`vllm/vllm-openai:v0.11.0` and `...@sha256:...` are both `vllm/vllm-openai`; Docker Hub's
    `docker.io/` and `docker.io/library/` prefixes are dropped."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    for prefix in ("docker.io/library/", "docker.io/", "index.docker.io/"):
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


def resolve_image(known: Mapping[str, Image], image: str) -> Image:
    found = known.get(repository(image))
    if found is None:
        raise ImageError(
            f"image {image!r} cannot run on the local cluster (it runs no containers); "
            f"known images: {', '.join(sorted(known))}"
        )
    return found


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` escapes a `$`, and
    a reference to an undefined variable is left as it is."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR.sub(sub, text)


def field_ref(pod: Mapping[str, Any], path: str) -> str:
    """The downward API's fieldRef paths (those a kubelet supports)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(p.get("ip", "") for p in status.get("podIPs") or []),
        "status.hostIPs": ",".join(p.get("ip", "") for p in status.get("hostIPs") or []),
    }
    if path in simple:
        return str(simple[path] or "")
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ConfigError(f"unsupported fieldRef {path!r}")


#: Reads `data` of a ConfigMap or a Secret (values already decoded): (namespace, name) -> data,
#: or None when the object does not exist.
Lookup = Callable[[str, str], Mapping[str, str] | None]


def _key_ref(
    ref: Mapping[str, Any], kind: str, namespace: str, lookup: Lookup, var: str
) -> str | None:
    data = lookup(namespace, ref.get("name", ""))
    optional = bool(ref.get("optional"))
    if data is None:
        if optional:
            return None
        raise ConfigError(f'{kind.lower()} "{ref.get("name")}" not found (env {var})')
    if ref.get("key") not in data:
        if optional:
            return None
        raise ConfigError(
            f"couldn't find key {ref.get('key')} in {kind} {namespace}/{ref.get('name')}"
        )
    return data[ref["key"]]


def resource_value(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    """resourceFieldRef: limits/requests of the container, with the divisor applied to cpu and
    memory in the units a kubelet uses (cpu rounded up to whole divisors, memory in bytes)."""
    resource = ref.get("resource", "")
    kind, _, name = resource.partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(name)
    if value is None:
        # A kubelet falls back to the node's allocatable; a big number says "unlimited".
        value = "192" if name == "cpu" else str(2**40)
    divisor = quantity(str(ref.get("divisor") or "1"))
    if divisor <= 0:
        raise ConfigError(f"resourceFieldRef {resource}: divisor must be positive")
    return str(math.ceil(quantity(str(value)) / divisor))


def quantity(text: str) -> Decimal:
    """A Kubernetes quantity (`500m`, `1Gi`, `2e3`) as a number."""
    value = kubeformat.quantity(text)
    if value is None:
        raise ConfigError(f"invalid quantity {text!r}")
    return value


@dataclass
class EnvSources:
    """The objects a container's environment may read."""

    configmaps: Lookup
    secrets: Lookup


def container_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    image: Image,
    sources: EnvSources,
    injected: Mapping[str, str],
) -> dict[str, str]:
    """The environment of a container, in a kubelet's order: the image's, the injected service
    variables and HOSTNAME, `envFrom`, then `env` (each `$(VAR)`-expanded against what came
    before)."""
    namespace = (pod.get("metadata") or {}).get("namespace") or "default"
    env: dict[str, str] = dict(image.env)
    env.update(injected)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, lookup in (("configMapRef", sources.configmaps), ("secretRef", sources.secrets)):
            ref = source.get(kind)
            if ref is None:
                continue
            data = lookup(namespace, ref.get("name", ""))
            if data is None:
                if ref.get("optional"):
                    continue
                label = "configmap" if kind == "configMapRef" else "secret"
                raise ConfigError(f'{label} "{ref.get("name")}" not found (envFrom)')
            for key, text in data.items():
                env[prefix + key] = text
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item or "valueFrom" not in item:
            env[name] = expand(str(item.get("value", "")), env)
            continue
        source = item["valueFrom"]
        value: str | None
        if "fieldRef" in source:
            value = field_ref(pod, source["fieldRef"].get("fieldPath", ""))
        elif "resourceFieldRef" in source:
            value = resource_value(container, source["resourceFieldRef"])
        elif "configMapKeyRef" in source:
            value = _key_ref(
                source["configMapKeyRef"], "ConfigMap", namespace, sources.configmaps, name
            )
        elif "secretKeyRef" in source:
            value = _key_ref(source["secretKeyRef"], "Secret", namespace, sources.secrets, name)
        else:
            raise ConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
        if value is not None:
            env[name] = value
    return env


def command_line(container: Mapping[str, Any], image: Image, env: Mapping[str, str]) -> list[str]:
    """`command` replaces the entrypoint and drops the image's cmd; `args` replace the cmd;
    both are `$(VAR)`-expanded."""
    command = container.get("command")
    args = container.get("args")
    if command:
        argv = list(command) + list(args or [])
    else:
        argv = list(image.entrypoint) + list(image.cmd if args is None else args)
    return [expand(str(a), env) for a in argv]


def decoded(secret: Mapping[str, Any]) -> dict[str, bytes]:
    """A Secret's `data` (base64) and `stringData`, as the bytes a volume file holds."""
    out = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    out.update({k: str(v).encode() for k, v in (secret.get("stringData") or {}).items()})
    return out


def configmap_bytes(configmap: Mapping[str, Any]) -> dict[str, bytes]:
    """A ConfigMap's `data` (text) and `binaryData` (base64), as the bytes a volume file holds."""
    out = {k: str(v).encode() for k, v in (configmap.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (configmap.get("binaryData") or {}).items()})
    return out


def as_text(data: Mapping[str, bytes] | None) -> dict[str, str] | None:
    """Values for environment variables (which are text)."""
    if data is None:
        return None
    return {k: v.decode(errors="replace") for k, v in data.items()}


def key_files(
    data: Mapping[str, bytes], items: list[Mapping[str, Any]] | None, what: str, optional: bool
) -> dict[str, bytes]:
    """The files a ConfigMap or Secret volume (or projection) holds: every key, or the listed
    `items` at their `path`."""
    if not items:
        return dict(data)
    files: dict[str, bytes] = {}
    for item in items:
        if item.get("key") not in data:
            if optional:
                continue
            raise ConfigError(f"{what}: no key {item.get('key')!r}")
        files[item.get("path") or item["key"]] = data[item["key"]]
    return files


def downward_files(pod: Mapping[str, Any], items: list[Mapping[str, Any]]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    containers = {c["name"]: c for c in (pod.get("spec") or {}).get("containers") or []}
    for item in items:
        if "fieldRef" in item:
            files[item["path"]] = field_ref(pod, item["fieldRef"].get("fieldPath", "")).encode()
        elif "resourceFieldRef" in item:
            ref = item["resourceFieldRef"]
            container = containers.get(ref.get("containerName", ""))
            if container is None:
                raise ConfigError(
                    f"downwardAPI {item['path']}: no container {ref.get('containerName')!r}"
                )
            files[item["path"]] = resource_value(container, ref).encode()
    return files


def port_number(container: Mapping[str, Any], port: int | str) -> int:
    """A probe's or preStop's `port`: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ConfigError(f"port {port!r} is not a named port of container {container.get('name')}")


@dataclass(frozen=True)
class Probe:
    """A container probe with the API's defaults."""

    action: Mapping[str, Any]
    initial_delay: float
    period: float
    timeout: float
    success_threshold: int
    failure_threshold: int

    @classmethod
    def of(cls, spec: Mapping[str, Any] | None) -> Probe | None:
        if not spec:
            return None
        return cls(
            action=spec,
            initial_delay=float(spec.get("initialDelaySeconds", 0)),
            period=float(spec.get("periodSeconds", 10)),
            timeout=float(spec.get("timeoutSeconds", 1)),
            success_threshold=int(spec.get("successThreshold", 1)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
        )


def backoff_seconds(restarts: int, base: float = 10.0, cap: float = 300.0) -> float:
    """A kubelet's crash-loop back-off before the next start, given the restarts so far: the
    first restart is immediate, then 10 s doubling up to 5 minutes."""
    return 0.0 if restarts <= 0 else min(base * 2 ** (restarts - 1), cap)
