"""The package's own import graph, read from the source with ``ast``: no cycles, layers
that import one way only, and no package-internal import hidden in a function body unless
it is marked deliberate.

A function-level import of the package itself must carry ``# lazy: <reason>`` (on the
statement or the line above it); optional dependencies (transformers, accelerate,
safetensors, ...) may be imported inside functions freely. Imports under ``if
TYPE_CHECKING:`` never run and are left out. Importing ``a.b.c`` also runs the package
``a.b`` (when the importer is not inside it), so that edge counts too.

``python tests/test_architecture.py`` prints the graph and the function-level imports.
"""

from __future__ import annotations

import ast
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "dlbhooks"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MARKER = "# lazy:"

#: One-way layers of the core, lowest first: a module here imports only modules of its
#: own layer or a lower one (``rules`` stands for the package and every module in it).
#: Modules not listed (the public façade, models, analysis, corpus, ...) sit on top.
LAYERS: list[set[str]] = [
    {"errors", "relevance", "binding", "views", "ledger"},
    {"storage", "integrations", "integrations.accelerate", "weights", "results", "seeds",
     "footprint", "report", "plot", "scratch"},
    {"rules"},
    {"engine"},
    {"explaining"},
    {"records"},
    {"trace", "function_calls"},
]

#: Modules owned elsewhere whose function-level imports are not marked yet (reason each).
PENDING: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    in_function: bool
    marked: bool  # carries '# lazy: <reason>'
    implicit: bool = False  # the package __init__ an import of one of its modules runs


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _marked(lines: list[str], node: ast.stmt) -> bool:
    span = lines[max(node.lineno - 2, 0):node.end_lineno]
    return any(MARKER in line and line.split(MARKER, 1)[1].strip() for line in span)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The package-internal imports ``name`` makes (module level and inside functions)."""
    source = path.read_text()
    lines = source.splitlines()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def add(target: str, node: ast.stmt, in_function: bool) -> None:
        while target not in modules and "." in target:  # an attribute of a module
            target = target.rpartition(".")[0]
        if target not in modules or target == name:
            return
        marked = _marked(lines, node)
        found.append(Import(name, target, node.lineno, in_function, marked))
        parent = target.rpartition(".")[0]
        while parent and parent != PACKAGE:
            if not (name == parent or name.startswith(parent + ".")):
                found.append(Import(name, parent, node.lineno, in_function, marked, True))
            parent = parent.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    visit_one(stmt, in_function)
                continue
            visit_one(child, in_function)

    def visit_one(child: ast.AST, in_function: bool) -> None:
        if isinstance(child, ast.Import):
            for alias in child.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name, child, in_function)
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                module = ".".join(base + ([child.module] if child.module else []))
            else:
                module = child.module or ""
            if module.split(".")[0] != PACKAGE:
                return
            for alias in child.names:
                sub = f"{module}.{alias.name}"
                add(sub if sub in modules else module, child, in_function)
        else:
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            visit(child, inner)

    visit(ast.parse(source, str(path)), False)
    return list(dict.fromkeys(found))  # one per statement and target


def all_imports(root: Path = ROOT) -> list[Import]:
    modules = package_modules(root)
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def components(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components that hold a cycle (Tarjan), members sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(found)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle through the first module of each component (``a, b, ..., a``)."""
    cycles = []
    for comp in components(edges):
        members, start = set(comp), comp[0]
        paths = {start: [start]}
        queue = [start]
        while queue:  # breadth first, back to ``start`` inside the component
            v = queue.pop(0)
            for w in sorted(edges.get(v, ())):
                if w == start:
                    cycles.append(paths[v] + [start])
                    queue = []
                    break
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return cycles


