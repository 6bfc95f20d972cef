"""Helpers for tests that send real traffic: Helm, reaching a pod, logs, continuous load.

On the local cluster every pod's process listens at its pod IP on this machine, so a test
reaches a pod directly. On kind or another cluster a pod IP is not reachable from the test, so
`kubectl port-forward` opens the way (the API server's pod proxy, as a person would).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from openai import OpenAI

from harness import kube
from harness.providers import Cluster
from llm_operator.constants import LABEL_DEPLOYMENT

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "llm-operator"


class Helm:
    """helm (the pinned build) against the test cluster, with its own config folders."""

    def __init__(self, cluster: Cluster, home: Path) -> None:
        found = cluster.which("helm")
        if found is None:
            from llm_operator_dev import chartgen

            found = str(chartgen.helm_binary())
        self.binary = found
        self.env = {
            **cluster.env(),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def __call__(self, *args: str, timeout: float = 240) -> str:
        result = kube.run([self.binary, *args], self.env, timeout=timeout)
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout


def ready_pods(api: client.ApiClient, namespace: str, selector: str) -> list[Any]:
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items
    return [
        p
        for p in pods
        if p.metadata.deletion_timestamp is None
        and p.status.pod_ip
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]


@contextlib.contextmanager
def reach(cluster: Cluster, pod: Any, port: int) -> Iterator[str]:
    """A base URL (http://host:port) that reaches ``port`` of ``pod`` from this process."""
    if cluster.provider == "local":
        yield f"http://{pod.status.pod_ip}:{port}"
        return
    kubectl = cluster.which("kubectl") or "kubectl"
    proc = subprocess.Popen(
        [kubectl, "port-forward", "-n", pod.metadata.namespace, f"pod/{pod.metadata.name}",
         f"127.0.0.1::{port}"],
        env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"kubectl port-forward said: {line}"
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        proc.terminate()
        proc.wait(10)


def container_log(cluster: Cluster, api: client.ApiClient, pod: Any, container: str) -> str:
    """Everything the container wrote, over all its restarts."""
    if cluster.provider == "local":
        # The pod runner keeps one file per start under the pod's folder.
        folder = Path(cluster.kubeconfig).parent / "pods" / pod.metadata.uid / "logs" / container
        return "".join(p.read_text(errors="replace") for p in sorted(folder.glob("*.log")))
    return str(
        client.CoreV1Api(api).read_namespaced_pod_log(
            pod.metadata.name, pod.metadata.namespace, container=container
        )
    )


def container_pid(pod: Any, container: str) -> int:
    """The host pid of a container's process on the local cluster (in its containerID)."""
    status = next(s for s in pod.status.container_statuses or [] if s.name == container)
    return int(str(status.container_id).rsplit("-", 1)[1])


@dataclass
class Load:
    """Clients sending chat completions in a loop until stopped: half of them streamed, or
    all (``streams=True``) or none (``streams=False``)."""

    base_url: str
    model: str
    clients: int = 4
    streams: bool | None = None
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    by_outcome: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _loop(self, index: int) -> None:
        from openai import OpenAI

        sdk = OpenAI(base_url=f"{self.base_url}/v1", api_key="e2e", max_retries=0, timeout=60)
        n = 0
        while not self._stop.is_set():
            n += 1
            stream = (index + n) % 2 == 0 if self.streams is None else self.streams
            try:
                messages = [{"role": "user", "content": f"request {index}-{n}"}]
                if stream:
                    text = ""
                    finish = None
                    for chunk in sdk.chat.completions.create(
                        model=self.model, messages=messages, max_tokens=8, stream=True
                    ):  # type: ignore[call-overload]
                        if chunk.choices:
                            text += chunk.choices[0].delta.content or ""
                            finish = chunk.choices[0].finish_reason or finish
                    assert text and finish, f"stream ended without text or finish ({finish})"
                else:
                    reply = sdk.chat.completions.create(
                        model=self.model, messages=messages, max_tokens=8
                    )  # type: ignore[call-overload]
                    assert reply.choices[0].message.content
                with self._lock:
                    self.ok += 1
                    self.by_outcome["stream" if stream else "plain"] += 1
            except Exception as err:  # every failure is a finding: keep it
                with self._lock:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {type(err).__name__}: {err}")

    def __enter__(self) -> Load:
        for i in range(self.clients):
            t = threading.Thread(target=self._loop, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)

    def wait_for_requests(self, count: int, timeout: float = 60) -> None:
        start = self.ok
        kube.wait_until(
            f"{count} more answered requests (failures so far: {self.failures[:3]})",
            lambda: self.ok - start >= count,
            timeout=timeout,
            interval=0.2,
        )


GROUP, VERSION, PLURAL = "llmoperator.io", "v1alpha1", "llmdeployments"
GATEWAY_PORT = 8080
# The local cluster's Prometheus as pods reach it (devcluster/podspec.py PROMETHEUS_POD_URL).
LOCAL_PROMETHEUS_POD_URL = "http://10.96.0.90:9090"


def pod_prometheus_url(cluster: Cluster) -> str | None:
    """A Prometheus that scrapes the gateway, as the operator's pod reaches it: the local
    cluster's, or LLMOP_E2E_PROMETHEUS_POD_URL on another cluster; None when neither."""
    url = os.environ.get("LLMOP_E2E_PROMETHEUS_POD_URL")
    if url is None and cluster.provider == "local":
        url = LOCAL_PROMETHEUS_POD_URL
    return url


def host_prometheus_url(cluster: Cluster) -> str | None:
    """A Prometheus as this host reaches it: LLMOP_PROMETHEUS_URL, or the local cluster's
    own (its port in the cluster's state.json); None when neither."""
    url = os.environ.get("LLMOP_PROMETHEUS_URL")
    if url is None and cluster.provider == "local":
        state = Path(cluster.kubeconfig).parent / "state.json"
        ports = json.loads(state.read_text()).get("ports", {}) if state.exists() else {}
        url = f"http://127.0.0.1:{ports['prometheus']}" if "prometheus" in ports else None
    return url


def llmd(name: str, replicas: int = 1, **engine: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": name},
            "engine": {"maxModelLen": 4096, **engine},
            "resources": {"gpu": {"product": "NVIDIA-H100-80GB-HBM3", "memoryGiB": 80}},
            "replicas": replicas,
        },
    }


class Serving:
    """One installed release and the namespace it serves."""

    def __init__(self, cluster: Cluster, api: client.ApiClient, namespace: str, release: str):
        self.cluster = cluster
        self.api = api
        self.namespace = namespace
        self.release = release
        self.fullname = f"{release}-llm-operator"

    def objects(self) -> Any:
        return client.CustomObjectsApi(self.api)

    def apply(self, body: dict[str, Any]) -> None:
        kube.apply(self.api, body, self.namespace)

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.objects().get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return obj

    def wait_ready(self, name: str, timeout: float = 120) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            obj = self.get(name)
            status = obj.get("status") or {}
            fresh = status.get("observedGeneration") == obj["metadata"]["generation"]
            return obj if fresh and status.get("phase") == "Ready" else None

        return kube.wait_until(f"{name} Ready", ready, timeout=timeout)

    def engines(self, name: str) -> list[Any]:
        return ready_pods(self.api, self.namespace, f"{LABEL_DEPLOYMENT}={name}")

    def gateway_pod(self) -> Any:
        selector = f"app.kubernetes.io/instance={self.release},app.kubernetes.io/component=gateway"
        pods = kube.wait_until(
            "a ready gateway pod", lambda: ready_pods(self.api, self.namespace, selector), 60
        )
        return pods[0]

    def wait_routed(
        self, base_url: str, model: str, timeout: float = 60, api_key: str = "e2e"
    ) -> None:
        """Until the gateway lists the model (it reads the operator's table by polling)."""
        sdk = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=10)

        def listed() -> bool:
            try:
                return model in {m.id for m in sdk.models.list()}
            except Exception:
                return False

        kube.wait_until(f"the gateway to list {model}", listed, timeout=timeout)


