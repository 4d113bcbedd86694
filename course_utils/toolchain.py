"""The bootcamp's own command-line tools (``xtuner``, ``opencompass``, ``lmdeploy``), run from a lesson.

They live in the InternStudio environment (requirements/gpu.txt: transformers 4.48, which InternLM2.5's
own model code and XTuner 0.2 need), which cannot share a venv with the CPU course (transformers 5).
On InternStudio that env is the one the notebook runs in. On a CPU, ``make toolchain`` installs the same
lock into ``.venv-sim`` and the lessons start its CLIs as subprocesses, on the same tiny model the rest
of the lesson uses. ``COURSE_TOOLCHAIN_BIN`` names another folder that holds them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .env import thread_count
from .errors import CourseError
from .paths import REPO_ROOT, cache_dir
from .progress import progress as progress_bar

ENV_VAR = "COURSE_TOOLCHAIN_BIN"
SIM_BIN = REPO_ROOT / ".venv-sim" / "bin"
# mmengine's line prefix ("12/01 21:44:13 - mmengine - INFO - ") carries the clock; the message does not.
_STAMP = re.compile(r"^\d\d/\d\d \d\d:\d\d:\d\d - (\w+) - (\w+) - ")
# Jupyter kernels set FORCE_COLOR, so mmengine colours its log: the escapes would hide the clock from _STAMP.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def toolchain_bin(tool: str) -> Path:
    """The folder whose ``tool`` the lesson runs: ``COURSE_TOOLCHAIN_BIN``, this env, then ``.venv-sim``."""
    places = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    places += [Path(sys.executable).parent, SIM_BIN]
    for place in places:
        if os.access(place / tool, os.X_OK):
            return place
    raise CourseError(
        f"`{tool}` is not installed here. It lives in the InternStudio environment (requirements/gpu.txt). "
        f"On InternStudio activate the course env (`conda activate internlm-course`); on this machine run "
        f"`make toolchain` (installs it into .venv-sim, about 8 GB), or set {ENV_VAR} to a folder holding `{tool}`.")


def sanitize(text: str, cwd: Path | None = None) -> str:
    """Log text without this machine's paths or mmengine's clock, as it may be stored in a notebook."""
    places = [(cache_dir(), "<cache>"), (REPO_ROOT, "<course>"), (Path.home(), "~")]
    if cwd is not None:
        places.insert(0, (Path(cwd), "."))
    for place, name in places:
        for spelling in {str(place), str(place.resolve())}:
            text = text.replace(spelling, name)
    return "\n".join(_STAMP.sub(r"[\1 \2] ", _ANSI.sub("", line)) for line in text.splitlines())


@dataclass
class ToolRun:
    """One finished run: the command as typed, its log (sanitized) and where the full log is kept."""

    command: str
    log: str
    log_file: Path
    seconds: float

    def lines(self, pattern: str) -> list[str]:
        """The log lines that match ``pattern`` (a regular expression)."""
        return [line for line in self.log.splitlines() if re.search(pattern, line)]


def _shown(arg, cwd: Path) -> str:
    """An argument as the learner would type it: paths relative to the working folder."""
    text = str(arg)
    try:
        return str(Path(text).resolve().relative_to(cwd.resolve())) if os.path.isabs(text) else text
    except ValueError:
        return sanitize(text)


def run_tool(tool: str, *args, cwd: str | Path, show: str | None = None, progress: str | None = None,
             expect: tuple = (), timeout: float = 1800, stdin: str | None = None) -> ToolRun:
    """Run ``tool args...`` in ``cwd`` and return its log; print the line that was typed first.

    ``show``: print log lines matching this pattern as they come (sanitized). ``progress``: a pattern
    with two groups (done, total), e.g. ``r"Iter\\(train\\) \\[\\s*(\\d+)/(\\d+)\\]"``, drives a progress bar.
    ``expect``: files the run must have written (XTuner exits 0 even when training fails).
    A failure raises CourseError with the log's end; Stop in Jupyter (KeyboardInterrupt) ends the tool too.
    """
    cwd = Path(cwd)
    if not cwd.is_dir():
        raise CourseError(f"Working folder {cwd.name!r} does not exist: create it first (mkdir).")
    folder = toolchain_bin(tool)
    command = " ".join([tool, *(_shown(a, cwd) for a in args)])
    print(f"$ {command}")
    env = {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(folder.parent), "PYTHONUNBUFFERED": "1", "NO_COLOR": "1",
           "OMP_NUM_THREADS": str(thread_count())}  # its torch: no spinning on a core another job holds
    env.pop("FORCE_COLOR", None)
    env.pop("PYTHONPATH", None)  # the CPU env's packages must not shadow the toolchain's
    log_file = cwd / f"{tool}-{args[0] if args else 'run'}.log"
    start, bar, done = time.perf_counter(), None, []
    proc = subprocess.Popen([str(folder / tool), *map(str, args)], cwd=cwd, env=env, text=True, bufsize=1,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    timer = threading.Timer(timeout, lambda: (done.append("timeout"), os.killpg(proc.pid, signal.SIGKILL)))
    timer.start()
    try:
        if stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.close()
        with log_file.open("w", encoding="utf-8") as log:
            for line in proc.stdout:
                log.write(line)
                if progress and (m := re.search(progress, line)):
                    bar = bar or progress_bar(total=int(m.group(2)), desc=tool, unit="it")
                    bar.update(int(m.group(1)) - bar.n)
                if show and re.search(show, line):
                    print(sanitize(line.rstrip("\n"), cwd))
        proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        timer.cancel()
        if bar is not None:
            bar.close()
    text = sanitize(log_file.read_text(encoding="utf-8", errors="replace"), cwd)
    tail = "\n".join(text.splitlines()[-25:])
    if done:
        raise CourseError(f"`{command}` ran past {timeout:.0f} s and was stopped. Its log ends:\n{tail}")
    if proc.returncode != 0:
        raise CourseError(f"`{command}` failed (exit {proc.returncode}). Its log ends:\n{tail}")
    missing = [Path(p).name for p in expect if not Path(p).exists()]
    if missing:
        raise CourseError(f"`{command}` finished without writing {', '.join(missing)}. Its log ends:\n{tail}")
    return ToolRun(command, text, log_file, round(time.perf_counter() - start, 1))
