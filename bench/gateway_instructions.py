#!/usr/bin/env python3
"""Instructions per request of the gateway, counted by callgrind (not a test).

Wall-clock CPU on a shared 2-core VM is too noisy to compare two gateway commits within a
few per cent, and the VM exposes no hardware counters (`perf stat -e instructions` says
"not supported"). callgrind counts the instructions the process executes, which does not
depend on what else the machine is doing. One run:

  1. two fake backends from bench/gateway_bench.py (not under valgrind; streamed chunks
     paced --chunk-gap-ms apart so that each one reaches the gateway in its own read even
     though the gateway runs ~50x slower under valgrind);
  2. the gateway of --tree (PYTHONPATH=<tree>/operator, PYTHONHASHSEED=0) under
     `valgrind --tool=callgrind`, in front of them, access log on (to a file);
  3. a warm-up of --warmup requests and --warmup streams, then a callgrind dump (discarded);
  4. --requests non-streaming requests, dump; an idle window of --idle seconds, dump;
     --streams streamed requests, dump. A dump zeroes the counters, so each dump holds
     exactly one phase. Requests go one at a time (concurrency 1) over one keep-alive
     connection: the same work every run, no batching that depends on timing.
  5. per request = (phase instructions - idle rate x phase seconds) / count. The idle rate
     (timers: access-log flush, routing-table poll) is tiny next to the requests; it is
     reported so that can be seen.

    python bench/gateway_instructions.py run --tree /tmp/gw-base --label base --out base1.json
    python bench/gateway_instructions.py report base*.json split*.json

`opcodes` counts bytecodes and Python calls per request, per gateway function, instead: the
gateway (`cli.serve`) of --tree runs in this process under a `sys.settrace` opcode counter
(the client's frames, under bench/, are not counted), the backends as above. Seconds, not
minutes, and exact; it tells where the bytecodes go, callgrind what they cost:

    python bench/gateway_instructions.py opcodes --tree /tmp/gw-base --out base-op.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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


# ----------------------------------------------------------------------------- paced backend
class PacedBackend(gb.FakeBackend):
    """gateway_bench's fake backend, with the streamed chunks `GAP` seconds apart."""

    GAP = 0.0

    def on_message_complete(self) -> None:
        raw = b"".join(self.body)
        try:
            stream = self.parser.get_method() == b"POST" and bool(json.loads(raw).get("stream"))
        except ValueError:
            stream = False
        if not stream or not self.GAP:
            super().on_message_complete()
            return
        self.t.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        loop = asyncio.get_running_loop()
        chunks = [gb._chunk("bench-model", i) for i in range(gb.CHUNKS)] + [b"data: [DONE]\n\n"]

        def send(i: int) -> None:
            if self.t.is_closing():
                return
            c = chunks[i]
            self.t.write(b"%x\r\n%b\r\n" % (len(c), c))
            if i + 1 < len(chunks):
                loop.call_later(self.GAP, send, i + 1)
            else:
                self.t.write(b"0\r\n\r\n")

        send(0)


