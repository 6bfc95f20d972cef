"""The gateway stays readable (issue 12): no function above cyclomatic complexity 15 (radon),
and no import cycle between its modules."""

from __future__ import annotations

import ast
from pathlib import Path

from radon.complexity import cc_visit

import llm_operator.gateway

GATEWAY = Path(llm_operator.gateway.__file__).parent
CAP = 15


def test_no_gateway_function_is_above_the_complexity_cap() -> None:
    over = [
        f"{path.name}:{block.lineno} {block.fullname} {block.complexity}"
        for path in sorted(GATEWAY.glob("*.py"))
        for block in cc_visit(path.read_text())
        if block.complexity > CAP
    ]
    assert over == [], "split these (rare branches into helpers): " + ", ".join(over)


def _imports(path: Path) -> set[str]:
    """Gateway modules `path` imports, at any depth (imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "llm_operator.gateway":
                found |= {a.name for a in node.names}
            elif node.module.startswith("llm_operator.gateway."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llm_operator.gateway."):
                    found.add(alias.name.split(".")[2])
    return found


def test_gateway_modules_import_no_cycle() -> None:
    modules = {p.stem: p for p in GATEWAY.glob("*.py")}
    graph = {name: _imports(path) & modules.keys() - {name} for name, path in modules.items()}
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        for nxt in sorted(graph[name]):
            if nxt in trail:
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif len(trail) < len(graph):
                visit(nxt, [*trail, nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert cycles == [], cycles[:5]
