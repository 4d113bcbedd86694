"""What the OS boundary costs: run_python under bubblewrap vs the same code without it, side by side.

Times a trivial program and one importing numpy, N runs each, with the boundary and with the limits
only (what run_python does inside an outer boundary). Usage: ``python bench/bench_sandbox.py [N]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn, n: int) -> tuple[float, float]:
    """Median and max seconds of ``n`` calls."""
    seconds = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), max(seconds)


def main(n: int = 10) -> None:
    import pandas as pd

    from course_utils import sandbox

    assert sandbox.boundary_error() is None, sandbox.boundary_error()
    rows = []
    for label, code in [("print(1)", "print(1)"), ("import numpy", "import numpy; print(numpy.ones(3).sum())")]:
        for mode in ("bubblewrap", "no boundary"):
            def run():
                if mode == "no boundary":  # what run_python does inside an outer boundary
                    os.environ[sandbox.INSIDE_ENV] = "1"
                try:
                    assert sandbox.run_python(code).ok
                finally:
                    os.environ.pop(sandbox.INSIDE_ENV, None)
            median, worst = timed(run, n)
            rows.append({"code": label, "run": mode, "median s": round(median, 3), "max s": round(worst, 3)})
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
