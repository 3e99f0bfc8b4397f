"""The package's import graph: no cycles, and the layers of DESIGN.md ("which way imports run")."""

import ast
from pathlib import Path

import workbench

ROOT = Path(workbench.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("workbench",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def _runtime_imports(tree: ast.AST) -> list[ast.AST]:
    """Import nodes anywhere (functions included) except under ``if TYPE_CHECKING:``."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            deps |= {t for t in targets if t in files}
        # A submodule imports its own package implicitly: that is not an edge of the design.
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "workbench.presets" in graph and "workbench.recipe.steps" in graph  # the walk saw the package
    assert _cycles(graph) == []


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_never_import_higher_ones():
    graph = import_graph()
    faces = {"workbench.cli", "workbench.widgets", "workbench.bench", "workbench.bench_deploy", "workbench.serve"}
    pipeline = {"workbench.recipe", "workbench.presets"}
    core_and_techniques = {"workbench.data", "workbench.models", "workbench.train", "workbench.measure",
                           "workbench.sparse", "workbench.prune", "workbench.quant", "workbench.cluster",
                           "workbench.coding", "workbench.distill", "workbench.fold", "workbench.schedules", "workbench.llm",
                           "workbench.store",
                           "workbench.onnx", "workbench.ort"}

    def top(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2])

    for name, deps in graph.items():
        if top(name) in core_and_techniques:
            bad = {d for d in deps if top(d) in faces | pipeline}
            assert not bad, f"{name} (core/technique) imports {bad}"
        if top(name) in pipeline:
            bad = {d for d in deps if top(d) in faces}
            assert not bad, f"{name} (pipeline) imports {bad}"
