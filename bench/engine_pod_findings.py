"""kube-score and checkov findings on the engine Deployments of every golden input (not a test).

Renders each tests/golden/<case>/input.yaml (with its config.yaml) with the code of a source
tree, runs both scanners on everything the case renders (the Service, HPA and PDB change
what kube-score checks on a Deployment), and counts only the findings on engine Deployments:
kube-score's CRITICAL and WARNING per check id, checkov's failed checks per check id.

    # before: the code of another commit, in a worktree (never git stash)
    git worktree add --detach /tmp/before 714c3db   # the last commit before engine requests
    .venv/bin/python bench/engine_pod_findings.py --tree /tmp/before --label before --json /tmp/b.json
    .venv/bin/python bench/engine_pod_findings.py --label after --json /tmp/a.json
    .venv/bin/python bench/engine_pod_findings.py --run-as-user 10001 --label "after, uid 10001" \
        --json /tmp/u.json
    .venv/bin/python bench/engine_pod_findings.py --compare /tmp/b.json /tmp/a.json /tmp/u.json

Tools: kube-score from `go install github.com/zegl/kube-score/cmd/kube-score@latest`
($KUBE_SCORE or ~/go/bin/kube-score), checkov from `pip install checkov` in its own virtualenv
($CHECKOV or /tmp/checkov-venv/bin/checkov).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
KUBE_SCORE = os.environ.get("KUBE_SCORE", str(Path.home() / "go" / "bin" / "kube-score"))
CHECKOV = os.environ.get("CHECKOV", "/tmp/checkov-venv/bin/checkov")

# Run in a child process so that `--tree` renders with that tree's llm_operator.
_RENDER = """\
import sys, yaml
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/operator")
from llm_operator.api import LLMDeployment
from llm_operator.render import RenderConfig, render_all
from llm_operator.render.output import to_yaml
import llm_operator
assert llm_operator.__file__.startswith(sys.argv[1]), llm_operator.__file__
case, out = Path(sys.argv[2]), Path(sys.argv[3])
config_file = case / "config.yaml"
values = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
values = values or {}
if sys.argv[4]:
    values["runAsUser"] = int(sys.argv[4])
llmd = LLMDeployment.model_validate(yaml.safe_load((case / "input.yaml").read_text()))
out.write_text(to_yaml(render_all(llmd, RenderConfig.from_mapping(values))))
"""

KUBE_SCORE_GRADES = {1: "CRITICAL", 5: "WARNING"}


def render(tree: Path, case: Path, out: Path, run_as_user: int | None) -> None:
    subprocess.run(
        [sys.executable, "-c", _RENDER, str(tree), str(case), str(out), str(run_as_user or "")],
        check=True,
    )


def kube_score(path: Path) -> Counter[str]:
    """kube-score's CRITICAL and WARNING checks on the file's Deployments."""
    proc = subprocess.run(
        [KUBE_SCORE, "score", "--output-format", "json", str(path)],
        capture_output=True,
        text=True,
    )
    found: Counter[str] = Counter()
    for obj in json.loads(proc.stdout):
        if obj["type_meta"]["kind"] != "Deployment":
            continue
        for check in obj["checks"]:
            grade = KUBE_SCORE_GRADES.get(check["grade"])
            if grade is not None and not check["skipped"]:
                found[f"{grade} {check['check']['id']}"] += 1
    return found


CHECKOV_ARGS = [
    "--skip-download",
    "--quiet",
    "--compact",
    "-o",
    "json",
    "--framework",
    "kubernetes",
]


def checkov(path: Path) -> Counter[str]:
    """checkov's failed Kubernetes checks on the file's Deployments and their pods."""
    proc = subprocess.run(
        [CHECKOV, *CHECKOV_ARGS, "-f", str(path)],
        capture_output=True,
        text=True,
        # Offline: no guideline download from Prisma Cloud.
        env=os.environ | {"BC_SKIP_MAPPING": "TRUE"},
    )
    report: Any = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    found: Counter[str] = Counter()
    for one in reports:
        for failed in one.get("results", {}).get("failed_checks", []):
            # Graph checks (CKV2_*) name the pod template as "Pod.<namespace>.<labels>".
            if failed["resource"].startswith(("Deployment.", "Pod.")):
                found[f"{failed['check_id']} {failed['check_name']}"] += 1
    return found


def measure(tree: Path, run_as_user: int | None) -> dict[str, Any]:
    cases = sorted(p for p in GOLDEN.iterdir() if (p / "input.yaml").exists())
    total_ks: Counter[str] = Counter()
    total_ck: Counter[str] = Counter()
    per_case: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            out = Path(tmp) / f"{case.name}.yaml"
            render(tree, case, out, run_as_user)
            ks, ck = kube_score(out), checkov(out)
            total_ks += ks
            total_ck += ck
            per_case[case.name] = {
                "kube-score CRITICAL": sum(n for k, n in ks.items() if k.startswith("CRITICAL")),
                "kube-score WARNING": sum(n for k, n in ks.items() if k.startswith("WARNING")),
                "checkov failed": sum(ck.values()),
            }
    return {
        "cases": per_case,
        "kube-score": dict(total_ks),
        "checkov": dict(total_ck),
    }


def compare(runs: list[dict[str, Any]]) -> str:
    """Markdown tables: per check id, then per case, the runs side by side."""
    labels = [run["label"] for run in runs]
    lines = []
    for tool in ("kube-score", "checkov"):
        lines += [f"| {tool} check | " + " | ".join(labels) + " |"]
        lines += ["| --- |" + " ---: |" * len(runs)]
        for key in sorted(set().union(*(run[tool] for run in runs))):
            lines.append(f"| {key} | " + " | ".join(str(r[tool].get(key, 0)) for r in runs) + " |")
        totals = " | ".join(f"**{sum(r[tool].values())}**" for r in runs)
        lines += [f"| **total** | {totals} |", ""]
    columns = ["kube-score CRITICAL", "kube-score WARNING", "checkov failed"]
    lines += [
        "| case | " + " | ".join(f"{c} ({' / '.join(labels)})" for c in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for case in sorted(runs[0]["cases"]):
        cells = [" / ".join(str(r["cases"][case][c]) for r in runs) for c in columns]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="source tree to render with")
    parser.add_argument("--label", default="after")
    parser.add_argument("--run-as-user", type=int, help="operator setting runAsUser for all")
    parser.add_argument("--json", type=Path, help="write the counts here")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="JSON", help="tabulate runs")
    args = parser.parse_args()
    if args.compare:
        print(compare([json.loads(p.read_text()) for p in args.compare]), end="")
        return
    result = measure(args.tree.resolve(), args.run_as_user) | {"label": args.label}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
