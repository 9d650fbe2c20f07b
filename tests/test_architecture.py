"""The import direction between the parts: gateway and control plane depend on core, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "skyfabric"

#: part → the parts it may import (besides itself).
ALLOWED = {
    "core": set(),
    "http": {"core"},
    "engine": {"core"},
    "gateway": {"core", "http"},
    "control": {"core"},
    "drills": {"core", "control", "http", "gateway"},
    "sim": {"core", "gateway", "control"},
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
