"""What machine this is, which profile the course runs in, and which of the pinned envs this Python is."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import CourseError

PROFILES = ("tiny", "internstudio")
# Both roots exist on InternStudio; /root/share mirrors /share. Overridable because the platform
# moves things between camps.
DEFAULT_SHARE_ROOTS = ("/share/new_models", "/root/share/new_models")


@dataclass(frozen=True)
class Platform:
    python: str
    os: str
    cpu_cores: int
    ram_gb: float
    torch: str | None
    cuda: bool
    gpu_name: str | None
    gpu_memory_gb: float | None
    internstudio: bool


def share_roots() -> list[Path]:
    """The InternStudio model roots, from ``COURSE_SHARE_ROOTS`` (colon-separated) or the defaults."""
    raw = os.environ.get("COURSE_SHARE_ROOTS")
    roots = raw.split(os.pathsep) if raw else DEFAULT_SHARE_ROOTS
    return [Path(r) for r in roots if r]


def _ram_gb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except ImportError:  # psutil is pinned, but doctor must still work without it
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def detect() -> Platform:
    """Facts about this machine: Python, CPU, RAM, torch, CUDA GPU, InternStudio or not."""
    try:
        import torch

        torch_version, cuda = torch.__version__, torch.cuda.is_available()
    except ImportError:
        torch_version, cuda = None, False
    gpu_name = gpu_mem = None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        gpu_name, gpu_mem = props.name, round(props.total_memory / 2**30, 1)
    return Platform(
        python=platform.python_version(),
        os=f"{platform.system()} {platform.machine()}",
        cpu_cores=os.cpu_count() or 1,
        ram_gb=round(_ram_gb(), 1),
        torch=torch_version,
        cuda=cuda,
        gpu_name=gpu_name,
        gpu_memory_gb=gpu_mem,
        internstudio=any(r.is_dir() for r in share_roots()),
    )


def profile() -> str:
    """The active profile: ``COURSE_PROFILE`` if set, else ``internstudio`` with a CUDA GPU, else ``tiny``.

    The tiny profile never touches the network, so it turns on ``HF_HUB_OFFLINE`` unless the
    learner set it explicitly.
    """
    chosen = os.environ.get("COURSE_PROFILE", "").strip().lower()
    if chosen and chosen not in PROFILES:
        raise CourseError(
            f"COURSE_PROFILE={chosen!r} is not a profile. Use one of {', '.join(PROFILES)} "
            "(or unset it to detect: internstudio with a CUDA GPU, tiny otherwise)."
        )
    if not chosen:
        chosen = "internstudio" if detect().cuda else "tiny"
    if chosen == "tiny":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return chosen


THREADS_ENV = "COURSE_THREADS"  # a whole number fixes torch's thread count (CI's parallel workers: 1)


def busy_cpus(samples: int = 5, gap: float = 0.02) -> int:
    """Threads of other processes running right now: the kernel's ``procs_running`` less this one.

    The median of a few samples, so one short-lived process does not count; 0 where ``/proc/stat``
    cannot be read. Instantaneous on purpose: the load average still counts, for a minute, the
    lesson that just finished.
    """
    counts = []
    for i in range(samples):
        try:
            with open("/proc/stat") as stat:
                line = next((ln for ln in stat if ln.startswith("procs_running")), "")
        except OSError:
            return 0
        if not line:
            return 0
        counts.append(int(line.split()[1]) - 1)
        if i + 1 < samples:
            time.sleep(gap)
    return max(0, sorted(counts)[len(counts) // 2])


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs a container's CPU quota allows (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), or None.

    Kubernetes pods (InternStudio's kind) are limited this way, not by the affinity mask, which still
    lists every CPU of the host.
    """
    for quota_file, period_file in ((root / "cpu.max", None),
                                    (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us")):
        try:
            fields = quota_file.read_text().split()
            if period_file is not None:
                fields.append(period_file.read_text().strip())
            quota, period = fields[0], float(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if quota in ("max", "-1") or period <= 0:
            return None
        return float(quota) / period
    return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (``taskset``, cpusets), capped by a CPU quota."""
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def thread_share(jobs: int) -> str:
    """Threads for each of ``jobs`` workers side by side (test workers, lesson kernels): an equal share."""
    return str(max(1, usable_cpus() // jobs))


def thread_count() -> int:
    """Threads for torch here: one per CPU this process may use that no other job is busy on, at least 1.

    The usable CPUs are the affinity mask (``os.sched_getaffinity``: ``taskset``, cpusets), capped by a
    container's CPU quota (:func:`usable_cpus`). Idle and without a quota, that is torch's own choice.
    Beside other CPU-bound jobs, torch's default of one OpenMP thread per core makes threads spin-wait
    for each other on cores they share:
    bench/bench_threads.py measured lesson 4's fine-tune 3.8x slower beside one such job and 10x
    beside two, against 1.9x and 3.8x with one thread (docs/benchmarks.md). ``COURSE_THREADS=n``
    fixes the count.
    """
    fixed = os.environ.get(THREADS_ENV, "").strip()
    if fixed:
        if not fixed.isdigit() or int(fixed) < 1:
            raise CourseError(f"{THREADS_ENV}={fixed!r}: use a whole number of threads, 1 or more "
                              "(or unset it to let the course choose).")
        return int(fixed)
    usable = usable_cpus()
    # procs_running counts the whole host: only the share on CPUs this process may use competes with it.
    busy = busy_cpus() * usable / max(usable, os.cpu_count() or 1)
    return max(1, usable - round(busy))


def configure_threads() -> int:
    """Set torch's thread count to :func:`thread_count` (called at each model load); returns it."""
    import torch

    threads = thread_count()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


KEY_PACKAGES = (
    "transformers", "peft", "accelerate", "bitsandbytes", "sentence-transformers",
    "langchain", "chromadb", "lagent", "openai", "lmdeploy", "xtuner", "opencompass",
)
LOCKS = {"CPU lock": "requirements/cpu.txt", "InternStudio lock": "requirements/gpu.txt"}
LOCK_KEYS = ("torch", "transformers", "peft", "bitsandbytes")  # what tells the two locks apart


def read_pins(path: Path) -> dict[str, str]:
    """{package: version} of the exact pins (``name==version``) in a requirements file."""
    pins = {}
    for line in path.read_text().splitlines():
        name, _, pinned = line.split("#")[0].strip().partition("==")
        if pinned:
            pins[name.lower()] = pinned
    return pins


def which_env() -> str:
    """Which of the course's pinned envs this Python is, and its name (conda env or venv folder)."""
    from .paths import REPO_ROOT

    name = os.environ.get("CONDA_DEFAULT_ENV") if "conda" in sys.prefix else None
    name = name or Path(sys.prefix).name
    have = {k: package_version(k).split("+")[0] for k in LOCK_KEYS}  # "2.5.1+cu124" -> "2.5.1"
    for label, lock in LOCKS.items():
        pins = read_pins(REPO_ROOT / lock) if (REPO_ROOT / lock).is_file() else {}
        if all(pins.get(k) == v for k, v in have.items()):
            return f"{label} ({lock}), env {name}"
    return (f"not a course lock (transformers {have['transformers']}), env {name}: run `make setup` "
            "(CPU) or `conda env create -f environment.yml` (InternStudio)")
