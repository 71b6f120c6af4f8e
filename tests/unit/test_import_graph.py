"""recnix's modules import one way: no cycle in the import graph, counting every
import (under ``if TYPE_CHECKING:`` and inside functions too)."""

from __future__ import annotations

import ast
from pathlib import Path

import recnix

PACKAGE_DIR = Path(recnix.__file__).parent


def module_files() -> dict[str, Path]:
    """Every module of the recnix package by dotted name (a package by its own name)."""
    files = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ("recnix", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The recnix modules ``name`` (at ``path``) imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(resolve(a.name) for a in node.names if a.name.startswith("recnix"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("recnix"):
                continue
            for alias in node.names:  # `from recnix import control`: the module control
                full = f"{module}.{alias.name}"
                found.add(full if full in known else resolve(module))
    found.discard(None)
    found.discard(name)
    return {m for m in found if m is not None}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_imports_it_must() -> None:
    graph = import_graph()
    assert "recnix.daemon.session" in graph["recnix.daemon.service"]
    assert "recnix.protocol.wire" in graph["recnix.protocol.connection"]  # relative import
    assert "recnix.hooks.control" in graph["recnix.hooks.prepost"]  # `from recnix import control`


def test_cycle_detection_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (a module imports its caller): " + "; ".join(
        " <-> ".join(c) for c in found
    )


# The subpackages from the bottom up (docs/architecture.md, "Modules"): a module may
# import its own subpackage and those before it, never one after it.
LAYERS = [
    "config",
    "formats",
    "protocol",
    "store",
    "sandbox",
    "remote",
    "hooks",
    "daemon",
    "cli",
]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a module by one of a lower layer (or outside every layer)."""
    rank = {layer: n for n, layer in enumerate(LAYERS)}
    found = []
    for name, imported in graph.items():
        parts = name.split(".")
        if len(parts) < 2:
            continue
        for dep in imported:
            dep_parts = dep.split(".")
            if len(dep_parts) < 2 or dep_parts[1] == parts[1]:
                continue
            if parts[1] not in rank or dep_parts[1] not in rank:
                found.append(f"{name} -> {dep} (a module outside the layers)")
            elif rank[dep_parts[1]] > rank[parts[1]]:
                found.append(f"{name} -> {dep}")
    return sorted(found)


def test_layer_check_finds_an_upward_import() -> None:
    graph = {"recnix.store.x": {"recnix.daemon.y"}, "recnix.daemon.y": {"recnix.store.x"}}
    assert layer_violations(graph) == ["recnix.store.x -> recnix.daemon.y"]


def test_every_subpackage_is_a_layer() -> None:
    subpackages = {p.name for p in PACKAGE_DIR.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(LAYERS)
    assert {p.name for p in PACKAGE_DIR.glob("*.py")} == {"__init__.py"}


def test_layers_import_only_layers_below_them() -> None:
    found = layer_violations(import_graph())
    assert not found, "imports of a higher layer: " + "; ".join(found)
