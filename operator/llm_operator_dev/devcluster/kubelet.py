"""The pod runner: a kubelet for the kwok nodes, so that the local cluster serves.

kwok keeps the fake nodes alive (registration, leases); this process plays the kubelet of their
pods. Every pod bound to a kwok node gets, per container, a process on this machine started
from the pod's own spec: the image's entrypoint (``podspec.images``), the container's command,
args and env, its volumes as files bind-mounted at their mount paths in a private mount
namespace (``unshare --mount``), and a ServiceAccount token obtained through the TokenRequest
API. The pod's IP comes from its node's ``spec.podCIDR`` (loopback: 127.1.N.0/24) and is where
its processes listen: the podnet shim (``e2e/cluster/podnet.c``, LD_PRELOAD) turns binds of
0.0.0.0 and 127.0.0.1 into the pod IP and DNATs the `kubernetes` Service's ClusterIP to the API
server, which is what a pod's network namespace and kube-proxy do on a real node.

What a kubelet reports, this reports from what really happens: Ready only once the readiness
probe passes; startup and liveness probes that fail restart the container; an exiting process
restarts per ``restartPolicy`` with crash-loop back-off, ``restartCount`` and
``lastState.terminated`` (reason, exit code); deletion runs preStop, sends SIGTERM, and kills
after the grace period, then removes the pod. ConfigMap, Secret and projected volumes are
refreshed while the pod runs, and the token is renewed before it expires.

    python -m llm_operator_dev.devcluster.kubelet --cluster-dir ~/.cache/llm-operator/cluster ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from llm_operator_dev.devcluster import podspec
from llm_operator_dev.devcluster.layout import PORTS
from llm_operator_dev.devcluster.podspec import ConfigError, Image, ImageError, Probe

log = logging.getLogger("llm_operator_dev.devcluster.kubelet")

# Pod processes carry this in their environment so that a sweep finds them after a crash.
POD_MARKER_ENV = "LLMOP_POD_CLUSTER"
VOLUME_RESYNC_SECONDS = 5.0
EVENT_REPEAT_SECONDS = 300.0
RETRY_REASONS = frozenset({"Failed", "FailedMount", "BackOff"})
TOKEN_SECONDS = 3607
PR_SET_PDEATHSIG = 1

# Runs in the pod's fresh mount namespace: bind each volume at its mount path, then exec the
# container's program. Arguments: (source target ro|rw)... -- program args...
MOUNT_SCRIPT = r"""
while [ "$1" != -- ]; do
  if [ -d "$1" ]; then mkdir -p "$2"; else mkdir -p "$(dirname "$2")"; [ -e "$2" ] || : >"$2"; fi
  mount --bind "$1" "$2" || exit 126
  if [ "$3" = ro ]; then mount -o remount,bind,ro "$2" || exit 126; fi
  shift 3
done
shift
exec "$@"
"""


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the API ---------------------------------------------------------------------------------


class Api:
    """The API calls a kubelet makes, over one aiohttp session with a client certificate."""

    def __init__(self, server: str, ca: Path, cert: Path, key: Path) -> None:
        self.server = server.rstrip("/")
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.ctx.load_cert_chain(str(cert), str(key))
        self.session: aiohttp.ClientSession | None = None

    async def _s(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ctx, limit=32),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
            )
        return self.session

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        session = await self._s()
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        async with session.request(
            method,
            self.server + path,
            data=data,
            params=params,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else {}
            except ValueError:
                return resp.status, {"message": text}

    async def watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
        session = await self._s()
        async with session.get(
            self.server + path,
            params={**params, "watch": "1"},
            headers={"Accept": "application/json"},
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"watch {path}: HTTP {resp.status}")
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


# -- pod IPs ---------------------------------------------------------------------------------


class Addresses:
    """Pod IPs per node, from each node's spec.podCIDR (never .0, .1 or the broadcast)."""

    def __init__(self) -> None:
        self.cidrs: dict[str, ipaddress.IPv4Network] = {}
        self.taken: dict[str, set[str]] = {}

    def set_node(self, node: str, cidr: str) -> None:
        self.cidrs[node] = ipaddress.IPv4Network(cidr)
        self.taken.setdefault(node, set())

    def reserve(self, node: str, ip: str) -> None:
        self.taken.setdefault(node, set()).add(ip)

    def allocate(self, node: str) -> str:
        net = self.cidrs.get(node)
        if net is None:
            raise ConfigError(f"node {node} has no spec.podCIDR")
        taken = self.taken.setdefault(node, set())
        for host in list(net.hosts())[1:]:
            if str(host) not in taken:
                taken.add(str(host))
                return str(host)
        raise ConfigError(f"no free pod IP left in {net} on node {node}")

    def release(self, node: str, ip: str) -> None:
        self.taken.get(node, set()).discard(ip)


# -- one container ---------------------------------------------------------------------------


@dataclass
class Settings:
    cluster_dir: Path
    pods_dir: Path
    shim: Path
    images_dir: Path
    known: dict[str, Image]
    dnat: str
    #: What the images' programs run from (the virtualenv, its Python, the checkout): a
    #: volume mounted over one of them (an emptyDir at /tmp, with the checkout under /tmp)
    #: must not hide the program, as a volume never hides a real image's files.
    image_paths: tuple[Path, ...] = ()
    host_ip: str = "127.0.0.1"


@dataclass
class ContainerState:
    """What the pod's status says of one container."""

    name: str
    image: str
    state: dict[str, Any] = field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    restart_count: int = 0
    container_id: str = ""

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": f"local://{podspec.repository(self.image)}",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            out["containerID"] = self.container_id
        return out


