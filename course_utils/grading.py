"""The teaching assistant's grader: run homework notebooks headless and read back every check.

``grade(paths)`` executes each notebook with ``course_utils.notebooks.execute_notebook`` (a fresh
kernel, the notebook's folder as working directory) and reads the JSON records that
``homework.check`` attaches to its outputs, so nothing depends on the wording of the ✅/❌ lines.
A task of the notebook's lesson that never reported (a cell before it crashed, its check cell
was deleted) counts as failed. Command line: ``python -m course_utils grade homework/ [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from .errors import CourseError
from .homework import MIME, PROGRESS_ENV, lesson_tasks

COLUMNS = ["student", "lesson", "task", "passed", "detail"]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in tracebacks


def find_notebooks(paths) -> list[Path]:
    """The ``.ipynb`` files among ``paths``; folders are searched recursively (checkpoints skipped)."""
    found: list[Path] = []
    for raw in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.ipynb")
                            if not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.suffix == ".ipynb" and path.is_file():
            found.append(path)
        else:
            raise CourseError(f"{raw} is neither a notebook nor a folder: pass homework/ or "
                              "some .ipynb files.")
    if not found:
        raise CourseError(f"No notebooks under {', '.join(map(str, [paths]))}: pass the folder "
                          "that holds the homework .ipynb files.")
    return found


def notebook_lesson(nb, path: Path) -> int | None:
    """The lesson a homework notebook belongs to: its metadata, else its ``0N_`` file name."""
    lesson = nb.metadata.get("homework", {}).get("lesson")
    if lesson is None and path.name[:2].isdigit():
        lesson = int(path.name[:2])
    return lesson


def read_records(nb) -> list[dict]:
    """Every record ``homework.start``/``check`` left in the outputs, in execution order."""
    records = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if MIME in data:
                records.append(dict(data[MIME]))
    return records


def _student(records: list[dict], path: Path) -> str:
    """The name given to ``homework.start``, else the submission's folder name."""
    names = [r["student"] for r in records if r.get("event") == "start" and r.get("student")]
    if names:
        return names[-1]
    return path.parent.name if path.parent.name not in ("homework", "") else "-"


def _rows(nb, path: Path, run_error: str) -> list[dict]:
    """One row per task: the last check record of each, plus the lesson's tasks never checked."""
    records = read_records(nb)
    student, lesson = _student(records, path), notebook_lesson(nb, path)
    checks = {r["task"]: r for r in records if r.get("event") == "check"}
    expected = [t.id for t in lesson_tasks(lesson)] if lesson else []
    rows = [{"student": student, "lesson": lesson, "task": r["task"], "passed": bool(r["passed"]),
             "detail": r["detail"], "notebook": path.name} for r in checks.values()]
    why = f"never checked: the notebook stopped ({run_error})" if run_error else \
        "never checked: the check cell did not run"
    rows += [{"student": student, "lesson": lesson, "task": t, "passed": False, "detail": why,
              "notebook": path.name} for t in expected if t not in checks]
    order = {t: i for i, t in enumerate(expected)}
    return sorted(rows, key=lambda r: order.get(r["task"], len(order)))


def grade_notebook(path: Path, *, out: Path, timeout: int = 1800) -> list[dict]:
    """Execute one notebook into ``out`` and return its rows (student, lesson, task, passed, detail)."""
    import nbformat

    from .notebooks import execute_notebook

    try:
        result = execute_notebook(path, out=out, timeout=timeout)
        run_error = "" if result.status == "ok" else _ANSI.sub("", result.error)
    except Exception as exc:  # a dead kernel or a cell timeout: grade what was stored before
        run_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    executed = out if out.is_file() else path
    return _rows(nbformat.read(executed, as_version=4), path, run_error)


def grade(paths, *, out_dir: str | Path | None = None, timeout: int = 1800, quiet: bool = False):
    """Grade notebooks (files or folders): a table with columns student, lesson, task, passed, detail.

    Executed copies go to ``out_dir`` (default ``build/graded``), one sub-folder per submission
    folder, so the originals are never modified; progress goes to a scratch file, not the
    student's ``homework/.progress.json``.
    """
    import pandas as pd

    notebooks = find_notebooks(paths)
    out_dir = Path(out_dir or "build/graded")
    rows: list[dict] = []
    saved_env = os.environ.get(PROGRESS_ENV)
    with tempfile.TemporaryDirectory(prefix="grading-") as scratch:
        try:
            for path in notebooks:
                folder = path.resolve().parent
                # one progress file per submission folder: a name given in notebook 1 carries on
                os.environ[PROGRESS_ENV] = str(Path(scratch) / f"{abs(hash(folder))}.json")
                if not quiet:
                    print(f"grading {path} ...", file=sys.stderr, flush=True)
                rows += grade_notebook(path, out=out_dir / folder.name / path.name, timeout=timeout)
        finally:
            if saved_env is None:
                os.environ.pop(PROGRESS_ENV, None)
            else:
                os.environ[PROGRESS_ENV] = saved_env
    return pd.DataFrame(rows, columns=COLUMNS + ["notebook"])


def format_table(table, width: int = 100) -> str:
    """The grade table as left-aligned text, then one score line per student."""
    if table.empty:
        return "(no tasks found)"
    cells = [[str(r.student), str(r.lesson), r.task, "✅" if r.passed else "❌",
              r.detail if len(r.detail) <= width else r.detail[: width - 1] + "…"]
             for r in table.itertuples()]
    widths = [max(len(row[i]) for row in cells + [COLUMNS]) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [COLUMNS] + cells]
    lines.append("")
    for student, group in table.groupby("student", sort=False):
        lines.append(f"{student}: {int(group.passed.sum())}/{len(group)} tasks passed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m course_utils grade PATHS [--json] [--out DIR] [--timeout S]``."""
    parser = argparse.ArgumentParser(prog="python -m course_utils grade",
                                     description="execute homework notebooks and grade every task")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The grade command's arguments (shared with the ``course_utils`` CLI's subparser)."""
    parser.add_argument("paths", nargs="+", help="homework notebooks or folders of them")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--out", default="build/graded", help="folder for the executed copies")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")


def run(args: argparse.Namespace) -> int:
    """Run the grade command for parsed arguments; 2 when the paths hold no notebooks."""
    try:
        table = grade(args.paths, out_dir=args.out, timeout=args.timeout, quiet=args.json)
    except CourseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(table.to_dict(orient="records"), ensure_ascii=False, indent=1))
    else:
        print(format_table(table))
    return 0
