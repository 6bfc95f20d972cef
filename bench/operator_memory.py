"""Where the operator's memory goes at N LLMDeployments (issue 18): a repeatable probe.

The operator runs as `llm-operator run` in a subprocess, started through this file
(`--as-operator`), which adds a probe on SIGUSR1 and nothing else: the probe writes one JSON
report (RSS and smaps by mapping, glibc's mallinfo2, pymalloc's arenas, deep sizes of the
operator's own caches and of kopf's per-object state, a census of objects by type, and, when
the process was started with tracemalloc, the top allocations by file and by traceback).

The driver makes a fresh namespace, probes the idle operator, creates N LLMDeployments as
bench/operator_bench.py does (replicas 0), waits for every Deployment and Service, waits
`--settle` seconds and probes again; then restarts the operator over the converged namespace
(with tracemalloc unless `--trace-frames 0`), waits `--settle` and probes a third time.

    KUBECONFIG=~/.cache/llm-operator/cluster/kubeconfig timeout 900 .venv/bin/python \
        bench/operator_memory.py --count 1000 --settle 30 --json /tmp/memory.json
"""

from __future__ import annotations

import json
import os
import sys

AS_OPERATOR = "--as-operator"
PROBE_OUT = "LLMOP_PROBE_OUT"
PROBE_FRAMES = "LLMOP_PROBE_TRACEMALLOC"
PROBE_TIMELINE = "LLMOP_PROBE_TIMELINE"


# -- the probe, inside the operator process (imports nothing the operator would not) -------


def _smaps() -> dict[str, float]:
    """Rss in MiB by mapping: [heap], anonymous, and each file (libraries) summed."""
    out: dict[str, float] = {}
    name = ""
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                parts = line.split()
                name = parts[5] if len(parts) > 5 else "[anon]"
                if "/" in name:
                    name = name.rsplit("/", 1)[1]
            elif first == "Rss:":
                out[name] = out.get(name, 0.0) + int(line.split()[1]) / 1024
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _status() -> dict[str, float]:
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {
        k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    } | {"Threads": int(fields["Threads"])}


def _mallinfo() -> dict[str, float]:
    """glibc's own account (all arenas), MiB: in use, free but kept, mmapped."""
    import ctypes
    import ctypes.util

    class Mallinfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        return {}
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    mib = 1024 * 1024
    return {
        "arena_bytes_MiB": info.arena / mib,
        "in_use_MiB": info.uordblks / mib,
        "free_kept_MiB": info.fordblks / mib,
        "mmapped_MiB": info.hblkhd / mib,
        "trimmable_top_MiB": info.keepcost / mib,
    }


def _pymalloc() -> dict[str, float]:
    """pymalloc's arenas (objects of 512 bytes or less), from sys._debugmallocstats."""
    import re
    import tempfile

    with tempfile.TemporaryFile("w+") as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read()

    def number(label: str) -> int:
        match = re.search(rf"# {label}\s*=\s*([\d,]+)", text)
        return int(match[1].replace(",", "")) if match else -1

    arenas = number("arenas allocated current")
    mib = 1024 * 1024
    return {
        "arenas_current": arenas,
        "arenas_highwater": number("arenas highwater mark"),
        "arenas_MiB": arenas * 1.0,  # 1 MiB arenas in CPython 3.10+
        "allocated_blocks_MiB": number("bytes in allocated blocks") / mib,
        "available_blocks_MiB": number("bytes in available blocks") / mib,
        "free_pools_MiB": number("bytes in free pools") / mib if "free pools" in text else -1,
    }


def _deep(roots: object, seen: set[int] | None = None) -> int:
    """Bytes reachable from `roots` (sys.getsizeof summed), each object once per `seen`.
    Stops at modules, classes, functions, threads, locks and event loops: those are code
    and machinery, not the data a cache holds."""
    import asyncio
    import threading
    import types

    stop = (
        types.ModuleType,
        type,
        types.FunctionType,
        types.BuiltinFunctionType,
        types.MethodType,
        types.CodeType,
        types.FrameType,
        threading.Thread,
        asyncio.AbstractEventLoop,
    )
    seen = set() if seen is None else seen
    stack = [roots]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, stop):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            for k, v in list(obj.items()):
                stack.append(k)
                stack.append(v)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(list(obj))
        elif isinstance(obj, (str, bytes, int, float, bool)) or obj is None:
            continue
        else:
            if hasattr(obj, "__dict__"):
                stack.append(vars(obj))
            for slot in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, slot):
                    stack.append(getattr(obj, slot))
            if type(obj).__name__ == "deque":
                stack.extend(list(obj))  # type: ignore[call-overload]
    return total