async def _serve_backend(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(PacedBackend, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# ----------------------------------------------------------------------------- driver
async def _send(target: str, n: int, stream: bool) -> dict[str, Any]:
    """`n` requests, one after the other on one keep-alive connection."""
    loop = asyncio.get_running_loop()
    host, port = target.rsplit(":", 1)
    body = gb.STREAM_BODY if stream else gb.REQUEST_BODY
    data = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %b\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer sk-bench\r\ncontent-length: %d\r\n\r\n%b"
        % (target.encode(), len(body), body)
    )
    statuses: dict[int, int] = {}
    reconnects = 0
    _, client = await loop.create_connection(gb.Client, host, int(port))
    t0 = time.perf_counter()
    for _ in range(n):
        if client.t.is_closing():
            reconnects += 1
            _, client = await loop.create_connection(gb.Client, host, int(port))
        _, _, status = await client.request(data)
        statuses[status] = statuses.get(status, 0) + 1
    seconds = time.perf_counter() - t0
    client.t.close()
    return {"requests": n, "statuses": statuses, "reconnects": reconnects, "seconds": seconds}


def _drive(target: str, n: int, stream: bool) -> dict[str, Any]:
    return asyncio.run(_send(target, n, stream))


# ----------------------------------------------------------------------------- callgrind
def _reads(text: str) -> int:
    """Socket reads in a dump: calls of uvloop's read callback (one per data_received)."""
    name = "__pyx_f_6uvloop_4loop___uv_stream_on_read"
    ids: dict[str, str] = {}
    current = ""
    total = 0
    for line in text.splitlines():
        if line.startswith("cfn=("):
            key, _, fn = line[5:].partition(")")
            if fn.strip():
                ids[key] = fn.strip()
            current = ids.get(key, "")
        elif line.startswith("fn=("):
            key, _, fn = line[4:].partition(")")
            if fn.strip():
                ids[key] = fn.strip()
        elif line.startswith("calls=") and current == name:
            total += int(line[6:].split()[0])
    return total


def _dump(pid: int, out_dir: Path, reason: str) -> tuple[int, int]:
    """Dump (and zero) the gateway's counters; return the dump's instructions and reads."""
    before = set(out_dir.glob("cg.out.*"))
    subprocess.run(
        ["callgrind_control", f"--dump={reason}", str(pid)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for f in sorted(set(out_dir.glob("cg.out.*")) - before):
            text = f.read_text(errors="replace")
            if f"Trigger: dump {reason}" in text:
                for line in text.splitlines():
                    if line.startswith(("summary:", "totals:")):
                        return int(line.split()[1]), _reads(text)
        time.sleep(0.2)
    raise RuntimeError(f"no callgrind dump for {reason}")


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _phase(pid: int, work: Path, target: str, n: int, stream: bool, name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = _drive(target, n, stream)
    r["instructions"], r["reads"] = _dump(pid, work, name)
    r["window_s"] = time.perf_counter() - t0
    return r


def cmd_run(args: argparse.Namespace) -> int:
    tree = Path(args.tree).resolve()
    work = Path(tempfile.mkdtemp(prefix="gwinstr-"))
    ports = [args.base_port + 1, args.base_port + 2]
    log = open(work / "run.log", "wb")  # noqa: SIM115 - closed in the finally below
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, **kw)
        procs.append(p)
        return p

    res: dict[str, Any] = {
        "label": args.label,
        "tree": str(tree),
        "commit": subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "chunk_gap_ms": args.chunk_gap_ms,
    }
    try:
        for port in ports:
            spawn(
                [PY, __file__, "backend", "--port", str(port), "--gap-ms", str(args.chunk_gap_ms)]
            )
        for port in ports:
            gb._wait_port(port)
        table = {
            "models": [
                {
                    "name": "bench-model",
                    "tracks": [
                        {
                            "name": "stable",
                            "weight": 100,
                            "addresses": [f"127.0.0.1:{p}" for p in ports],
                        }
                    ],
                }
            ]
        }
        (work / "routes.json").write_text(json.dumps(table))
        gw_port = args.base_port + 10
        access = open(work / "access.log", "wb")  # noqa: SIM115 - closed with the process
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={work}/cg.out",
            "--dump-instr=no",
            PY,
            "-m",
            "llm_operator.gateway.cli",
            "--config",
            str(work / "routes.json"),
            "--host",
            "127.0.0.1",
            "--port",
            str(gw_port),
        ]
        env = {**os.environ, "PYTHONPATH": str(tree / "operator"), "PYTHONHASHSEED": "0"}
        gw = subprocess.Popen(
            cmd, stdout=access, stderr=log, start_new_session=True, cwd=tree, env=env
        )
        procs.append(gw)
        gb._wait_port(gw_port, timeout=300)
        target = f"127.0.0.1:{gw_port}"
        _drive(target, args.warmup, False)
        _drive(target, args.warmup, True)
        _dump(gw.pid, work, "warmup")
        res["plain"] = _phase(gw.pid, work, target, args.requests, False, "plain")
        t0 = time.perf_counter()
        time.sleep(args.idle)
        idle, _ = _dump(gw.pid, work, "idle")
        res["idle"] = {"instructions": idle, "window_s": time.perf_counter() - t0}
        res["stream"] = _phase(gw.pid, work, target, args.streams, True, "stream")
        rate = idle / res["idle"]["window_s"]
        for k in ("plain", "stream"):
            ph = res[k]
            ph["idle_share"] = rate * ph["window_s"] / ph["instructions"]
            ph["per_request"] = (ph["instructions"] - rate * ph["window_s"]) / ph["requests"]
            ph["per_request_raw"] = ph["instructions"] / ph["requests"]
            ph["reads_per_request"] = ph["reads"] / ph["requests"]
        _stop(gw)
        access.close()
    finally:
        for p in procs:
            _stop(p)
        log.close()
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    print(f"work dir (callgrind dumps, logs): {work}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Per label: each run's instructions per request, then mean and spread."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for f in args.files:
        r = json.loads(Path(f).read_text())
        runs.setdefault(r["label"], []).append(r)
    out = [
        "| commit | non-streaming instr/req, per run | mean (max-min) | streamed instr/req, "
        "per run | mean (max-min) | upstream reads per stream |",
        "|---|---|---|---|---|---|",
    ]
    means: dict[str, dict[str, float]] = {}
    for label, rs in runs.items():
        cells = [f"{label} {rs[0]['commit'][:7]}"]
        for k in ("plain", "stream"):
            xs = [r[k]["per_request"] for r in rs]
            means.setdefault(label, {})[k] = statistics.fmean(xs)
            cells.append(", ".join(f"{x:,.0f}" for x in xs))
            cells.append(f"{statistics.fmean(xs):,.0f} ({max(xs) - min(xs):,.0f})")
        # Each read of a streamed answer is one pass through the relay: fewer reads than
        # chunks (17) means the gateway fell behind the paced backend and got several at once.
        cells.append(", ".join(f"{r['stream']['reads_per_request'] - 1:.2f}" for r in rs))
        out.append("| " + " | ".join(cells) + " |")
    labels = list(means)
    for other in labels[1:]:
        for k in ("plain", "stream"):
            a, b = means[labels[0]][k], means[other][k]
            out.append(
                f"\n{other} vs {labels[0]}, {k}: {b - a:+,.0f} instr/req ({(b / a - 1):+.2%})"
            )
    print("\n".join(out))
    return 0


# ----------------------------------------------------------------------------- opcodes
def cmd_opcodes(args: argparse.Namespace) -> int:
    """Run `_opcodes_child` with the tree's package on the path."""
    env = {**os.environ, "PYTHONPATH": str(Path(args.tree).resolve() / "operator")}
    env["PYTHONHASHSEED"] = "0"
    cmd = [PY, __file__, "opcodes-child", "--requests", str(args.requests)]
    cmd += ["--base-port", str(args.base_port), "--out", args.out]
    return subprocess.run(cmd + (["--stream"] if args.stream else []), env=env).returncode


async def _opcodes(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    from llm_operator.gateway import cli  # the tree's, from PYTHONPATH

    ops: dict[tuple[str, int, str], int] = {}
    calls: dict[tuple[str, int, str], int] = {}
    here = str(Path(__file__).resolve().parent)

    def tracer(frame: Any, event: str, _: Any) -> Any:
        code = frame.f_code
        if code.co_filename.startswith(here):
            return None
        key = (code.co_filename, code.co_firstlineno, code.co_name)
        if event == "call":  # also each resumption of a coroutine
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            calls[key] = calls.get(key, 0) + 1
        elif event == "opcode":
            ops[key] = ops.get(key, 0) + 1
        return tracer

    ports = [args.base_port + 1, args.base_port + 2]
    procs = [
        subprocess.Popen([PY, __file__, "backend", "--port", str(p), "--gap-ms", "5"])
        for p in ports
    ]
    work = Path(tempfile.mkdtemp(prefix="gwops-"))
    try:
        for p in ports:
            gb._wait_port(p)
        tracks = [{"name": "stable", "weight": 100, "addresses": [f"127.0.0.1:{p}" for p in ports]}]
        (work / "routes.json").write_text(
            json.dumps({"models": [{"name": "bench-model", "tracks": tracks}]})
        )
        gw_port = args.base_port + 10
        gw_args = cli.parse_args(
            ["--config", str(work / "routes.json"), "--host", "127.0.0.1", "--port", str(gw_port)]
        )
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the access log, for the process
        task = asyncio.get_running_loop().create_task(cli.serve(gw_args))
        for _ in range(600):  # the gateway starts on this loop: wait without blocking it
            try:
                _, w = await asyncio.open_connection("127.0.0.1", gw_port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        target = f"127.0.0.1:{gw_port}"
        await _send(target, 100, args.stream)  # warm-up
        sys.settrace(tracer)
        await _send(target, args.requests, args.stream)
        sys.settrace(None)
        task.cancel()
    finally:
        for p in procs:
            p.terminate()
    n = args.requests
    rows = [
        (f"{Path(k[0]).name}:{k[1]}:{k[2]}", v / n, calls.get(k, 0) / n) for k, v in ops.items()
    ]
    return sorted(rows, key=lambda r: -r[1])


def cmd_opcodes_child(args: argparse.Namespace) -> int:
    rows = asyncio.run(_opcodes(args))
    total_ops, total_calls = sum(r[1] for r in rows), sum(r[2] for r in rows)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"opcodes": total_ops, "calls": total_calls, "rows": rows})
        )
    out = sys.__stdout__
    assert out is not None
    print(f"per request: {total_ops:,.0f} bytecodes, {total_calls:.1f} Python calls", file=out)
    for name, ops, calls in rows[:40]:
        print(f"{ops:8.1f} {calls:5.1f}  {name}", file=out)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend")
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--gap-ms", type=float, default=0.0)
    r = sub.add_parser("run")
    r.add_argument("--tree", required=True, help="a checkout (git worktree) of the commit")
    r.add_argument("--label", required=True)
    r.add_argument("--requests", type=int, default=2000)
    r.add_argument("--streams", type=int, default=500)
    r.add_argument("--warmup", type=int, default=200)
    r.add_argument("--idle", type=float, default=3.0)
    r.add_argument("--chunk-gap-ms", type=float, default=5.0)
    r.add_argument("--base-port", type=int, default=18400)
    r.add_argument("--out", default="")
    rp = sub.add_parser("report")
    rp.add_argument("files", nargs="+")
    for name in ("opcodes", "opcodes-child"):
        o = sub.add_parser(name)
        if name == "opcodes":
            o.add_argument("--tree", required=True)
        o.add_argument("--requests", type=int, default=300)
        o.add_argument("--stream", action="store_true")
        o.add_argument("--base-port", type=int, default=18700)
        o.add_argument("--out", default="")
    args = ap.parse_args()
    if args.cmd == "report":
        return cmd_report(args)
    if args.cmd == "opcodes":
        return cmd_opcodes(args)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.cmd == "backend":
        PacedBackend.GAP = args.gap_ms / 1000
        asyncio.run(_serve_backend(args.port))
        return 0
    if args.cmd == "opcodes-child":
        return cmd_opcodes_child(args)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
