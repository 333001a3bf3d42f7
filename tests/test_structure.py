"""The package's shape, read from its source with `ast` (nothing is imported): no import circles
(imports inside functions included; `if TYPE_CHECKING:` blocks, which never run, excluded), also
none between its packages (config, data, models, trainer); no module over 600 lines, no function
over 60; no two classes of the same name.

Run as a script (`python tests/test_structure.py`) it prints the numbers: modules, imports,
circles, and the five longest modules and functions.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jax_sft"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its source: `from a.b import c` is an
    import of the module a.b.c when there is one, else of a.b."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between the top-level parts of the package: jax_sft.config.*, jax_sft.data.*, ...
    each collapse to one node; a top-level module is a node of its own."""
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    out = defaultdict(set)
    for a, targets in graph.items():
        out[top(a)].update(top(b) for b in targets if top(b) != top(a))
    for node in list(out.values()):
        for b in node:
            out.setdefault(b, set())
    return dict(out)


def _functions() -> list[tuple[int, str]]:
    out = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name} ({path.name}:{node.lineno})"))
    return sorted(out, reverse=True)


def _module_lines() -> list[tuple[int, str]]:
    return sorted(((len(p.read_text().splitlines()), n) for n, p in _modules().items()), reverse=True)


def test_no_import_circles():
    graph = import_graph()
    assert sum(map(len, graph.values())) > 100  # the walk sees the package's imports
    assert cycles(graph) == []


def test_no_circles_between_the_packages():
    assert cycles(package_graph(import_graph())) == []


def test_the_layers_point_one_way():
    """models and data never import the config package or the trainer; data never imports models."""
    graph = package_graph(import_graph())
    assert not graph["jax_sft.models"] & {"jax_sft.config", "jax_sft.data", "jax_sft.trainer"}
    assert not graph["jax_sft.data"] & {"jax_sft.config", "jax_sft.trainer", "jax_sft.models"}
    assert "jax_sft.trainer" not in graph["jax_sft.config"]


def test_modules_and_functions_are_short():
    long_modules = [(n, m) for n, m in _module_lines() if n > MAX_MODULE_LINES]
    long_functions = [(n, f) for n, f in _functions() if n > MAX_FUNCTION_LINES]
    assert long_modules == [] and long_functions == []


def test_no_two_classes_share_a_name():
    seen = defaultdict(list)
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                seen[node.name].append(name)
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


if __name__ == "__main__":
    g = import_graph()
    print(
        f"modules {len(g)}, imports {sum(map(len, g.values()))}, circles {len(cycles(g))} "
        f"(between packages: {len(cycles(package_graph(g)))})"
    )
    print("longest modules:", ", ".join(f"{m} {n}" for n, m in _module_lines()[:5]))
    print("longest functions:", ", ".join(f"{f} {n}" for n, f in _functions()[:5]))
