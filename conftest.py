"""Loaded by every pytest run in this repo (unit tests and nbval on the lessons).

Parallel workers (pytest-xdist, ``make test``) share the machine's CPUs: each gets an equal share
as its torch thread count, set before any test or lesson kernel starts. Two workers with torch's
default of one thread per core made the unit tests slower than one worker (docs/benchmarks.md).
"""

import os

_workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
if _workers and not os.environ.get("COURSE_THREADS"):
    from course_utils.env import thread_share

    _share = thread_share(int(_workers))
    # COURSE_THREADS for the course's model loads (env.configure_threads), OMP_NUM_THREADS for
    # the CLIs and servers the tests and lessons start.
    os.environ.update(COURSE_THREADS=_share, OMP_NUM_THREADS=_share)
