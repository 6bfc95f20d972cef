"""The local cluster's pod runner plays a kubelet truthfully: pods on its kwok nodes are real
processes, and what their status and events say is what those processes did.

Each test creates bare pods on ``cpu-0`` (no GPU, no taint) and checks one kubelet behaviour
against the process itself: probes gate Ready and restart the container, volumes are files at
their mount paths and follow their ConfigMap, a missing Secret or an unknown image keeps the
container waiting with a reason that says why, deletion runs preStop and honours the grace
period, and the ServiceAccount token the pod holds is one the API server accepts. The engine
image (``vllm/vllm-openai``) is the simulator, whose ``/health`` and ``/sim/admin`` make a probe
pass or fail on demand; ``registry.k8s.io/pause`` sleeps, with the host's /bin for exec probes.

Only on the local cluster: elsewhere a real kubelet runs pods, and these are its own tests.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube
from harness.providers import Cluster
from harness.serving import container_log, container_pid, ready_pods

NODE = "cpu-0"
SIM = "vllm/vllm-openai:v0.11.0"
PAUSE = "registry.k8s.io/pause:3.10"
SIM_PORT = 8000
KNOWN_IMAGES = ("ghcr.io/llm-operator/llm-operator", "registry.k8s.io/pause", "vllm/vllm-openai")
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Probes every second, so that a transition shows within a few seconds.
FAST = {"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 1}

# Nothing of these tests may go through a proxy: pod IPs are on this machine's loopback.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(autouse=True)
def _local_only(cluster: Cluster) -> None:
    if cluster.provider != "local":
        pytest.skip(
            "the pod runner is the local cluster's kubelet; elsewhere a real kubelet runs pods"
        )


@pytest.fixture
def pods_dir(cluster: Cluster) -> Path:
    return Path(cluster.kubeconfig).parent / "pods"


# -- helpers --------------------------------------------------------------------------------


def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


def create_pod(
    api: client.ApiClient, namespace: str, name: str, *containers: dict[str, Any], **spec: Any
) -> Any:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 5,
            "containers": list(containers),
            **spec,
        },
    }
    return core(api).create_namespaced_pod(namespace, body)


def sim(*flags: str, **fields: Any) -> dict[str, Any]:
    """The engine image: the simulator, as `vllm serve m --port 8000 FLAGS`."""
    return {
        "name": "c",
        "image": SIM,
        "args": ["m", "--port", str(SIM_PORT), *flags],
        "ports": [{"name": "http", "containerPort": SIM_PORT}],
        **fields,
    }


def pause(**fields: Any) -> dict[str, Any]:
    return {"name": "c", "image": PAUSE, **fields}


def read(api: client.ApiClient, namespace: str, name: str) -> Any:
    return core(api).read_namespaced_pod(name, namespace)


def container(pod: Any, name: str = "c") -> Any:
    return next(s for s in pod.status.container_statuses or [] if s.name == name)


def has_status(pod: Any, name: str = "c") -> bool:
    return any(s.name == name for s in pod.status.container_statuses or [])


def is_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def wait_pod(
    api: client.ApiClient,
    namespace: str,
    name: str,
    what: str,
    check: Callable[[Any], bool],
    timeout: float = 30,
) -> Any:
    """The pod, once ``check(pod)`` holds (its container has a status by then)."""

    def ready() -> Any:
        pod = read(api, namespace, name)
        return pod if has_status(pod) and check(pod) else None

    return kube.wait_until(f"pod {name}: {what}", ready, timeout=timeout, interval=0.25)


def waiting_reason(pod: Any) -> str | None:
    waiting = container(pod).state.waiting
    return waiting.reason if waiting else None


def running(pod: Any) -> bool:
    return container(pod).state.running is not None


def wait_events(
    api: client.ApiClient, namespace: str, name: str, reason: str, needle: str = "", count: int = 1
) -> list[str]:
    """The messages of the pod's events with ``reason`` (and ``needle`` in the message)."""

    def found() -> list[str] | None:
        messages = [
            e.message or ""
            for e in kube.events_for(api, namespace, name)
            if e.reason == reason and needle in (e.message or "")
        ]
        return messages if len(messages) >= count else None

    return kube.wait_until(f"{reason} event of pod {name} ({needle!r})", found, timeout=20)