def _interned(obj: object) -> object:
    """The same JSON data with every string interned: what a cache would hold if equal
    strings were one object (json.loads shares keys only within one document)."""
    if isinstance(obj, dict):
        return {sys.intern(k): _interned(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_interned(v) for v in obj]
    if isinstance(obj, str):
        return sys.intern(obj)
    return obj


def _mib(n: int) -> float:
    return round(n / 1024 / 1024, 2)


def _children_report(children: list[dict[str, object]]) -> dict[str, object]:
    from collections import defaultdict

    by_kind: dict[str, list[dict[str, object]]] = defaultdict(list)
    for child in children:
        by_kind[str(child.get("kind"))].append(child)
    report: dict[str, object] = {
        "objects": len(children),
        "retained_MiB": _mib(_deep(children)),
        "compact_json_MiB": _mib(sum(len(json.dumps(c, separators=(",", ":"))) for c in children)),
    }
    interned = [_interned(c) for c in children]
    report["if_strings_interned_MiB"] = _mib(_deep(interned))
    del interned
    kinds: dict[str, object] = {}
    for kind, objects in by_kind.items():
        sections: dict[str, float] = defaultdict(float)
        for obj in objects:
            for part, value in obj.items():
                if part == "spec" and isinstance(value, dict) and "template" in value:
                    sections["spec.template"] += _deep(value["template"])
                    rest = {k: v for k, v in value.items() if k != "template"}
                    sections["spec (rest)"] += _deep(rest) - sys.getsizeof(rest)
                    sections["spec (rest)"] += sys.getsizeof(value)
                else:
                    sections[part] += _deep(value)
            sections["object"] += sys.getsizeof(obj)
        kinds[kind] = {
            "objects": len(objects),
            "retained_MiB": _mib(_deep(objects)),
            "mean_bytes_alone": {k: round(v / len(objects)) for k, v in sections.items()},
            "mean_compact_json_bytes": round(
                sum(len(json.dumps(o, separators=(",", ":"))) for o in objects) / len(objects)
            ),
        }
    report["by_kind"] = kinds
    return report


def probe() -> dict[str, object]:
    """One report of this process's memory (see the module docstring)."""
    import gc
    import threading
    import time
    import tracemalloc
    from collections import Counter

    started = time.monotonic()
    # What only the cycle collector would free (kept, counted, then freed): objects that
    # wait for a full collection hold arenas meanwhile.
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    garbage: Counter[str] = Counter()
    garbage_bytes: Counter[str] = Counter()
    for obj in gc.garbage:
        garbage[type(obj).__qualname__] += 1
        garbage_bytes[type(obj).__qualname__] += sys.getsizeof(obj)
    cyclic = {
        "objects": len(gc.garbage),
        "MiB_shallow": _mib(sum(garbage_bytes.values())),
        "top": [(name, garbage[name], _mib(size)) for name, size in garbage_bytes.most_common(12)],
    }
    gc.set_debug(0)
    gc.garbage.clear()
    collect_started = time.perf_counter()
    gc.collect()
    cyclic["full_collection_ms"] = round((time.perf_counter() - collect_started) * 1000, 1)
    report: dict[str, object] = {
        "cyclic_garbage": cyclic,
        "status_MiB": _status(),
        "smaps_MiB": {k: round(v, 1) for k, v in list(_smaps().items())[:14]},
        "mallinfo2": _mallinfo(),
        "pymalloc": _pymalloc(),  # -1: not pymalloc (PYTHONMALLOC=malloc, or tracemalloc)
        "threads": [t.name for t in threading.enumerate()],
    }
    objects = gc.get_objects()
    census: Counter[str] = Counter()
    census_bytes: Counter[str] = Counter()
    for obj in objects:
        name = type(obj).__qualname__
        census[name] += 1
        census_bytes[name] += sys.getsizeof(obj)
    report["gc_tracked_objects"] = len(objects)
    report["census_top"] = [
        (name, census[name], _mib(size)) for name, size in census_bytes.most_common(20)
    ]
    caches: dict[str, object] = {}
    try:
        from llm_operator.controller import metrics
        from llm_operator.controller.informer import Informer
        from llm_operator.controller.reconciler import Controller
    except ImportError:  # not started yet
        Controller = Informer = None  # type: ignore[assignment,misc]
    controllers = [o for o in objects if Controller is not None and isinstance(o, Controller)]
    informers = [o for o in objects if Informer is not None and isinstance(o, Informer)]
    memories = [o for o in objects if type(o).__name__ == "ResourceMemories"]
    del objects
    for controller in controllers:
        children = [c for owned in list(controller.children.values()) for c in owned.values()]
        caches["Controller.bodies (LLMDeployments)"] = {
            "objects": len(controller.bodies),
            "retained_MiB": _mib(_deep(controller.bodies)),
            "mean_bytes_alone": {
                part: round(
                    sum(_deep(b.get(part)) for b in controller.bodies.values())
                    / max(1, len(controller.bodies))
                )
                for part in ("metadata", "spec", "status")
            },
        }
        caches["Controller.children"] = _children_report(children)
        caches["Controller.children (the maps, beside the objects)"] = _mib(
            _deep(controller.children) - _deep(children)
        )
        caches["Controller locks, failures, timers, replicas_owned, foreign"] = _mib(
            _deep(
                [
                    controller.locks,
                    controller.failures,
                    controller.retries,
                    controller.rechecks,
                    controller.replicas_owned,
                    controller.foreign,
                    controller.fallback_checked,
                ]
            )
        )
        if controller.routes is not None:
            caches["RoutesWriter (without the bodies)"] = _mib(
                _deep(vars(controller.routes), {id(controller.bodies), id(controller.client)})
            )
    caches["Informer.known (tombstones)"] = {
        "objects": sum(len(i.known) for i in informers),
        "retained_MiB": _mib(_deep([i.known for i in informers])),
    }
    caches["kopf ResourceMemories"] = {
        "objects": sum(len(m._items) for m in memories),
        "retained_MiB": _mib(_deep([m._items for m in memories])),
    }
    if Controller is not None:
        gauges = [
            g
            for g in vars(metrics).values()
            if hasattr(g, "_metrics") and isinstance(getattr(g, "_metrics", None), dict)
        ]
        # Labelled Gauges (and their _SERIES index) before 0e900b2; rows per LLMDeployment
        # after (_STATUS_SERIES; the day-2 ones, _COST_SERIES, from f760077).
        status_rows = getattr(getattr(metrics, "_STATUS_SERIES", None), "rows", {})
        cost = getattr(metrics, "_COST_SERIES", None)
        cost_rows = [getattr(cost, "costs", {}), getattr(cost, "stall_restarts", {})]
        index = [getattr(metrics, "_SERIES", {}), *cost_rows]
        caches["prometheus series per LLMDeployment"] = {
            "series": sum(len(g._metrics) for g in gauges),
            "rows": len(status_rows),
            "retained_MiB": _mib(
                _deep([g._metrics for g in gauges] + [*index, status_rows], {id(g) for g in gauges})
            ),
        }
    report["caches"] = caches
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot()  # filter_traces would take minutes here
        report["tracemalloc"] = {
            "traced_MiB": _mib(current),
            "peak_MiB": _mib(peak),
            "by_file": [
                (str(s.traceback[0].filename).split("site-packages/")[-1], _mib(s.size), s.count)
                for s in snapshot.statistics("filename")[:25]
            ],
            "by_traceback": [
                {"MiB": _mib(s.size), "blocks": s.count, "where": s.traceback.format()[-12:]}
                for s in snapshot.statistics("traceback")[:20]
            ],
        }
    report["probe_seconds"] = round(time.monotonic() - started, 1)
    return report


def _install_probe(out: str) -> None:
    import signal

    count = [0]

    def on_signal(_signum: int, _frame: object) -> None:
        count[0] += 1
        path = f"{out}.{count[0]}"
        with open(path + ".part", "w") as f:
            json.dump(probe(), f, indent=1)
        os.replace(path + ".part", path)

    signal.signal(signal.SIGUSR1, on_signal)


def _timeline(out: str, every: float) -> None:
    """A line per `every` seconds: RSS, pymalloc's blocks in use and arenas, the event loop's
    ready callbacks and its tasks. Shows when in a burst the arenas grow, and with what queued."""
    import asyncio
    import threading
    import time
    from collections import Counter

    loops: list[asyncio.AbstractEventLoop] = []
    original = asyncio.BaseEventLoop.call_soon_threadsafe

    def remember(self: asyncio.BaseEventLoop, *args: object, **kwargs: object) -> object:
        if not loops:
            loops.append(self)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    asyncio.BaseEventLoop.call_soon_threadsafe = remember  # type: ignore[method-assign]

    def sample() -> None:
        started = time.monotonic()
        with open(out, "w") as f:
            while True:
                time.sleep(every)
                loop = loops[0] if loops else None
                kinds: Counter[str] = Counter()
                try:
                    running = list(asyncio.all_tasks(loop)) if loop else []
                    tasks = len(running)
                    kinds.update(t.get_coro().__qualname__ for t in running)
                except RuntimeError:  # the set changed while counted
                    tasks = -1
                ready = len(getattr(loop, "_ready", ())) if loop else -1
                arenas = _pymalloc()
                line = {
                    "t": round(time.monotonic() - started, 2),
                    "rss": round(_status()["VmRSS"], 1),
                    "in_use_MiB": round(arenas["allocated_blocks_MiB"], 1),
                    "arenas": arenas["arenas_current"],
                    "ready": ready,
                    "tasks": tasks,
                    "tasks_by_coroutine": dict(kinds.most_common(4)),
                }
                f.write(json.dumps(line) + "\n")
                f.flush()

    threading.Thread(target=sample, name="probe-timeline", daemon=True).start()


def as_operator(argv: list[str]) -> int:
    """`llm-operator <argv>` in this process, with the probe on SIGUSR1."""
    frames = int(os.environ.get(PROBE_FRAMES) or 0)
    if frames:
        import tracemalloc

        tracemalloc.start(frames)
    _install_probe(os.environ[PROBE_OUT])
    if os.environ.get(PROBE_TIMELINE):
        _timeline(os.environ[PROBE_OUT] + ".timeline", float(os.environ[PROBE_TIMELINE]))
    from llm_operator.cli import main as cli

    return cli(argv)


# -- the driver -------------------------------------------------------------------------------


def main() -> int:
    import argparse
    import signal
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import operator_bench as bench
    from kubernetes import client, config

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--settle", type=float, default=30.0)
    parser.add_argument("--source", type=Path, help="an operator/ directory (default: installed)")
    parser.add_argument(
        "--trace-frames", type=int, default=10, help="tracemalloc frames of the restarted run"
    )
    parser.add_argument(
        "--trace-converge",
        type=int,
        default=0,
        help="tracemalloc frames of the converging run too (slower; gives the heap's peak)",
    )
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the operator (repeatable)"
    )
    parser.add_argument(
        "--timeline",
        type=float,
        default=0.0,
        help="sample RSS, pymalloc, ready callbacks and tasks every this many seconds",
    )
    parser.add_argument(
        "--probe-present",
        action="store_true",
        help="probe also when every child is present (perturbs what follows)",
    )
    parser.add_argument("--json", type=Path, help="write the reports here")
    args = parser.parse_args()
    config.load_kube_config()
    api = client.ApiClient()
    bench.ensure_crds(api)
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    namespace = f"bench-memory-{args.count}-{int(time.time())}"
    core.create_namespace({"metadata": {"name": namespace}})
    out = f"/tmp/{namespace}-probe"
    extra = dict(e.split("=", 1) for e in args.env)
    log = open(f"/tmp/{namespace}.log", "wb")  # noqa: SIM115
    results: dict[str, object] = {"count": args.count, "namespace": namespace, "env": extra}
    prefix = [sys.executable, str(Path(__file__).resolve()), AS_OPERATOR]

    def start(frames: int, tag: str) -> tuple[object, int]:
        env = {**extra, PROBE_OUT: f"{out}-{tag}", PROBE_FRAMES: str(frames)}
        if args.timeline:
            env[PROBE_TIMELINE] = str(args.timeline)
        # Under tracemalloc the imports alone take minutes on a busy machine.
        return bench.start_operator(
            namespace, args.source, log, prefix=prefix, env=env, ready_within=600
        )

    def ask(operator: object, tag: str, n: int) -> dict[str, object]:
        os.kill(operator.pid, signal.SIGUSR1)  # type: ignore[attr-defined]
        path = Path(f"{out}-{tag}.{n}")
        deadline = time.monotonic() + 300
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no probe report {path}")
            time.sleep(0.5)
        report: dict[str, object] = json.loads(path.read_text())
        return report

    operator, _ = start(args.trace_converge, "run")
    try:
        time.sleep(2)
        results["idle"] = ask(operator, "run", 1)
        watcher = bench.ChildWatcher(api, namespace)
        names = [f"m-{i:04d}" for i in range(args.count)]
        created: dict[str, float] = {}

        def create(name: str) -> None:
            created[name] = time.monotonic()
            custom.create_namespaced_custom_object(
                bench.GROUP, bench.VERSION, namespace, bench.PLURAL, bench.body(name)
            )

        import concurrent.futures

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(create, names))
        present = None
        deadline = time.monotonic() + max(120, args.count * 0.5)
        while present is None:
            if time.monotonic() > deadline:
                raise TimeoutError("children not all present")
            time.sleep(0.2)
            present = watcher.complete(names)
        watcher.stop.set()
        latencies = [present[n] - created[n] for n in names]
        results["converge_seconds"] = round(time.monotonic() - started, 1)
        results["p50_ms"] = round(bench.percentile(latencies, 0.5) * 1000)
        results["p99_ms"] = round(bench.percentile(latencies, 0.99) * 1000)
        peak_watch = bench.proc_stats(operator.pid)  # type: ignore[attr-defined]
        results["rss_when_present_MiB"] = round(peak_watch[0], 1)
        probes = 2
        if args.probe_present:
            # What is queued at the burst's end. The probe stops the event loop for seconds,
            # so what the watches send meanwhile queues up and the heap grows: off by default.
            results["present"] = ask(operator, "run", probes)
            probes += 1
        time.sleep(args.settle)
        results["converged"] = ask(operator, "run", probes)
        bench.stop_operator(operator)  # type: ignore[arg-type]
        operator, _ = start(args.trace_frames, "restart")
        time.sleep(args.settle)
        results["restarted"] = ask(operator, "restart", 1)
    finally:
        bench.stop_operator(operator)  # type: ignore[arg-type]
        log.close()
        if args.timeline:
            results["timeline"] = {
                tag: [
                    json.loads(line)
                    for line in Path(f"{out}-{tag}.timeline").read_text().splitlines()
                ]
                for tag in ("run", "restart")
                if os.path.exists(f"{out}-{tag}.timeline")
            }
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        bench.delete_namespace_and_wait(core, namespace, 600)
    print(summary(results))
    return 0


