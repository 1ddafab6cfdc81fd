"""No function in the package longer than :data:`LIMIT` lines (signature and docstring
included) unless a reason is written next to it: ``# long: <reason>`` on its ``def`` line
or on the line above (above its decorators, if any).

``python tests/test_function_length.py`` lists the functions over the limit.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "dlbhooks"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
LIMIT = 60
MARKER = "# long:"

#: Modules owned elsewhere whose long functions are not split or explained yet (reason each).
PENDING: dict[str, str] = {}


def _module(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _marked(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    span = [lines[first - 2]] if first >= 2 else []
    span.append(lines[node.lineno - 1])
    return any(MARKER in line and line.split(MARKER, 1)[1].strip() for line in span)


def long_functions(root: Path = ROOT, limit: int = LIMIT) -> list[tuple[str, str, int, int]]:
    """``(module, function, first line, length)`` of each unmarked function over ``limit``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source, str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length > limit and not _marked(lines, node):
                found.append((_module(path, root), node.name, node.lineno, length))
    return found


def _pending(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PENDING)


def test_no_long_function_without_a_reason():
    bad = [f for f in long_functions() if not _pending(f[0])]
    assert not bad, (
        f"functions over {LIMIT} lines (split them, or write '{MARKER} <reason>' next to the "
        "def):\n" + "\n".join(f"  {m}.{name} (line {line}): {n} lines" for m, name, line, n in bad)
    )


def test_pending_modules_still_need_their_entry():
    left = {f[0] for f in long_functions()}
    done = sorted(p for p in PENDING if not any(m == p or m.startswith(p + ".") for m in left))
    assert not done, f"no long unmarked function left in {done}: drop them from PENDING"


def test_the_marker_is_read_on_the_def_or_above_the_decorators(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    (tmp_path / PACKAGE).mkdir()
    (tmp_path / PACKAGE / "m.py").write_text(
        "def plain():\n" + body
        + "# long: one table, row by row\n@staticmethod\ndef above():\n" + body
        + "def on_def():  # long: a state machine read in one place\n" + body
        + "def empty_reason():  # long:\n" + body
        + "def short():\n    pass\n"
    )
    found = long_functions(tmp_path / PACKAGE)
    assert [name for _, name, _, _ in found] == ["plain", "empty_reason"]


if __name__ == "__main__":
    for module, name, line, n in long_functions():
        print(f"{n:4d}  {module}.{name} (line {line}){'  [pending]' if _pending(module) else ''}")
