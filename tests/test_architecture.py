"""The package's shape (README, Layout): layers whose imports point down only, no import cycle, no
private name imported from another module, no mixins, modules of one sitting's length."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "jaxppo"

# what each layer may import from jaxppo (besides itself); the leaves are errors and runtime
ALLOWED = {
    "core": set(),
    "config": {"errors"},
    "data": {"errors"},
    "models": {"core", "errors"},
    "engine": {"core", "models", "config", "runtime", "errors"},
    "run": {"core", "models", "engine", "config", "data", "runtime", "errors"},
}
MAX_LINES = 350


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, path, ast.parse(path.read_text(), str(path))


def imports(tree, module: str, top_level_only: bool = False):
    """(imported module, [names]) of every jaxppo import in `tree` (relative ones resolved)."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxppo"):
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("jaxppo"):
                    yield a.name, []


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_layers_import_downwards_only():
    wrong = []
    for name, _, tree in modules():
        own = layer(name)
        if own not in ALLOWED:
            continue
        for target, _ in imports(tree, name):
            other = layer(target)
            if other not in (None, own) and other not in ALLOWED[own]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_the_core_imports_only_jax():
    for name, _, tree in modules():
        if layer(name) != "core":
            continue
        for node in ast.walk(tree):
            roots = ([a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else
                     [node.module.split(".")[0]] if isinstance(node, ast.ImportFrom) and node.module else [])
            for root in roots:
                assert root in {"jax", "jaxppo", "__future__", "typing", "collections", "dataclasses",
                                "functools", "math"}, (name, root)


def test_no_module_imports_a_private_name_of_another():
    wrong = [f"{name}: from {target} import {n}" for name, _, tree in modules()
             for target, names in imports(tree, name) for n in names if n.startswith("_") and target != name]
    assert not wrong, wrong


def test_no_test_imports_a_private_name():
    """Tests drive the public names (a private one may change without notice)."""
    wrong = []
    for path in sorted((PKG.parent / "tests").rglob("*.py")):
        for target, names in imports(ast.parse(path.read_text()), ""):
            wrong += [f"{path.name}: from {target} import {n}" for n in names if n.startswith("_")]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = {name: {t for t, _ in imports(tree, name, top_level_only=True)} for name, _, tree in modules()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt in graph and not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [node])


def test_no_mixins_and_short_modules():
    for name, path, tree in modules():
        assert len(path.read_text().splitlines()) <= MAX_LINES, f"{name} is over {MAX_LINES} lines"
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert "Mixin" not in node.name and not any("Mixin" in ast.unparse(b) for b in node.bases), name
