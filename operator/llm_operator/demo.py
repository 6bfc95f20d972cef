"""The README's main job: a local control plane, the operator, and sample LLMDeployments.

`python -m llm_operator.demo up` brings the local cluster up (building it once into the
cache), installs the CRD, starts the operator in the background, applies samples, waits for
them to be Ready and shows them. `down` stops the operator and the cluster.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llm_operator.devcluster import cluster
from llm_operator.devcluster.layout import Layout

NAMESPACE = "llm-demo"
SAMPLES = ("llama-3-8b.yaml", "llama-3-70b-fp8.yaml")


def _kubectl(layout: Layout, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(layout.binary("kubectl")), "--kubeconfig", str(layout.kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def _operator_pidfile(layout: Layout) -> Path:
    return layout.run_dir / "demo-operator.pid"


def _stop_operator(layout: Layout) -> None:
    pidfile = _operator_pidfile(layout)
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pidfile.unlink(missing_ok=True)


def up(layout: Layout, timeout: float) -> int:
    cluster.up(layout, allow_build=True)
    root = layout.repo_root
    _kubectl(layout, "apply", "--server-side", "-f", str(root / "crds"))
    _kubectl(layout, "wait", "--for=condition=Established", "crd/llmdeployments.llmoperator.io")
    _kubectl(
        layout, "apply", "-f", "-",
        stdin=_kubectl(layout, "create", "namespace", NAMESPACE, "--dry-run=client", "-o", "yaml"),
    )  # fmt: skip
    _stop_operator(layout)
    log_path = layout.logs_dir / "demo-operator.log"
    env = {**os.environ, "KUBECONFIG": str(layout.kubeconfig)}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llm_operator.cli", "run", "--namespace", NAMESPACE,
             "--liveness-port", "0", "--metrics-port", "0"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    _operator_pidfile(layout).write_text(str(process.pid))
    for sample in SAMPLES:
        _kubectl(
            layout, "apply", "-n", NAMESPACE, "-f", str(root / "manifests" / "samples" / sample)
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        phases = _kubectl(
            layout, "get", "llmd", "-n", NAMESPACE, "-o", "jsonpath={.items[*].status.phase}"
        ).split()
        if len(phases) == len(SAMPLES) and all(p == "Ready" for p in phases):
            break
        if process.poll() is not None:
            print(f"the operator exited; its log: {log_path}", file=sys.stderr)
            return 1
        time.sleep(1)
    print(_kubectl(layout, "get", "llmd,deployments,services,pods", "-n", NAMESPACE))
    print(f"operator log: {log_path}")
    print(f'try: eval "$(llm-operator dev cluster env)"; kubectl get llmd -n {NAMESPACE} -o yaml')
    print("stop: make demo-down")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_operator.demo", description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args(argv)
    layout = Layout.discover()
    if args.action == "up":
        return up(layout, args.timeout)
    _stop_operator(layout)
    cluster.down(layout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
