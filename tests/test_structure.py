"""The package's shape: imports run one way, no import circle, no oversized module without a reason.

The layers are the ones docs/internals.md draws; an import (at module level or inside a function) may only
point to the same layer or a lower one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deltazip"

# Lowest layer first. A module's layer is found by its longest matching prefix.
LAYERS: list[tuple[str, ...]] = [
    ("deltazip.errors", "deltazip.ui", "deltazip.fsutil", "deltazip.threads", "deltazip.config", "deltazip"),
    ("deltazip.hf", "deltazip.packed", "deltazip.format"),
    ("deltazip.kernels", "deltazip.compress", "deltazip.family"),
    ("deltazip.converters", "deltazip.runtime", "deltazip.eval"),
    ("deltazip.builder", "deltazip.serving", "deltazip.plugins"),
    ("deltazip.commands", "deltazip.cli"),
]
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported deltazip module, at module level?) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "deltazip" or name.startswith("deltazip."):
                found.append((name, id(node) in top_level))
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported name lives in (``deltazip.format.load_delta`` → ``deltazip.format``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def layer_of(module: str) -> int:
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


def test_every_module_has_a_layer():
    assert [m for m in all_modules() if layer_of(m) < 0] == []


def test_imports_point_down_or_sideways():
    modules = all_modules()
    upward = []
    for module, path in modules.items():
        for name, _ in imports_of(path, module):
            target = resolve(name, modules)
            if target and target != "deltazip" and layer_of(target) > layer_of(module):
                upward.append(f"{module} -> {target}")
    assert sorted(set(upward)) == []


def test_no_import_circle_at_module_level():
    modules = all_modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for name, top in imports_of(path, module):
            target = resolve(name, modules)
            if top and target and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_long_modules_say_why():
    long = []
    for module, path in all_modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_LINES and "over 400 lines" not in text[:2000].replace("\n", " "):
            long.append(f"{module} ({len(text.splitlines())} lines)")
    assert long == []