def _pdeathsig() -> None:
    # The pod's processes die with the runner rather than outliving it unsupervised.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Container:
    """One container of a pod: start, probe, restart, stop."""

    def __init__(self, pod: PodWorker, spec: dict[str, Any], init: bool = False) -> None:
        self.pod = pod
        self.spec = spec
        self.init = init
        self.name = spec["name"]
        self.st = ContainerState(self.name, spec.get("image", ""))
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.pull_failures = 0
        self.exited = asyncio.Event()

    # -- launching ----------------------------------------------------------------------

    def _launch(self) -> tuple[list[str], dict[str, str], str]:
        image = podspec.resolve_image(self.pod.settings.known, self.st.image)
        env = podspec.container_env(
            self.pod.view(), self.spec, image, self.pod.env_sources(), self.pod.injected_env()
        )
        argv = podspec.command_line(self.spec, image, env)
        if not argv:
            raise ConfigError("no command specified")
        mounts = self.pod.mounts_for(self.spec)
        env["PATH"] = (
            f"{self.pod.settings.images_dir / _image_key(image)}:/usr/local/bin:/usr/bin:/bin"
        )
        env[POD_MARKER_ENV] = str(self.pod.settings.cluster_dir)
        env["LD_PRELOAD"] = str(self.pod.settings.shim)
        env["LLMOP_POD_IP"] = self.pod.ip
        env["LLMOP_POD_DNAT"] = self.pod.settings.dnat
        wrapper = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            MOUNT_SCRIPT,
            "sh",
        ]
        for source, target, ro in self.pod.with_image_paths(mounts):
            wrapper += [str(source), target, "ro" if ro else "rw"]
        cwd = self.spec.get("workingDir") or "/"
        return [*wrapper, "--", *argv], env, cwd

    async def run(self) -> None:
        """Supervise the container until the pod stops (or, for Never/OnFailure, it is done)."""
        policy = self.pod.pod["spec"].get("restartPolicy", "Always")
        while not self.stopping:
            try:
                argv, env, cwd = self._launch()
            except ImageError as err:
                # A pull fails (ErrImagePull), then the kubelet backs off (ImagePullBackOff,
                # 10 s doubling to 5 minutes) between tries.
                self.pod.event(
                    "Warning", "Failed", f"Failed to pull image {self.st.image!r}: {err}"
                )
                self._waiting("ErrImagePull", str(err))
                await self._sleep(1)
                self.pull_failures += 1
                self._waiting("ImagePullBackOff", f'Back-off pulling image "{self.st.image}"')
                await self._sleep(podspec.backoff_seconds(self.pull_failures))
                continue
            except ConfigError as err:
                self._waiting("CreateContainerConfigError", str(err))
                self.pod.event("Warning", "Failed", f"Error: {err}")
                await self._sleep(2)
                continue
            exit_code, reason, started = await self._run_once(argv, env, cwd)
            if self.stopping:
                return
            succeeded = exit_code == 0
            if self.init and succeeded:
                return
            if policy == "Never" or (policy == "OnFailure" and succeeded):
                return
            ran = time.monotonic() - started
            if ran > 600:  # a kubelet forgets the back-off after a long enough run
                self.pod.restarts_backoff[self.name] = 0
            n = self.pod.restarts_backoff.get(self.name, 0)
            delay = podspec.backoff_seconds(n)
            self.pod.restarts_backoff[self.name] = n + 1
            self.st.restart_count += 1
            if delay:
                self._waiting(
                    "CrashLoopBackOff",
                    f"back-off {delay:.0f}s restarting failed container={self.name} "
                    f"pod={self.pod.name}_{self.pod.namespace}({self.pod.uid})",
                )
                self.pod.event("Warning", "BackOff", "Back-off restarting failed container")
                await self._sleep(delay)
            del reason

    def _waiting(self, reason: str, message: str) -> None:
        self.st.state = {"waiting": {"reason": reason, "message": message[:1000]}}
        self.st.ready = False
        self.st.started = False
        self.pod.changed()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.pod.stopping.wait(), seconds)

    async def _run_once(
        self, argv: list[str], env: dict[str, str], cwd: str
    ) -> tuple[int, str, float]:
        logs = self.pod.dir / "logs" / self.name
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{self.st.restart_count}.log"
        started = time.monotonic()
        with log_path.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd if Path(cwd).is_dir() else "/",
                start_new_session=True,
                preexec_fn=_pdeathsig,
            )
        self.exited.clear()
        self.st.container_id = (
            f"local://{self.pod.uid[:8]}-{self.name}-{self.st.restart_count}-{self.proc.pid}"
        )
        self.st.state = {"running": {"startedAt": now()}}
        self.st.started = False
        self.st.ready = False
        if not self.init and self.pod.phase == "Pending":
            self.pod.phase = "Running"  # a pod runs once one of its containers has started
        self.pod.changed()
        self.pod.event("Normal", "Started", f"Started container {self.name}")
        probes = [] if self.init else [asyncio.create_task(self._probe_loop())]
        code = await self.proc.wait()
        self.exited.set()
        for task in probes:
            task.cancel()
        reason = "Completed" if code == 0 else "Error"
        # A process killed by a signal reports 128 + the signal, as a container runtime does.
        exit_code = 128 - code if code < 0 else code
        terminated = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": self.st.state.get("running", {}).get("startedAt", now()),
            "finishedAt": now(),
            "containerID": self.st.container_id,
        }
        if code < 0:
            terminated["signal"] = -code
        tail = _tail(log_path)
        if (
            exit_code != 0
            and tail
            and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            terminated["message"] = tail
        self.st.last_state = {"terminated": terminated}
        self.st.state = {"terminated": terminated}
        self.st.ready = False
        self.pod.changed()
        return exit_code, reason, started

    # -- probes -------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        startup = Probe.of(self.spec.get("startupProbe"))
        readiness = Probe.of(self.spec.get("readinessProbe"))
        liveness = Probe.of(self.spec.get("livenessProbe"))
        if startup is not None and not await self._until(startup, "Startup"):
            await self.kill("Startup probe failed", "Unhealthy")
            return
        self.st.started = True
        self.pod.changed()
        tasks = [asyncio.create_task(self._readiness(readiness))]
        if liveness is not None:
            tasks.append(asyncio.create_task(self._liveness(liveness, startup is not None)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _results(self, probe: Probe) -> AsyncIterator[tuple[bool, str, int]]:
        """Each result of the probe, with how many times in a row it came out the same (a
        kubelet's success and failure thresholds count such runs)."""
        await asyncio.sleep(probe.initial_delay)
        last: bool | None = None
        run = 0
        while True:
            ok, why = await self._check(probe)
            run = run + 1 if ok == last else 1
            last = ok
            yield ok, why, run
            await asyncio.sleep(probe.period)

    async def _until(self, probe: Probe, kind: str) -> bool:
        """Probe until success_threshold successes (True) or failure_threshold failures."""
        async for ok, why, run in self._results(probe):
            if ok and run >= probe.success_threshold:
                return True
            if not ok and run >= probe.failure_threshold:
                self.pod.event("Warning", "Unhealthy", f"{kind} probe failed: {why}")
                return False
        return False

    async def _readiness(self, probe: Probe | None) -> None:
        if probe is None:
            self.st.ready = True
            self.pod.changed()
            return
        async for ok, why, run in self._results(probe):
            if ok and not self.st.ready and run >= probe.success_threshold:
                self.st.ready = True
                self.pod.changed()
            elif not ok and self.st.ready and run >= probe.failure_threshold:
                self.st.ready = False
                self.pod.changed()
                self.pod.event("Warning", "Unhealthy", f"Readiness probe failed: {why}")

    async def _liveness(self, probe: Probe, after_startup: bool) -> None:
        # After a startup probe, liveness starts at once (its initial delay has been spent).
        delay = 0.0 if after_startup else probe.initial_delay
        probe = Probe(probe.action, delay, probe.period, probe.timeout, 1, probe.failure_threshold)
        async for ok, why, run in self._results(probe):
            if not ok and run >= probe.failure_threshold:
                self.pod.event("Warning", "Unhealthy", f"Liveness probe failed: {why}")
                await self.kill(
                    f"Container {self.name} failed liveness probe, will be restarted", "Killing"
                )
                return

    async def _check(self, probe: Probe) -> tuple[bool, str]:
        action = probe.action
        try:
            if "httpGet" in action:
                get = action["httpGet"]
                port = podspec.port_number(self.spec, get.get("port", 80))
                host = get.get("host") or self.pod.ip
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                return await asyncio.wait_for(
                    _http_get(
                        host, port, get.get("path", "/"), headers, get.get("scheme") == "HTTPS"
                    ),
                    probe.timeout,
                )
            if "tcpSocket" in action:
                port = podspec.port_number(self.spec, action["tcpSocket"].get("port", 0))
                host = action["tcpSocket"].get("host") or self.pod.ip
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), probe.timeout
                )
                writer.close()
                return True, ""
            if "exec" in action:
                code = await self.exec(list(action["exec"].get("command") or []), probe.timeout)
                return code == 0, f"command exited with {code}"
            return False, f"unsupported probe {sorted(action)}"
        except TimeoutError:
            return False, f"timeout after {probe.timeout:.0f}s"
        except (OSError, ConfigError) as err:
            return False, str(err)

    async def exec(self, command: list[str], timeout: float) -> int:
        """Run a command beside the container's process, as `kubectl exec` and exec probes do:
        same image, environment and mounts."""
        argv, env, cwd = self._launch()
        wrapper = argv[: argv.index("--", argv.index("sh") + 1) + 1]
        proc = await asyncio.create_subprocess_exec(
            *wrapper,
            *command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=cwd if Path(cwd).is_dir() else "/",
            start_new_session=True,
            preexec_fn=_pdeathsig,
        )
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            _signal(proc, signal.SIGKILL)
            await proc.wait()
            return -1

    # -- stopping -----------------------------------------------------------------------

    async def kill(self, message: str, event_reason: str, grace: float | None = None) -> None:
        """Stop the running process (SIGTERM, then SIGKILL after the grace period); the run
        loop restarts it unless the pod is stopping."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if grace is None:
            grace = float(self.pod.pod["spec"].get("terminationGracePeriodSeconds", 30))
        self.pod.event("Normal" if event_reason == "Killing" else "Warning", event_reason, message)
        self.st.ready = False
        self.pod.changed()
        _signal(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.exited.wait(), grace)
        except TimeoutError:
            _signal(proc, signal.SIGKILL)
            await self.exited.wait()

    async def stop(self, deadline: float) -> None:
        """Pod termination: preStop, then SIGTERM, then SIGKILL at the deadline."""
        self.stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        pre = ((self.spec.get("lifecycle") or {}).get("preStop")) or {}
        with contextlib.suppress(Exception):
            if "exec" in pre:
                await self.exec(
                    list(pre["exec"].get("command") or []), max(deadline - time.monotonic(), 0.1)
                )
            elif "httpGet" in pre:
                get = pre["httpGet"]
                port = podspec.port_number(self.spec, get.get("port", 80))
                await asyncio.wait_for(
                    _http_get(
                        get.get("host") or self.pod.ip, port, get.get("path", "/"), {}, False
                    ),
                    max(deadline - time.monotonic(), 0.1),
                )
            elif "sleep" in pre:
                await asyncio.sleep(
                    min(float(pre["sleep"].get("seconds", 0)), max(deadline - time.monotonic(), 0))
                )
        _signal(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.exited.wait(), max(deadline - time.monotonic(), 0.1))
        except TimeoutError:
            _signal(proc, signal.SIGKILL)
            await self.exited.wait()


def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
    # The whole session: `unshare` and `sh` exec into the program, but a program may fork.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _tail(path: Path, size: int = 2048) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(path.stat().st_size - size, 0))
            return f.read().decode(errors="replace").strip()[-1024:]
    except OSError:
        return ""


def _image_key(image: Image) -> str:
    return hashlib.sha256(json.dumps(sorted(image.programs.items())).encode()).hexdigest()[:12]


async def _http_get(
    host: str, port: int, path: str, headers: Mapping[str, str], tls: bool
) -> tuple[bool, str]:
    """One GET the way a kubelet probes: a new connection, 200-399 is success."""
    ctx = None
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
    try:
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "User-Agent: kube-probe/1.36",
            "Connection: close",
        ]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.decode(errors="replace").split()
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        return 200 <= code < 400, f"HTTP probe failed with statuscode: {code}"
    finally:
        writer.close()


# -- one pod ---------------------------------------------------------------------------------


class PodWorker:
    """The life of one pod on a kwok node, from binding to removal."""

    def __init__(self, kubelet: Kubelet, pod: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.settings = kubelet.settings
        self.pod = pod
        meta = pod["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.node: str = pod["spec"]["nodeName"]
        self.dir: Path = self.settings.pods_dir / self.uid
        self.ip = ""
        self.started_at = now()
        self.init_containers = [
            Container(self, c, init=True) for c in pod["spec"].get("initContainers") or []
        ]
        self.containers = [Container(self, c) for c in pod["spec"].get("containers") or []]
        self.initialized = not self.init_containers
        self.restarts_backoff: dict[str, int] = {}
        self.stopping = asyncio.Event()
        self.done = asyncio.Event()
        self.dirty = asyncio.Event()
        self.cache: dict[tuple[str, str, str], Mapping[str, bytes] | None] = {}
        self.tokens: dict[str, tuple[str, float]] = {}
        self.volume_error = ""
        self.last_written: dict[str, Any] | None = None
        self.written_version = 0
        self.phase = "Pending"

    # -- status -------------------------------------------------------------------------

    def changed(self) -> None:
        self.dirty.set()

    def status(self) -> dict[str, Any]:
        containers = [c.st for c in self.containers]
        all_ready = bool(containers) and all(c.ready for c in containers)
        scheduled = next(
            (
                c
                for c in self.pod.get("status", {}).get("conditions") or []
                if c.get("type") == "PodScheduled"
            ),
            {"type": "PodScheduled", "status": "True"},
        )

        def cond(kind: str, ok: bool, reason: str = "") -> dict[str, Any]:
            out: dict[str, Any] = {"type": kind, "status": "True" if ok else "False"}
            previous = next(
                (
                    c
                    for c in (self.last_written or {}).get("conditions") or []
                    if c.get("type") == kind
                ),
                None,
            )
            same = previous is not None and previous.get("status") == out["status"]
            out["lastTransitionTime"] = (
                previous.get("lastTransitionTime") if same and previous else now()
            )
            out["lastProbeTime"] = None
            if not ok and reason:
                out["reason"] = reason
            return out

        not_ready = "ContainersNotReady" if self.initialized else "PodInitializing"
        status: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": self.settings.host_ip,
            "hostIPs": [{"ip": self.settings.host_ip}],
            "startTime": self.started_at,
            "conditions": [
                cond("PodReadyToStartContainers", bool(self.ip)),
                cond("Initialized", self.initialized, "ContainersNotInitialized"),
                cond("Ready", all_ready, not_ready),
                cond("ContainersReady", all_ready, not_ready),
                scheduled,
            ],
            "containerStatuses": [c.status() for c in containers],
            "qosClass": self.pod.get("status", {}).get("qosClass", "BestEffort"),
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.st.status() for c in self.init_containers]
        if self.ip:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        return status

    async def write_status(self) -> None:
        """Write the newest status, coalescing bursts; skip it when nothing changed."""
        while True:
            await self.dirty.wait()
            await asyncio.sleep(0.05)
            self.dirty.clear()
            status = self.status()
            comparable = _without_times(status)
            if self.last_written is not None and _without_times(self.last_written) == comparable:
                continue
            path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status"
            try:
                code, body = await self.kubelet.api.request(
                    "PATCH", path, {"status": status}, content_type="application/merge-patch+json"
                )
            except (aiohttp.ClientError, TimeoutError) as err:
                log.warning("status of %s/%s: %s; retrying", self.namespace, self.name, err)
                self.dirty.set()
                await asyncio.sleep(1)
                continue
            if code == 404:
                return
            if code >= 300:
                log.warning(
                    "status of %s/%s: HTTP %s %s",
                    self.namespace,
                    self.name,
                    code,
                    body.get("message"),
                )
                self.dirty.set()
                await asyncio.sleep(1)
                continue
            self.last_written = status
            self.written_version = _version(body)

    def seen(self, pod: dict[str, Any]) -> None:
        """The API's copy of the pod changed: when another writer overwrote what this runner
        reports (the node lifecycle controller marks every pod of a NotReady node unready),
        report it again, as a kubelet's status manager does when the API's copy differs from
        its own. Without this, pods stay unready for good after their node flaps."""
        self.pod = pod
        if conditions_overwritten(self.last_written, self.written_version, pod):
            self.last_written = None
            self.changed()

    def event(self, kind: str, reason: str, message: str) -> None:
        self.kubelet.event(self.pod, kind, reason, message)

    # -- environment and volumes --------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """The pod as the downward API sees it: with the addresses this runner gave it, which
        the API's copy may not carry yet."""
        status = dict(self.pod.get("status") or {})
        if self.ip:
            status.update(podIP=self.ip, podIPs=[{"ip": self.ip}])
        host = self.settings.host_ip
        status.update(hostIP=host, hostIPs=[{"ip": host}])
        return {**self.pod, "status": status}

    def env_sources(self) -> podspec.EnvSources:
        return podspec.EnvSources(
            configmaps=lambda ns, name: podspec.as_text(self.cache.get(("configmaps", ns, name))),
            secrets=lambda ns, name: podspec.as_text(self.cache.get(("secrets", ns, name))),
        )

    def injected_env(self) -> dict[str, str]:
        port = str(podspec.KUBERNETES_SERVICE_PORT)
        vip = self.kubelet.service_ip
        return {
            "HOSTNAME": self.pod["spec"].get("hostname") or self.name,
            "KUBERNETES_SERVICE_HOST": vip,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{vip}:{port}",
            f"KUBERNETES_PORT_{port}_TCP": f"tcp://{vip}:{port}",
            f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
            f"KUBERNETES_PORT_{port}_TCP_PORT": port,
            f"KUBERNETES_PORT_{port}_TCP_ADDR": vip,
        }

    async def fetch(self, kind: str, namespace: str, name: str) -> Mapping[str, bytes] | None:
        code, body = await self.kubelet.api.request(
            "GET", f"/api/v1/namespaces/{namespace}/{kind}/{name}"
        )
        if code == 404:
            data = None
        elif code != 200:
            raise ConfigError(f"reading {kind} {namespace}/{name}: HTTP {code}")
        elif kind == "secrets":
            data = podspec.decoded(body)
        else:
            data = podspec.configmap_bytes(body)
        self.cache[(kind, namespace, name)] = data
        return data

    def _referenced(self) -> set[tuple[str, str]]:
        """Every (kind, name) of ConfigMaps and Secrets the pod's env and volumes read."""
        refs: set[tuple[str, str]] = set()
        spec = self.pod["spec"]
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            for src in c.get("envFrom") or []:
                if "configMapRef" in src:
                    refs.add(("configmaps", src["configMapRef"]["name"]))
                if "secretRef" in src:
                    refs.add(("secrets", src["secretRef"]["name"]))
            for e in c.get("env") or []:
                vf = e.get("valueFrom") or {}
                if "configMapKeyRef" in vf:
                    refs.add(("configmaps", vf["configMapKeyRef"]["name"]))
                if "secretKeyRef" in vf:
                    refs.add(("secrets", vf["secretKeyRef"]["name"]))
        for v in spec.get("volumes") or []:
            if "configMap" in v:
                refs.add(("configmaps", v["configMap"]["name"]))
            if "secret" in v:
                refs.add(("secrets", v["secret"]["secretName"]))
            for src in (v.get("projected") or {}).get("sources") or []:
                if "configMap" in src:
                    refs.add(("configmaps", src["configMap"]["name"]))
                if "secret" in src:
                    refs.add(("secrets", src["secret"]["name"]))
        return refs

    async def token(self, source: Mapping[str, Any]) -> str:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        expiration = int(source.get("expirationSeconds", TOKEN_SECONDS))
        key = json.dumps([sa, source.get("audience"), expiration])
        cached = self.tokens.get(key)
        # A kubelet renews at 80% of the lifetime.
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": expiration,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": self.name,
                    "uid": self.uid,
                },
            },
        }
        if source.get("audience"):
            body["spec"]["audiences"] = [source["audience"]]
        code, reply = await self.kubelet.api.request(
            "POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{sa}/token", body
        )
        if code != 201:
            raise ConfigError(
                f"TokenRequest for serviceaccount {self.namespace}/{sa}: "
                f"HTTP {code} {reply.get('message')}"
            )
        token = str(reply["status"]["token"])
        self.tokens[key] = (token, time.monotonic() + 0.8 * expiration)
        return token

    async def volume_files(self, volume: Mapping[str, Any]) -> dict[str, bytes] | None:
        """The files of a ConfigMap/Secret/projected/downward-API volume; None for a folder
        volume (emptyDir) that the pod writes itself."""
        ns = self.namespace
        if "configMap" in volume or "secret" in volume:
            is_cm = "configMap" in volume
            src = volume["configMap" if is_cm else "secret"]
            name = src["name"] if is_cm else src["secretName"]
            data = self.cache.get(("configmaps" if is_cm else "secrets", ns, name))
            if data is None:
                if src.get("optional"):
                    return {}
                raise ConfigError(f'{"configmap" if is_cm else "secret"} "{name}" not found')
            return podspec.key_files(
                data, src.get("items"), f"volume {volume['name']}", bool(src.get("optional"))
            )
        if "projected" in volume:
            files: dict[str, bytes] = {}
            for src in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in src:
                    token = await self.token(src["serviceAccountToken"])
                    files[src["serviceAccountToken"].get("path", "token")] = token.encode()
                elif "configMap" in src or "secret" in src:
                    is_cm = "configMap" in src
                    ref = src["configMap" if is_cm else "secret"]
                    data = self.cache.get(("configmaps" if is_cm else "secrets", ns, ref["name"]))
                    if data is None:
                        if ref.get("optional"):
                            continue
                        raise ConfigError(
                            f'{"configmap" if is_cm else "secret"} "{ref["name"]}" not found'
                        )
                    files.update(
                        podspec.key_files(
                            data,
                            ref.get("items"),
                            f"volume {volume['name']}",
                            bool(ref.get("optional")),
                        )
                    )
                elif "downwardAPI" in src:
                    files.update(
                        podspec.downward_files(self.view(), src["downwardAPI"].get("items") or [])
                    )
            return files
        if "downwardAPI" in volume:
            return podspec.downward_files(self.view(), volume["downwardAPI"].get("items") or [])
        if "emptyDir" in volume:
            return None
        if "hostPath" in volume:
            return None
        raise ConfigError(
            f"volume {volume.get('name')}: type {sorted(set(volume) - {'name'})} "
            "is not supported here"
        )

    async def sync_volumes(self) -> None:
        """Materialise (or refresh) every volume under the pod's folder; files are replaced
        atomically, so a program reading them never sees half a file."""
        for kind, name in self._referenced():
            await self.fetch(kind, self.namespace, name)
        for volume in self.pod["spec"].get("volumes") or []:
            folder = self.dir / "volumes" / volume["name"]
            folder.mkdir(parents=True, exist_ok=True)
            files = await self.volume_files(volume)
            if files is None:
                continue
            for rel, content in files.items():
                target = folder / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists() and target.read_bytes() == content:
                    continue
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_bytes(content)
                tmp.replace(target)
            wanted = {folder / rel for rel in files}
            for existing in folder.rglob("*"):
                if (
                    existing.is_file()
                    and existing not in wanted
                    and not existing.name.startswith(".")
                ):
                    existing.unlink()

    def hosts_file(self) -> Path:
        """The pod's /etc/hosts: itself, and the `kubernetes` Service by its DNS names (this
        cluster has no DNS server; the Service's ClusterIP is DNATed by the podnet shim)."""
        vip = self.kubelet.service_ip
        names = ("kubernetes", "kubernetes.default", "kubernetes.default.svc")
        domain = "kubernetes.default.svc.cluster.local"
        hostname = self.pod["spec"].get("hostname") or self.name
        text = (
            "# Kubernetes-managed hosts file (the local cluster's pod runner).\n"
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{self.ip}\t{hostname}\n{vip}\t{' '.join(names)} {domain}\n"
        )
        path = self.dir / "etc-hosts"
        if not path.exists() or path.read_text() != text:
            self.dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return path

    def with_image_paths(
        self, mounts: list[tuple[Path, str, bool]]
    ) -> list[tuple[Path, str, bool]]:
        """The volume mounts, plus what keeps the image's own files visible: each image path
        that a volume would shadow is bound to a folder of the pod's first, then bound back
        over the volume at its own path."""
        targets = [Path(target) for _, target, _ in mounts]
        before: list[tuple[Path, str, bool]] = []
        after: list[tuple[Path, str, bool]] = []
        for i, path in enumerate(self.settings.image_paths):
            if not any(path == t or t in path.parents for t in targets):
                continue
            stash = self.dir / "image" / str(i)
            stash.mkdir(parents=True, exist_ok=True)
            before.append((path, str(stash), False))
            after.append((stash, str(path), True))
        return [*before, *mounts, *after]

    def mounts_for(self, container: Mapping[str, Any]) -> list[tuple[Path, str, bool]]:
        volumes = {v["name"]: v for v in self.pod["spec"].get("volumes") or []}
        # A kubelet manages every pod's /etc/hosts; cluster DNS names the Services.
        mounts: list[tuple[Path, str, bool]] = [(self.hosts_file(), "/etc/hosts", True)]
        for m in container.get("volumeMounts") or []:
            volume = volumes.get(m["name"])
            if volume is None:
                raise ConfigError(f"volumeMount {m['name']} names no volume of the pod")
            if "hostPath" in volume:
                source = Path(volume["hostPath"]["path"])
            else:
                source = self.dir / "volumes" / m["name"]
            if m.get("subPath"):
                source = source / m["subPath"]
            mounts.append((source, m["mountPath"], bool(m.get("readOnly"))))
        return mounts

    # -- the life ---------------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.create_task(self.write_status())
        try:
            await self._run()
        finally:
            self.done.set()
            writer.cancel()

    async def _run(self) -> None:
        self.ip = (self.pod.get("status") or {}).get("podIP") or ""
        if self.ip:
            self.kubelet.addresses.reserve(self.node, self.ip)
        while not self.ip:
            try:
                self.ip = self.kubelet.addresses.allocate(self.node)
            except ConfigError as err:  # a node that gains its podCIDR later
                log.warning("pod %s/%s: %s", self.namespace, self.name, err)
                await asyncio.sleep(2)
                await self.kubelet.load_nodes()
        self.changed()
        while not self.stopping.is_set():
            try:
                await self.sync_volumes()
                self.volume_error = ""
                break
            except (ConfigError, aiohttp.ClientError, OSError) as err:
                if str(err) != self.volume_error:
                    self.event("Warning", "FailedMount", f"MountVolume.SetUp failed: {err}")
                self.volume_error = str(err)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 2)
        refresher = asyncio.create_task(self._refresh_volumes())
        try:
            for init in self.init_containers:
                await init.run()
                if (
                    self.stopping.is_set()
                    or init.st.state.get("terminated", {}).get("exitCode", 1) != 0
                ):
                    if not self.stopping.is_set():
                        self.phase = "Failed"
                        self.changed()
                    return
            self.initialized = True
            self.changed()
            await asyncio.gather(*(c.run() for c in self.containers))
            if not self.stopping.is_set():
                codes = [
                    c.st.state.get("terminated", {}).get("exitCode", 1) for c in self.containers
                ]
                self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
                self.changed()
                await self.stopping.wait()
        finally:
            refresher.cancel()

    async def _refresh_volumes(self) -> None:
        while True:
            await asyncio.sleep(VOLUME_RESYNC_SECONDS)
            try:
                await self.sync_volumes()
            except (ConfigError, aiohttp.ClientError, OSError) as err:
                log.warning("refreshing volumes of %s/%s: %s", self.namespace, self.name, err)

    async def terminate(self, grace: float) -> None:
        """preStop, SIGTERM, SIGKILL after ``grace``; then the pod is removed (grace 0)."""
        deadline = time.monotonic() + grace
        self.stopping.set()
        everyone = self.init_containers + self.containers
        for c in everyone:
            if c.proc is not None and c.proc.returncode is None:
                self.event("Normal", "Killing", f"Stopping container {c.name}")
        await asyncio.gather(*(c.stop(deadline) for c in everyone), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), 5)

    def cleanup(self) -> None:
        if self.ip:
            self.kubelet.addresses.release(self.node, self.ip)
        shutil.rmtree(self.dir, ignore_errors=True)


