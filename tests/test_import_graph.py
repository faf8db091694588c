"""The package's import graph: no cycles, and the thin client's modules stay stdlib-only.

Read from the source with ``ast`` (nothing is imported), so a cycle or a heavy import fails
here before any process pays for it. Imports inside functions count too: a lazy import that
closes a cycle still couples two modules both ways.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qmpnet"

#: what ``qmpnet <command>`` imports in service mode, before any reply is printed
THIN_CLIENT = (
    "qmpnet",
    "qmpnet.cli",
    "qmpnet.exits",
    "qmpnet.errors",
    "qmpnet.lazy",
    "qmpnet.limits",
    "qmpnet.service",
    "qmpnet.service.client",
    "qmpnet.service.protocol",
)


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = {d for d in _imports(path) if d in modules and d != name}
        # a package's own __init__ is not a dependency edge back from its modules
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_package_has_no_import_cycle() -> None:
    assert _cycle(_graph()) == []


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_thin_client_imports_only_the_standard_library_at_module_level() -> None:
    stdlib = set(sys.stdlib_module_names)
    for name in THIN_CLIENT:
        path = PACKAGE.parent / (name.replace(".", "/"))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.If):
                continue  # the TYPE_CHECKING block: never run
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots = {node.module.split(".")[0]}
                if node.module.startswith("qmpnet"):
                    assert node.module in THIN_CLIENT or node.module == "__future__", (
                        name,
                        node.module,
                    )
                    continue
            else:
                continue
            assert roots <= stdlib | {"__future__", "qmpnet"}, (name, roots - stdlib)