def summary(results: dict[str, object]) -> str:
    """The figures worth a table, from the reports."""
    lines = [
        f"N={results['count']}: converged in {results.get('converge_seconds')} s "
        f"(p50 {results.get('p50_ms')} ms, p99 {results.get('p99_ms')} ms) env={results['env']}"
    ]
    for phase in ("idle", "present", "converged", "restarted"):
        report = results.get(phase)
        if not isinstance(report, dict):
            continue
        status, malloc, py = report["status_MiB"], report["mallinfo2"], report["pymalloc"]
        lines.append(
            f"- {phase}: RSS {status['VmRSS']:.1f} MiB (peak {status['VmHWM']:.1f}, anon "
            f"{status['RssAnon']:.1f}), threads {status['Threads']}; glibc in use "
            f"{malloc.get('in_use_MiB', 0):.1f} / free kept {malloc.get('free_kept_MiB', 0):.1f}"
            f" / mmapped {malloc.get('mmapped_MiB', 0):.1f} MiB; pymalloc arenas "
            f"{py['arenas_current']} MiB, blocks in use {py['allocated_blocks_MiB']:.1f} MiB"
        )
        lines.append(f"  caches: {json.dumps(report['caches'])}")
        if "tracemalloc" in report:
            trace = report["tracemalloc"]
            lines.append(
                f"  tracemalloc {trace['traced_MiB']} MiB (peak {trace['peak_MiB']}): "
                f"{trace['by_file'][:12]}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == [AS_OPERATOR]:
        sys.exit(as_operator(sys.argv[2:]))
    sys.exit(main())