def http(url: str, body: dict[str, Any] | None = None) -> int | None:
    """The HTTP status of a GET (or a POST of JSON); None when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _direct.open(request, timeout=3) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not reaped it yet.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(api: client.ApiClient, namespace: str, name: str, timeout: float) -> float:
    """Wait until the pod is removed from the API; returns the time.monotonic() of that."""

    def gone() -> float | None:
        try:
            read(api, namespace, name)
        except ApiException as err:
            if err.status == 404:
                return time.monotonic()
            raise
        return None

    return kube.wait_until(f"pod {name} removed", gone, timeout=timeout, interval=0.1)


# -- probes ---------------------------------------------------------------------------------


def test_a_readiness_probe_gates_ready(api_client: client.ApiClient, namespace: str) -> None:
    """The simulator answers /health with 503 for its start-up delay: the process runs and
    serves, but the pod turns Ready only once /health is 200; a failing probe later takes
    Ready away (with an Unhealthy event) without restarting anything."""
    probe = {"httpGet": {"path": "/health", "port": "http"}, **FAST}
    create_pod(api_client, namespace, "gated", sim("--sim-startup-delay=3", readinessProbe=probe))
    pod = wait_pod(api_client, namespace, "gated", "running", running)
    base = f"http://{pod.status.pod_ip}:{SIM_PORT}"

    gated = 0  # times the process answered 503 while the pod was not Ready
    deadline = time.monotonic() + 30
    while True:
        pod = read(api_client, namespace, "gated")  # first the pod, then /health:
        code = http(f"{base}/health")  # the sim only goes 503 -> 200 while starting
        assert not (is_ready(pod) and code == 503), "Ready while /health still answers 503"
        if is_ready(pod):
            break
        gated += code == 503 and running(pod)
        assert time.monotonic() < deadline, f"not Ready after 30 s (last /health: {code})"
        time.sleep(0.2)
    assert gated, "never saw the process up with /health 503 while the pod was not Ready"
    assert http(f"{base}/health") == 200
    state = container(pod)
    ready_at = next(c for c in pod.status.conditions if c.type == "Ready").last_transition_time
    assert (ready_at - state.state.running.started_at).total_seconds() >= 2, (
        "Ready well before the 3 s start-up delay was over"
    )
    assert ready_pods(api_client, namespace, "app=gated")
    first_id = state.container_id

    assert http(f"{base}/sim/admin", {"health_status": 503}) == 200
    pod = wait_pod(api_client, namespace, "gated", "not Ready", lambda p: not is_ready(p), 10)
    assert (container(pod).restart_count, container(pod).container_id) == (0, first_id)
    wait_events(api_client, namespace, "gated", "Unhealthy", "Readiness probe failed")
    assert http(f"{base}/sim/admin", {"health_status": None}) == 200
    pod = wait_pod(api_client, namespace, "gated", "Ready again", is_ready, 10)
    assert (container(pod).restart_count, container(pod).container_id) == (0, first_id)


def test_a_failing_liveness_probe_restarts_the_container(
    cluster: Cluster, api_client: client.ApiClient, namespace: str, pods_dir: Path
) -> None:
    """A liveness probe on a path the simulator does not serve (404) fails once the startup
    probe passed: the runner kills the process, starts a new one (the first time at once,
    then after a back-off), counts the restarts and says why in events."""
    spec = sim(
        startupProbe={
            "httpGet": {"path": "/health", "port": SIM_PORT},
            **FAST,
            "failureThreshold": 30,
        },
        livenessProbe={
            "httpGet": {"path": "/no-such-path", "port": "http"},
            **FAST,
            "failureThreshold": 2,
        },
    )
    create_pod(api_client, namespace, "doomed", spec, terminationGracePeriodSeconds=3)
    first = wait_pod(api_client, namespace, "doomed", "running", running)
    first_pid = container_pid(first, "c")
    pod = wait_pod(
        api_client, namespace, "doomed", "2 restarts", lambda p: container(p).restart_count >= 2, 45
    )
    state = container(pod)
    terminated = state.last_state.terminated
    assert terminated is not None, f"no lastState.terminated: {state}"
    assert terminated.finished_at is not None
    assert terminated.container_id != first.status.container_statuses[0].container_id
    assert not alive(first_pid), f"the first process ({first_pid}) still runs"
    assert pod.status.phase == "Running"

    unhealthy = wait_events(api_client, namespace, "doomed", "Unhealthy", "Liveness probe failed")
    assert any("404" in m for m in unhealthy), unhealthy
    wait_events(api_client, namespace, "doomed", "Killing", "failed liveness probe", count=2)
    wait_events(api_client, namespace, "doomed", "Started", count=2)
    # The third start waits out the back-off (the first restart is immediate).
    wait_events(api_client, namespace, "doomed", "BackOff")
    logs = sorted(p.name for p in (pods_dir / pod.metadata.uid / "logs" / "c").glob("*.log"))
    assert logs[:2] == ["0.log", "1.log"], logs
    assert container_log(cluster, api_client, pod, "c")  # the simulator wrote its start lines


# -- files ----------------------------------------------------------------------------------


def test_a_configmap_volume_is_files_at_its_mount_path_and_follows_edits(
    api_client: client.ApiClient, namespace: str, pods_dir: Path
) -> None:
    """Exec probes run in the container's mount namespace: the startup probe finds `v1` in
    /etc/demo/key, the readiness probe wants `v2`, so the pod turns Ready only once an edit of
    the ConfigMap has reached the file (within 20 s, without a restart)."""
    core(api_client).create_namespaced_config_map(
        namespace, {"metadata": {"name": "demo"}, "data": {"key": "v1"}}
    )
    spec = pause(
        volumeMounts=[{"name": "demo", "mountPath": "/etc/demo", "readOnly": True}],
        startupProbe={
            "exec": {"command": ["grep", "-qx", "v1", "/etc/demo/key"]},
            **FAST,
            "failureThreshold": 30,
        },
        readinessProbe={"exec": {"command": ["grep", "-qx", "v2", "/etc/demo/key"]}, **FAST},
    )
    create_pod(
        api_client,
        namespace,
        "files",
        spec,
        volumes=[{"name": "demo", "configMap": {"name": "demo"}}],
    )
    pod = wait_pod(api_client, namespace, "files", "started", lambda p: container(p).started)
    assert not is_ready(pod)
    assert not Path("/etc/demo/key").exists(), "the mount leaked into the host's namespace"
    on_disk = pods_dir / pod.metadata.uid / "volumes" / "demo" / "key"
    assert on_disk.read_text() == "v1"
    time.sleep(1.5)  # a readiness probe or two against v1
    assert not is_ready(read(api_client, namespace, "files"))

    core(api_client).patch_namespaced_config_map("demo", namespace, {"data": {"key": "v2"}})
    edited = time.monotonic()
    pod = wait_pod(api_client, namespace, "files", "Ready after the edit", is_ready, timeout=20)
    took = time.monotonic() - edited
    assert on_disk.read_text() == "v2"
    state = container(pod)
    assert state.restart_count == 0, f"restarted to see the edit ({took:.1f} s)"


def test_configmap_binary_data_is_mounted_decoded(
    api_client: client.ApiClient, namespace: str, pods_dir: Path
) -> None:
    blob = b"\x00\x01binary\xff"
    core(api_client).create_namespaced_config_map(
        namespace,
        {"metadata": {"name": "bin"}, "binaryData": {"blob": base64.b64encode(blob).decode()}},
    )
    spec = pause(volumeMounts=[{"name": "bin", "mountPath": "/etc/bin"}])
    create_pod(
        api_client, namespace, "bin", spec, volumes=[{"name": "bin", "configMap": {"name": "bin"}}]
    )
    pod = wait_pod(api_client, namespace, "bin", "running", running)
    assert (pods_dir / pod.metadata.uid / "volumes" / "bin" / "blob").read_bytes() == blob


def test_the_serviceaccount_token_is_mounted_and_accepted(
    api_client: client.ApiClient, namespace: str, pods_dir: Path
) -> None:
    """The admission-added kube-api-access volume (TokenRequest token, the cluster's CA, the
    namespace) is at its usual path inside the container, and the API server authenticates
    the token as the pod's ServiceAccount, bound to this very pod."""
    check = (
        f"test -s {SA_DIR}/token && grep -q 'BEGIN CERTIFICATE' {SA_DIR}/ca.crt"
        f" && grep -qx {namespace} {SA_DIR}/namespace"
    )
    create_pod(
        api_client,
        namespace,
        "sa",
        pause(readinessProbe={"exec": {"command": ["sh", "-c", check]}, **FAST}),
    )
    pod = wait_pod(api_client, namespace, "sa", "Ready (files at the SA path)", is_ready)
    volume = next(v.name for v in pod.spec.volumes if v.name.startswith("kube-api-access-"))
    token = (pods_dir / pod.metadata.uid / "volumes" / volume / "token").read_text()

    review = client.AuthenticationV1Api(api_client).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
    )
    assert review.status.authenticated, review.status.error
    user = review.status.user
    assert user.username == f"system:serviceaccount:{namespace}:default"
    assert f"system:serviceaccounts:{namespace}" in user.groups
    assert user.extra["authentication.kubernetes.io/pod-name"] == ["sa"]
    assert user.extra["authentication.kubernetes.io/pod-uid"] == [pod.metadata.uid]


