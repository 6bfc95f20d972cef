"""Run a real Prometheus (Debian's package) on loopback for tests.

    from tests.support.prometheus import run_prometheus

    with run_prometheus({"sim": ["127.0.0.1:8001", "127.0.0.1:8002"]}) as prom:
        prom.wait_targets_up()
        prom.wait_for('max(vllm:num_requests_waiting) > 0', timeout=10)
        value = prom.query_value('sum(rate(http_requests_total[30s]))')

Each run gets a temporary config (scrape and evaluation interval 1s by default) and
a temporary TSDB directory, and listens on a free 127.0.0.1 port. The binary is
`$LLMOP_PROMETHEUS_BIN`, else `prometheus` on PATH. When it is missing the test
FAILS, so CI cannot go green by silently skipping; set
`LLMOP_ALLOW_SKIP_PROMETHEUS=1` on a workstation to skip instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

START_TIMEOUT_S = 20.0


def require_prometheus() -> str:
    """Path of the prometheus binary; fail (or skip, if allowed) when there is none."""
    candidate = os.environ.get("LLMOP_PROMETHEUS_BIN") or shutil.which("prometheus")
    if candidate and os.access(candidate, os.X_OK):
        return candidate
    message = (
        "prometheus binary not found (install Debian's package: apt-get install -y "
        "prometheus, or set LLMOP_PROMETHEUS_BIN)"
    )
    if os.environ.get("LLMOP_ALLOW_SKIP_PROMETHEUS") == "1":
        pytest.skip(message)
    pytest.fail(message + "; set LLMOP_ALLOW_SKIP_PROMETHEUS=1 to skip instead", pytrace=False)


class PrometheusError(RuntimeError):
    pass


@dataclass
class Prometheus:
    """A running Prometheus: its URL and a few helpers around the HTTP API."""

    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    config_path: Path
    scrape_interval: str
    jobs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET /api/v1/<path>; returns `data`, raises PrometheusError on an error answer."""
        query = "?" + urllib.parse.urlencode(params) if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            payload = json.loads(err.read() or b"{}")
        if payload.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {payload}")
        return payload["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns the vector (list of {"metric": ..., "value": [t, "v"]})."""
        data = self.api("query", {"query": promql})
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_value(self, promql: str) -> float | None:
        """The single value of an instant query, or None when the result is empty."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{promql!r} returned {len(result)} series; aggregate it")
        return float(result[0]["value"][1])

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[float | None], bool] = lambda v: v is not None,
        timeout: float = 15.0,
        interval: float = 0.25,
    ) -> float | None:
        """Poll `promql` until `predicate(value)` holds; returns that value.

        The default predicate is "any result", which fits filter expressions such as
        `max(vllm:num_requests_waiting) > 0`.
        """
        deadline = time.monotonic() + timeout
        last: float | None = None
        while True:
            last = self.query_value(promql)
            if predicate(last):
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql!r} never satisfied in {timeout}s; last={last}")
            time.sleep(interval)

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return active

    def wait_targets_up(self, timeout: float = 15.0) -> None:
        """Wait until every configured target has been scraped successfully."""
        expected = sum(len(t) for t in self.jobs.values())
        deadline = time.monotonic() + timeout
        while True:
            targets = self.targets()
            up = [t for t in targets if t.get("health") == "up"]
            if len(up) >= expected:
                return
            if time.monotonic() > deadline:
                detail = [
                    (t.get("scrapeUrl"), t.get("health"), t.get("lastError")) for t in targets
                ]
                raise AssertionError(f"targets not up after {timeout}s: {detail}")
            time.sleep(0.2)

    def reload(self, jobs: Mapping[str, Sequence[str]]) -> None:
        """Replace the scrape targets and reload the configuration (no restart)."""
        self.jobs = {job: list(t) for job, t in jobs.items()}
        _write_config(self.config_path, self.jobs, self.scrape_interval)
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status != 200:
                raise PrometheusError(f"reload answered {resp.status}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.workdir / "prometheus.log").read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


def _write_config(path: Path, jobs: Mapping[str, Sequence[str]], interval: str) -> None:
    config = {
        "global": {
            "scrape_interval": interval,
            # scrape_timeout defaults to 10s and may not exceed the interval.
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]}
            for job, targets in jobs.items()
        ],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def run_prometheus(
    jobs: Mapping[str, Sequence[str]] | Sequence[str],
    *,
    scrape_interval: str = "1s",
    binary: str | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Iterator[Prometheus]:
    """Start Prometheus scraping `jobs` ({job: [host:port, ...]} or a list for job "sim")."""
    binary = binary or require_prometheus()
    job_map = {"sim": list(jobs)} if not isinstance(jobs, Mapping) else dict(jobs)
    with tempfile.TemporaryDirectory(prefix="llmop-prom-") as tmp:
        workdir = Path(tmp)
        config_path = workdir / "prometheus.yml"
        _write_config(config_path, job_map, scrape_interval)
        prom: Prometheus | None = None
        # Another process can take the port between _free_port() and Prometheus
        # binding it; try again with a new port then.
        for _attempt in range(3):
            port = _free_port()
            with (workdir / "prometheus.log").open("wb") as log:
                proc = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={workdir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--web.enable-lifecycle",
                        "--storage.tsdb.retention.time=1h",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            candidate = Prometheus(
                proc,
                port,
                workdir,
                config_path,
                scrape_interval,
                {k: list(v) for k, v in job_map.items()},
            )
            if _wait_ready(candidate, timeout):
                prom = candidate
                break
            candidate.stop()
            if "address already in use" not in candidate.log_tail():
                raise PrometheusError(f"prometheus did not become ready:\n{candidate.log_tail()}")
        if prom is None:
            raise PrometheusError("prometheus could not bind a free port in 3 attempts")
        try:
            yield prom
        finally:
            prom.stop()


def _wait_ready(prom: Prometheus, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prom.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False
