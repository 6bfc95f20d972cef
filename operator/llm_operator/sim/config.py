"""Command line of the simulator: `vllm serve` flags plus `--sim-...` flags.

The parser is hand-written rather than argparse because it must accept any command
line the operator renders for real vLLM, unchanged, including flags this file has
never heard of (`extraArgs`). argparse's `parse_known_args` guesses badly about which
token after an unknown flag is its value and which is the positional model; here
unknown flags take the next token as their value unless it looks like a flag or the
flag is a known vLLM switch (`--enable-prefix-caching`, ...).

Every `--sim-x-y` flag can also be set by the environment variable `LLMOP_SIM_X_Y`,
so a Kubernetes Deployment can tune the simulator without touching vLLM's args.
Precedence: command line, then environment, then default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "LLMOP_SIM_"


class ConfigError(ValueError):
    """A flag or environment value the simulator cannot use."""


@dataclass
class SimConfig:
    """Everything the simulator needs; see docs/simulator.md for the meaning of each."""

    model: str = "sim-model"
    served_model_names: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 8000
    max_model_len: int = 4096
    max_num_seqs: int = 256
    api_keys: list[str] = field(default_factory=list)

    # Latency model (seconds unless said otherwise).
    ttft_base: float = 0.05
    prefill_per_token: float = 0.0002
    itl: float = 0.02
    jitter: float = 0.1
    load_slowdown: float = 0.5
    output_tokens: int = 128
    kv_cache_tokens: int = 0  # 0: derived from max_num_seqs and max_model_len

    # Failure injection.
    startup_delay: float = 0.0
    drain_timeout: float = 10.0
    error_rate_500: float = 0.0
    error_rate_429: float = 0.0
    retry_after: int = 1
    hang: bool = False
    disconnect_after: int | None = None
    """Cut every answer after this many SSE events (non-stream: tokens); None: never."""

    seed: int | None = None
    port_file: str | None = None
    vllm_version: str = "0.11.0"
    log_level: str = "info"

    ignored: list[str] = field(default_factory=list)
    """Recognised vLLM flags that mean nothing without a GPU (logged, then ignored)."""
    unknown: list[str] = field(default_factory=list)
    """Flags the simulator does not know (warned about, then ignored)."""

    @property
    def served_names(self) -> list[str]:
        return self.served_model_names or [self.model]

    @property
    def kv_capacity(self) -> int:
        """KV-cache size in tokens: enough for one full-length request at least."""
        if self.kv_cache_tokens > 0:
            return self.kv_cache_tokens
        return max(self.max_model_len, self.max_num_seqs * 512)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number (0 picks a free one)")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite number >= 0")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


def _fraction_below_one(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise ValueError("must be >= 0 and < 1")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("must be true or false")


@dataclass(frozen=True)
class _Flag:
    dest: str
    convert: Callable[[str], Any] | None  # None: a switch (no value)
    help: str = ""


# vLLM flags the simulator uses.
_VLLM_FLAGS: dict[str, _Flag] = {
    "--model": _Flag("model", str),
    "--host": _Flag("host", str),
    "--port": _Flag("port", _port),
    "--max-model-len": _Flag("max_model_len", _positive_int),
    "--max-num-seqs": _Flag("max_num_seqs", _positive_int),
}

# vLLM flags that take a value and mean nothing here (GPU sizing, weights, parsing).
_VLLM_IGNORED_WITH_VALUE = {
    "--tensor-parallel-size",
    "-tp",
    "--pipeline-parallel-size",
    "-pp",
    "--data-parallel-size",
    "-dp",
    "--gpu-memory-utilization",
    "--dtype",
    "--quantization",
    "-q",
    "--kv-cache-dtype",
    "--revision",
    "--code-revision",
    "--tokenizer",
    "--tokenizer-revision",
    "--tokenizer-mode",
    "--download-dir",
    "--load-format",
    "--swap-space",
    "--block-size",
    "--max-num-batched-tokens",
    "--distributed-executor-backend",
    "--chat-template",
    "--tool-call-parser",
    "--reasoning-parser",
    "--uvicorn-log-level",
    "--max-logprobs",
    "--cpu-offload-gb",
    "--config",
    "--hf-overrides",
    "--limit-mm-per-prompt",
    "--lora-modules",
    "--override-generation-config",
    "--generation-config",
    "--root-path",
    "--middleware",
    "--compilation-config",
    "-O",
    "--speculative-config",
    "--kv-transfer-config",
    "--served-model-name-prefix",
}

# vLLM switches (no value) that mean nothing here. Knowing them matters: an unknown
# switch followed by a positional would otherwise swallow it as its value.
_VLLM_SWITCHES = {
    "--trust-remote-code",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--enforce-eager",
    "--disable-log-requests",
    "--disable-log-stats",
    "--enable-chunked-prefill",
    "--no-enable-chunked-prefill",
    "--enable-lora",
    "--enable-auto-tool-choice",
    "--disable-custom-all-reduce",
    "--enable-log-requests",
    "--disable-frontend-multiprocessing",
    "--enable-request-id-headers",
    "--disable-fastapi-docs",
    "--enable-prompt-tokens-details",
    "--enable-server-load-tracking",
    "--headless",
    "--enable-expert-parallel",
    "--async-scheduling",
    "--enable-sleep-mode",
    "--disable-uvicorn-access-log",
    "--return-tokens-as-token-ids",
}

# Simulator flags: --sim-NAME, env LLMOP_SIM_NAME.
SIM_FLAGS: dict[str, _Flag] = {
    "--sim-ttft-base": _Flag(
        "ttft_base", _non_negative, "seconds of time to first token before prefill"
    ),
    "--sim-prefill-per-token": _Flag(
        "prefill_per_token", _non_negative, "seconds of prefill per prompt token"
    ),
    "--sim-itl": _Flag("itl", _non_negative, "inter-token latency (seconds) at low load"),
    "--sim-jitter": _Flag(
        "jitter", _fraction_below_one, "each delay is scaled by uniform(1-j, 1+j)"
    ),
    "--sim-load-slowdown": _Flag(
        "load_slowdown",
        _non_negative,
        "delays grow by this fraction when all max-num-seqs slots are running",
    ),
    "--sim-output-tokens": _Flag(
        "output_tokens",
        _positive_int,
        "mean natural answer length; answers end with finish_reason=stop there",
    ),
    "--sim-kv-cache-tokens": _Flag("kv_cache_tokens", _positive_int, "KV-cache capacity in tokens"),
    "--sim-startup-delay": _Flag(
        "startup_delay", _non_negative, "seconds /health answers 503 after start"
    ),
    "--sim-drain-timeout": _Flag(
        "drain_timeout",
        _non_negative,
        "on SIGTERM, seconds to let running requests finish before cutting them",
    ),
    "--sim-error-rate-500": _Flag("error_rate_500", _rate, "fraction of requests answered 500"),
    "--sim-error-rate-429": _Flag("error_rate_429", _rate, "fraction of requests answered 429"),
    "--sim-retry-after": _Flag("retry_after", _positive_int, "Retry-After seconds on a 429"),
    "--sim-hang": _Flag("hang", _bool, "produce no token while /health stays 200"),
    "--sim-disconnect-after": _Flag(
        "disconnect_after",
        _non_negative_int,
        "close every connection after this many SSE events (non-stream: tokens)",
    ),
    "--sim-seed": _Flag("seed", int, "seed for jitter, failures and answer lengths"),
    "--sim-port-file": _Flag("port_file", str, "write the bound port here (for --port 0)"),
    "--sim-vllm-version": _Flag("vllm_version", str, "version /version reports"),
    "--sim-log-level": _Flag("log_level", str, "debug, info, warning or error"),
}


def parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> SimConfig:
    """Parse a `vllm serve` command line (with or without the leading `serve`)."""
    cfg = SimConfig()
    _apply_env(cfg, env or {})
    args = list(argv)
    if len(args) >= 2 and args[0] == "vllm" and args[1] == "serve":
        args = args[2:]
    elif args and args[0] == "serve":
        args = args[1:]

    positionals: list[str] = []
    served: list[str] = []
    vllm_seed: int | None = None
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("-") or token == "-":
            positionals.append(token)
            continue
        name, eq, inline_value = token.partition("=")
        if name == "--served-model-name":
            # vLLM takes one or more names after a single flag.
            if eq:
                served.append(inline_value)
            while i < len(args) and not args[i].startswith("-"):
                served.append(args[i])
                i += 1
            if not served:
                raise ConfigError("--served-model-name needs at least one name")
            continue
        if name == "--seed":
            # vLLM's own seed only applies when no --sim-seed/LLMOP_SIM_SEED is given.
            value, i = _take_value(name, eq, inline_value, args, i)
            try:
                vllm_seed = int(value)
            except ValueError:
                raise ConfigError(f"--seed={value!r}: must be an integer") from None
            continue
        if name == "--api-key":
            value, i = _take_value(name, eq, inline_value, args, i)
            cfg.api_keys.append(value)
            continue
        flag = _VLLM_FLAGS.get(name) or SIM_FLAGS.get(name)
        if flag is not None:
            if flag.convert is _bool and not eq and (i >= len(args) or args[i].startswith("-")):
                value = "true"  # `--sim-hang` alone is a switch
            else:
                value, i = _take_value(name, eq, inline_value, args, i)
            _set(cfg, flag, value, name)
            continue
        if name in _VLLM_IGNORED_WITH_VALUE:
            value, i = _take_value(name, eq, inline_value, args, i)
            cfg.ignored.append(f"{name}={value}")
            continue
        if name in _VLLM_SWITCHES:
            cfg.ignored.append(name)
            continue
        if name.startswith("--sim-"):
            raise ConfigError(f"unknown simulator flag {name} (known: {', '.join(SIM_FLAGS)})")
        # Unknown flag: take a following non-flag token as its value when there is
        # one and the positional model has already been given (vLLM's rendered
        # command line puts the model first).
        if eq:
            cfg.unknown.append(token)
        elif i < len(args) and not args[i].startswith("-") and positionals:
            cfg.unknown.append(f"{name}={args[i]}")
            i += 1
        else:
            cfg.unknown.append(name)

    if len(positionals) > 1:
        raise ConfigError(f"expected one positional model, got {positionals}")
    if positionals:
        cfg.model = positionals[0]
    if served:
        cfg.served_model_names = served
    if cfg.seed is None:
        cfg.seed = vllm_seed
    return cfg


def _take_value(name: str, eq: str, inline_value: str, args: list[str], i: int) -> tuple[str, int]:
    if eq:
        return inline_value, i
    if i >= len(args):
        raise ConfigError(f"{name} needs a value")
    return args[i], i + 1


def _set(cfg: SimConfig, flag: _Flag, text: str, source: str) -> None:
    assert flag.convert is not None
    try:
        value = flag.convert(text)
    except ValueError as err:
        raise ConfigError(f"{source}={text!r}: {err}") from None
    setattr(cfg, flag.dest, value)


def _apply_env(cfg: SimConfig, env: Mapping[str, str]) -> None:
    for name, flag in SIM_FLAGS.items():
        var = env_var(name)
        if var in env:
            _set(cfg, flag, env[var], var)


def env_var(flag: str) -> str:
    """`--sim-error-rate-500` -> `LLMOP_SIM_ERROR_RATE_500`."""
    return ENV_PREFIX + flag.removeprefix("--sim-").replace("-", "_").upper()