# -- waiting --------------------------------------------------------------------------------


def test_a_missing_secret_keeps_the_container_waiting_until_it_exists(
    api_client: client.ApiClient, namespace: str
) -> None:
    """A non-optional secretKeyRef to an absent Secret: CreateContainerConfigError naming it,
    no process; once the Secret is created the container starts with its value."""
    env = [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late-secret", "key": "token"}}},
        {"name": "BEARER", "value": "Bearer $(TOKEN)"},
    ]
    create_pod(api_client, namespace, "late", pause(env=env))
    pod = wait_pod(
        api_client,
        namespace,
        "late",
        "CreateContainerConfigError",
        lambda p: waiting_reason(p) == "CreateContainerConfigError",
    )
    state = container(pod)
    assert "late-secret" in state.state.waiting.message
    assert not state.container_id and not state.started and not is_ready(pod)
    wait_events(api_client, namespace, "late", "Failed", "late-secret")

    core(api_client).create_namespaced_secret(
        namespace, {"metadata": {"name": "late-secret"}, "stringData": {"token": "s3cret"}}
    )
    pod = wait_pod(api_client, namespace, "late", "running and Ready", is_ready, timeout=20)
    seen = environ(container_pid(pod, "c"))
    assert (seen["TOKEN"], seen["BEARER"]) == ("s3cret", "Bearer s3cret")
    assert seen["HOSTNAME"] == "late"
    assert seen["KUBERNETES_SERVICE_PORT"] == "443"


