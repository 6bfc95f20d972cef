#!/usr/bin/env python3
"""Side-by-side benchmark of the gateway, vllm-router and LiteLLM's proxy (not a test).

Backends: a minimal fast fake OpenAI server (raw asyncio protocol on uvloop) so the backend
is not the bottleneck: it answers a chat completion at once, or streams 16 SSE chunks in
16 separate writes. Two backends; every router balances one model over both.

Layout on a 2-core machine: the router under test is pinned to core 0 (`taskset -c 0`); the
load generator and the backends share core 1. The load generator is a closed loop of N
keep-alive connections (raw protocol + httptools, uvloop) measuring each request's latency
and, for streams, the time to the first body chunk. "direct" runs the same load straight at
the backends: the added latency of a router is its number minus direct's.

    python bench/gateway_bench.py run --out bench/results/gateway.raw.json
    python bench/gateway_bench.py backend --port 9001            # one fake backend
    python bench/gateway_bench.py load --target 127.0.0.1:8000 -c 16 -d 5 [--stream]

Routers are started from their own venvs (see bench/results/gateway.md for the commands):
  /tmp/venv-vllm-router/bin/vllm-router, /tmp/venv-litellm/bin/litellm.
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

import httptools

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CHUNKS = 16
REQUEST_BODY = json.dumps(
    {
        "model": "bench-model",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence, please."},
        ],
        "max_tokens": 16,
    }
).encode()
STREAM_BODY = json.dumps({**json.loads(REQUEST_BODY), "stream": True}).encode()


# ----------------------------------------------------------------------------- fake backend
def _completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! Nice to meet you."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27},
        }
    ).encode()


def _chunk(model: str, i: int) -> bytes:
    delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f" tok{i}"}
    body = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
        }
    ).encode()
    return b"data: " + body + b"\n\n"


class FakeBackend(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.url = b""

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.t.close()

    def on_message_begin(self) -> None:
        self.body = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, b: bytes) -> None:
        self.body.append(b)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        if method == b"GET":
            if self.url.startswith(b"/v1/models"):
                body = json.dumps(
                    {"object": "list", "data": [{"id": "bench-model", "object": "model"}]}
                ).encode()
            else:
                body = b"{}"
            self.t.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                % (len(body), body)
            )
            return
        raw = b"".join(self.body)
        try:
            req = json.loads(raw)
        except ValueError:
            req = {}
        model = req.get("model", "bench-model")
        if not req.get("stream"):
            body = _completion(model)
            self.t.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                % (len(body), body)
            )
            return
        self.t.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        loop = asyncio.get_running_loop()
        chunks = [_chunk(model, i) for i in range(CHUNKS)] + [b"data: [DONE]\n\n"]

        def send(i: int) -> None:
            if self.t.is_closing():
                return
            c = chunks[i]
            self.t.write(b"%x\r\n%b\r\n" % (len(c), c))
            if i + 1 < len(chunks):
                # One chunk per loop turn: separate writes, as an engine emits tokens.
                loop.call_soon(send, i + 1)
            else:
                self.t.write(b"0\r\n\r\n")

        send(0)


async def _serve_backend(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeBackend, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# ----------------------------------------------------------------------------- load generator
class Client(asyncio.Protocol):
    def __init__(self, done: asyncio.Queue[Any] | None = None) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.fut: asyncio.Future[tuple[float, float, int]] | None = None
        self.first = 0.0
        self.status = 0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, b: bytes) -> None:
        if not self.first:
            self.first = time.perf_counter()

    def on_message_complete(self) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_result((self.first, time.perf_counter(), self.status))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError("closed"))
        if not self.lost.done():
            self.lost.set_result(None)

    def request(self, data: bytes) -> asyncio.Future[tuple[float, float, int]]:
        self.first = 0.0
        self.fut = asyncio.get_running_loop().create_future()
        self.t.write(data)
        return self.fut


async def _load(
    targets: list[str], concurrency: int, duration: float, stream: bool, path: str, warmup: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    body = STREAM_BODY if stream else REQUEST_BODY
    lat: list[float] = []
    ttfc: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    t_end_warm = time.perf_counter() + warmup
    t_end = t_end_warm + duration

    async def worker(i: int) -> None:
        nonlocal errors
        host, port = targets[i % len(targets)].rsplit(":", 1)
        data = (
            b"POST %b HTTP/1.1\r\nhost: %b\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer sk-bench\r\ncontent-length: %d\r\n\r\n%b"
            % (path.encode(), targets[i % len(targets)].encode(), len(body), body)
        )
        client: Client | None = None
        while True:
            now = time.perf_counter()
            if now >= t_end:
                break
            if client is None or client.t.is_closing():
                _, client = await loop.create_connection(Client, host, int(port))
            start = time.perf_counter()
            try:
                first, end, status = await client.request(data)
            except ConnectionError:
                errors += 1
                client = None
                continue
            if start >= t_end_warm:
                statuses[status] = statuses.get(status, 0) + 1
                if status != 200:
                    errors += 1
                lat.append(end - start)
                if first:
                    ttfc.append(first - start)
        if client is not None:
            client.t.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return _summary(lat, ttfc, errors, statuses, duration)


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def _summary(
    lat: list[float], ttfc: list[float], errors: int, statuses: dict[int, int], duration: float
) -> dict[str, Any]:
    return {
        "requests": len(lat),
        "errors": errors,
        "statuses": statuses,
        "rps": len(lat) / duration,
        "p50_ms": _pct(lat, 50) * 1000,
        "p99_ms": _pct(lat, 99) * 1000,
        "mean_ms": (statistics.fmean(lat) * 1000) if lat else float("nan"),
        "ttfc_p50_ms": _pct(ttfc, 50) * 1000,
        "ttfc_p99_ms": _pct(ttfc, 99) * 1000,
    }


# ----------------------------------------------------------------------------- orchestration
NICE = 0


def _taskset(core: str) -> list[str]:
    # Every process of the run (routers, backends, load generator) gets the same niceness:
    # on a shared machine a negative one keeps other tenants from skewing the latencies,
    # and it is the same for every router.
    prefix = ["nice", "-n", str(NICE)] if NICE else []
    return [*prefix, "taskset", "-c", core]


def _wait_port(port: int, timeout: float = 60.0, path: str = "/health") -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"nothing answered on port {port}{path} within {timeout}s")


def _proc_tree(pid: int) -> list[int]:
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for c in children:
        out += _proc_tree(int(c))
    return out


def _cpu_seconds(pid: int) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in _proc_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _peak_rss_mib(pid: int) -> float:
    total = 0
    for p in _proc_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _run_load(target: str, c: int, d: float, stream: bool, warmup: float) -> dict[str, Any]:
    cmd = [
        *_taskset("1"),
        PY,
        __file__,
        "load",
        "--target",
        target,
        "-c",
        str(c),
        "-d",
        str(d),
        "--warmup",
        str(warmup),
    ]
    if stream:
        cmd.append("--stream")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=d + warmup + 120)
    return json.loads(out.stdout)


SCENARIOS = [
    # name, concurrency, stream
    ("c1", 1, False),
    ("c16", 16, False),
    ("c64", 64, False),
    ("stream_c1", 1, True),
    ("stream_c16", 16, True),
]


def _bench_target(
    name: str, target: str, pid: int | None, duration: float, warmup: float
) -> dict[str, Any]:
    res: dict[str, Any] = {"name": name}
    for scen, c, stream in SCENARIOS:
        cpu0 = _cpu_seconds(pid) if pid else 0.0
        r = _run_load(target, c, duration, stream, warmup)
        cpu1 = _cpu_seconds(pid) if pid else 0.0
        if pid and r["requests"]:
            # CPU over warm-up + measurement, divided by the requests of both (approx: the
            # warm-up rate matches the measured one).
            r["cpu_us_per_req"] = (
                (cpu1 - cpu0) / (r["requests"] * (duration + warmup) / duration) * 1e6
            )
        res[scen] = r
        print(f"  {name:14s} {scen:11s} {json.dumps(_short(r))}", file=sys.stderr, flush=True)
    if pid:
        res["peak_rss_mib"] = _peak_rss_mib(pid)
    return res


def _short(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("rps", "p50_ms", "p99_ms", "ttfc_p50_ms", "errors", "cpu_us_per_req")
    return {k: round(r[k], 3) if isinstance(r.get(k), float) else r.get(k) for k in keys}


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def cmd_run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="gwbench-"))
    b_ports = [args.base_port + 1, args.base_port + 2]
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "python": sys.version.split()[0]},
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "targets": {},
        "errors": {},
    }
    log = open(work / "bench.log", "wb")  # noqa: SIM115 - closed in the finally below

    def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, **kw)
        procs.append(p)
        return p

    try:
        for port in b_ports:
            spawn([*_taskset("1"), PY, __file__, "backend", "--port", str(port)])
        for port in b_ports:
            _wait_port(port)
        backends = [f"127.0.0.1:{p}" for p in b_ports]
        only = set(args.only.split(",")) if args.only else None

        if not only or "direct" in only:
            print("direct", file=sys.stderr)
            results["targets"]["direct"] = _bench_target(
                "direct", ",".join(backends), None, args.duration, args.warmup
            )

        # --- our gateway
        if not only or "gateway" in only:
            gw_port = args.base_port + 10
            table = {
                "models": [
                    {
                        "name": "bench-model",
                        "tracks": [{"name": "stable", "weight": 100, "addresses": backends}],
                    }
                ]
            }
            (work / "routes.json").write_text(json.dumps(table))
            gw_cmd = [
                *_taskset("0"),
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
            p = spawn(gw_cmd, cwd=ROOT)
            _wait_port(gw_port)
            print("gateway: " + " ".join(gw_cmd), file=sys.stderr)
            results["targets"]["gateway"] = _bench_target(
                "gateway", f"127.0.0.1:{gw_port}", p.pid, args.duration, args.warmup
            )
            results["targets"]["gateway"]["command"] = " ".join(gw_cmd)
            _stop(p)

        # --- vllm-router
        vr = Path(args.vllm_router)
        if (not only or "vllm-router" in only) and vr.exists():
            vr_port = args.base_port + 20
            vr_cmd = [
                *_taskset("0"),
                str(vr),
                "--host",
                "127.0.0.1",
                "--port",
                str(vr_port),
                "--worker-urls",
                *[f"http://{b}" for b in backends],
                "--policy",
                "round_robin",
                "--log-level",
                "warning",
                "--prometheus-port",
                str(args.base_port + 21),
            ]
            p = spawn(vr_cmd)
            try:
                _wait_port(vr_port, 90)
                print("vllm-router: " + " ".join(vr_cmd), file=sys.stderr)
                results["targets"]["vllm-router"] = _bench_target(
                    "vllm-router", f"127.0.0.1:{vr_port}", p.pid, args.duration, args.warmup
                )
                results["targets"]["vllm-router"]["command"] = " ".join(vr_cmd)
            except Exception as e:
                results["errors"]["vllm-router"] = str(e)
            _stop(p)
        elif not vr.exists():
            results["errors"]["vllm-router"] = f"{vr} not installed"

        # --- LiteLLM proxy
        ll = Path(args.litellm)
        if (not only or "litellm" in only) and ll.exists():
            ll_port = args.base_port + 30
            cfg = "model_list:\n" + "".join(
                f"  - model_name: bench-model\n    litellm_params:\n"
                f"      model: openai/bench-model\n      api_base: http://{b}/v1\n"
                f"      api_key: sk-fake\n"
                for b in backends
            )
            # LiteLLM refuses to start without a master key; the load generator sends it.
            cfg += "litellm_settings:\n  drop_params: true\n"
            cfg += "general_settings:\n  master_key: sk-bench\n"
            (work / "litellm.yaml").write_text(cfg)
            ll_cmd = [
                *_taskset("0"),
                str(ll),
                "--config",
                str(work / "litellm.yaml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(ll_port),
                "--num_workers",
                "1",
            ]
            p = spawn(ll_cmd, env={**os.environ, "LITELLM_LOG": "ERROR"})
            try:
                _wait_port(ll_port, 180, "/health/liveliness")
                print("litellm: " + " ".join(ll_cmd), file=sys.stderr)
                results["targets"]["litellm"] = _bench_target(
                    "litellm", f"127.0.0.1:{ll_port}", p.pid, args.duration, args.warmup
                )
                results["targets"]["litellm"]["command"] = " ".join(ll_cmd)
            except Exception as e:
                results["errors"]["litellm"] = str(e)
            _stop(p)
        elif not ll.exists():
            results["errors"]["litellm"] = f"{ll} not installed"
    finally:
        for p in procs:
            _stop(p)
        log.close()
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    print(f"logs: {work / 'bench.log'}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Medians over several `run` outputs, as the markdown table in bench/results."""
    runs = [json.loads(Path(f).read_text()) for f in args.files]
    names = [n for n in ("direct", "gateway", "vllm-router", "litellm") if n in runs[0]["targets"]]

    def med(name: str, scen: str, key: str) -> float:
        vals = [
            r["targets"][name][scen][key]
            for r in runs
            if name in r["targets"] and key in r["targets"][name].get(scen, {})
        ]
        return statistics.median(vals) if vals else float("nan")

    def rss(name: str) -> float:
        vals = [
            r["targets"][name].get("peak_rss_mib", float("nan"))
            for r in runs
            if name in r["targets"]
        ]
        return statistics.median(vals) if vals else float("nan")

    out = [
        f"Medians of {len(runs)} passes. Added latency = router minus direct, per percentile.",
        "",
        "| target | added p50 / p99 ms, c1 | added p50 / p99 ms, c16 | req/s c16 | req/s c64 "
        "| CPU µs/req c64 | stream TTFC added ms, c1 | stream TTFC added ms, c16 "
        "| streams/s c16 | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:

        def add(scen: str, key: str, n: str = n) -> str:
            if n == "direct":
                return f"{med(n, scen, key):.3f}"
            return f"{med(n, scen, key) - med('direct', scen, key):+.3f}"

        out.append(
            f"| {n} | {add('c1', 'p50_ms')} / {add('c1', 'p99_ms')} "
            f"| {add('c16', 'p50_ms')} / {add('c16', 'p99_ms')} "
            f"| {med(n, 'c16', 'rps'):,.0f} | {med(n, 'c64', 'rps'):,.0f} "
            f"| {med(n, 'c64', 'cpu_us_per_req'):.0f} "
            f"| {add('stream_c1', 'ttfc_p50_ms')} | {add('stream_c16', 'ttfc_p50_ms')} "
            f"| {med(n, 'stream_c16', 'rps'):,.0f} | {rss(n):.0f} |"
        )
    print("\n".join(out))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend")
    b.add_argument("--port", type=int, required=True)
    ld = sub.add_parser("load")
    ld.add_argument("--target", required=True, help="host:port[,host:port...]")
    ld.add_argument("-c", "--concurrency", type=int, default=16)
    ld.add_argument("-d", "--duration", type=float, default=5.0)
    ld.add_argument("--warmup", type=float, default=1.0)
    ld.add_argument("--stream", action="store_true")
    ld.add_argument("--path", default="/v1/chat/completions")
    r = sub.add_parser("run")
    r.add_argument("--duration", type=float, default=5.0)
    r.add_argument("--warmup", type=float, default=1.0)
    r.add_argument("--base-port", type=int, default=18000)
    r.add_argument("--out", default="")
    r.add_argument("--only", default="", help="comma list: direct,gateway,vllm-router,litellm")
    r.add_argument("--vllm-router", default="/tmp/venv-vllm-router/bin/vllm-router")
    r.add_argument("--litellm", default="/tmp/venv-litellm/bin/litellm")
    r.add_argument("--nice", type=int, default=0, help="niceness for every process (root: <0)")
    rp = sub.add_parser("report")
    rp.add_argument("files", nargs="+")
    args = ap.parse_args()
    if args.cmd == "report":
        return cmd_report(args)
    global NICE
    NICE = getattr(args, "nice", 0)
    if args.cmd in ("backend", "load"):
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    if args.cmd == "backend":
        asyncio.run(_serve_backend(args.port))
        return 0
    if args.cmd == "load":
        res = asyncio.run(
            _load(
                args.target.split(","),
                args.concurrency,
                args.duration,
                args.stream,
                args.path,
                args.warmup,
            )
        )
        print(json.dumps(res))
        return 0
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
