"""Start vLLM simulators as subprocesses on loopback, for tests that need backends.

Usage (the gateway, autoscaling and canary tests use it as their "vLLM pods"):

    from tests.support.sim import run_sims

    with run_sims(2, served_name="llama", args=["--max-num-seqs", "4"]) as sims:
        client = openai.OpenAI(base_url=sims[0].openai_url, api_key="x")
        sims[1].admin(error_rate_500=1.0)      # change failure injection at run time
        ...

Each simulator runs `python -m llm_operator.sim.cli serve MODEL ... --port 0` in its own
process: the OS picks a free port and the simulator writes it to a file we pass with
`--sim-port-file`, so there is no find-a-free-port-then-bind race between parallel tests.
Output goes to a log file whose tail is shown when start-up fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "sim/test-model"
START_TIMEOUT_S = 20.0


class SimStartError(RuntimeError):
    """The simulator process did not come up; the message carries its log tail."""


@dataclass
class SimProcess:
    """One running simulator process."""

    proc: subprocess.Popen[bytes]
    port: int
    served_names: list[str]
    log_path: Path
    host: str = "127.0.0.1"
    _workdir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`, for /health, /metrics, /sim/admin."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_url(self) -> str:
        """The `base_url` an OpenAI SDK client wants: `http://127.0.0.1:PORT/v1`."""
        return f"{self.base_url}/v1"

    @property
    def served_name(self) -> str:
        return self.served_names[0]

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET a path; return (status, body) also for 4xx/5xx answers."""
        return _request("GET", self.base_url + path, None, timeout)

    def health(self, timeout: float = 2.0) -> int:
        """Status of GET /health, or 0 when nothing answers."""
        try:
            return self.get("/health", timeout)[0]
        except OSError:
            return 0

    def metrics_text(self) -> str:
        status, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return body.decode()

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return metric_value(self.metrics_text(), name, labels)

    def admin(self, **changes: Any) -> dict[str, Any]:
        """POST /sim/admin with `changes`; returns the simulator's full fault settings.

        Keys (see docs/simulator.md): error_rate_500, error_rate_429, retry_after,
        hang, health_status, ... An empty call just reads the current settings.
        """
        status, body = _request("POST", self.base_url + "/sim/admin", changes, 5.0)
        if status != 200:
            raise RuntimeError(f"/sim/admin answered {status}: {body!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until /health answers 200; raise SimStartError with the log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SimStartError(
                    f"simulator exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.health() == 200:
                return
            time.sleep(0.05)
        raise SimStartError(f"simulator not healthy after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (the simulator drains running requests), a second SIGTERM after
        `timeout` (cuts the drain short), SIGKILL as a last resort; returns the exit code."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        return self.proc.returncode


def sim_command(
    model: str = DEFAULT_MODEL,
    *,
    served_name: str | Sequence[str] | None = None,
    args: Sequence[str] = (),
    port: int = 0,
    python: str | None = None,
) -> list[str]:
    """The argv that starts one simulator (the same flags `vllm serve` takes)."""
    cmd = [python or sys.executable, "-m", "llm_operator.sim.cli", "serve", model]
    if served_name is not None:
        names = [served_name] if isinstance(served_name, str) else list(served_name)
        cmd += ["--served-model-name", *names]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *args]
    return cmd


def start_sim(
    model: str = DEFAULT_MODEL,
    *,
    served_name: str | Sequence[str] | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = START_TIMEOUT_S,
) -> SimProcess:
    """Start one simulator on a free loopback port.

    `wait_ready=False` returns as soon as the port is bound (e.g. to watch /health
    answer 503 during `--sim-startup-delay`). `env` is added to the current
    environment (e.g. `{"LLMOP_SIM_SEED": "1"}`).
    """
    proc, workdir, port_file, log_path, names = _spawn(model, served_name, args, env)
    sim = SimProcess(proc=proc, port=0, served_names=names, log_path=log_path, _workdir=workdir)
    try:
        sim.port = _wait_port_file(proc, port_file, log_path, timeout)
        if wait_ready:
            sim.wait_healthy(timeout)
    except BaseException:
        # Keep the log for the error message before the temp dir goes away.
        sim.stop()
        raise
    return sim


@contextlib.contextmanager
def run_sims(
    count: int = 1,
    model: str = DEFAULT_MODEL,
    *,
    served_name: str | Sequence[str] | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = START_TIMEOUT_S,
) -> Iterator[list[SimProcess]]:
    """Start `count` identical simulators (in parallel) and stop them all on exit."""
    sims: list[SimProcess] = []
    try:
        # Start every process first and only then wait, so N simulators cost one
        # start-up time rather than N.
        pending = [_spawn(model, served_name, args, env) for _ in range(count)]
        for proc, workdir, _, log_path, names in pending:
            sims.append(
                SimProcess(
                    proc=proc, port=0, served_names=names, log_path=log_path, _workdir=workdir
                )
            )
        for sim, (_, _, port_file, _, _) in zip(sims, pending, strict=True):
            sim.port = _wait_port_file(sim.proc, port_file, sim.log_path, timeout)
        if wait_ready:
            for sim in sims:
                sim.wait_healthy(timeout)
        yield sims
    finally:
        for sim in sims:
            sim.stop()


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum the samples of `name` in Prometheus text whose labels include `labels`.

    A small parser for tests: it handles the exposition lines the simulator writes
    (`name{a="b",c="d"} value`), not every corner of the format.
    """
    total = 0.0
    want = dict(labels or {})
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            sample, _, rest = line.partition("{")
            label_text, _, value_text = rest.rpartition("}")
            got = _parse_labels(label_text)
        else:
            sample, _, value_text = line.partition(" ")
            got = {}
        if sample != name:
            continue
        if all(got.get(k) == v for k, v in want.items()):
            total += float(value_text.split()[0])
    return total


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    i = 0
    while i < len(text):
        eq = text.index("=", i)
        key = text[i:eq].strip().lstrip(",").strip()
        j = eq + 2  # skip ="
        value_chars: list[str] = []
        while text[j] != '"':
            if text[j] == "\\":
                j += 1
            value_chars.append(text[j])
            j += 1
        labels[key] = "".join(value_chars)
        i = j + 1
        while i < len(text) and text[i] in ", ":
            i += 1
    return labels


def _spawn(
    model: str,
    served_name: str | Sequence[str] | None,
    args: Sequence[str],
    env: Mapping[str, str] | None,
) -> tuple[subprocess.Popen[bytes], tempfile.TemporaryDirectory[str], Path, Path, list[str]]:
    workdir = tempfile.TemporaryDirectory(prefix="llmop-sim-")
    port_file = Path(workdir.name) / "port"
    log_path = Path(workdir.name) / "sim.log"
    cmd = sim_command(model, served_name=served_name, args=args)
    cmd += ["--sim-port-file", str(port_file)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env
        )
    if served_name is None:
        names = [model]
    elif isinstance(served_name, str):
        names = [served_name]
    else:
        names = list(served_name)
    return proc, workdir, port_file, log_path, names


def _wait_port_file(
    proc: subprocess.Popen[bytes], port_file: Path, log_path: Path, timeout: float
) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimStartError(
                f"simulator exited with {proc.returncode} before binding:\n{_tail(log_path)}"
            )
        try:
            text = port_file.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return int(text)
        time.sleep(0.02)
    raise SimStartError(f"simulator did not bind within {timeout}s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _request(
    method: str, url: str, payload: Mapping[str, Any] | None, timeout: float
) -> tuple[int, bytes]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
