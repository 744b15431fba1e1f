"""The layout keeps its shape: the layers below import nothing from the layers above, packages form no
import cycle, engine/'s top level stays small and every subpackage says what it holds.

The import graph is read from the source with `ast` (function-level imports included), so a lazy import that
breaks the layering counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Lowest first. A module may import from its own layer and the layers below it.
LAYERS = (
    ("engine", "engine.schema", "engine.storage", "engine.config"),
    ("engine.methods", "engine.models", "engine.output", "engine.run", "engine.stages", "engine.readers"),
    ("actors",),
    ("engine.recipes", "engine.tiny"),
    ("engine.pipeline", "engine.train", "engine.finetune"),
    ("jobs",),
)
MAX_ENGINE_TOP_LEVEL = 6


def group(module: str) -> str:
    """The package (or engine top-level module) a module belongs to, as LAYERS names it."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "engine" else parts[0]


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    modules = {}
    for path in [*ROOT.glob("engine/**/*.py"), *ROOT.glob("actors/*.py"), *ROOT.glob("jobs/*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def test_no_layer_imports_from_a_layer_above():
    layer_of = {g: i for i, names in enumerate(LAYERS) for g in names}
    graph = project_imports()
    unplaced = sorted({group(m) for m in graph} - set(layer_of))
    assert not unplaced, f"packages without a layer in LAYERS: {unplaced}"
    upward = [
        f"{module} (layer {layer_of[group(module)]}) imports {other} (layer {layer_of[group(other)]})"
        for module, imported in graph.items()
        for other in imported
        if layer_of[group(other)] > layer_of[group(module)]
    ]
    assert not upward, "\n".join(upward)


def test_packages_form_no_import_cycle():
    edges: dict[str, set[str]] = {}
    for module, imported in project_imports().items():
        edges.setdefault(group(module), set()).update(group(m) for m in imported if group(m) != group(module))
    # A cycle exists iff a depth-first search meets a node still on its stack.
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt) :] + [node, nxt])
                return True
            if not state.get(nxt) and visit(nxt, [*stack, node]):
                return True
        state[node] = 2
        return False

    for node in sorted(edges):
        if not state.get(node) and visit(node, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_engine_top_level_is_small_and_every_subpackage_says_what_it_holds():
    engine = Path(ROOT / "engine")
    top = sorted(p.name for p in engine.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_ENGINE_TOP_LEVEL, top
    for package in sorted(p for p in engine.iterdir() if (p / "__init__.py").is_file()):
        docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert docstring and len(docstring) > 40, f"{package.relative_to(ROOT)}/__init__.py says nothing"
