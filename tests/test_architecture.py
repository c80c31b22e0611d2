"""The shape of the code (docs/theory.md §0): no import cycle between qem's top-level modules and
packages; the mechanism and the privacy accounting import neither torch nor the torch side;
curvatures do not import the privacy package. Read from the sources (every import statement,
including those inside functions), so the test also catches imports made lazily."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "qem"


def module_imports() -> dict[str, set[str]]:
    """{dotted module: the dotted names it imports}, for every module under src/qem."""
    imports: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        imports[module] = names
    return imports


def top_level(name: str) -> str | None:
    """qem.finetune.engine -> finetune; None for what is not qem's."""
    parts = name.split(".")
    return parts[1] if parts[0] == "qem" and len(parts) > 1 else None


def top_level_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    known = {top_level(m) for m in module_imports()} - {None}
    for module, names in module_imports().items():
        source = top_level(module)
        if source is None:
            continue
        targets = {top_level(n) for n in names} & known
        graph.setdefault(source, set()).update(targets - {source, None})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of nodes, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if state.get(target) is None and (cycle := visit(target)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_top_level_modules():
    cycle = find_cycle(top_level_graph())
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize("package", ["mechanism", "privacy"])
def test_the_mechanism_and_the_accounting_import_no_torch_and_no_torch_side(package):
    torch_side = {"finetune", "statistics", "curvature", "subspace", "public", "data", "models"}
    for module, names in module_imports().items():
        if top_level(module) != package:
            continue
        assert not {n for n in names if n.split(".")[0] == "torch"}, module
        assert not {top_level(n) for n in names} & torch_side, module


def test_curvatures_do_not_import_the_privacy_package():
    for module, names in module_imports().items():
        if top_level(module) == "curvature":
            assert "privacy" not in {top_level(n) for n in names}, module
