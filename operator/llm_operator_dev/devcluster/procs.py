"""Background processes with pid files, and finding them again without trusting the pid alone.

A pid file can outlive its process and the pid can be reused, so a process counts as ours only
when ``/proc/<pid>/cmdline`` still starts with the binary we launched and names our cluster
folder. ``down`` also sweeps ``/proc`` for such processes, so one whose pid file was lost is
still found and stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Running:
    """A live process that we started."""

    name: str
    pid: int
    argv0: str


def cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat.rsplit(")", 1)[-1].split()[0] in {"Z", "X"}


def is_ours(pid: int, argv0: str, marker: str) -> bool:
    """Whether ``pid`` is alive, runs ``argv0`` and mentions ``marker`` (our cluster folder)."""
    cmd = cmdline(pid)
    if not cmd or cmd[0] != argv0 or _is_zombie(pid):
        return False
    return any(marker in part for part in cmd[1:])


def pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def read_pid(run_dir: Path, name: str) -> tuple[int, str] | None:
    try:
        data = json.loads(pid_file(run_dir, name).read_text())
        return int(data["pid"]), str(data["argv0"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running(run_dir: Path, name: str, marker: str) -> Running | None:
    """The process recorded for ``name``, if it is still alive and still ours."""
    recorded = read_pid(run_dir, name)
    if recorded is None:
        return None
    pid, argv0 = recorded
    return Running(name, pid, argv0) if is_ours(pid, argv0, marker) else None


def start(
    name: str,
    argv: list[str],
    run_dir: Path,
    log: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
) -> Running:
    """Start ``argv`` in its own session, detached from our terminal, logging to ``log``.

    Its own session means a Ctrl-C in the shell that ran ``up`` does not reach it, and the
    process survives us: ``down`` is the way to stop it. ``env`` adds to (or overrides) our
    own environment.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}: "
                  f"{' '.join(argv)}\n".encode())  # fmt: skip
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **env} if env else None,
            start_new_session=True,
            close_fds=True,
        )
    # We never wait() on it; forget the handle so Python does not warn that it still runs.
    proc.returncode = 0
    # Popen returns once exec has begun, but the kernel sets up the new command line a
    # moment later; until then /proc shows our own, and the process would not look like ours.
    deadline = time.monotonic() + 2.0
    while cmdline(proc.pid) != argv and time.monotonic() < deadline:
        if exited_early(proc.pid):
            break
        time.sleep(0.005)
    tmp = pid_file(run_dir, name).with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": proc.pid, "argv0": argv[0]}) + "\n")
    tmp.replace(pid_file(run_dir, name))
    return Running(name, proc.pid, argv[0])


def exited_early(pid: int) -> bool:
    """True once a child we started has exited (reaps it if it is our child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        # Not our child (started by an earlier `up`): fall back to /proc.
        return cmdline(pid) is None or _is_zombie(pid)
    return done == pid


def sweep(bin_prefix: Path, marker: str) -> list[Running]:
    """Every live process whose binary lives under ``bin_prefix`` and mentions ``marker``."""
    found: list[Running] = []
    prefix = str(bin_prefix) + os.sep
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cmd = cmdline(pid)
        if cmd and cmd[0].startswith(prefix) and is_ours(pid, cmd[0], marker):
            found.append(Running(Path(cmd[0]).name, pid, cmd[0]))
    return found


def stop(proc: Running, marker: str, grace: float = 15.0) -> bool:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. True if the process is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not is_ours(proc.pid, proc.argv0, marker):
            return True
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            exited_early(proc.pid)  # reap it if it is our child, else it stays a zombie
            if not is_ours(proc.pid, proc.argv0, marker):
                return True
            time.sleep(0.1)
    return not is_ours(proc.pid, proc.argv0, marker)
