"""Fixtures for the gateway's integration tests: simulators and a gateway process on loopback.

The routing table is laid out like a mounted ConfigMap (`routes.yaml -> ..data/routes.yaml`,
`..data -> ..<version>`), and `GatewayProc.update` swaps the `..data` symlink the way the
kubelet does, so the reload tests exercise the same inode change production sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

import openai
import pytest
import yaml

from tests.support.sim import SimProcess, metric_value, run_sims

# Fast simulators: a few ms per answer, deterministic lengths.
SIM_ARGS = [
    "--sim-ttft-base",
    "0.002",
    "--sim-itl",
    "0.0005",
    "--sim-output-tokens",
    "8",
    "--sim-jitter",
    "0",
    "--max-num-seqs",
    "64",
]
SIM_DEFAULTS = {
    "error_rate_500": 0.0,
    "error_rate_429": 0.0,
    "hang": False,
    "retry_after": 1,
    "disconnect_after": None,
    "output_tokens": 8,
    "itl": 0.0005,  # as SIM_ARGS
}
EXT_KEY = "sk-external-test-key"


class GatewayProc:
    """`llm-operator gateway` as a subprocess on 127.0.0.1 with a ConfigMap-style table."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = root / "gateway.log"
        self.access_path = root / "access.log"

    @property
    def config_path(self) -> Path:
        return self.root / "routes.yaml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(self, table: dict[str, Any]) -> None:
        """Write a new table version and swap `..data` to it atomically."""
        self.version += 1
        vdir = self.root / f"..v{self.version}"
        vdir.mkdir()
        (vdir / "routes.yaml").write_text(yaml.safe_dump(table))
        tmp = self.root / "..data_tmp"
        os.symlink(vdir.name, tmp)
        os.replace(tmp, self.root / "..data")
        if not self.config_path.is_symlink():
            os.symlink("..data/routes.yaml", self.config_path)

    def start(
        self, table: dict[str, Any] | None, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        """Start on `table`, or with no table file yet (as before the operator writes one)."""
        if table is not None:
            self.write(table)
        port_file = self.root / "port.json"
        cmd = [
            sys.executable,
            "-m",
            "llm_operator.gateway.cli",
            "--config",
            str(self.config_path),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--drain-seconds",
            "2",
            *extra,
        ]
        with self.log_path.open("wb") as err, self.access_path.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()}")
            if port_file.exists():
                self.port = json.loads(port_file.read_text())["port"]
                return
            time.sleep(0.02)
        raise RuntimeError(f"gateway did not start: {self.log_path.read_text()}")

    def update(self, table: dict[str, Any], wait_generation: bool = True) -> None:
        before = self.generation()
        self.write(table)
        if wait_generation:
            deadline = time.monotonic() + 2.0
            while self.generation() == before:
                assert time.monotonic() < deadline, "table change not applied within 2 s"
                time.sleep(0.02)

    def get(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        req = urllib.request.Request(
            self.url + path,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}

    def metrics(self) -> str:
        return self.get("/metrics")[1].decode()

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics(), name, labels)

    def generation(self) -> float:
        return metric_value(self.metrics(), "llm_gateway_config_generation")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def gateway() -> Iterator[GatewayProc]:
    with tempfile.TemporaryDirectory(prefix="llmop-gw-") as d:
        gw = GatewayProc(Path(d))
        try:
            yield gw
        finally:
            gw.stop()


class Sdk(Protocol):
    """The `sdk` fixture: an OpenAI SDK client for a gateway."""

    def __call__(self, gw: GatewayProc, key: str = "none", **kw: Any) -> openai.AsyncOpenAI: ...


@pytest.fixture
async def sdk() -> AsyncIterator[Sdk]:
    """OpenAI SDK clients (`max_retries=0`: the SDK must not hide what the gateway does),
    closed at the end of the test, on its own event loop. One left open is not freed when
    the test ends (the client and its resources refer to each other): the cycle collector
    frees it later, at any moment, often inside a later test's event loop, where the SDK's
    `__del__` schedules an `aclose()` of sockets bound to the closed loop; that task fails
    with "Event loop is closed" and asyncio logs it as an error in whichever test is running
    (test_malformed.py fails on any error logged while it runs)."""
    made: list[openai.AsyncOpenAI] = []

    def make(gw: GatewayProc, key: str = "none", **kw: Any) -> openai.AsyncOpenAI:
        c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


@pytest.fixture(scope="session")
def llama_sims() -> Iterator[list[SimProcess]]:
    """Three simulators serving "llama": the tests use them as stable and canary pods."""
    with run_sims(3, served_name="llama", args=SIM_ARGS) as sims:
        yield sims


@pytest.fixture(scope="session")
def small_sim() -> Iterator[SimProcess]:
    """One simulator serving "small": the fallback model."""
    with run_sims(1, served_name="small", args=SIM_ARGS) as sims:
        yield sims[0]


@pytest.fixture(scope="session")
def external_sim() -> Iterator[SimProcess]:
    """An "external provider": a simulator that serves "ext-model" and requires a key."""
    with run_sims(1, served_name="ext-model", args=[*SIM_ARGS, "--api-key", EXT_KEY]) as sims:
        yield sims[0]


@pytest.fixture
def sims(
    llama_sims: list[SimProcess], small_sim: SimProcess
) -> Iterator[tuple[list[SimProcess], SimProcess]]:
    """The shared simulators with failure injection reset before and after each test."""
    for s in [*llama_sims, small_sim]:
        s.admin(**SIM_DEFAULTS)
    yield llama_sims, small_sim
    for s in [*llama_sims, small_sim]:
        s.admin(**SIM_DEFAULTS)


def served(sim: SimProcess) -> float:
    """Requests a simulator completed (any finish reason)."""
    return sim.metric("vllm:request_success_total")


def addr(sim: SimProcess) -> str:
    return f"127.0.0.1:{sim.port}"
