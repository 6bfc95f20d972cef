"""The README's main job: a local cluster that serves, the chart, and sample models answering.

`python -m llm_operator_dev.demo up` brings the local cluster up (building it once into the
cache), installs the chart with Helm (the operator and the gateway run as pods, with the
chart's ServiceAccounts), applies the samples, waits for them to be Ready, then asks the gateway
for a chat completion and a streamed one with the OpenAI SDK and prints them, with the address
to try with curl or any OpenAI client. `down` stops the cluster (and every pod's process).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any

import yaml

from llm_operator_dev import chartgen
from llm_operator_dev.devcluster import cluster
from llm_operator_dev.devcluster.layout import Layout

NAMESPACE = "llm-demo"
RELEASE = "llm-operator"
RELEASE_NAMESPACE = "llm-operator"
SAMPLES = ("llama-3-8b.yaml", "llama-3-70b-fp8.yaml")
GATEWAY_PORT = 8080


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def _run(argv: list[str], stdin: str | None = None) -> str:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def _kubectl(layout: Layout, *args: str, stdin: str | None = None) -> str:
    kubectl = [str(layout.binary("kubectl")), "--kubeconfig", str(layout.kubeconfig)]
    return _run([*kubectl, *args], stdin)


def _helm(layout: Layout, *args: str) -> str:
    binary = layout.binary("helm")
    helm = str(binary if binary.exists() else chartgen.helm_binary())
    return _run([helm, "--kubeconfig", str(layout.kubeconfig), *args])


def _namespace(layout: Layout, name: str) -> None:
    manifest = _kubectl(layout, "create", "namespace", name, "--dry-run=client", "-o", "yaml")
    _kubectl(layout, "apply", "-f", "-", stdin=manifest)


def _gateway_url(layout: Layout) -> str:
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=gateway"
    pods = yaml.safe_load(
        _kubectl(layout, "get", "pods", "-n", RELEASE_NAMESPACE, "-l", selector, "-o", "yaml")
    )["items"]
    for pod in pods:
        conditions = pod.get("status", {}).get("conditions") or []
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return f"http://{pod['status']['podIP']}:{GATEWAY_PORT}"
    raise SystemExit("no gateway pod is Ready; see `kubectl get pods -n llm-operator`")


def _ask(base_url: str, model: str, timeout: float) -> None:
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{base_url}/v1", api_key="demo", max_retries=0, timeout=30)
    deadline = time.monotonic() + timeout
    # The gateway reads the operator's routing table by polling: wait until it lists the model.
    while model not in {m.id for m in _models(sdk)}:
        if time.monotonic() > deadline:
            raise SystemExit(f"the gateway at {base_url} does not list {model} yet")
        time.sleep(1)
    question = "What does an LLMDeployment give me?"
    reply = sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=24
    )
    print(f"\n> {question}\n{reply.choices[0].message.content}")
    assert reply.usage is not None
    print(f"  ({reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} tokens)")
    question = "And streamed?"
    print(f"\n> {question} (stream=True)")
    stream = sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=24, stream=True
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


def _models(sdk: Any) -> list[Any]:
    try:
        return list(sdk.models.list())
    except Exception:  # the gateway answers once the table is loaded
        return []


def up(layout: Layout, timeout: float) -> int:
    started = time.monotonic()
    say("the local cluster (the first run builds it: about 13 minutes on 2 cores)")
    cluster.up(layout, allow_build=True)
    root = layout.repo_root
    say("the CRD, then the chart: the operator and the gateway run as pods")
    _kubectl(layout, "apply", "--server-side", "-f", str(root / "crds"))
    _kubectl(layout, "wait", "--for=condition=Established", "crd/llmdeployments.llmoperator.io")
    _namespace(layout, NAMESPACE)
    _helm(
        layout, "upgrade", "--install", RELEASE, str(root / "charts" / "llm-operator"),
        "--namespace", RELEASE_NAMESPACE, "--create-namespace", "--wait", "--timeout", "180s",
        "--set", "crds.enabled=false", "--set", f"watchNamespaces={{{NAMESPACE}}}",
    )  # fmt: skip
    # The samples read a Hugging Face token; the simulator downloads nothing, any value does.
    secret = _kubectl(
        layout, "create", "secret", "generic", "hf-token", "-n", NAMESPACE,
        "--from-literal=token=hf_demo_not_a_real_token", "--dry-run=client", "-o", "yaml",
    )  # fmt: skip
    _kubectl(layout, "apply", "-f", "-", stdin=secret)
    say(f"the samples in namespace {NAMESPACE}: {', '.join(SAMPLES)}")
    for sample in SAMPLES:
        _kubectl(
            layout, "apply", "-n", NAMESPACE, "-f", str(root / "manifests" / "samples" / sample)
        )
    deadline = time.monotonic() + timeout
    while True:
        phases = _kubectl(
            layout, "get", "llmd", "-n", NAMESPACE, "-o", "jsonpath={.items[*].status.phase}"
        ).split()
        if len(phases) == len(SAMPLES) and all(p == "Ready" for p in phases):
            break
        if time.monotonic() > deadline:
            print(_kubectl(layout, "get", "llmd,pods", "-n", NAMESPACE), file=sys.stderr)
            raise SystemExit(f"the samples were not Ready within {timeout:.0f}s")
        time.sleep(1)
    print(_kubectl(layout, "get", "llmd,pods", "-n", NAMESPACE, "-o", "wide"))
    base = _gateway_url(layout)
    model = "llama-3-8b"
    _ask(base, model, timeout)
    print(
        f"\nThe gateway: {base}/v1 (any OpenAI client; no API key is configured). Try:\n"
        f"  curl -s {base}/v1/models\n"
        f"  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' "
        f"""-d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}]}}'\n"""
        f'  eval "$(llm-operator dev cluster env)"; kubectl get llmd -n {NAMESPACE}\n'
        "Stop everything: make demo-down"
    )
    say(f"done in {time.monotonic() - started:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_operator_dev.demo", description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args(argv)
    layout = Layout.discover()
    if args.action == "up":
        return up(layout, args.timeout)
    cluster.down(layout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
