"""The teaching assistant's grader: it trusts only its own execution.

For each submitted notebook the grader takes the learner's ``task:<id>`` cells and nothing else,
puts them into the course's own copy of that homework notebook (pristine setup and check cells),
and runs it with a Jupyter kernel behind the sandbox's OS boundary (``course_utils.sandbox``):
no network, no secrets in the environment, no view of the course folder beyond the code, data and
models it needs read-only, a time limit per cell and per notebook. The grader drives the kernel
from its own process, so it knows which cells really finished. In the sandbox ``homework.check``
only saves each answer as data (``course_utils.evidence``); the grader rebuilds the answers and
runs the checks itself. Outputs stored in the submitted file, and anything the learner's code
displays, are never read: a task whose check cell did not run (a crash or a timeout before it)
fails. Command line: ``python -m course_utils grade homework/ [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from .errors import CourseError
from .homework import EVIDENCE_ENV, PROGRESS_ENV, Crashed, NotDone, lesson_tasks, run_check

COLUMNS = ["student", "lesson", "task", "passed", "detail"]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in tracebacks
_STUDENT = re.compile(r"""student\s*=\s*(["'])(.{1,80}?)\1""")


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
    return lesson if isinstance(lesson, int) and not isinstance(lesson, bool) else None


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def pristine_notebook(lesson: int) -> Path:
    """The course's own homework notebook of ``lesson``."""
    from .paths import REPO_ROOT

    found = sorted((REPO_ROOT / "homework").glob(f"{lesson:02d}_*.ipynb"))
    if not found:
        raise CourseError(f"No homework notebook for lesson {lesson} in the course.")
    return found[0]


def assemble(submission: Path):
    """(notebook to run, lesson, student): the pristine notebook with the submission's task cells.

    Only code cells tagged ``task:<id>`` are taken from the submission; setup and check cells,
    and every stored output, come from the course's copy or nowhere.
    """
    import nbformat

    try:
        sub = nbformat.read(submission, as_version=4)
    except Exception as exc:  # not JSON, not a notebook
        raise CourseError(f"{submission.name} is not a readable notebook ({type(exc).__name__}).") from None
    lesson = notebook_lesson(sub, submission)
    if lesson is None:
        raise CourseError(f"{submission.name}: no homework lesson in its metadata or file name.")
    answers = {t[5:]: c.source for c in sub.cells if c.cell_type == "code"
               for t in _tags(c) if t.startswith("task:")}
    nb = nbformat.read(pristine_notebook(lesson), as_version=4)
    names = []
    for cell in nb.cells:
        for tag in _tags(cell):
            if tag.startswith("task:") and tag[5:] in answers:
                cell.source = answers[tag[5:]]
        cell.pop("outputs", None) if cell.cell_type != "code" else cell.update(outputs=[])
    for cell in sub.cells:  # the name typed into homework.start(..., student="..."): a label only
        if cell.cell_type == "code" and "homework.start(" in cell.source:
            names += [m.group(2) for m in _STUDENT.finditer(cell.source)]
    folder = submission.resolve().parent.name
    student = names[-1] if names else (folder if folder not in ("homework", "") else "-")
    return nb, lesson, student


def _kernel_manager(work: Path, limits, uid: int):
    """A Jupyter kernel manager whose kernel starts behind the sandbox boundary, talking over
    Unix sockets in ``work`` (the only writable host folder the kernel sees)."""
    from jupyter_client import AsyncKernelManager  # nbclient's kind: a blocking one ignores timeouts

    from . import sandbox
    from .paths import DATA_DIR, REPO_ROOT, cache_dir

    read_only = [REPO_ROOT / "course_utils", DATA_DIR, cache_dir()]

    class SandboxedKernelManager(AsyncKernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            cmd = super().format_kernel_cmd(extra_arguments)
            if os.geteuid() == 0:  # written 0600 by us just now; the kernel runs as ``uid``
                os.chown(self.connection_file, uid, uid)
            return sandbox.boundary_argv(cmd, ro=[p for p in read_only if p.exists()], rw=[work],
                                         cwd=str(work / "notebook"), workdir_mb=limits.workdir_mb,
                                         uid=uid)

    km = SandboxedKernelManager(kernel_name="python3", transport="ipc", ip=str(work / "ipc"))
    km.connection_file = str(work / "kernel.json")
    return km


def _kernel_env(work: Path) -> dict:
    from .env import THREADS_ENV
    from .paths import cache_dir
    from .sandbox import child_env

    threads = str(len(os.sched_getaffinity(0)))  # torch's start; model loads adapt it (env.configure_threads)
    fixed = {THREADS_ENV: os.environ[THREADS_ENV]} if os.environ.get(THREADS_ENV) else {}
    return child_env(str(work / "home"), **fixed, **{
        EVIDENCE_ENV: str(work / "evidence"), PROGRESS_ENV: str(work / "progress.json"),
        "COURSE_OUTPUT_DIR": str(work / "outputs"), "COURSE_CACHE_DIR": str(cache_dir()),
        "COURSE_PROFILE": "tiny", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONHASHSEED": "0", "JUPYTER_PLATFORM_DIRS": "1", "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads})


def run_submission(nb, work: Path, *, cell_timeout: int, notebook_timeout: int) -> tuple[set, str]:
    """Run ``nb`` in a sandboxed kernel; (ids of check cells that finished, why it stopped or "")."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    from .sandbox import Limits, host_uid

    for sub in ("notebook", "home", "evidence", "outputs", "ipc"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    uid = host_uid()
    if os.geteuid() == 0:  # the kernel runs as ``uid``: let it write its own folders
        for path in [work, *work.rglob("*")]:
            os.chown(path, uid, uid)
    cpus = len(os.sched_getaffinity(0))
    limits = Limits(timeout=notebook_timeout * cpus, memory_mb=24 * 1024, file_mb=2048,
                    nproc=1024, open_files=4096)
    km = _kernel_manager(work, limits, uid)
    deadline = time.monotonic() + notebook_timeout
    client = NotebookClient(nb, km=km, timeout=cell_timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(work / "notebook")}})
    client.timeout_func = lambda cell: max(1, min(cell_timeout, int(deadline - time.monotonic())))
    finished, stopped = set(), ""
    try:  # cleanup_kc: the client did not make km, so it would leave the kernel running
        with client.setup_kernel(env=_kernel_env(work), preexec_fn=limits.apply, cleanup_kc=True):
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                try:
                    client.execute_cell(cell, index)
                except CellTimeoutError:
                    over = time.monotonic() >= deadline - 1
                    stopped = (f"the notebook's time limit ({notebook_timeout} s)" if over else
                               f"cell {index} ran past the per-cell limit ({cell_timeout} s)")
                    break
                except CellExecutionError as exc:
                    last = _ANSI.sub("", str(exc)).strip().splitlines()[-1][:200]
                    stopped = f"cell {index} raised {last}"
                    break
                except DeadKernelError:
                    stopped = f"the kernel died in cell {index} (memory or process limit?)"
                    break
                finished.update(t[6:] for t in _tags(cell) if t.startswith("check:"))
    except RuntimeError as exc:  # the kernel did not start: the sandbox is broken here
        raise CourseError(f"The sandboxed kernel did not start ({exc}).") from exc
    finally:
        if km.has_kernel:  # a kernel that did not answer the shutdown request: its pid namespace goes
            from jupyter_core.utils import run_sync

            run_sync(km.shutdown_kernel)(now=True)
    return finished, stopped


def grade_notebook(path: Path, *, out: Path, timeout: int = 1800,
                   notebook_timeout: int = 3600) -> list[dict]:
    """Grade one submission; its rows (student, lesson, task, passed, detail, notebook).

    The notebook that ran (with its outputs, for the TA to read) is written to ``out``.
    """
    import nbformat

    from . import evidence
    from .paths import DATA_DIR

    nb, lesson, student = assemble(path)
    with tempfile.TemporaryDirectory(prefix="grading-") as scratch:
        work = Path(scratch) / "work"
        finished, stopped = run_submission(nb, work, cell_timeout=timeout,
                                           notebook_timeout=notebook_timeout)
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
        rows = []
        for spec in lesson_tasks(lesson):
            if spec.id not in finished:
                why = f"not checked: the notebook stopped before its check ({stopped})" if stopped \
                    else "not checked: its check cell did not run"
                rows.append((spec.id, False, why))
                continue
            try:
                answer = evidence.load(work / "evidence" / spec.id, [work, DATA_DIR], (NotDone, Crashed))
            except Exception as exc:  # missing, malformed or refused evidence: the task fails
                rows.append((spec.id, False, f"no usable answer ({type(exc).__name__}: {exc})"[:300]))
                continue
            with evidence.confined([work, DATA_DIR]):
                result = run_check(spec.id, answer)
            rows.append((spec.id, result.passed, result.detail))
    return [{"student": student, "lesson": lesson, "task": t, "passed": p, "detail": d,
             "notebook": path.name} for t, p, d in rows]


def grade(paths, *, out_dir: str | Path | None = None, timeout: int = 1800,
          notebook_timeout: int = 3600, quiet: bool = False):
    """Grade notebooks (files or folders): a table with columns student, lesson, task, passed, detail.

    Needs the OS sandbox (``sandbox.isolation()``): without it this raises a CourseError. The
    notebooks that ran go to ``out_dir`` (default ``build/graded``), one sub-folder per
    submission folder; the submitted files are never modified.
    """
    import pandas as pd

    from .models import embedding_path, resolve
    from .sandbox import INSTALL_HINT, boundary_error

    notebooks = find_notebooks(paths)
    why = boundary_error()
    if why is not None:
        raise CourseError(f"Grading runs each submission in the OS sandbox, which this machine "
                          f"cannot make ({why}): {INSTALL_HINT}.")
    resolve(), embedding_path()  # the kernel sees the model cache read-only: fill it first
    out_dir = Path(out_dir or "build/graded")
    rows: list[dict] = []
    for path in notebooks:
        if not quiet:
            print(f"grading {path} ...", file=sys.stderr, flush=True)
        try:
            rows += grade_notebook(path, out=out_dir / path.resolve().parent.name / path.name,
                                   timeout=timeout, notebook_timeout=notebook_timeout)
        except CourseError as exc:
            rows.append({"student": "-", "lesson": None, "task": "-", "passed": False,
                         "detail": str(exc), "notebook": path.name})
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The grade command's arguments (the ``course_utils`` CLI's ``grade`` subparser)."""
    parser.add_argument("paths", nargs="+", help="homework notebooks or folders of them")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--out", default="build/graded", help="folder for the notebooks that ran")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--notebook-timeout", type=int, default=3600,
                        help="seconds allowed per notebook")


def run(args: argparse.Namespace) -> int:
    """Run the grade command for parsed arguments; 2 when it cannot grade (no notebooks, no sandbox)."""
    try:
        table = grade(args.paths, out_dir=args.out, timeout=args.timeout,
                      notebook_timeout=args.notebook_timeout, quiet=args.json)
    except CourseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(table.to_dict(orient="records"), ensure_ascii=False, indent=1))
    else:
        print(format_table(table))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m course_utils grade PATHS [--json] [--out DIR] [--timeout S] [--notebook-timeout S]``."""
    parser = argparse.ArgumentParser(prog="python -m course_utils grade",
                                     description="run homework notebooks in the sandbox and grade every task")
    add_arguments(parser)
    return run(parser.parse_args(argv))
