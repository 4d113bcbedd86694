"""The check framework: tasks and their registry, ``attempt``/``check``, saved progress, checker helpers.

In a homework notebook each task is a stub cell (tag ``task:<id>``) defining a function that
raises ``NotImplementedError("TODO: ...")`` until the learner writes it, called through
``attempt()`` so an unfinished notebook still runs top to bottom, and a check cell (tag
``check:<id>``) calling ``check(id, answer)``. ``check`` never raises: it prints ✅ with what it
verified or ❌ with what is missing and a hint, saves the outcome to ``homework/.progress.json``
and tags its output with a JSON record that the grader (``course_utils.grading``) reads back.
The lesson modules (``lesson1`` ... ``lesson6``) register their checkers here with ``@task``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

MIME = "application/vnd.course-homework+json"  # tags check outputs (for tools; the grader ignores them)
PROGRESS_ENV = "COURSE_HOMEWORK_PROGRESS"
EVIDENCE_ENV = "COURSE_HOMEWORK_EVIDENCE"  # set by the grader: save answers there, check nothing


@dataclass(frozen=True)
class Task:
    id: str  # "L<lesson>.<name>", e.g. "L4.identity"
    lesson: int
    level: str  # "basic" or "advanced"
    title: str
    hint: str  # shown with ❌
    checker: Callable[[Any], str]  # returns what it verified; raises Missing otherwise


TASKS: dict[str, Task] = {}


class Missing(Exception):
    """What an answer lacks; ``check`` shows it next to the task's hint."""


@dataclass
class NotDone:
    """What ``attempt`` returns while a stub still raises NotImplementedError."""

    message: str


@dataclass
class Crashed:
    """What ``attempt`` returns when the learner's function raised another error."""

    error: str


@dataclass
class Result:
    task: str
    passed: bool
    detail: str
    hint: str = ""

    def line(self) -> str:
        """The one line a learner sees: ✅ with what was verified, ❌ with what is missing."""
        if self.passed:
            return f"✅ {self.task}: {self.detail}"
        return f"❌ {self.task}: {self.detail}" + (f"\n   hint: {self.hint}" if self.hint else "")


def task(task_id: str, *, level: str, title: str, hint: str):
    """Register the decorated function as the checker of ``task_id``."""
    def register(checker: Callable[[Any], str]) -> Callable[[Any], str]:
        lesson = int(task_id.split(".")[0].lstrip("L"))
        TASKS[task_id] = Task(task_id, lesson, level, title, hint, checker)
        return checker
    return register


def lesson_tasks(lesson: int) -> list[Task]:
    """The tasks of one lesson, basic ones first, in registration order."""
    tasks = [t for t in TASKS.values() if t.lesson == lesson]
    return sorted(tasks, key=lambda t: t.level != "basic")


# ---- running a task and checking it ------------------------------------------------------------

