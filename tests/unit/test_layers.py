"""The packages are layered: every import points down, and no module imports itself back.

From the bottom: the error taxonomy, the step contract (`modules.core`), storage, the
training loop, measurement primitives, the techniques, the meta-steps that drive them,
the job engine, and the faces on top. Imports inside functions count too: a lazy import
that runs upward is still an upward import. The one exemption is a technique file's
script face (its `main()` and `if __name__ == "__main__":` block), which hands the command
line to the engine's shared script body so that `python -m modules.compression.<name>`
keeps working.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("modules", "api", "workers")

# Lower number = lower layer. A module may import its own package or any lower layer.
LAYERS: dict[str, int] = {
    "modules": 0,  # the package's own __init__
    "modules.errors": 0,
    "modules.core": 1,
    "modules.storage": 2,
    "modules.training": 3,
    "modules.evaluation": 4,
    "modules.compression": 5,
    "modules.deployment": 5,
    "modules.search": 6,
    "modules.pipeline": 7,
    "modules.cli": 8,
    "workers": 8,
    "api": 8,
}


# The API hands job ids to the workers through the sending side of a dispatcher (Celery's
# send_task by name, ECS RunTask): never the task, its policy or the Celery app config.
API_MAY_IMPORT = frozenset({"workers.dispatch"})


def _package(module: str) -> str:
    parts = module.split(".")
    for depth in (2, 1):
        name = ".".join(parts[:depth])
        if name in LAYERS:
            return name
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")


def _is_script_face(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            return True
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
        ):
            return True
    return False


def _imports() -> dict[str, set[tuple[str, bool]]]:
    """module -> {(imported module, from a script face)} over the first-party tree."""
    graph: dict[str, set[tuple[str, bool]]] = defaultdict(set)
    for top in FIRST_PARTY:
        for path in sorted((ROOT / top).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(
                ".__init__"
            )
            tree = ast.parse(path.read_text(encoding="utf-8"))
            parents = {
                child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)
            }
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                for name in names:
                    if name.split(".")[0] in FIRST_PARTY:
                        graph[module].add((name, _is_script_face(node, parents)))
            graph.setdefault(module, set())
    return graph


def test_every_import_points_down() -> None:
    upward = []
    for module, imported in _imports().items():
        here = _package(module)
        for target, script_face in imported:
            there = _package(target)
            if there == here or (script_face and there == "modules.pipeline"):
                continue
            if here == "api" and target in API_MAY_IMPORT:
                continue
            if LAYERS[there] >= LAYERS[here]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def test_no_module_imports_itself_back() -> None:
    graph = {m: {t for t, _ in targets} for m, targets in _imports().items()}
    # Resolve `from package import name` of a submodule to the module itself where it exists.
    edges = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
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
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_api_imports_only_the_sending_side_of_the_workers() -> None:
    graph = _imports()
    offenders = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("api")
        for target, _ in targets
        if target.startswith("workers") and target not in API_MAY_IMPORT
    )
    assert not offenders, "\n".join(offenders)