@contextlib.contextmanager
def installed(
    cluster: Cluster,
    api: client.ApiClient,
    helm_home: Path,
    prefix: str,
    *values: str,
    prepare: Callable[[str], None] | None = None,
) -> Iterator[Serving]:
    """The chart installed (operator and gateway as pods) watching a fresh namespace, with an
    hf-token Secret; uninstalled and the namespace deleted after. `values` are more --set;
    `prepare(namespace)` runs before the install (Secrets the chart's pods mount)."""
    gpus = [
        n
        for n in client.CoreV1Api(api).list_node().items
        if int((n.status.allocatable or {}).get("nvidia.com/gpu", "0")) > 0
    ]
    if cluster.provider != "local" and (not gpus or not os.environ.get("LLMOP_E2E_IMAGE")):
        pytest.skip(
            "serving tests need nodes that advertise nvidia.com/gpu (real vLLM engines) and the "
            "llm-operator image in LLMOP_E2E_IMAGE (repository:tag the nodes can pull); "
            "LLMOP_CLUSTER=local runs both as processes"
        )
    namespace = f"e2e-{prefix}-{secrets.token_hex(3)}"
    kube.create_namespace(api, namespace)
    if prepare is not None:
        prepare(namespace)
    release = f"{prefix[:6]}-{secrets.token_hex(2)}"
    helm = Helm(cluster, helm_home)
    args = ["--set", f"watchNamespaces={{{namespace}}}", "--set", "crds.enabled=false"]
    for value in values:
        args += ["--set", value]
    if os.environ.get("LLMOP_E2E_IMAGE"):
        repo, _, tag = os.environ["LLMOP_E2E_IMAGE"].rpartition(":")
        args += ["--set", f"image.repository={repo}", "--set", f"image.tag={tag}"]
    helm("install", release, str(CHART), "--namespace", namespace, "--wait", "--timeout",
         "180s", *args)  # fmt: skip
    client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        {"metadata": {"name": "hf-token"}, "stringData": {"token": "hf_e2e_not_a_real_token"}},
    )
    try:
        yield Serving(cluster, api, namespace, release)
    finally:
        kube.run([helm.binary, "uninstall", release, "--namespace", namespace, "--wait"],
                 helm.env, 180)  # fmt: skip
        kube.delete_namespace(api, namespace)
