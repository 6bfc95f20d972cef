"""Read the routing table file and watch it for changes.

The operator writes the table into a ConfigMap; a ConfigMap volume updates by swapping a
`..data` symlink, so the file's inode (not only its mtime) changes. The watcher polls
`os.stat` (which follows the symlink) every `POLL_INTERVAL_S` and also watches the API key
files the table names (mounted Secrets rotate the same way). A table that fails to parse or
validate is logged and ignored: the gateway keeps serving the last good table.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from llm_operator.api.gateway_config import ClientKey, Edge, Fallback, GatewayConfig

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


def load(
    path: str | os.PathLike[str], edge_path: str | None = None, missing_ok: bool = False
) -> GatewayConfig:
    """The table at `path`; with `edge_path`, its `edge` is that file's (the chart's edge
    settings: the operator writes no edge); client keys of `edge.keysDir` read and hashed.
    `missing_ok`: a table file that does not exist yet is an empty table."""
    if missing_ok and not os.path.exists(path):
        config = GatewayConfig()
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read routing table {path}: {e.strerror or e}") from None
        config = parse(text, str(path))
    if edge_path is not None:
        config = config.model_copy(update={"edge": load_edge(edge_path)})
    return with_dir_keys(config)


def load_edge(path: str) -> Edge:
    try:
        text = Path(path).read_text()
        data: Any = yaml.safe_load(text) or {}
    except OSError as e:
        raise ConfigError(f"cannot read edge settings {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML: {e}") from None
    try:
        return Edge.model_validate(data)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def _key_files(keys_dir: str) -> list[str]:
    """The key files of a keys directory, by name; a mounted Secret's `..data` links and
    other dot names are not keys."""
    try:
        names = sorted(os.listdir(keys_dir))
    except OSError:
        return []
    return [os.path.join(keys_dir, n) for n in names if not n.startswith(".")]


def with_dir_keys(config: GatewayConfig) -> GatewayConfig:
    """`config` with the keys of `edge.keysDir` added to `edge.apiKeys` (hashed: the key
    itself is never kept). A file whose name an `apiKeys` entry already has is skipped."""
    edge = config.edge
    if edge.keys_dir is None:
        return config
    keys = list(edge.api_keys)
    names = {k.name for k in keys}
    hashes = {k.sha256 for k in keys}
    for path in _key_files(edge.keys_dir):
        name = os.path.basename(path)
        try:
            key = Path(path).read_text().strip()
        except OSError as e:  # a directory, or a file that went away mid-rotation
            log.debug("client key %s not read: %s", name, e)
            continue
        digest = hashlib.sha256(key.encode()).hexdigest()
        if not key or name in names or digest in hashes:
            log.warning("client key %s skipped: empty, or its name or key is there twice", name)
            continue
        names.add(name)
        hashes.add(digest)
        keys.append(ClientKey(name=name, sha256=digest))
    if not keys:
        log.warning("edge.keysDir %s holds no keys: every /v1 request gets 401", edge.keys_dir)
    return config.model_copy(update={"edge": edge.model_copy(update={"api_keys": keys})})


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


def fingerprint(
    path: str, config: GatewayConfig | None, edge_path: str | None = None
) -> Fingerprint:
    paths = [path]
    if edge_path is not None:
        paths.append(edge_path)
    if config is not None:
        paths += [f.api_key_file for m in config.models for f in m.fallbacks if f.api_key_file]
        if config.edge.keys_dir is not None:
            # A rotated Secret swaps its `..data` link: the directory's entries change too.
            paths.append(config.edge.keys_dir)
            paths += _key_files(config.edge.keys_dir)
    return tuple(_stat(p) for p in paths)


async def watch(
    path: str,
    current: GatewayConfig,
    apply: Callable[[GatewayConfig], None],
    on_error: Callable[[str], None],
    interval: float = POLL_INTERVAL_S,
    seen: Fingerprint | None = None,
    edge_path: str | None = None,
) -> None:
    """Poll the table (and its key files) and call `apply` with each new valid table.

    `seen` is the fingerprint taken *before* `current` was read, so a change made between
    that read and the first poll is not missed.
    """
    if seen is None:
        seen = fingerprint(path, current, edge_path)
    config = current
    while True:
        await asyncio.sleep(interval)
        fp = fingerprint(path, config, edge_path)
        if fp == seen:
            continue
        seen = fp
        try:
            # Parsing a large table can take milliseconds; that is fine once per change.
            new = load(path, edge_path)
        except ConfigError as e:
            log.error("routing table not reloaded, keeping the last good one: %s", e)
            on_error(str(e))
            continue
        config = new
        # Keep the table file's stat from before the read (a write racing the read shows up
        # at the next poll); add the key files the new table names.
        seen = fp[:1] + fingerprint(path, config, edge_path)[1:]
        apply(new)
