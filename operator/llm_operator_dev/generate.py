"""Regenerate every generated file, or check that none has drifted (`--check`).

One command for all of them: the CRD from the API models, the Grafana dashboards the chart
ships (dashboards.py), the chart's CRD template from the CRD, and the plain-YAML install from
the chart. CI runs `llm-operator generate --check`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from llm_operator_dev import crdgen, dashboards

REGENERATE_COMMAND = "llm-operator generate"


def repo_root() -> Path:
    """The checkout this package was installed from (editable install)."""
    return Path(__file__).resolve().parents[2]


def generators(root: Path) -> list[tuple[Path, Callable[[], str]]]:
    """Each generated file and the function that produces its content, in dependency order."""
    produced: list[tuple[Path, Callable[[], str]]] = [
        (root / "crds" / crdgen.CRD_FILENAME, crdgen.render_crd_yaml),
    ]
    if (root / dashboards.DASHBOARD_DIR).parent.is_dir():  # a root without the chart has none
        produced += dashboards.generators(root)
    try:
        chartgen = importlib.import_module("llm_operator_dev.chartgen")
    except ModuleNotFoundError:  # the chart generator arrives with the Helm chart
        return produced
    chart_files: list[tuple[Path, Callable[[], str]]] = chartgen.generators(root)
    return produced + chart_files


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE_COMMAND, description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if any file would change")
    parser.add_argument("--root", type=Path, default=None, help="repository root")
    args = parser.parse_args(argv)
    root = args.root or repo_root()
    drifted: list[str] = []
    for path, produce in generators(root):
        text = produce()
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if args.check:
            drifted.append(str(path.relative_to(root)))
            diff = difflib.unified_diff(
                current.splitlines(), text.splitlines(), str(path), "generated", lineterm="", n=1
            )
            sys.stderr.write("\n".join(list(diff)[:40]) + "\n")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(root)}")
    if drifted:
        sys.stderr.write(
            f"generated files are out of date: {', '.join(drifted)}\n"
            f"run `{REGENERATE_COMMAND}` and commit the result\n"
        )
        return 1
    return 0
