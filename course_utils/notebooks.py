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


def run_notebooks(paths, *, out_dir: Path | None = None, inplace: bool = False):
    """Execute each notebook in turn; returns a table (notebook, status, seconds, error)."""
    import pandas as pd
    from tqdm.auto import tqdm

    results = []
    for path in tqdm([Path(p) for p in paths], desc="notebooks", unit="nb"):
        if inplace:
            res = execute_notebook(path, out=path)
        else:
            base = Path(out_dir or "build")
            res = execute_notebook(path, out=base / path.name,
                                   html=base / "html" / path.with_suffix(".html").name)
        print(f"{res.notebook}: {res.status} in {res.seconds} s", flush=True)
        results.append(res)
    return pd.DataFrame([r.__dict__ for r in results])