def test_an_unknown_image_waits_in_errimagepull_naming_the_known_images(
    api_client: client.ApiClient, namespace: str
) -> None:
    create_pod(api_client, namespace, "nginx", {"name": "c", "image": "nginx:1.27"})
    pod = wait_pod(
        api_client,
        namespace,
        "nginx",
        "ErrImagePull",
        lambda p: waiting_reason(p) in ("ErrImagePull", "ImagePullBackOff"),
    )
    state = container(pod)
    message = state.state.waiting.message
    assert "nginx:1.27" in message
    for repo in KNOWN_IMAGES:
        assert repo in message, message
    assert not state.container_id and not is_ready(pod)
    wait_events(api_client, namespace, "nginx", "Failed", "Failed to pull image")


def test_a_pod_whose_container_never_started_is_pending(
    api_client: client.ApiClient, namespace: str
) -> None:
    create_pod(api_client, namespace, "nginx", {"name": "c", "image": "nginx:1.27"})
    secret = {"name": "T", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}
    create_pod(api_client, namespace, "nosecret", pause(env=[secret]))
    for name in ("nginx", "nosecret"):
        pod = wait_pod(api_client, namespace, name, "waiting", lambda p: bool(waiting_reason(p)))
        assert pod.status.phase == "Pending", f"{name}: {pod.status.phase}, {waiting_reason(pod)}"


