"""The package layers: a module imports only its own layer or lower ones, and the import graph has no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# lowest first (README "Layout"); a module may import only its own or lower layers
LAYERS = ("core", "augmentation", "preprocessing", "dataio", "models", "evaluation", "training", "experiments",
          "serving")
RANK = {name: i for i, name in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never imported at run time)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import of a package module, at any depth (function-level too)."""
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]  # `from pkg import module`
    return [(line, m) for line, m in out if m.split(".")[0] in RANK]


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((REPO_ROOT / layer).rglob("*.py"))}


def test_no_module_imports_a_higher_layer() -> None:
    bad = []
    for name, path in package_modules().items():
        layer = RANK[name.split(".")[0]]
        for line, target in imports_of(path):
            if RANK[target.split(".")[0]] > layer:
                bad.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {target}")
    assert not bad, "imports pointing up the layers:\n" + "\n".join(bad)


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports (a `from pkg import name` edge goes to pkg.name when that is a module)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for _, target in imports_of(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def test_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """The checks themselves: an upward import and a two-module cycle are both reported."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from training.trainer import train\n")
    assert imports_of(f) == [(2, "training.trainer"), (2, "training.trainer.train")]


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_is_a_package(layer: str) -> None:
    assert (REPO_ROOT / layer / "__init__.py").is_file()
