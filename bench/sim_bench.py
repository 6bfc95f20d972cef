"""Benchmark of the vLLM simulator: concurrency held and latency overhead.

Not a test. It answers two questions from issue 6:

1. Does one simulator process on one core hold >= 500 concurrent streaming requests?
2. Does its own overhead move the time to first token (TTFT) and the inter-token
   latency (ITL) clients measure by no more than 5% from what the latency model says?

How: the simulator runs pinned to one core (`taskset -c SIM_CORE`); this script, the
client, pins itself to another core. The client opens one connection per request
and speaks raw HTTP/1.1 on asyncio protocols (uvloop) so that the client's own cost
stays small next to the server's: the OpenAI SDK would need a core of its own for
10,000 chunks a second. Requests arrive at a steady rate over `--ramp` seconds
(open loop) and each streams `--tokens` tokens (`ignore_eos`).

For every request the client computes what the latency model predicts, using the
same formulas as the simulator (`llm_operator.sim.latency.LatencyModel`) and the
number of requests in flight as the batch size:

    TTFT_model = (ttft_base + prompt_tokens * prefill_per_token) * load(in flight at send)
    ITL_model  = itl * load(in flight when the previous token arrived)

Jitter is uniform around 1, so it averages out of the means. The report gives mean
measured vs mean model, the deviation in percent, percentiles, the peak of
`vllm:num_requests_running` (scraped from the simulator during the run) and the
simulator's CPU use (from /proc).

Usage:
    .venv/bin/python bench/sim_bench.py                   # the scenarios in bench/results/sim.md
    .venv/bin/python bench/sim_bench.py --scenario custom --concurrency 800 --itl 0.03
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))

from llm_operator.sim.latency import LatencyModel  # noqa: E402
from llm_operator.sim.protocol import parse_chat  # noqa: E402

EVENT = b"data: {"  # every SSE event but [DONE] starts like this
DONE = b"data: [DONE]"


@dataclass
class Scenario:
    name: str
    concurrency: int = 500
    tokens: int = 200
    ramp: float = 2.0
    prompt_chars: int = 1000
    ttft_base: float = 0.05
    prefill_per_token: float = 0.0002
    itl: float = 0.05
    jitter: float = 0.1
    load_slowdown: float = 0.0
    max_num_seqs: int = 512


SCENARIOS = {
    "flat-50ms": Scenario("flat-50ms"),
    "slowdown-50ms": Scenario("slowdown-50ms", load_slowdown=0.5),
    "flat-25ms": Scenario("flat-25ms", itl=0.025),
    "burst-50ms": Scenario("burst-50ms", ramp=0.0),
    "flat-1000": Scenario("flat-1000", concurrency=1000, ramp=4.0, max_num_seqs=1024),
}
DEFAULT_SET = ["flat-50ms", "slowdown-50ms", "flat-25ms", "burst-50ms", "flat-1000"]


@dataclass
class Record:
    sent: float = 0.0
    inflight_at_send: int = 0
    events: list[float] = field(default_factory=list)
    inflight_at_event: list[int] = field(default_factory=list)
    done: bool = False
    error: str | None = None


class Tracker:
    def __init__(self) -> None:
        self.inflight = 0
        self.peak_inflight = 0


class StreamClient(asyncio.Protocol):
    """One streaming request on its own connection; records when each event arrives."""

    def __init__(
        self, request: bytes, record: Record, tracker: Tracker, finished: asyncio.Future[None]
    ) -> None:
        self.request = request
        self.record = record
        self.tracker = tracker
        self.finished = finished
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        tracker = self.tracker
        tracker.inflight += 1
        tracker.peak_inflight = max(tracker.peak_inflight, tracker.inflight)
        self.record.inflight_at_send = tracker.inflight
        self.record.sent = time.perf_counter()
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.tail + data
        count = buf.count(EVENT)
        if count:
            inflight = self.tracker.inflight
            self.record.events.extend([now] * count)
            self.record.inflight_at_event.extend([inflight] * count)
        # Keep a partial marker that may continue in the next read.
        self.tail = buf[-(len(DONE) - 1) :]
        if DONE in buf and not self.record.done:
            self.record.done = True
            self.tracker.inflight -= 1
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.record.done:
            self.record.error = f"connection lost after {len(self.record.events)} events: {exc}"
            self.tracker.inflight -= 1
        if not self.finished.done():
            self.finished.set_result(None)


def build_request(port: int, sc: Scenario) -> tuple[bytes, int]:
    words = ("lorem ipsum dolor sit amet " * (sc.prompt_chars // 20 + 1))[: sc.prompt_chars]
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": words}],
        "max_tokens": sc.tokens,
        "stream": True,
        "ignore_eos": True,
    }
    prompt_tokens = parse_chat(body).prompt_tokens  # the simulator's own estimate
    raw = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    return head + raw, prompt_tokens


async def scrape_running(port: int, stop: asyncio.Event, peaks: dict[str, float]) -> None:
    def read() -> tuple[float, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        running = waiting = 0.0
        for line in text.splitlines():
            if line.startswith("vllm:num_requests_running{"):
                running = float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:num_requests_waiting{"):
                waiting = float(line.rsplit(" ", 1)[1])
        return running, waiting

    while not stop.is_set():
        running, waiting = await asyncio.to_thread(read)
        peaks["running"] = max(peaks.get("running", 0.0), running)
        peaks["waiting"] = max(peaks.get("waiting", 0.0), waiting)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def drive(port: int, sc: Scenario) -> tuple[list[Record], Tracker, dict[str, float], float]:
    loop = asyncio.get_running_loop()
    request, _ = build_request(port, sc)
    tracker = Tracker()
    records = [Record() for _ in range(sc.concurrency)]
    stop = asyncio.Event()
    peaks: dict[str, float] = {}
    scraper = asyncio.create_task(scrape_running(port, stop, peaks))
    futures: list[asyncio.Future[None]] = []
    start = time.perf_counter()

    async def launch(i: int) -> None:
        finished: asyncio.Future[None] = loop.create_future()
        futures.append(finished)
        await loop.create_connection(
            lambda: StreamClient(request, records[i], tracker, finished), "127.0.0.1", port
        )

    launches = []
    for i in range(sc.concurrency):
        if sc.ramp > 0:
            delay = start + i * sc.ramp / sc.concurrency - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        launches.append(asyncio.create_task(launch(i)))
    await asyncio.gather(*launches)
    timeout = sc.ramp + (sc.ttft_base + sc.tokens * sc.itl) * (1 + sc.load_slowdown) * 3 + 30
    await asyncio.wait_for(asyncio.gather(*futures), timeout)
    elapsed = time.perf_counter() - start
    stop.set()
    await scraper
    peaks["server_ttft"] = await asyncio.to_thread(
        server_mean, port, "vllm:time_to_first_token_seconds"
    )
    return records, tracker, peaks, elapsed


def server_mean(port: int, histogram: str) -> float:
    """Mean of a histogram as the simulator itself measured it (from its /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(histogram + "_sum{"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith(histogram + "_count{"):
            count = float(line.rsplit(" ", 1)[1])
    return total / count if count else float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def analyse(sc: Scenario, records: list[Record], prompt_tokens: int) -> dict[str, float]:
    model = LatencyModel(
        sc.ttft_base, sc.prefill_per_token, sc.itl, sc.jitter, sc.load_slowdown, sc.max_num_seqs
    )
    ttft_meas, ttft_model, itl_meas, itl_model = [], [], [], []
    for rec in records:
        # Chat: event 0 is the role chunk, events 1..tokens are the tokens.
        tokens = rec.events[1:]
        if rec.error or len(tokens) != sc.tokens:
            continue
        ttft_meas.append(tokens[0] - rec.sent)
        ttft_model.append(model.mean_ttft(prompt_tokens, rec.inflight_at_send))
        inflight = rec.inflight_at_event[1:]
        for k in range(1, len(tokens)):
            itl_meas.append(tokens[k] - tokens[k - 1])
            itl_model.append(model.mean_itl(inflight[k - 1]))
    out = {
        "ok": float(len(ttft_meas)),
        "ttft_model": statistics.fmean(ttft_model),
        "ttft_meas": statistics.fmean(ttft_meas),
        "ttft_p50": pct(ttft_meas, 0.5),
        "ttft_p99": pct(ttft_meas, 0.99),
        "itl_model": statistics.fmean(itl_model),
        "itl_meas": statistics.fmean(itl_meas),
        "itl_p50": pct(itl_meas, 0.5),
        "itl_p99": pct(itl_meas, 0.99),
    }
    out["ttft_dev"] = (out["ttft_meas"] / out["ttft_model"] - 1) * 100
    out["itl_dev"] = (out["itl_meas"] / out["itl_model"] - 1) * 100
    return out


def start_sim(sc: Scenario, core: int, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = workdir / "port"
    cmd = [
        "taskset", "-c", str(core),
        sys.executable, "-m", "llm_operator.sim.cli", "serve", "bench-model",
        "--served-model-name", "bench",
        "--host", "127.0.0.1", "--port", "0",
        "--max-num-seqs", str(sc.max_num_seqs),
        "--max-model-len", "8192",
        "--sim-ttft-base", str(sc.ttft_base),
        "--sim-prefill-per-token", str(sc.prefill_per_token),
        "--sim-itl", str(sc.itl),
        "--sim-jitter", str(sc.jitter),
        "--sim-load-slowdown", str(sc.load_slowdown),
        "--sim-seed", "1",
        "--sim-port-file", str(port_file),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    log = (workdir / "sim.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 20
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((workdir / "sim.log").read_text())
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def run_scenario(sc: Scenario, sim_core: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="sim-bench-") as tmp:
        proc, port = start_sim(sc, sim_core, Path(tmp))
        try:
            time.sleep(0.5)  # let it finish importing before the clock starts
            cpu0, wall0 = cpu_seconds(proc.pid), time.perf_counter()
            client0 = cpu_seconds(os.getpid())
            records, tracker, peaks, elapsed = run_client(port, sc)
            cpu = cpu_seconds(proc.pid) - cpu0
            client_cpu = cpu_seconds(os.getpid()) - client0
            wall = time.perf_counter() - wall0
            load = os.getloadavg()[0]
        finally:
            proc.terminate()
            proc.wait(10)
    _, prompt_tokens = build_request(port, sc)
    result = analyse(sc, records, prompt_tokens)
    result.update(
        errors=float(sum(1 for r in records if r.error or not r.done)),
        peak_running=peaks.get("running", 0.0),
        peak_waiting=peaks.get("waiting", 0.0),
        server_ttft=peaks.get("server_ttft", float("nan")),
        peak_inflight=float(tracker.peak_inflight),
        sim_cpu=cpu / wall * 100,
        client_cpu=client_cpu / wall * 100,
        load=load,
        tokens_per_s=sum(max(0, len(r.events) - 1) for r in records) / elapsed,
        elapsed=elapsed,
    )
    return result


def run_client(port: int, sc: Scenario) -> tuple[list[Record], Tracker, dict[str, float], float]:
    try:
        import uvloop

        return uvloop.run(drive(port, sc))
    except ImportError:
        return asyncio.run(drive(port, sc))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--scenario", action="append", choices=[*SCENARIOS, "custom"])
    parser.add_argument("--sim-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument(
        "--realtime",
        type=int,
        default=0,
        metavar="PRIO",
        help="run client and simulator SCHED_FIFO at this priority (root only), so that\n"
        "other tenants of a shared machine do not delay their wake-ups",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness for the client and the simulator (it inherits it); a negative value\n"
        "(root only) keeps other work on a shared machine from skewing the latencies",
    )
    for name, value in vars(Scenario("custom")).items():
        if name != "name":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.client_core})
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    if args.realtime:
        # SCHED_FIFO is inherited by the simulator. Both are mostly idle (see the CPU
        # columns), and the kernel's RT throttling leaves other work >= 5% anyway.
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.realtime))
    names = args.scenario or DEFAULT_SET
    print(
        "| scenario | streams | ramp s | tokens | ok | errors | peak running | TTFT model ms "
        "| TTFT measured ms (p50/p99) | TTFT dev | ITL model ms | ITL measured ms (p50/p99) "
        "| ITL dev | sim CPU | tokens/s | TTFT server-side ms | client CPU | load avg |"
    )
    print("|" + "---|" * 18)
    for name in names:
        if name == "custom":
            fields = {k: getattr(args, k) for k in vars(Scenario("custom")) if k != "name"}
            sc = Scenario("custom", **fields)
        else:
            sc = SCENARIOS[name]
        r = run_scenario(sc, args.sim_core)
        print(
            f"| {sc.name} | {sc.concurrency} | {sc.ramp:g} | {sc.tokens} | {r['ok']:.0f} "
            f"| {r['errors']:.0f} | {r['peak_running']:.0f} | {r['ttft_model'] * 1e3:.1f} "
            f"| {r['ttft_meas'] * 1e3:.1f} ({r['ttft_p50'] * 1e3:.1f}/{r['ttft_p99'] * 1e3:.1f}) "
            f"| {r['ttft_dev']:+.1f}% | {r['itl_model'] * 1e3:.2f} "
            f"| {r['itl_meas'] * 1e3:.2f} ({r['itl_p50'] * 1e3:.1f}/{r['itl_p99'] * 1e3:.1f}) "
            f"| {r['itl_dev']:+.1f}% | {r['sim_cpu']:.0f}% | {r['tokens_per_s']:.0f} "
            f"| {r['server_ttft'] * 1e3:.1f} | {r['client_cpu']:.0f}% | {r['load']:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