def attempt(fn: Callable, *args, **kwargs):
    """Call the learner's function; a stub or a bug becomes a value the check reports, not a crash."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as exc:
        message = str(exc) or f"{getattr(fn, '__name__', 'the function')} is not written yet"
        print(f"⏳ not done yet: {message}")
        return NotDone(message)
    except Exception as exc:  # the learner's bug: show it, keep the notebook running
        frames = traceback.format_exception(exc)
        print("".join(frames[:1] + frames[2:]).rstrip(), file=sys.stderr)  # drop attempt's own frame
        return Crashed(f"{type(exc).__name__}: {exc}")


def run_check(task_id: str, answer) -> Result:
    """Check ``answer`` for ``task_id`` and return the outcome; never raises."""
    spec = TASKS.get(task_id)
    if spec is None:
        return Result(task_id, False, f"unknown task id; this course has {', '.join(TASKS)}")
    if isinstance(answer, NotDone):
        return Result(task_id, False, f"not done yet ({answer.message})", spec.hint)
    if isinstance(answer, Crashed):
        return Result(task_id, False, f"your code raised {answer.error}", spec.hint)
    if answer is None:
        return Result(task_id, False, "no answer: the task function returned None (a missing return?)",
                      spec.hint)
    try:
        return Result(task_id, True, spec.checker(answer))
    except Missing as exc:
        return Result(task_id, False, str(exc), spec.hint)
    except Exception as exc:  # a check must never stop the notebook
        return Result(task_id, False, f"could not check the answer ({type(exc).__name__}: {exc})",
                      spec.hint)


def _display(text: str, record: dict) -> None:
    """Print ``text``; in a notebook also attach ``record`` as JSON for the grader."""
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is not None:
            display({"text/plain": text, MIME: record}, raw=True)
            return
    except ImportError:
        pass
    print(text)


def check(task_id: str, answer) -> None:
    """Check the answer, print ✅/❌ with details, save progress. Never raises.

    Under the grader (``COURSE_HOMEWORK_EVIDENCE`` set) it only saves the answer as data: the
    grader checks it in its own process (``course_utils.evidence``, ``course_utils.grading``).
    """
    folder = os.environ.get(EVIDENCE_ENV)
    if folder:
        from .. import evidence

        try:
            evidence.save(answer, Path(folder) / task_id)
            print(f"📦 {task_id}: answer saved for the grader")
        except Exception as exc:  # the grader then reports "no usable answer"; later tasks still run
            print(f"📦 {task_id}: the answer could not be saved ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
        return
    result = run_check(task_id, answer)
    try:
        _display(result.line(), {"event": "check", **asdict(result)})
        record_progress(result)
    except Exception as exc:  # e.g. a read-only folder: the check itself still counts
        print(f"(progress not saved: {exc})", file=sys.stderr)


# ---- progress file -----------------------------------------------------------------------------

def progress_path() -> Path:
    """``COURSE_HOMEWORK_PROGRESS`` if set, else ``homework/.progress.json`` at the repo root."""
    from ..paths import REPO_ROOT

    return Path(os.environ.get(PROGRESS_ENV) or REPO_ROOT / "homework" / ".progress.json")


def load_progress() -> dict:
    """The saved progress (``{"student": ..., "tasks": {id: {...}}}``); empty if none or unreadable."""
    try:
        data = json.loads(progress_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) and isinstance(data.get("tasks"), dict) else {"tasks": {}}
    except (OSError, ValueError):
        return {"tasks": {}}


def _save_progress(data: dict) -> None:
    path = progress_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # write then rename: never a half-written file
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def record_progress(result: Result) -> None:
    """Save the latest outcome of one task (and when it first passed)."""
    data = load_progress()
    before = data["tasks"].get(result.task, {})
    entry = {"passed": result.passed, "detail": result.detail,
             "checked_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    entry["first_passed_at"] = before.get("first_passed_at") or (
        entry["checked_at"] if result.passed else None)
    data["tasks"][result.task] = entry
    _save_progress(data)


def start(lesson: int, student: str = "") -> None:
    """Open a homework notebook: remember the student, list the lesson's tasks and saved progress."""
    data = load_progress()
    student = (student or "").strip() or data.get("student", "")
    if student and data.get("student") != student:
        data["student"] = student
        try:
            _save_progress(data)
        except OSError as exc:
            print(f"(progress not saved: {exc})", file=sys.stderr)
    lines = [f"Homework for lesson {lesson}" + (f" · student: {student}" if student else
                                                " · tip: homework.start(..., student='your name')")]
    for spec in lesson_tasks(lesson):
        saved = data["tasks"].get(spec.id)
        state = "not checked yet" if saved is None else ("✅ passed" if saved["passed"] else "❌ not yet")
        lines.append(f"  {spec.id:<16} {spec.level:<8} {spec.title}  [{state}]")
    _display("\n".join(lines), {"event": "start", "lesson": lesson, "student": student})


def summary(lesson: int) -> None:
    """Print this lesson's tasks with their saved outcome: the end-of-notebook scoreboard."""
    tasks = load_progress()["tasks"]
    done = 0
    for spec in lesson_tasks(lesson):
        saved = tasks.get(spec.id)
        passed = bool(saved and saved["passed"])
        done += passed
        print(f"{'✅' if passed else '❌'} {spec.id:<16} {spec.level:<8} {spec.title}")
    print(f"{done}/{len(lesson_tasks(lesson))} tasks passed")


# ---- shared helpers for checks ------------------------------------------------------------------

def answer_field(answer, key: str, kind=None):
    """``answer[key]`` (dict) or ``answer.key`` (object), type-checked; Missing names what to add."""
    value = answer.get(key) if isinstance(answer, dict) else getattr(answer, key, None)
    if value is None:
        raise Missing(f"the answer has no {key!r}: return a dict with {key!r} in it")
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise Missing(f"{key!r} should be a {names}, got {type(value).__name__}")
    return value


def within(value: float, expected: float, rel: float) -> bool:
    """Whether ``value`` is within the fraction ``rel`` of ``expected`` (a reported number vs. a re-measured one)."""
    return abs(float(value) - expected) <= rel * abs(expected)


def contains(text: str, fact: str) -> bool:
    """Whether ``text`` says ``fact``, ignoring case and spacing (a model's reply vs. the expected words)."""
    return " ".join(fact.lower().split()) in " ".join(str(text).lower().split())

