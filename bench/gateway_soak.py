#!/usr/bin/env python3
"""The gateway under many connections and a long steady load: memory stays bounded (not a test).

Issue 17's load drill. One run, all on loopback:

  1. two paced fake backends (bench/gateway_instructions.py: streamed events --gap-ms apart)
     and the gateway in front of them (access log on, to a file), as in gateway_bench.py;
  2. **idle**: --idle-connections TCP connections opened to the gateway and held (each sends
     nothing), the gateway's RSS before, while held and after they close;
  3. **streams**: --streams concurrent streamed chat completions (17 events each, --gap-ms
     apart, so they overlap), every one checked whole; RSS before, at peak, after;
  4. **soak**: --soak-seconds of steady closed-loop load (--soak-clients connections, half
     streaming), RSS sampled every --sample-seconds: the first and last samples, the
     largest, and the slope of a least-squares line over the second half.

    python bench/gateway_soak.py --out /tmp/soak.json                 # 10-minute soak
    python bench/gateway_soak.py --soak-seconds 60 --out /tmp/q.json  # a quick one
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_bench as gb

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-model"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def request(stream: bool, i: int) -> bytes:
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": f"hi {i}"}], "stream": stream}
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response (content-length or chunked): (status, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = None
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if length is not None:
        return status, await reader.readexactly(length)
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, body
        body += chunk[:-2]


async def idle_phase(port: int, gw_pid: int, count: int, hold: float) -> dict[str, Any]:
    before = rss_mib(gw_pid)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    started = time.monotonic()
    for i in range(count):
        conns.append(await asyncio.open_connection("127.0.0.1", port))
        if i % 500 == 499:
            await asyncio.sleep(0)  # let the gateway accept
    opened = time.monotonic() - started
    await asyncio.sleep(hold)
    held = rss_mib(gw_pid)
    # Still served while they are held: one request on a fresh connection.
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(request(False, 0))
    status, _ = await read_response(r)
    w.close()
    alive = sum(1 for rd, _ in conns if not rd.at_eof())
    for _, wr in conns:
        wr.close()
    await asyncio.sleep(3)
    return {
        "connections": count,
        "open_seconds": round(opened, 2),
        "still_open_after_hold": alive,
        "served_meanwhile": status,
        "rss_before_mib": round(before, 1),
        "rss_held_mib": round(held, 1),
        "rss_per_connection_kib": round((held - before) * 1024 / count, 2),
        "rss_after_mib": round(rss_mib(gw_pid), 1),
    }


async def streams_phase(port: int, gw_pid: int, count: int) -> dict[str, Any]:
    before = rss_mib(gw_pid)
    peak = before
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mib(gw_pid))
            await asyncio.sleep(0.1)

    async def one(i: int) -> bool:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            w.write(request(True, i))
            status, body = await read_response(r)
            return (
                status == 200 and body.endswith(b"data: [DONE]\n\n") and body.count(b"data:") == 17
            )
        finally:
            w.close()

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    took = time.monotonic() - started
    done.set()
    await sampler
    await asyncio.sleep(3)
    ok = sum(1 for x in results if x is True)
    return {
        "streams": count,
        "whole": ok,
        "failed": count - ok,
        "seconds": round(took, 2),
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_after_mib": round(rss_mib(gw_pid), 1),
    }


async def soak_phase(
    port: int, gw_pid: int, seconds: float, clients: int, every: float, pause: float
) -> dict[str, Any]:
    stop = time.monotonic() + seconds
    counts = {"ok": 0, "failed": 0}

    async def client(k: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        i = 0
        while time.monotonic() < stop:
            w.write(request(k % 2 == 0, i))
            try:
                status, _ = await read_response(r)
                counts["ok" if status == 200 else "failed"] += 1
            except (asyncio.IncompleteReadError, ConnectionError):
                counts["failed"] += 1
                w.close()
                r, w = await asyncio.open_connection("127.0.0.1", port)
            i += 1
            await asyncio.sleep(pause)  # a steady rate, not the machine's limit
        w.close()

    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()

    async def sample() -> None:
        while time.monotonic() < stop:
            samples.append((time.monotonic() - t0, rss_mib(gw_pid)))
            await asyncio.sleep(every)

    await asyncio.gather(sample(), *(client(k) for k in range(clients)))
    second_half = [s for s in samples if s[0] >= seconds / 2]
    slope = (
        statistics.linear_regression([t for t, _ in second_half], [m for _, m in second_half])[0]
        if len(second_half) >= 2
        else 0.0
    )
    return {
        "seconds": seconds,
        "clients": clients,
        "pause_s": pause,
        "requests_ok": counts["ok"],
        "requests_failed": counts["failed"],
        "rss_first_mib": round(samples[0][1], 1),
        "rss_last_mib": round(samples[-1][1], 1),
        "rss_max_mib": round(max(m for _, m in samples), 1),
        "rss_slope_mib_per_hour_second_half": round(slope * 3600, 2),
        "samples": [(round(t, 1), round(m, 1)) for t, m in samples],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-port", type=int, default=19400)
    p.add_argument("--gap-ms", type=float, default=50.0)
    p.add_argument("--idle-connections", type=int, default=10_000)
    p.add_argument("--idle-hold", type=float, default=10.0)
    p.add_argument("--streams", type=int, default=1_000)
    p.add_argument("--soak-seconds", type=float, default=600.0)
    p.add_argument("--soak-clients", type=int, default=8)
    p.add_argument(
        "--soak-pause", type=float, default=0.02, help="each client's pause between requests"
    )
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument("--out", default="")
    args = p.parse_args()
    # Both ends of every connection live in this machine: the client and the gateway each
    # hold one descriptor per connection.
    need = args.idle_connections + args.streams + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, need)), hard))

    work = Path(tempfile.mkdtemp(prefix="gwsoak-"))
    ports = [args.base_port + 1, args.base_port + 2]
    gw_port = args.base_port + 10
    procs: list[subprocess.Popen[bytes]] = []
    log = open(work / "run.log", "wb")  # noqa: SIM115 - closed below
    try:
        for port in ports:
            procs.append(
                subprocess.Popen(
                    [
                        PY,
                        str(ROOT / "bench/gateway_instructions.py"),
                        "backend",
                        "--port",
                        str(port),
                        "--gap-ms",
                        str(args.gap_ms),
                    ],
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            )
        for port in ports:
            gb._wait_port(port)
        table = {
            "models": [
                {
                    "name": MODEL,
                    "tracks": [
                        {"name": "stable", "weight": 100,
                         "addresses": [f"127.0.0.1:{port}" for port in ports]}
                    ],
                }
            ]
        }  # fmt: skip
        (work / "routes.json").write_text(json.dumps(table))
        gw = subprocess.Popen(
            [PY, "-m", "llm_operator.gateway.cli", "--config", str(work / "routes.json"),
             "--host", "127.0.0.1", "--port", str(gw_port)],
            stdout=open(work / "access.log", "wb"), stderr=log, start_new_session=True,  # noqa: SIM115
            cwd=ROOT,
        )  # fmt: skip
        procs.append(gw)
        gb._wait_port(gw_port)
        result: dict[str, Any] = {"gap_ms": args.gap_ms, "started": time.strftime("%FT%TZ")}
        print("idle connections", file=sys.stderr)
        result["idle"] = asyncio.run(
            idle_phase(gw_port, gw.pid, args.idle_connections, args.idle_hold)
        )
        print(json.dumps(result["idle"]), file=sys.stderr)
        print("concurrent streams", file=sys.stderr)
        result["streams"] = asyncio.run(streams_phase(gw_port, gw.pid, args.streams))
        print(json.dumps(result["streams"]), file=sys.stderr)
        print(f"soak {args.soak_seconds:.0f} s", file=sys.stderr)
        result["soak"] = asyncio.run(
            soak_phase(
                gw_port,
                gw.pid,
                args.soak_seconds,
                args.soak_clients,
                args.sample_seconds,
                args.soak_pause,
            )
        )
        result["load_average"] = os.getloadavg()
        summary = {k: v for k, v in result["soak"].items() if k != "samples"}
        print(json.dumps(summary), file=sys.stderr)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        for proc in procs:
            gb._stop(proc)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
