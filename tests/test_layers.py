"""The architecture, checked on the source text: every file under src/crome is parsed with ``ast``,
never imported. No import cycle; no module imports a layer above its own (and inside
``crome.editing``, no sub-layer above its own); no function over 60 lines; the method names
("rome", "crome", ...) written as strings in methods.py alone."""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "crome"
METHODS_FILE = PACKAGE / "editing" / "methods.py"

MAX_FUNCTION_LINES = 60

# The layers, bottom to top, by the first component after ``crome.``: a module may import its own
# layer or a lower one. The package ``crome`` itself (its __init__, the public API) is above them all.
LAYERS = ["errors", "hooks", "cache", "arch", "models", "request", "scoring", "editing", "evaluation", "analysis",
          "distribution", "serving", "cli"]

# The sub-layers of ``crome.editing``, bottom to top (the same rule holds between them). Keep this table
# up to date: a module of crome.editing that is not in it fails test_no_module_imports_a_layer_above_it.
# The package's own __init__ (``crome.editing``) is above every sub-layer.
EDITING_LAYERS = {
    "hparams": 0, "methods": 0, "records": 0,
    "templates": 1, "mom2": 1,                                          # key statistics
    "weights": 2, "delta": 2,                                           # weights and factors
    "compute_key": 3, "compute_value": 3, "fast": 3, "update": 3,       # the edit steps
    "null_space": 3, "norm_anchor": 3, "edit": 3, "memit": 3, "memory": 3,
    "efficacy": 4,
    "locate": 5, "layer_choice": 5,
    "rules": 6, "verify": 6, "fallback": 6,                             # the guard's parts
    "context": 7,                                                       # the run context (names rule, verifier)
    "guard": 8,                                                         # the guard, taking the run context
    "api": 9,                                                           # the public wrappers that fill in defaults
}


# ------------------------------------------------------------------ reading the source


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Every module of crome by its dotted name (a package by its own name, for its __init__.py)."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def walk(path: Path) -> list[ast.AST]:
    """Every node of the file that has a line number, in line order."""
    return sorted((n for n in ast.walk(parse(path)) if hasattr(n, "lineno")), key=lambda n: (n.lineno, n.col_offset))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(SRC.parent)}:{node.lineno}"


def known(name: str) -> str | None:
    """The crome module ``name`` names, or the nearest crome package above it; None outside crome."""
    names = modules()
    while name:
        if name in names:
            return name
        name = name.rpartition(".")[0]
    return None


def resolve_from(module: str, node: ast.ImportFrom) -> str:
    """The absolute name a ``from ... import`` statement in ``module`` imports from."""
    if not node.level:
        return node.module or ""
    is_package = modules()[module].name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    base = package.split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, ast.stmt]]:
    """The crome modules ``module`` imports, each with its statement: every import anywhere in the file
    (in functions, under ``if TYPE_CHECKING``); ``from .x import name`` counts as importing ``.x.name``
    where that is a module, and ``.x`` otherwise."""
    found = []
    for node in walk(modules()[module]):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(module, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in node.names]
        else:
            continue
        for target in targets:
            resolved = known(target)
            if resolved is not None and resolved != module:
                found.append((resolved, node))
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in imports(m)} for m in modules()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle for each strongly connected component of more than one module (Tarjan's algorithm),
    as the modules in import order, the first repeated at the end."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [cycle_in(graph, component) for component in components]


def cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")  # cannot happen: a component is strongly connected


# ------------------------------------------------------------------ the layers


def layer(module: str) -> tuple[int, int | None]:
    """(layer, sub-layer inside crome.editing or None); KeyError names a module missing from the tables."""
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS), None                                   # the package crome: above everything
    top = LAYERS.index(parts[1]) if parts[1] in LAYERS else None
    if top is None:
        raise KeyError(f"{module}: {parts[1]!r} is not in LAYERS")
    if parts[1] != "editing":
        return top, None
    if len(parts) == 2:
        return top, len(set(EDITING_LAYERS.values()))             # crome.editing's __init__: above its modules
    if parts[2] not in EDITING_LAYERS:
        raise KeyError(f"{module}: {parts[2]!r} is not in EDITING_LAYERS (add it to the table in {Path(__file__).name})")
    return top, EDITING_LAYERS[parts[2]]


def upward(module: str, target: str) -> bool:
    (top, sub), (target_top, target_sub) = layer(module), layer(target)
    if top != target_top or sub is None or target_sub is None:
        return target_top > top
    return target_sub > sub


# ------------------------------------------------------------------ the method names


def method_names() -> set[str]:
    """The first argument of every ``Method(...)`` call in methods.py: the keys of METHODS."""
    names = set()
    for node in ast.walk(parse(METHODS_FILE)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Method":
            first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
    return names


# ------------------------------------------------------------------ the checks


def test_the_source_is_found():
    assert "crome" in modules() and "crome.editing.methods" in modules(), f"no crome package under {SRC}"


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among crome's modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_a_layer_above_it():
    unknown, above = set(), []
    for module in modules():
        try:
            layer(module)
        except KeyError as e:
            unknown.add(e.args[0])
            continue
        for target, node in imports(module):
            try:
                if upward(module, target):
                    above.append(f"{where(modules()[module], node)}: {module} imports {target}")
            except KeyError as e:
                unknown.add(e.args[0])
    problems = sorted(unknown) + list(dict.fromkeys(above))
    assert not problems, "modules missing from the layer tables, or importing a layer above their own:\n" + \
        "\n".join(problems)


def test_no_function_is_over_60_lines():
    long = []
    for path in modules().values():
        for node in walk(path):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1          # lineno is the def line: decorators excluded
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{where(path, node)}: {node.name} is {length} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_method_names_are_written_in_methods_py_only():
    names = method_names()
    assert names, f"no Method(...) calls found in {METHODS_FILE}"
    found = []
    for path in modules().values():
        if path == METHODS_FILE:
            continue
        for node in walk(path):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{where(path, node)}: {node.value!r}")
    assert not found, f"method names {sorted(names)} written outside {METHODS_FILE.name} " \
                      "(use the METHODS table's constants):\n" + "\n".join(found)
