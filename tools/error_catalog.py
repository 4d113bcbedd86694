"""Every CourseError a learner can meet, read from the code: the catalogue in docs/troubleshooting.md.

Scans ``course_utils/**/*.py`` (subpackages such as ``homework/`` too) for ``raise CourseError(...)`` and renders each message with its
f-string fields as ``{...}`` (the field's code), grouped by module and function. ``--write``
replaces the catalogue between the markers in docs/troubleshooting.md; without it, prints it.
tests/test_error_catalog.py fails when the file and the code disagree, so the list cannot drift.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "troubleshooting.md"
START, END = "<!-- error-catalog:start -->", "<!-- error-catalog:end -->"


def _text(node: ast.AST) -> str:
    """A message expression as text: literals kept, f-string fields and other code as ``{code}``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) for v in node.values)
    if isinstance(node, ast.FormattedValue):
        return "{" + ast.unparse(node.value) + "}"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text(node.left) + _text(node.right)
    return "{" + ast.unparse(node) + "}"


def _raises(node: ast.AST, func: str = "<module>"):
    """(line, innermost function, message) for each ``raise CourseError(msg)`` below ``node``."""
    for child in ast.iter_child_nodes(node):
        inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
        call = child.exc if isinstance(child, ast.Raise) else None
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "CourseError" and call.args:
            yield child.lineno, func, _text(call.args[0])
        yield from _raises(child, inner)


def _module_name(path: Path) -> str:
    """``course_utils/homework/lesson3.py`` -> ``course_utils.homework.lesson3`` (a package's ``__init__``: its name)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def catalogue() -> str:
    """The Markdown catalogue: one table per module, one row per distinct (function, message)."""
    parts = []
    for path in sorted((ROOT / "course_utils").rglob("*.py")):
        rows, seen = [], set()
        for _, func, message in sorted(_raises(ast.parse(path.read_text(encoding="utf-8")))):
            key = (func, message)
            if key not in seen:  # the same message raised twice in one function
                seen.add(key)
                cell = " ".join(message.split()).replace("|", "\\|")
                rows.append(f"| `{func}` | {cell} |")
        if rows:
            parts.append(f"#### `{_module_name(path)}`\n\n| where | message (it says what to do) |\n"
                         "| --- | --- |\n" + "\n".join(rows))
    return "\n\n".join(parts)


def current() -> str:
    """The catalogue as docs/troubleshooting.md holds it now."""
    text = DOC.read_text(encoding="utf-8")
    return text[text.index(START) + len(START):text.index(END)].strip()


def write() -> None:
    text = DOC.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    DOC.write_text(f"{head}{START}\n\n{catalogue()}\n\n{END}{rest.split(END, 1)[1]}", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update docs/troubleshooting.md")
    args = parser.parse_args(argv)
    if args.write:
        write()
    else:
        print(catalogue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
