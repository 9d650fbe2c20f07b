"""The import structure: parts import downward only, and no module imports itself back through others.

Both checks read the source with :mod:`ast` and count every import statement wherever it stands: at module
level, inside a function (a lazy import), or under ``if TYPE_CHECKING:``. A lazy or type-only import still
couples the two modules; a cycle hidden that way is a cycle (the house rule: imports run one way).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "skyfabric"

#: part → the parts it may import (besides itself).
ALLOWED = {
    "core": set(),
    "http": {"core"},
    "engine": {"core"},
    "protocols": {"core"},
    "gateway": {"core", "http", "protocols", "ops"},
    "ops": {"core"},
    "control": {"core"},
    "drills": {"core", "control", "http", "gateway", "protocols"},
    "sim": {"core", "gateway", "control", "protocols"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("skyfabric."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("skyfabric."):
                    found.add(alias.name.split(".")[1])
    return found


def test_parts_import_only_downwards() -> None:
    violations = []
    for part, allowed in ALLOWED.items():
        for path in (SRC / part).rglob("*.py"):
            for other in imports_of(path) - allowed - {part}:
                violations.append(f"{path.relative_to(SRC)} imports skyfabric.{other}")
    assert violations == []


def test_every_part_is_known() -> None:
    parts = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert parts <= set(ALLOWED), parts - set(ALLOWED)


# ------------------------------------------------------------------------------------------- import cycles


def module_name(path: Path, root: Path = SRC) -> str:
    """``.../skyfabric/engine/base.py`` → ``skyfabric.engine.base`` (a package is its ``__init__``)."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_imports(path: Path, modules: set[str], root: Path = SRC) -> set[str]:
    """The project modules that ``path`` imports, from any statement anywhere in the file.

    ``from pkg import name`` is an import of ``pkg.name`` when that is a module, else of ``pkg``; relative
    imports are resolved against the file's package.
    """
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]

    def resolve(name: str) -> str:
        """The longest project module that ``name`` refers to (``a.b.C`` → module ``a.b``), or ''."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(
                    resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else resolve(base)
                )
    found.discard("")
    found.discard(me)
    return found


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module → the project modules it imports (every import statement counts)."""
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(paths)
    return {name: module_imports(path, modules, root) for name, path in paths.items()}


def tangles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components that hold a cycle (modules that all import each other, in a loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm; the graph is small, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One shortest cycle per tangle, as a chain ``[a, b, …, a]``."""
    cycles = []
    for component in tangles(graph):
        members = set(component)
        start = component[0]
        # Breadth-first from start back to start inside the component: the shortest chain through it.
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            following = []
            for node in frontier:
                for nxt in sorted(graph.get(node, ())):
                    if nxt not in members:
                        continue
                    if nxt == start:
                        found = node
                        break
                    if nxt not in previous:
                        previous[nxt] = node
                        following.append(nxt)
                if found is not None:
                    break
            frontier = following
        assert found is not None
        chain = [start]
        node = found
        while node != start:
            chain.append(node)
            node = previous[node]
        chain.append(start)
        cycles.append([chain[0], *reversed(chain[1:-1]), chain[-1]])
    return cycles


def test_no_import_cycles_even_through_lazy_or_type_checking_imports() -> None:
    graph = import_graph()
    cycles = [
        " → ".join(cycle)
        + (
            f"  (tangled with it: {', '.join(sorted(set(tangle) - set(cycle)))})"
            if len(tangle) > len(cycle) - 1
            else ""
        )
        for cycle, tangle in zip(find_cycles(graph), tangles(graph), strict=True)
    ]
    assert cycles == [], "import cycles:\n  " + "\n  ".join(cycles)


def test_cycle_finder_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    """The check itself can fail: a package whose only cycles hide in a function and under TYPE_CHECKING."""
    pkg = tmp_path / "skyfabric"
    (pkg / "part").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "part" / "__init__.py").write_text("")
    (pkg / "part" / "a.py").write_text("from skyfabric.part.b import B\n")
    (pkg / "part" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from skyfabric.part import a\nB = 1\n"
    )
    (pkg / "part" / "c.py").write_text("def load():\n    from . import d\n")
    (pkg / "part" / "d.py").write_text("import skyfabric.part.c\n")
    (pkg / "part" / "e.py").write_text("from skyfabric.part import a, b\n")  # imports, but closes no cycle
    graph = import_graph(pkg)
    assert graph["skyfabric.part.e"] == {"skyfabric.part.a", "skyfabric.part.b"}
    assert find_cycles(graph) == [
        ["skyfabric.part.a", "skyfabric.part.b", "skyfabric.part.a"],
        ["skyfabric.part.c", "skyfabric.part.d", "skyfabric.part.c"],
    ]
