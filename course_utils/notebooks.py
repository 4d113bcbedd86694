"""Execute notebooks headless (for `make course` and `make notebooks`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunResult:
    notebook: str
    status: str  # "ok" or "error"
    seconds: float
    error: str = ""


def execute_notebook(path: Path, *, out: Path | None = None, timeout: int = 1800,
                     html: Path | None = None) -> RunResult:
    """Run every cell of ``path`` in a fresh ``python3`` kernel started in the notebook's folder.

    Writes the executed notebook to ``out`` (``path`` itself for in-place) and optionally an HTML
    page. A failing cell stops the run; what ran so far is still written, so the error is visible.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from .progress import HEADLESS_ENV

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    os.environ[HEADLESS_ENV] = "1"  # the kernel inherits it: progress bars store their final line
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    start, status, error = time.perf_counter(), "ok", ""
    try:
        client.execute()
    except CellExecutionError as exc:
        status, error = "error", str(exc).strip().splitlines()[-1][:300]
    seconds = round(time.perf_counter() - start, 1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
    if html is not None:
        from nbconvert import HTMLExporter

        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(HTMLExporter().from_notebook_node(nb)[0], encoding="utf-8")
    return RunResult(path.name, status, seconds, error)


def stored_seconds(path: Path) -> float:
    """How long the notebook's stored run took, from nbclient's per-cell timestamps (0 if none)."""
    import json
    from datetime import datetime

    total = 0.0
    for cell in json.loads(Path(path).read_text(encoding="utf-8")).get("cells", []):
        times = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in times and "shell.execute_reply" in times:
            start, end = (datetime.fromisoformat(times[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            total += (end - start).total_seconds()
    return total


def _run_one(path: Path, out_dir: Path | None, inplace: bool) -> RunResult:
    if inplace:
        return execute_notebook(path, out=path)
    base = Path(out_dir or "build")
    return execute_notebook(path, out=base / path.name, html=base / "html" / path.with_suffix(".html").name)


def run_notebooks(paths, *, out_dir: Path | None = None, inplace: bool = False, jobs: int = 1):
    """Execute the notebooks, ``jobs`` at a time; returns a table (notebook, status, seconds, error).

    With ``jobs`` > 1 each kernel gets an equal share of the CPUs as torch threads
    (``COURSE_THREADS``, unless set), and the notebooks whose stored run took longest start first,
    so the last one to finish is not a long one started late.
    """
    import pandas as pd
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    from .env import THREADS_ENV, thread_share
    from .errors import CourseError, is_whole

    if not is_whole(jobs) or jobs < 1:
        raise CourseError(f"jobs={jobs!r}: use a whole number of notebooks to run at once, 1 or more.")
    asked = [Path(p) for p in paths]
    threads = {}
    if jobs > 1:  # set in the workers, whose kernels inherit both: torch starts with its share
        share = os.environ.get(THREADS_ENV) or thread_share(jobs)
        threads = {THREADS_ENV: share, "OMP_NUM_THREADS": share}
    start_order = sorted(asked, key=stored_seconds, reverse=True) if jobs > 1 else asked
    results = []
    with ProcessPoolExecutor(max_workers=jobs, initializer=os.environ.update, initargs=(threads,)) as pool, \
            tqdm(total=len(asked), desc="notebooks", unit="nb") as bar:
        futures = [pool.submit(_run_one, path, out_dir, inplace) for path in start_order]
        for future in as_completed(futures):
            res = future.result()
            print(f"{res.notebook}: {res.status} in {res.seconds} s", flush=True)
            results.append(res)
            bar.update()
    order = {p.name: i for i, p in enumerate(asked)}
    results.sort(key=lambda r: order[r.notebook])  # the table in the order asked for
    return pd.DataFrame([r.__dict__ for r in results])
