"""`llm-operator sim [serve] MODEL [vllm flags] [--sim-... flags]`: run the vLLM simulator.

Also runnable as `python -m llm_operator.sim.cli ...` (the test launcher does that).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from llm_operator.sim.config import SIM_FLAGS, ConfigError, env_var, parse_args

USAGE = """\
usage: llm-operator sim [serve] MODEL [--served-model-name NAME ...] [--host H] [--port P]
                        [--max-model-len N] [--max-num-seqs N] [--api-key KEY]
                        [any other `vllm serve` flag: accepted and ignored]
                        [--sim-... flags below]

A vLLM look-alike without a GPU: vLLM's OpenAI API, /health, /metrics, a scheduler
with max-num-seqs running and a FIFO waiting queue, a latency model, and failure
injection (x-sim-fail request header, POST /sim/admin). See docs/simulator.md.

simulator flags (each also settable by the environment variable shown):
"""


def _usage() -> str:
    lines = [USAGE]
    for flag, spec in SIM_FLAGS.items():
        lines.append(f"  {flag:<24} {env_var(flag):<28} {spec.help}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if any(a in {"-h", "--help"} for a in argv):
        print(_usage())
        return 0
    try:
        cfg = parse_args(argv, os.environ)
    except ConfigError as err:
        print(f"llm-operator sim: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="%(levelname)s %(asctime)s %(name)s: %(message)s",
    )
    log = logging.getLogger("llm_operator.sim")
    if cfg.ignored:
        log.info("ignoring GPU/engine flags that mean nothing here: %s", " ".join(cfg.ignored))
    if cfg.unknown:
        log.warning("ignoring unknown flags: %s", " ".join(cfg.unknown))

    from llm_operator.sim.server import run

    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is optional (no Windows wheels); asyncio works, slower
        runner = asyncio.run
    try:
        runner(run(cfg))
    except OSError as err:
        log.error("cannot serve on %s:%d: %s", cfg.host, cfg.port, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