def graph(imports: list[Import]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for imp in imports:
        edges.setdefault(imp.source, set()).add(imp.target)
    return edges


def _layer_of(module: str) -> int | None:
    short = module.removeprefix(PACKAGE + ".")
    for i, layer in enumerate(LAYERS):
        if short in layer or short.split(".")[0] in layer & {"rules"}:
            return i
    return None


def _where(imp: Import) -> str:
    how = "in a function, " if imp.in_function else ""
    how += "its package's __init__, " if imp.implicit else ""
    return f"{imp.source} -> {imp.target} ({how}line {imp.line})"


def cycle_report(imports: list[Import]) -> list[str]:
    """Per component: its modules, then one cycle through them, edge by edge."""
    edges = graph(imports)
    first = {}
    for imp in imports:
        first.setdefault((imp.source, imp.target), imp)
    return [
        f"  {len(comp)} modules import each other: {', '.join(comp)}; e.g.\n    "
        + "\n    ".join(_where(first[a, b]) for a, b in zip(cycle, cycle[1:]))
        for comp, cycle in zip(components(edges), find_cycles(edges))
    ]


def unmarked_in_functions(imports: list[Import]) -> list[Import]:
    return [i for i in imports if i.in_function and not i.marked and not i.implicit]


# -- tests ----------------------------------------------------------------------------------
def test_the_import_graph_has_no_cycle():
    cycles = cycle_report(all_imports())
    assert not cycles, "import cycles (module -> what it imports):\n" + "\n".join(cycles)


def test_no_unmarked_package_import_inside_a_function():
    bad = [i for i in unmarked_in_functions(all_imports()) if i.source not in PENDING]
    assert not bad, (
        f"package-internal imports inside function bodies (move them to module level, or "
        f"mark a deliberate one with '{MARKER} <reason>'):\n"
        + "\n".join(f"  {i.source} line {i.line}: {i.target}" for i in bad)
    )


def test_pending_modules_still_need_their_entry():
    left = {i.source for i in unmarked_in_functions(all_imports())}
    done = sorted(set(PENDING) - left)
    assert not done, f"no unmarked function-level imports left in {done}: drop them from PENDING"


def test_layers_import_one_way():
    imports = all_imports()
    wrong = []
    for imp in imports:
        src, dst = _layer_of(imp.source), _layer_of(imp.target)
        if src is not None and (dst is None or dst > src):
            wrong.append(_where(imp))
    assert not wrong, "imports against the layers (lowest first: " + " < ".join(
        "/".join(sorted(layer)) for layer in LAYERS) + "):\n  " + "\n  ".join(wrong)


def test_every_layered_module_exists():
    modules = {m.removeprefix(PACKAGE + ".") for m in package_modules()}
    assert not {m for layer in LAYERS for m in layer} - modules


def test_no_class_is_patched_from_outside():
    """Module-level ``Name.attribute = ...`` (e.g. a method bolted onto an imported class)."""
    patched = []
    for name, path in package_modules().items():
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                    patched.append(f"{name} line {node.lineno}: {ast.unparse(t)}")
    assert not patched, "attributes set on other objects at import time:\n  " + "\n  ".join(
        patched)


def test_tape_explain_is_a_method_with_explain_tapes_arguments():
    from dlbhooks.explaining import explain_tape
    from dlbhooks.records import Tape

    # defined in the class body (not patched in from outside), as explain_tape itself
    assert Tape.__dict__.get("explain") is explain_tape
    first = next(iter(inspect.signature(Tape.explain).parameters))
    assert first == "tape"  # the method's self


def test_old_import_paths_still_work():
    from dlbhooks.api import explain_tape, select_output  # noqa: F401
    from dlbhooks.engine import LedgerEntry
    from dlbhooks.ledger import LedgerEntry as Entry
    from dlbhooks.memory import record_bytes  # noqa: F401
    from dlbhooks.records import (  # noqa: F401
        ABS_WEIGHTS,
        all_positive,
        base_to_view,
        bind_arguments,
        dense,
        fetch_abs_param,
        fetch_param,
        set_weight_cache,
        tensor_leaves,
        view_to_base,
    )
    from dlbhooks.rules.core import broadcasts_into, nonneg_div, safe_div  # noqa: F401
    from dlbhooks.rules.elementwise import reduce_to  # noqa: F401

    assert LedgerEntry is Entry


# -- the checker itself ---------------------------------------------------------------------
def _write(tmp: Path, files: dict[str, str]) -> Path:
    root = tmp / PACKAGE
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_checker_finds_cycles_lazy_imports_and_package_inits(tmp_path):
    root = _write(tmp_path, {
        "__init__.py": "from . import a\n",
        "a.py": "from .b import f\n",
        "b.py": "def f():\n    from .a import g\n    from . import c  # lazy: a reason\n"
                "    import transformers\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import g\n",
        "sub/__init__.py": "from . import x\n",
        "sub/x.py": "from ..d import y\n",
        "sub/y.py": "",
        "d.py": "from .sub.y import z\n",  # runs sub/__init__, which imports sub.x
    })
    imports = all_imports(root)
    assert find_cycles(graph(imports)) == [
        [f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.a"],
        [f"{PACKAGE}.d", f"{PACKAGE}.sub", f"{PACKAGE}.sub.x", f"{PACKAGE}.d"],
    ]
    assert [(i.source, i.target) for i in unmarked_in_functions(imports)] == [
        (f"{PACKAGE}.b", f"{PACKAGE}.a")]
    assert not any(i.source == f"{PACKAGE}.c" for i in imports)  # TYPE_CHECKING only


@pytest.mark.parametrize("comment, marked", [
    ("# lazy: keeps import light", True), ("# lazy:", False), ("# noqa: F401", False)])
def test_the_lazy_marker_needs_a_reason(tmp_path, comment, marked):
    root = _write(tmp_path, {"__init__.py": "", "a.py": "",
                             "b.py": f"def f():\n    from .a import g  {comment}\n"})
    (imp,) = all_imports(root)
    assert imp.marked is marked


if __name__ == "__main__":
    found = all_imports()
    for src, dsts in sorted(graph([i for i in found if not i.in_function]).items()):
        print(f"{src} -> {', '.join(sorted(d.removeprefix(PACKAGE + '.') for d in dsts))}")
    print("\ninside functions:")
    for i in found:
        if i.in_function and not i.implicit:
            print(f"  {i.source} line {i.line}: {i.target}"
                  + ("  (marked lazy)" if i.marked else ""))
    print("\ncycles:", *cycle_report(found) or ["none"], sep="\n")