def _version(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:  # opaque on some API servers: then every newer copy is compared
        return 0


def conditions_overwritten(
    written: Mapping[str, Any] | None, written_version: int, pod: Mapping[str, Any]
) -> bool:
    """Whether `pod` (the API's copy, newer than this runner's last status write) carries a
    condition status other than the one this runner wrote. Copies from before the write are
    not evidence: the watch may still be delivering them."""
    if written is None or _version(pod) <= written_version:
        return False
    theirs = {
        c.get("type"): c.get("status") for c in (pod.get("status") or {}).get("conditions") or []
    }
    return any(theirs.get(c["type"]) != c["status"] for c in written.get("conditions") or [])


def _without_times(status: Mapping[str, Any]) -> Any:
    out = dict(status)
    out["conditions"] = [
        {k: v for k, v in c.items() if k not in ("lastTransitionTime", "lastProbeTime")}
        for c in status.get("conditions") or []
    ]
    return out


# -- the node agent --------------------------------------------------------------------------


class Kubelet:
    def __init__(self, api: Api, settings: Settings, service_ip: str) -> None:
        self.api = api
        self.settings = settings
        self.service_ip = service_ip
        self.addresses = Addresses()
        self.nodes: set[str] = set()
        self.workers: dict[str, PodWorker] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.terminating: dict[str, asyncio.Task[None]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self.posted: dict[tuple[str, str, str], float] = {}
        self.synced = False

    def event(self, pod: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        # A retry loop repeats itself (a missing Secret every 2 s): one Event per pod, reason
        # and message per EVENT_REPEAT_SECONDS, as a kubelet's event aggregation keeps it quiet.
        key = (meta["uid"], reason, message)
        last = self.posted.get(key)
        if reason in RETRY_REASONS:
            if last is not None and time.monotonic() - last < EVENT_REPEAT_SECONDS:
                return
            self.posted[key] = time.monotonic()
        if len(self.posted) > 10_000:
            self.posted.clear()
        stamp = now()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "kubelet", "host": pod["spec"].get("nodeName", "")},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "reportingComponent": "kubelet",
            "reportingInstance": pod["spec"].get("nodeName", ""),
        }
        with contextlib.suppress(asyncio.QueueFull):
            self.events.put_nowait(body)

    async def send_events(self) -> None:
        while True:
            body = await self.events.get()
            with contextlib.suppress(Exception):
                await self.api.request(
                    "POST", f"/api/v1/namespaces/{body['metadata']['namespace']}/events", body
                )

    async def load_nodes(self) -> None:
        code, body = await self.api.request("GET", "/api/v1/nodes")
        if code != 200:
            raise RuntimeError(f"listing nodes: HTTP {code}")
        for node in body.get("items") or []:
            annotations = node["metadata"].get("annotations") or {}
            if annotations.get("kwok.x-k8s.io/node") != "fake":
                continue
            name = node["metadata"]["name"]
            self.nodes.add(name)
            cidr = (node.get("spec") or {}).get("podCIDR")
            if cidr:
                self.addresses.set_node(name, cidr)

    def handle(self, kind: str, pod: dict[str, Any]) -> None:
        spec = pod.get("spec") or {}
        if spec.get("nodeName") not in self.nodes:
            return
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker is not None and uid not in self.terminating:
                # Removed without us (a forced delete): stop at once.
                self.terminating[uid] = asyncio.create_task(self._finish(worker, 2.0, delete=False))
            return
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") and worker is None:
            return
        if worker is None:
            if uid in self.terminating:
                return
            if pod["metadata"].get("deletionTimestamp"):
                # Nothing of it runs (it was never started, or an earlier runner ran it).
                task = asyncio.create_task(self._remove(pod))
                self.terminating[uid] = task
                task.add_done_callback(lambda _: self.terminating.pop(uid, None))
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
            self.tasks[uid] = asyncio.create_task(self._guard(worker))
            return
        worker.seen(pod)
        if pod["metadata"].get("deletionTimestamp") and uid not in self.terminating:
            grace = float(pod["metadata"].get("deletionGracePeriodSeconds") or 0)
            self.terminating[uid] = asyncio.create_task(self._finish(worker, grace, delete=True))

    async def _guard(self, worker: PodWorker) -> None:
        try:
            await worker.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pod %s/%s failed in the runner", worker.namespace, worker.name)

    async def _finish(self, worker: PodWorker, grace: float, delete: bool) -> None:
        try:
            await worker.terminate(grace)
            task = self.tasks.pop(worker.uid, None)
            if task is not None:
                task.cancel()
            if delete:
                await self._remove(worker.pod)
        finally:
            worker.cleanup()
            self.workers.pop(worker.uid, None)
            self.terminating.pop(worker.uid, None)

    async def _remove(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        for _ in range(10):
            try:
                code, _ = await self.api.request(
                    "DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body
                )
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(1)
                continue
            if code in (200, 404, 409):
                return
            await asyncio.sleep(1)

    async def watch_pods(self) -> None:
        version = ""
        while True:
            try:
                if not version:
                    code, listing = await self.api.request("GET", "/api/v1/pods")
                    if code != 200:
                        raise RuntimeError(f"listing pods: HTTP {code}")
                    await self.load_nodes()
                    seen = set()
                    for pod in listing.get("items") or []:
                        seen.add(pod["metadata"]["uid"])
                        self.handle("ADDED", pod)
                    for uid, worker in list(self.workers.items()):
                        if uid not in seen:
                            self.handle("DELETED", worker.pod)
                    version = listing["metadata"]["resourceVersion"]
                    self.synced = True
                params = {
                    "resourceVersion": version,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": "300",
                }
                async for event in self.api.watch("/api/v1/pods", params):
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        version = ""  # 410 Gone: list again
                        break
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if event.get("type") == "BOOKMARK":
                        continue
                    if (
                        obj.get("spec", {}).get("nodeName")
                        and obj["spec"]["nodeName"] not in self.nodes
                    ):
                        await self.load_nodes()
                    self.handle(str(event.get("type")), obj)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("pod watch: %s; listing again", err)
                version = ""
                await asyncio.sleep(1)

    async def shutdown(self) -> None:
        """The runner stops: its pods' processes stop with it (quickly, not with the pods'
        grace periods: the pods stay, and the next runner starts them again)."""
        workers = list(self.workers.values())
        await asyncio.gather(*(w.terminate(2.0) for w in workers), return_exceptions=True)


def build_shim(source: Path, out_dir: Path) -> Path:
    """Compile the podnet shim once per source version (gcc, about a second)."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    target = out_dir / f"podnet-{digest}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("the pod runner needs gcc (or cc) to build its podnet shim")
    tmp = target.with_suffix(".tmp")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(source), "-ldl"], check=True)
    tmp.replace(target)
    return target


def install_images(known: Mapping[str, Image], images_dir: Path) -> None:
    """The programs on each image's PATH, as small scripts."""
    for image in known.values():
        folder = images_dir / _image_key(image)
        folder.mkdir(parents=True, exist_ok=True)
        for program, line in image.programs.items():
            path = (
                folder / program.lstrip("/")
                if not program.startswith("/")
                else folder / Path(program).name
            )
            text = f"#!/bin/sh\n{line}\n"
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                path.chmod(0o755)


def absolute_entrypoints(known: dict[str, Image], images_dir: Path) -> dict[str, Image]:
    """Entrypoints given as absolute paths (`/pause`) point into the image's folder."""
    out: dict[str, Image] = {}
    for repo, image in known.items():
        folder = images_dir / _image_key(image)
        entry = tuple(
            str(folder / Path(e).name) if e in image.programs and e.startswith("/") else e
            for e in image.entrypoint
        )
        out[repo] = Image(entry, image.cmd, image.env, image.programs)
    return out


def sweep(cluster_dir: Path) -> int:
    """Kill pod processes a crashed runner left behind (found by their environment)."""
    marker = f"{POD_MARKER_ENV}={cluster_dir}".encode()
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed


async def serve(args: argparse.Namespace) -> None:
    cluster_dir = Path(args.cluster_dir)
    pki = cluster_dir / "pki"
    pods_dir = cluster_dir / "pods"
    swept = sweep(cluster_dir)
    if swept:
        log.info("stopped %d process(es) left by an earlier runner", swept)
    shutil.rmtree(pods_dir, ignore_errors=True)
    pods_dir.mkdir(parents=True)
    venv_bin = Path(sys.executable).parent
    images_dir = cluster_dir / "images"
    known = podspec.images(venv_bin)
    install_images(known, images_dir)
    shim = build_shim(Path(args.shim_source), cluster_dir / "shim")
    settings = Settings(
        cluster_dir=cluster_dir,
        pods_dir=pods_dir,
        shim=shim,
        images_dir=images_dir,
        known=absolute_entrypoints(known, images_dir),
        dnat=",".join(
            (
                f"{args.service_ip}:{podspec.KUBERNETES_SERVICE_PORT}={args.apiserver}",
                f"{podspec.PROMETHEUS_SERVICE_IP}:{podspec.PROMETHEUS_SERVICE_PORT}"
                f"=127.0.0.1:{PORTS['prometheus']}",
            )
        ),
        image_paths=tuple(
            sorted({Path(sys.prefix), Path(sys.base_prefix), Path(args.shim_source).parents[2]})
        ),
    )
    api = Api(args.server, pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
    kubelet = Kubelet(api, settings, args.service_ip)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(
            text="ok" if kubelet.synced else "syncing", status=200 if kubelet.synced else 503
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(kubelet.watch_pods()), asyncio.create_task(kubelet.send_events())]
    log.info(
        "pod runner up: pods of kwok nodes run as processes (healthz on 127.0.0.1:%d)", args.port
    )
    await stop.wait()
    log.info("stopping: stopping %d pod(s)", len(kubelet.workers))
    for t in tasks:
        t.cancel()
    await kubelet.shutdown()
    await runner.cleanup()
    await api.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llm_operator_dev.devcluster.kubelet", description=__doc__.splitlines()[0]
    )
    p.add_argument("--cluster-dir", required=True)
    p.add_argument("--server", required=True, help="API server URL")
    p.add_argument(
        "--apiserver", required=True, help="host:port the kubernetes Service's ClusterIP maps to"
    )
    p.add_argument("--service-ip", required=True, help="the kubernetes Service's ClusterIP")
    p.add_argument("--shim-source", required=True, help="path of podnet.c")
    p.add_argument("--port", type=int, required=True, help="healthz port on 127.0.0.1")
    p.add_argument("--code-version", default="", help="ignored: lets `up` notice new code")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
