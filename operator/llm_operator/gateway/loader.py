"""Read the routing table file and watch it for changes.

The operator writes the table into a ConfigMap; a ConfigMap volume updates by swapping a
`..data` symlink, so the file's inode (not only its mtime) changes. The watcher polls
`os.stat` (which follows the symlink) every `POLL_INTERVAL_S` and also watches the API key
files the table names (mounted Secrets rotate the same way). A table that fails to parse or
validate is logged and ignored: the gateway keeps serving the last good table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from llm_operator.api.gateway_config import Fallback, GatewayConfig

log = logging.getLogger("llm_operator.gateway")

POLL_INTERVAL_S = 0.25

Fingerprint = tuple[tuple[str, int, int, int, int], ...]


class ConfigError(Exception):
    """The table file cannot be read or is not a valid table."""


def parse(text: str, name: str = "") -> GatewayConfig:
    """A table from YAML or JSON text (JSON is YAML, but json.loads is faster and exact)."""
    try:
        data: Any = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{name or 'routing table'}: not YAML or JSON: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name or 'routing table'}: the top level must be a mapping")
    try:
        return GatewayConfig.model_validate(data)
    except ValueError as e:
        raise ConfigError(f"{name or 'routing table'}: {e}") from None


def load(path: str | os.PathLike[str]) -> GatewayConfig:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read routing table {path}: {e.strerror or e}") from None
    return parse(text, str(path))


def read_api_key(f: Fallback) -> str | None:
    """The API key of an external fallback, from its env var or file. Never logged."""
    if f.api_key_env:
        value = os.environ.get(f.api_key_env)
        if value is None:
            log.warning("fallback %s: environment variable %s is not set", f.url, f.api_key_env)
        return value.strip() if value else None
    if f.api_key_file:
        try:
            return Path(f.api_key_file).read_text().strip() or None
        except OSError as e:
            log.warning("fallback %s: cannot read API key file: %s", f.url, e.strerror or e)
            return None
    return None


def _stat(path: str) -> tuple[str, int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (path, 0, 0, 0, -1)
    return (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def fingerprint(path: str, config: GatewayConfig | None) -> Fingerprint:
    paths = [path]
    if config is not None:
        paths += [f.api_key_file for m in config.models for f in m.fallbacks if f.api_key_file]
    return tuple(_stat(p) for p in paths)


async def watch(
    path: str,
    current: GatewayConfig,
    apply: Callable[[GatewayConfig], None],
    on_error: Callable[[str], None],
    interval: float = POLL_INTERVAL_S,
    seen: Fingerprint | None = None,
) -> None:
    """Poll the table (and its key files) and call `apply` with each new valid table.

    `seen` is the fingerprint taken *before* `current` was read, so a change made between
    that read and the first poll is not missed.
    """
    if seen is None:
        seen = fingerprint(path, current)
    config = current
    while True:
        await asyncio.sleep(interval)
        fp = fingerprint(path, config)
        if fp == seen:
            continue
        seen = fp
        try:
            # Parsing a large table can take milliseconds; that is fine once per change.
            new = load(path)
        except ConfigError as e:
            log.error("routing table not reloaded, keeping the last good one: %s", e)
            on_error(str(e))
            continue
        config = new
        # Keep the table file's stat from before the read (a write racing the read shows up
        # at the next poll); add the key files the new table names.
        seen = fp[:1] + fingerprint(path, config)[1:]
        apply(new)