def test_an_image_pull_backs_off(api_client: client.ApiClient, namespace: str) -> None:
    create_pod(api_client, namespace, "nginx", {"name": "c", "image": "nginx:1.27"})
    wait_pod(api_client, namespace, "nginx", "ErrImagePull", lambda p: bool(waiting_reason(p)))
    wait_pod(
        api_client,
        namespace,
        "nginx",
        "ImagePullBackOff between pulls",
        lambda p: waiting_reason(p) == "ImagePullBackOff",
        timeout=13,  # the runner pulls again after 10 s
    )


def test_the_downward_api_gives_the_pod_ip(api_client: client.ApiClient, namespace: str) -> None:
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
    ]
    create_pod(api_client, namespace, "ip", pause(env=env), automountServiceAccountToken=False)
    pod = wait_pod(api_client, namespace, "ip", "running with an IP", lambda p: running(p))
    pod = wait_pod(api_client, namespace, "ip", "an IP", lambda p: bool(p.status.pod_ip))
    seen = environ(container_pid(pod, "c"))
    assert (seen["POD_IP"], seen["HOST_IP"]) == (pod.status.pod_ip, pod.status.host_ip)


# -- deletion -------------------------------------------------------------------------------


def test_deletion_runs_prestop_then_sigterm_within_the_grace_period(
    api_client: client.ApiClient, namespace: str, pods_dir: Path, tmp_path: Path
) -> None:
    """preStop (2 s, then it writes a stamp) runs in the container, SIGTERM comes after it
    (the process stamps it on its way out), and the pod is removed well before the 30 s
    grace period, since the process exits on SIGTERM."""
    tmp_path.chmod(0o777)
    on_term = "trap 'date +%s.%N > /host/term; exit 0' TERM; while :; do sleep 0.2; done"
    spec = pause(
        command=["sh", "-c", on_term],
        volumeMounts=[{"name": "host", "mountPath": "/host"}],
        lifecycle={
            "preStop": {"exec": {"command": ["sh", "-c", "sleep 2; date +%s.%N > /host/prestop"]}}
        },
    )
    create_pod(
        api_client,
        namespace,
        "graceful",
        spec,
        terminationGracePeriodSeconds=30,
        volumes=[{"name": "host", "hostPath": {"path": str(tmp_path), "type": "Directory"}}],
    )
    pod = wait_pod(api_client, namespace, "graceful", "Ready", is_ready)
    pid = container_pid(pod, "c")

    asked_wall, asked = time.time(), time.monotonic()
    core(api_client).delete_namespaced_pod("graceful", namespace)
    took = wait_gone(api_client, namespace, "graceful", timeout=30) - asked
    assert 2 <= took < 30, f"removed after {took:.1f} s"
    prestop = float((tmp_path / "prestop").read_text())
    term = float((tmp_path / "term").read_text())
    assert prestop - asked_wall >= 1.9, "preStop did not take its 2 s"
    assert term >= prestop, "SIGTERM came before preStop finished"
    assert not alive(pid)
    wait_events(api_client, namespace, "graceful", "Killing", "Stopping container c")
    kube.wait_until(
        "the pod's folder removed",
        lambda: not (pods_dir / pod.metadata.uid).exists(),
        timeout=10,
    )


def test_a_process_ignoring_sigterm_is_killed_at_the_grace_period(
    api_client: client.ApiClient, namespace: str
) -> None:
    stubborn = "trap '' TERM; while :; do sleep 0.2; done"
    create_pod(
        api_client,
        namespace,
        "stubborn",
        pause(command=["sh", "-c", stubborn]),
        terminationGracePeriodSeconds=3,
    )
    pod = wait_pod(api_client, namespace, "stubborn", "Ready", is_ready)
    pid = container_pid(pod, "c")
    asked = time.monotonic()
    core(api_client).delete_namespaced_pod("stubborn", namespace)
    time.sleep(2)
    assert alive(pid), "gone before the grace period although it ignores SIGTERM"
    took = wait_gone(api_client, namespace, "stubborn", timeout=20) - asked
    assert 3 <= took < 10, f"removed after {took:.1f} s (grace period 3 s)"
    assert not alive(pid)
