"""The import structure of pyquant (DESIGN.md, "Target shape of the package"), read from the sources with `ast`.

Every import of a pyquant module in pyquant/ and kernels/ (which is `pyquant.kernels`) counts, at module level and
inside functions alike (a function-level import is a cycle that has only been postponed), except those under
`if TYPE_CHECKING:`, which never run. An import is resolved to the modules it runs:
- `import pyquant.a.b`, `from pyquant.a.b import name`, `from .b import name`: pyquant.a.b, and pyquant.a (its
  __init__ runs too) unless pyquant.a is a package the importing module is in (already imported then);
- `from pyquant.a import b` where pyquant/a/b.py exists: pyquant.a.b (and pyquant.a, as above);
- `import pyquant` and `from pyquant import name` (name not a submodule): the package root, that is everything
  pyquant/__init__.py imports;
- `importlib.import_module("pyquant.x")` with a literal name: pyquant.x (names built at run time are not seen).

The rules:
(a) no import cycle among pyquant's modules;
(b) no cycle among pyquant's units: a unit is a subpackage (pyquant.experiment, pyquant.data, ...) or a top-level
    module (pyquant.amp, pyquant.backends.capi, ...); two units that import each other are the shortest such cycle;
(c) pyquant.data and pyquant.subsets never import pyquant.experiment, directly or through other modules.
A failure names each cycle (or path) with the file and line of every import in it.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pyquant"
# Libraries that the experiment uses; they never import it (DESIGN.md).
LIBRARIES = ("pyquant.data", "pyquant.subsets")
EXPERIMENT = "pyquant.experiment"


def _source_files() -> dict[str, Path]:
    """Module name -> file: pyquant/ and kernels/ (installed as pyquant.kernels; pyquant/kernels may link to it)."""
    files = {}
    for top, name in ((ROOT / "pyquant", PACKAGE), (ROOT / "kernels", f"{PACKAGE}.kernels")):
        for path in sorted(top.rglob("*.py")):
            rel = path.relative_to(top)
            if top.name == PACKAGE and rel.parts[0] == "kernels":
                continue  # read from kernels/ itself
            parts = [name, *rel.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom/import_module call, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node
        stack.extend(ast.iter_child_nodes(node))


@functools.cache
def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    """({module: {imported module: line of the first such import}}, {module: file})."""
    files = _source_files()
    modules = set(files)
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}

    for module, path in files.items():
        is_package = path.name == "__init__.py"
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1 + is_package)}

        def add(target: str, line: int) -> None:
            # The longest prefix of `target` that is a module of ours (`import pyquant.x.name` is not a thing, but
            # `import_module` of a missing name should not crash the test).
            parts = target.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if not parts or parts[0] != PACKAGE:
                return
            target = ".".join(parts)
            # The packages between the root and the target run their __init__ too, unless already importing.
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent not in own_packages:
                    graph[module].setdefault(parent, line)
            if target != module:
                graph[module].setdefault(target, line)

        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                        add(alias.name, node.lineno)
            elif isinstance(node, ast.Call):
                add(node.args[0].value, node.lineno)
            else:
                if node.level:
                    base = module.split(".")
                    base = base if is_package else base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                    continue
                names = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
                for name in names:
                    add(name, node.lineno)
                if len(names) < len(node.names):  # some imported names are attributes of `source` itself
                    add(source, node.lineno)
    return graph, files


def _where(graph, files, a: str, b: str) -> str:
    return f"{files[a].relative_to(ROOT)}:{graph[a][b]}"


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's components of more than one node (or with a self-loop), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _shortest_path(graph, start: str, goal: str, within: set[str] | None = None) -> list[str] | None:
    """The shortest import chain start -> ... -> goal (start == goal: the shortest cycle through start)."""
    seen, queue = {start: None}, deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ())):
            if within is not None and w not in within:
                continue
            if w == goal:
                path = [w, v]
                while seen[path[-1]] is not None:
                    path.append(seen[path[-1]])
                return path[::-1]
            if w not in seen:
                seen[w] = v
                queue.append(w)
    return None


def _cycles(graph) -> list[list[str]]:
    """For every node of every cycle, the shortest cycle through it; duplicates (rotations) once."""
    cycles, seen = [], set()
    for component in _strongly_connected(graph):
        members = set(component)
        for v in component:
            cycle = _shortest_path(graph, v, v, members)
            key = frozenset(zip(cycle, cycle[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return sorted(cycles, key=lambda c: (len(c), c))


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _unit_graph(graph) -> tuple[dict[str, dict[str, int]], dict[tuple[str, str], tuple[str, str]]]:
    """The graph of units without the package root, and for each unit edge one module edge behind it."""
    units: dict[str, dict[str, int]] = {}
    witness = {}
    for a, targets in sorted(graph.items()):
        if a == PACKAGE:
            continue
        units.setdefault(_unit(a), {})
        for b in sorted(targets):
            if b == PACKAGE or _unit(a) == _unit(b):
                continue
            units[_unit(a)].setdefault(_unit(b), 0)
            witness.setdefault((_unit(a), _unit(b)), (a, b))
    return units, witness


def test_no_import_cycle():
    graph, files = import_graph()
    cycles = _cycles(graph)
    lines = [
        "  " + " -> ".join(f"{a} ({_where(graph, files, a, b)})" for a, b in zip(c, c[1:])) + f" -> {c[-1]}"
        for c in cycles
    ]
    assert not cycles, (
        f"{len(cycles)} import cycles among pyquant's modules (the shortest through each module in one; "
        "file:line of the import that makes each step):\n" + "\n".join(lines)
    )


def test_no_cycle_among_subpackages():
    graph, files = import_graph()
    units, witness = _unit_graph(graph)
    lines = []
    for cycle in _cycles(units):
        steps = []
        for a, b in zip(cycle, cycle[1:]):
            ma, mb = witness[(a, b)]
            steps.append(f"{a} ({ma} imports {mb}, {_where(graph, files, ma, mb)})")
        lines.append("  " + " -> ".join(steps) + f" -> {cycle[-1]}")
    assert not lines, "subpackages / top-level modules of pyquant that import each other:\n" + "\n".join(lines)


def test_libraries_never_import_the_experiment():
    graph, files = import_graph()
    lines = []
    for module in sorted(graph):
        if _unit(module) not in LIBRARIES:
            continue
        for target in sorted(m for m in graph if _unit(m) == EXPERIMENT):
            path = _shortest_path(graph, module, target)
            if path is not None:
                lines.append("  " + " -> ".join(f"{a} ({_where(graph, files, a, b)})" for a, b in zip(path, path[1:]))
                             + f" -> {path[-1]}")
                break  # one path per library module
    assert not lines, f"{' and '.join(LIBRARIES)} must not import {EXPERIMENT}:\n" + "\n".join(lines)


def test_the_graph_sees_the_imports():
    """The reader itself: known imports of today's tree are found (guards against a test that passes on nothing)."""
    graph, files = import_graph()
    assert "pyquant.kernels" in files and "pyquant.amp" in files
    assert graph["pyquant"], "pyquant/__init__.py imports nothing?"
    assert any(t.startswith("pyquant.kernels") for deps in graph.values() for t in deps)


def test_pyquant_kernels_is_a_link_to_the_triton_folder():
    # The install serves pyquant/ alone (pyproject.toml), and kernels/ reaches it as pyquant.kernels through this
    # link, which git stores as a link. A copy that turns links into files breaks `import pyquant.kernels`.
    link = ROOT / "pyquant" / "kernels"
    assert link.is_symlink() and link.resolve() == (ROOT / "kernels").resolve(), (
        f"{link} must be a symbolic link to ../kernels (git checkout restores it: git checkout -- pyquant/kernels)"
    )
