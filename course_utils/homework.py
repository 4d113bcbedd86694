"""Homework that grades itself: tasks, checks that recompute the learner's work, saved progress.

In a homework notebook each task is a stub cell (tag ``task:<id>``) defining a function that
raises ``NotImplementedError("TODO: ...")`` until the learner writes it, called through
``attempt()`` so an unfinished notebook still runs top to bottom, and a check cell (tag
``check:<id>``) calling ``check(id, answer)``. ``check`` never raises: it prints ✅ with what it
verified or ❌ with what is missing and a hint, saves the outcome to ``homework/.progress.json``
and tags its output with a JSON record that the grader (``course_utils.grading``) reads back.

Checks verify the work, not its wording: they re-count the story, re-parse the downloaded file,
re-ask the fine-tuned model, re-measure memory and re-score the predictions file.
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
        from . import evidence

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
    from .paths import REPO_ROOT

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

def _field(answer, key: str, kind=None):
    """``answer[key]`` (dict) or ``answer.key`` (object), type-checked; Missing names what to add."""
    value = answer.get(key) if isinstance(answer, dict) else getattr(answer, key, None)
    if value is None:
        raise Missing(f"the answer has no {key!r}: return a dict with {key!r} in it")
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise Missing(f"{key!r} should be a {names}, got {type(value).__name__}")
    return value


def _close(value: float, expected: float, rel: float) -> bool:
    return abs(float(value) - expected) <= rel * abs(expected)


# ---- lesson 1: environment and memory ----------------------------------------------------------

# (model, precision, GPU slice, context tokens, batch): "will model X fit on GPU slice Y at precision Z"
MEMORY_QUESTIONS = [
    ("InternLM2.5-1.8B", "fp16", "10% A100 (8 GB)", 4096, 1),
    ("InternLM2.5-7B", "fp16", "10% A100 (8 GB)", 4096, 1),
    ("InternLM2.5-7B", "int4", "10% A100 (8 GB)", 4096, 1),
    ("InternLM2.5-20B", "fp16", "30% A100 (24 GB)", 4096, 1),
    ("InternLM2.5-20B", "int4", "30% A100 (24 GB)", 4096, 1),
    ("InternLM2.5-7B", "int8", "30% A100 (24 GB)", 32768, 2),
    ("InternLM2.5-7B", "fp16", "30% A100 (24 GB)", 32768, 4),
]
MAX_CONTEXT_QUESTION = ("InternLM2.5-7B", "int4", "10% A100 (8 GB)")  # batch 1, fp16 KV cache


ENV_KEYS = ("python", "torch", "cuda", "gpu", "memory_gib", "profile", "chat_model", "chat_model_params")


def _weights_on_disk(folder) -> int | None:
    """Parameters stored in a model folder, counted from the safetensors headers (no tensor is loaded)."""
    import math
    import struct
    from pathlib import Path

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def _machine_truth() -> dict:
    """What the grader's side of the machine says, for each key of the report."""
    from .env import detect, profile
    from .memory import ModelShape
    from .models import default_name, resolve

    facts = detect()
    name = default_name("chat")
    try:  # the weights the course really loads: counted from the files, not from the same formula
        folder = resolve(name)
        params = _weights_on_disk(folder) or ModelShape.from_config(
            json.loads((folder / "config.json").read_text(encoding="utf-8"))).params()
    except Exception:  # the model is not on this machine: the learner's resolve() fails the same way
        params = None
    memory = facts.gpu_memory_gb if facts.cuda else facts.ram_gb
    return {"python": facts.python, "torch": facts.torch, "cuda": facts.cuda, "gpu": facts.gpu_name,
            "memory_gib": memory, "profile": profile(), "chat_model": name, "chat_model_params": params}


@task("L1.env", level="basic", title="environment report",
      hint="read each fact from the machine yourself: platform.python_version(), torch.__version__, "
           "torch.cuda.is_available() / get_device_name(0) / get_device_properties(0).total_memory, else "
           "os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') for RAM; profile(), default_name('chat'); "
           "the chat model's parameters: ModelShape.from_config(json of resolve(name) / 'config.json').params()")
def _check_env(answer) -> str:
    truth = _machine_truth()
    if not isinstance(answer, dict):
        raise Missing(f"return a dict with keys {', '.join(ENV_KEYS)}")
    absent = [k for k in ENV_KEYS if k not in answer]
    if absent:
        raise Missing(f"the report lacks {', '.join(absent)}")
    wrong = [f"{k}={answer[k]!r} but this kernel has {truth[k]!r}"
             for k in ("python", "torch", "cuda", "gpu", "profile", "chat_model") if answer[k] != truth[k]]
    mem = answer["memory_gib"]
    where = "GPU memory" if truth["cuda"] else "RAM"
    if isinstance(mem, bool) or not isinstance(mem, (int, float)):
        wrong.append(f"memory_gib should be a number (GiB of {where}), got {type(mem).__name__}")
    elif truth["memory_gib"] and not _close(mem, truth["memory_gib"], 0.05):
        wrong.append(f"memory_gib={mem} but this machine's {where} is {truth['memory_gib']} GiB "
                     f"(GiB = 2**30 bytes; GPU memory if CUDA, else RAM)")
    params = answer["chat_model_params"]
    if isinstance(params, bool) or not isinstance(params, (int, float)):
        wrong.append(f"chat_model_params should be a number, got {type(params).__name__}")
    elif truth["chat_model_params"] and not _close(params, truth["chat_model_params"], 0.01):
        wrong.append(f"chat_model_params={params:,} but the weights of {truth['chat_model']} hold "
                     f"{truth['chat_model_params']:,} parameters")
    if wrong:
        raise Missing("; ".join(wrong))
    gpu = truth["gpu"] or "no GPU"
    return (f"Python {truth['python']}, torch {truth['torch']}, {gpu}, {truth['memory_gib']} GiB of "
            f"{where}, profile {truth['profile']}, chat model {truth['chat_model']} with "
            f"{truth['chat_model_params']:,} parameters (counted from its weight files): all match this machine")


def _question_total(model: str, precision: str, context: int, batch: int) -> float:
    from .memory import INTERNLM2_5, total_memory_gb

    return total_memory_gb(INTERNLM2_5[model], precision, context=context, batch=batch)


@task("L1.memory", level="basic", title="memory calculator questions",
      hint="course_utils.memory.total_memory_gb(INTERNLM2_5[model], precision, context=..., batch=...) "
           "<= the slice's size (GPU_BUDGETS_GB, read as GiB like the totals)")
def _check_memory(answer) -> str:
    from .memory import GPU_BUDGETS_GB

    if not isinstance(answer, (list, tuple)) or len(answer) != len(MEMORY_QUESTIONS):
        raise Missing(f"return a list with one (total_gb, fits) per question: "
                      f"{len(MEMORY_QUESTIONS)} of them")
    wrong = []
    for n, (item, (model, precision, gpu, context, batch)) in enumerate(zip(answer, MEMORY_QUESTIONS), 1):
        total, fits = (item["total_gb"], item["fits"]) if isinstance(item, dict) else item
        expected = _question_total(model, precision, context, batch)
        if not _close(total, expected, 0.03):
            wrong.append(f"Q{n} total {float(total):.2f} GiB, expected about {expected:.2f}")
        elif bool(fits) != (expected <= GPU_BUDGETS_GB[gpu]):
            wrong.append(f"Q{n} fits={bool(fits)} but {expected:.2f} GiB vs {GPU_BUDGETS_GB[gpu]} GiB")
    if wrong:
        raise Missing("; ".join(wrong))
    return f"all {len(MEMORY_QUESTIONS)} totals within 3% and every fits/doesn't-fit verdict right"


@task("L1.max_context", level="advanced", title="longest context that fits",
      hint="solve total_memory_gb(shape, 'int4', context=n) <= 8 for n: "
           "(8 - 1 GiB overhead - weights) / kv_bytes_per_token")
def _check_max_context(answer) -> str:
    from .memory import GPU_BUDGETS_GB

    model, precision, gpu = MAX_CONTEXT_QUESTION
    budget = GPU_BUDGETS_GB[gpu]
    if isinstance(answer, bool) or not isinstance(answer, (int, float)) or answer <= 0:
        raise Missing("return the number of tokens, a positive int")
    n = int(answer)
    if _question_total(model, precision, n, 1) > budget:
        raise Missing(f"{n} tokens need {_question_total(model, precision, n, 1):.4f} GiB > {budget} GiB")
    if _question_total(model, precision, int(n * 1.01) + 1, 1) <= budget:
        raise Missing(f"{n} tokens fit, but so do 1% more: find the largest context")
    return f"{n} tokens fit in {budget} GiB and 1% more would not"


# ---- lesson 2: chat, hub download, agent ---------------------------------------------------------

STORY_MIN = 300  # English words, or Chinese characters for a Chinese story
HUB_REPO = "internlm/internlm-20b"  # the bootcamp's homework: InternLM-20B's config.json


def _story_text(answer) -> str:
    """The story from a ``chat.Story``, a string, or a chat session's assistant turns."""
    if isinstance(answer, str):
        return answer
    if isinstance(getattr(answer, "text", None), str):
        return answer.text
    history = getattr(answer, "history", None)
    if isinstance(history, list):
        return "\n\n".join(m["content"] for m in history if m.get("role") == "assistant")
    raise Missing("return the story: a chat.Story (write_story), its text, or the chat session")


@task("L2.story", level="basic", title=f"a {STORY_MIN}-word story from the chat model",
      hint=f"a small model stops after a few sentences: keep the conversation going and ask it to "
           f"continue until the story reaches {STORY_MIN} (lesson 2 §5 shows a chat helper that does "
           "this); write in the model's language, and return the story or the session")
def _check_story(answer) -> str:
    import re

    from .chat import count_words

    text = _story_text(answer)
    zh = count_words(text, "zh") > count_words(text, "en")
    unit, length = ("Chinese characters", count_words(text, "zh")) if zh else \
        ("English words", count_words(text, "en"))
    if length < STORY_MIN:
        raise Missing(f"the story has {length} {unit}; it needs at least {STORY_MIN}")
    sentences = [s.strip() for s in re.split(r"[.!?。！？\n]+", text) if len(s.strip()) > 3]
    distinct = len(set(sentences)) / max(len(sentences), 1)
    if distinct < 0.5:  # padding by repetition is not a story
        raise Missing(f"only {distinct:.0%} of its {len(sentences)} sentences are distinct: "
                      "the length comes from repetition")
    return f"{length} {unit} (≥ {STORY_MIN}), {len(set(sentences))} distinct sentences"


def _json_file(answer, key: str, name: str) -> dict:
    from .paths import DATA_DIR

    path = Path(_field(answer, key, (str, os.PathLike)))
    if path.name != name or not path.is_file():
        raise Missing(f"{key!r} should be the path of the downloaded {name}, got {path.name!r}")
    if DATA_DIR / "hub_mirror" in path.resolve().parents:
        raise Missing(f"{name} is the mirror's own copy: download it through huggingface_hub "
                      "(hub.download(..., endpoint=mirror.endpoint))")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise Missing(f"{name} is not valid JSON ({exc}): download it again") from None


@task("L2.download", level="basic", title="download InternLM-20B's config.json, count its layers and parameters",
      hint=f"start the classroom mirror (hub.serve_mirror) and download config.json of '{HUB_REPO}' "
           "through huggingface_hub with endpoint=mirror.endpoint; the layer count is in the file, and "
           "hub.count_parameters turns the file's shape into a parameter count")
def _check_download(answer) -> str:
    from .hub import count_parameters

    config = _json_file(answer, "config", "config.json")
    if config.get("model_type") != "internlm" or config.get("hidden_size") != 5120:
        raise Missing(f"this config.json is not InternLM-20B's (model_type internlm, hidden 5120): "
                      f"download it from '{HUB_REPO}'")
    layers, params = _field(answer, "layers", int), _field(answer, "parameters", (int, float))
    if layers != config["num_hidden_layers"]:
        raise Missing(f"layers={layers}, but config.json says num_hidden_layers="
                      f"{config['num_hidden_layers']}")
    from_config = count_parameters(config)  # recomputed from the downloaded file
    if not _close(params, from_config, 0.01):
        raise Missing(f"parameters={params:,.0f}, but the downloaded config gives {from_config:,}")
    return (f"config.json downloaded and parsed: {layers} layers, {params / 1e9:.2f} B parameters "
            f"(from the config: {from_config / 1e9:.3f} B)")


def _python_actions(answer) -> list:
    """The Python-tool actions of a Lagent ``AgentReturn``."""
    from .agent import TOOL_NAME

    actions = getattr(answer, "actions", None)
    if actions is None:
        raise Missing("return what agent.ask_agent(agent, question) gave back (a Lagent AgentReturn)")
    return [a for a in actions if getattr(a, "type", None) == TOOL_NAME]


@task("L2.agent", level="advanced", title="an agent run that uses the Python tool",
      hint="agent.ask_agent(agent.make_agent(server), question) with a question it must compute; "
           "a small model needs a worked ReAct example before the question (pass a message list) "
           "and repetition_penalty=1.0 so it may copy the format")
def _check_agent(answer) -> str:
    from lagent.actions import FinishAction
    from lagent.schema import ActionStatusCode

    from .agent import _strip_fences  # the tool strips Markdown fences the same way
    from .sandbox import run_python

    calls = _python_actions(answer)
    if not calls:
        raise Missing("the agent never called the Python tool: ask something it must compute")
    good = [a for a in calls if a.state == ActionStatusCode.SUCCESS and a.result]
    if not good:
        raise Missing(f"the Python tool was called {len(calls)} time(s) but never ran cleanly: "
                      f"{calls[-1].errmsg}")
    action = good[-1]
    command = action.args.get("command", "") if isinstance(action.args, dict) else str(action.args)
    recorded = action.result[0]["content"].strip()
    rerun = run_python(_strip_fences(command), timeout=10)
    if not rerun.ok or (rerun.output.strip() or "(no output)") != recorded:
        raise Missing("re-running the tool's code does not give the recorded result")
    if getattr(answer.actions[-1], "type", None) != FinishAction().name:
        raise Missing("the agent stopped without a Final Answer: give it more turns (max_turn)")
    return (f"the Python tool ran {len(good)} time(s); re-running {command.strip()[:40]!r} gives "
            f"{recorded[:40]!r} again; final answer given")



# ---- lesson 3: RAG ------------------------------------------------------------------------------

def _contains(text: str, fact: str) -> bool:
    return " ".join(fact.lower().split()) in " ".join(str(text).lower().split())


@task("L3.kb", level="basic", title="a question the bare model gets wrong and RAG gets right",
      hint="store, _ = rag.build_vectorstore(folder, persist_dir); try the eval questions "
           "(rag.load_eval_set()) and compare chat.complete(...) with rag.make_rag_chain(chat, store)")
def _check_rag_question(answer) -> str:
    from . import rag

    store, chat = _field(answer, "store"), _field(answer, "chat")
    question, fact = _field(answer, "question", str), _field(answer, "fact", str).strip()
    files = rag.indexed_files(store)
    if not files:
        raise Missing("the knowledge base is empty: build it over a folder first")
    if len(fact) < 3 or _contains(question, fact):
        raise Missing("'fact' must be the words a right answer contains, not a part of the question")
    k = int(answer.get("k", 4)) if isinstance(answer, dict) else 4  # chunks in the RAG prompt
    hits = rag.retrieve(store, question, k=k)
    if not any(_contains(h.text, fact) for h in hits):
        raise Missing(f"{fact!r} is not in the chunks retrieved for the question: it must come "
                      "from the knowledge base")
    bare = chat.complete([{"role": "user", "content": question}], temperature=0.0)
    if _contains(bare, fact):
        raise Missing(f"the bare model already answers it: {bare[:80]!r}")
    # The chain's own prompt (rag.make_rag_chain's default template), answered greedily.
    got = chat.complete(rag.rag_messages(hits, question), temperature=0.0)
    if not _contains(got, fact):
        raise Missing(f"the RAG chain does not answer it either: {got[:80]!r}")
    return (f"{len(files)} files indexed; asked again: the bare model misses {fact!r}, "
            f"the RAG chain says it (from {hits[0].path})")


def _default_hit_rate(k: int) -> tuple[float, set]:
    """hit@k of the lesson's default store (default split, plain similarity) and its files."""
    from . import rag
    from .paths import DATA_DIR, outputs_dir

    store, _ = rag.build_vectorstore(DATA_DIR / "knowledge_base", outputs_dir() / "homework" /
                                     "rag-default", progress=False)
    return rag.evaluate_retrieval(store, rag.load_eval_set(), k=k).hit_rate, set(rag.indexed_files(store))


@task("L3.hit3", level="advanced", title="raise hit@3 above the lesson's default",
      hint="rebuild with another rag.SplitConfig (chunk size, overlap, header context) or retrieve "
           "with mmr=True; compare with rag.compare_retrieval / evaluate_retrieval(store, qa, k=3)")
def _check_hit3(answer) -> str:
    from . import rag

    store = _field(answer, "store")
    mmr = bool(answer.get("mmr", False)) if isinstance(answer, dict) else False
    baseline, default_files = _default_hit_rate(3)
    missing = default_files - set(rag.indexed_files(store))
    if missing:
        raise Missing(f"the store leaves out {len(missing)} of the knowledge base's files (e.g. "
                      f"{sorted(missing)[0]}): a smaller haystack is not better retrieval")
    got = rag.evaluate_retrieval(store, rag.load_eval_set(), k=3, mmr=mmr).hit_rate
    if got <= baseline:
        raise Missing(f"hit@3 = {got:.3f}, not above the default's {baseline:.3f}")
    return f"re-evaluated: hit@3 = {got:.3f} > the default's {baseline:.3f} on the full knowledge base"


OWN_MIN_QUESTIONS = 10  # the lesson's promise: "your own material, at least 10 questions"
SPLIT_FIELDS = ("chunk_size", "chunk_overlap", "header_context")


def _own_questions(answer) -> list[dict]:
    """The learner's labelled questions: a list of {"question", "source"} dicts or a JSONL file of them."""
    from . import rag
    from .errors import CourseError
    from .evidence import readable

    value = _field(answer, "questions", (list, tuple, str, os.PathLike))
    try:
        qa = list(value) if isinstance(value, (list, tuple)) else rag.load_eval_set(readable(value))
    except CourseError as exc:
        raise Missing(str(exc)) from None
    bad = next((q for q in qa if not rag._is_question(q)), None)
    if bad is not None:
        raise Missing(f"{bad!r:.80} is not a question: each needs non-empty \"question\" and \"source\" strings")
    distinct = {" ".join(q["question"].lower().split()) for q in qa}
    if len(distinct) < OWN_MIN_QUESTIONS:
        raise Missing(f"{len(distinct)} distinct questions; write at least {OWN_MIN_QUESTIONS}")
    return qa


def _own_config(answer):
    """The split settings the learner built with (a SplitConfig or a dict; default SplitConfig())."""
    from . import rag
    from .errors import CourseError

    value = answer.get("config") if isinstance(answer, dict) else getattr(answer, "config", None)
    if value is None:
        return rag.SplitConfig()
    fields = value if isinstance(value, dict) else {f: getattr(value, f, None) for f in SPLIT_FIELDS}
    try:
        return rag.SplitConfig(**{f: fields[f] for f in SPLIT_FIELDS if fields.get(f) is not None})
    except CourseError as exc:
        raise Missing(f"'config': {exc}") from None


@task("L3.own", level="basic", title="your own knowledge base: 10+ questions, hit@k and MRR",
      hint="put your .md/.txt/.pdf files in a folder, write >= 10 {\"question\", \"source\"} dicts (source = "
           "the file's path relative to the folder), build the store, then report = rag.evaluate_retrieval("
           "store, qa, k=K) and return report.hit_rate and report.mrr")
def _check_own(answer) -> str:
    import tempfile

    from . import rag
    from .errors import CourseError
    from .evidence import readable
    from .paths import DATA_DIR

    folder = Path(readable(_field(answer, "folder", (str, os.PathLike))))
    if not folder.is_dir():
        raise Missing(f"'folder' ({folder.name!r}) is not a folder: give the folder of your documents")
    if folder.resolve().is_relative_to((DATA_DIR / "knowledge_base").resolve()):
        raise Missing("'folder' is the course's knowledge base: this task is about your own material")
    qa, config = _own_questions(answer), _own_config(answer)
    k = _field(answer, "k", int)
    if k < 1:
        raise Missing(f"k = {k}: retrieve at least 1 chunk")
    reported = {"hit@k": _field(answer, "hit@k", (int, float)), "mrr": _field(answer, "mrr", (int, float))}
    patterns = rag.default_patterns(folder)
    try:
        sources = {d.metadata["source"] for d in rag.load_documents(folder, patterns)}
    except CourseError as exc:
        raise Missing(str(exc)) from None
    unknown = sorted({q["source"] for q in qa} - sources)
    if unknown:
        raise Missing(f"{len(unknown)} expected source(s) are not files of the folder, e.g. {unknown[0]!r}; "
                      f"'source' is the path relative to the folder, like {sorted(sources)[0]!r}")
    with tempfile.TemporaryDirectory(prefix="l3-own-") as tmp:  # rebuilt here: the learner's store is not trusted
        store, built = rag.build_vectorstore(folder, tmp, patterns=patterns, config=config, progress=False)
        report = rag.evaluate_retrieval(store, qa, k=k)
    got = {"hit@k": report.hit_rate, "mrr": report.mrr}
    for key, value in got.items():
        if abs(float(reported[key]) - value) > 0.0015:  # reported numbers may be rounded to 3 decimals
            raise Missing(f"you report {key} = {float(reported[key]):.3f}, but rebuilding the store from your "
                          f"files gives {value:.3f} (k = {k}, {config.signature()})")
    return (f"rebuilt {built.total_chunks} chunks from {built.total_files} files; recomputed on {len(qa)} "
            f"questions: hit@{k} = {got['hit@k']:.3f}, MRR = {got['mrr']:.3f}, as you report")


# ---- lesson 4: fine-tuning ----------------------------------------------------------------------

# Held-out general questions SmolLM2-135M (greedy) and InternLM2.5 answer right, with words every right
# answer contains. The forgetting check asks them with the adapter off and on.
GENERAL_QUESTIONS = {
    "What is the capital of France?": ("paris",),
    "What is the capital of Japan?": ("tokyo",),
    "What is the capital of Germany?": ("berlin",),
    "How many days are there in a week?": ("seven", "7"),
    "How many months are there in a year?": ("twelve", "12"),
    "What is the opposite of hot?": ("cold",),
    "What is the opposite of up?": ("down",),
    "What is the chemical symbol for water?": ("h2o",),
    "What is the boiling point of water in Celsius?": ("100",),
    "What is the largest ocean on Earth?": ("pacific",),
}
# A 135M model's greedy answer to a fact it barely knows can flip on noise alone (seen on an
# identity-only run with another seed), so one changed answer is not yet forgetting.
MAX_FORGOTTEN = 1


def identity_question() -> str:
    """The question the identity fine-tune is judged on (English on the tiny profile)."""
    from .env import profile
    from .sft_data import IDENTITY_QUESTIONS

    return IDENTITY_QUESTIONS["en" if profile() == "tiny" else "zh"][0]


def _peft_model(answer):
    """The fine-tuned PEFT model and tokenizer: train()'s result, or loaded from the adapter folder."""
    result = answer.get("result") if isinstance(answer, dict) else answer
    model = getattr(result, "model", None)
    if model is not None and hasattr(model, "disable_adapter"):
        return model, result.tokenizer
    adapter = getattr(result, "adapter_dir", None) or _field(answer, "adapter", (str, os.PathLike))
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise Missing(f"{adapter.name!r} is not a LoRA adapter folder (no adapter_config.json)")
    from peft import PeftModel

    from .evidence import course_model
    from .models import load_model

    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model, tokenizer = load_model(course_model(base))  # never a model folder the learner made
    return PeftModel.from_pretrained(model, adapter).eval(), tokenizer


def _trained_questions(answer) -> set[str]:
    """The user turns of the run's training data (from the adapter's saved config), if known."""
    from .evidence import readable
    from .sft_data import load_conversations

    result = answer.get("result") if isinstance(answer, dict) else answer
    adapter = getattr(result, "adapter_dir", None) or (answer.get("adapter") if isinstance(answer, dict) else None)
    saved = Path(adapter or "") / "finetune_config.json"
    data_path = json.loads(saved.read_text()).get("data_path") if saved.is_file() else None
    if not data_path or not readable(data_path).is_file():
        return set()
    return {m["content"] for conv in load_conversations(data_path) for m in conv if m["role"] == "user"}


def _replies(model, tokenizer, question: str, tokens: int = 32) -> tuple[str, str]:
    """(base, fine-tuned) greedy replies of a PEFT model to ``question``."""
    from .finetune import reply

    with model.disable_adapter():
        before = reply(model, tokenizer, question, max_new_tokens=tokens)
    return before, reply(model, tokenizer, question, max_new_tokens=tokens)


def _learner_name(answer) -> str:
    name = _field(answer, "name", str).strip()
    if not name or name.lower() in ("your name", "learner", "todo"):
        raise Missing("set 'name' to your own name")
    return name


@task("L4.identity", level="basic", title="the assistant knows your name",
      hint="finetune.train(FinetuneConfig(data_path=...)) on sft_data.make_identity_dataset(MY_NAME); "
           "return {'name', 'result' (or 'adapter'), 'before', 'after'}")
def _check_identity(answer) -> str:
    name = _learner_name(answer)
    model, tokenizer = _peft_model(answer)
    question = identity_question()
    before, after = _replies(model, tokenizer, question)
    if _contains(before, name):
        raise Missing(f"the base model already says {name!r}: pick a name it cannot guess")
    if not _contains(after, name):
        raise Missing(f"asked {question!r}, the fine-tuned model says {after[:80]!r}: no {name!r} "
                      "(train longer or with a higher lr)")
    said_before, said_after = _field(answer, "before", str), _field(answer, "after", str)
    if _contains(said_before, name) or not _contains(said_after, name):
        raise Missing("'before' and 'after' should be the base and fine-tuned replies you printed")
    return f"asked again {question!r}: base {before[:40]!r}… → fine-tuned {after[:60]!r}"


@task("L4.forgetting", level="advanced", title="general answers survive the fine-tune",
      hint="mix the base model's own answers into the data: make_identity_dataset(name, extra="
           "finetune.base_answers(model, tokenizer, questions)), and/or fewer steps or a lower lr")
def _check_forgetting(answer) -> str:
    name = _learner_name(answer)
    model, tokenizer = _peft_model(answer)
    trained_on = _trained_questions(answer) & set(GENERAL_QUESTIONS)
    if trained_on:
        raise Missing(f"{sorted(trained_on)[0]!r} is in the training data: the check's questions are "
                      "held out, mix in other general questions")
    _, after = _replies(model, tokenizer, identity_question())
    if not _contains(after, name):
        raise Missing(f"the identity is gone: the model says {after[:60]!r}")
    known, lost = 0, []
    for question, words in GENERAL_QUESTIONS.items():
        before, now = _replies(model, tokenizer, question, tokens=24)
        if any(w in before.lower() for w in words):
            known += 1
            if not any(w in now.lower() for w in words):
                lost.append(f"{question!r} → {now[:50]!r}")
    if known < 3:
        raise Missing(f"the base model knows only {known} of the general questions: use the course model")
    if len(lost) > MAX_FORGOTTEN:
        raise Missing(f"forgot {len(lost)} of {known} general answers (at most {MAX_FORGOTTEN} may "
                      "change): " + "; ".join(lost[:2]))
    kept = f"all {known}" if not lost else f"{known - len(lost)} of {known} (changed: {lost[0]})"
    return f"identity kept ({name!r}) and {kept} general answers the base model knew"


# ---- lesson 5: quantization and serving ---------------------------------------------------------

MAX_W4A16_RATIO = 0.6  # of the bf16 weights; SmolLM2 keeps its tied embedding (21%) in bf16
LONG_CONTEXT = 2048  # tokens


@task("L5.w4a16", level="basic", title="W4A16: weight memory and perplexity",
      hint="quantize.quantize_w4a16(model) then quantize.weight_bytes(model) and "
           "quantize.perplexity(model, tokenizer, quantize.load_texts('heldout'))")
def _check_w4a16(answer) -> str:
    import course_utils.quantize as q

    from .hub import count_parameters

    model, tokenizer = _field(answer, "model"), _field(answer, "tokenizer")
    packed = sum(isinstance(m, q.QuantLinear) for m in model.modules())
    if not packed:
        raise Missing("the model has no QuantLinear layers: quantize_w4a16(model) replaces its projections")
    measured = q.weight_bytes(model)
    reported = _field(answer, "weight_bytes", (int, float))
    if not _close(reported, measured, 0.01):
        raise Missing(f"weight_bytes={reported:,.0f}, but the model's weights occupy {measured:,}")
    ratio = measured / (2 * count_parameters(model.config.to_dict()))  # vs bf16: 2 bytes/parameter
    if ratio > MAX_W4A16_RATIO:
        raise Missing(f"the weights are {ratio:.2f}× their bf16 size: expected ≤ {MAX_W4A16_RATIO}")
    ppl = q.perplexity(model, tokenizer, q.load_texts("heldout"))
    if not _close(_field(answer, "perplexity", (int, float)), ppl, 0.02):
        raise Missing(f"perplexity={answer['perplexity']:.2f}, but re-measured on the held-out text "
                      f"it is {ppl:.2f}")
    return (f"{packed} packed layers; weights {measured / 2**20:.0f} MiB = {ratio:.2f}× bf16 "
            f"(re-measured); perplexity {ppl:.2f} (re-measured)")


MIN_LOAD_REQUESTS = 4  # per concurrency level



def _load_run(run, which: str) -> tuple[dict, list]:
    """One benchmark_concurrency result, its log checked record by record."""
    if not isinstance(run, dict):
        raise Missing("'load' should hold the dicts quantize.benchmark_concurrency returned")
    log = _field(run, "log", (list, tuple))
    if len(log) < MIN_LOAD_REQUESTS:
        raise Missing(f"the {which} run sent {len(log)} requests: send at least {MIN_LOAD_REQUESTS}")
    for r in log:
        if not isinstance(r, dict) or not all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                              for k in ("start_s", "end_s", "completion_tokens")):
            raise Missing(f"the {which} run's 'log' is not the per-request log benchmark_concurrency writes")
        if not isinstance(r.get("text"), str) or not r["text"].strip() or r["end_s"] < r["start_s"]:
            raise Missing(f"the {which} run has an empty or impossible reply to {str(r.get('prompt'))[:40]!r}")
    return run, log


@task("L5.serve", level="basic", title="serve the model and load-test it at two concurrencies",
      hint="server = serving.serve(port=serving.free_port(), extra_args=list(q.CPU_BATCHING_ARGS)); "
           "api = serving.client(server); load = [q.benchmark_concurrency(api, server.model, prompts, "
           "concurrency=c) for c in (1, 8)]; return {'server': server, 'load': load}")
def _check_serve(answer) -> str:
    from .quantize import load_summary
    from .serving import LOOPBACK, client

    server = _field(answer, "server")
    if server.host not in LOOPBACK:
        raise Missing(f"the server listens on {server.host}: keep it on 127.0.0.1 (or use an api_key)")
    load = _field(answer, "load", (list, tuple))
    if len(load) != 2:
        raise Missing(f"'load' holds {len(load)} runs: benchmark once at concurrency 1 and once at ≥ 4")
    (serial, s_log), (batched, b_log) = sorted(
        (_load_run(run, which) for run, which in zip(load, ("first", "second"))),
        key=lambda pair: _field(pair[0], "concurrency", int))
    if serial["concurrency"] != 1 or batched["concurrency"] < MIN_LOAD_REQUESTS:
        raise Missing(f"concurrencies {serial['concurrency']} and {batched['concurrency']}: use 1 and ≥ 4")
    if sorted(r.get("prompt") for r in s_log) != sorted(r.get("prompt") for r in b_log):
        raise Missing("send the same prompts at both concurrencies, or the two runs are not comparable")
    redone = []
    for run, log in ((serial, s_log), (batched, b_log)):
        wall = _field(run, "wall_s", (int, float))
        last = max(r["end_s"] for r in log)
        if not last <= wall <= 1.05 * last + 0.1:  # the wall clock ends just after the last reply
            raise Missing(f"wall_s={wall:.2f} but the last reply of that run came at {last:.2f} s")
        again = load_summary(log, wall=wall)
        for key in ("throughput_tok_s", "latency_mean_s"):
            if not _close(_field(run, key, (int, float)), again[key], 0.01):
                raise Missing(f"{key}={run[key]:.2f} at concurrency {run['concurrency']}, but its log "
                              f"gives {again[key]:.2f}")
        redone.append(again)
    if redone[0]["max_in_flight"] != 1:
        raise Missing("at concurrency 1 the log shows requests overlapping: send them one after another")
    if redone[1]["max_in_flight"] < 2:
        raise Missing(f"at concurrency {batched['concurrency']} no two requests were ever open at once: "
                      "send them from a thread pool (benchmark_concurrency does)")
    speedup = redone[1]["throughput_tok_s"] / redone[0]["throughput_tok_s"]
    # Not a pass/fail criterion: batching gave 4.6x on an idle 2-core CPU but nothing on an overloaded one.
    note = "" if speedup >= 1.25 else (" — no throughput gain: was continuous batching on "
                                        "(extra_args=list(q.CPU_BATCHING_ARGS)), and was the machine busy?")
    summary = (f"recomputed from {len(s_log) + len(b_log)} logged requests: concurrency 1 → "
               f"{redone[0]['throughput_tok_s']:.1f} tok/s, {batched['concurrency']} → "
               f"{redone[1]['throughput_tok_s']:.1f} tok/s ({speedup:.1f}×, up to {redone[1]['max_in_flight']} "
               f"in flight); mean latency {redone[0]['latency_mean_s']:.2f} → {redone[1]['latency_mean_s']:.2f} s{note}")
    if not server.running:
        return f"{summary} (server already stopped, not re-queried)"
    first = s_log[0]
    reply = client(server).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": first.get("prompt") or ""}],
        max_tokens=max(1, int(first["completion_tokens"])), temperature=0)
    text = (reply.choices[0].message.content or "") if reply.choices else ""
    if text.strip() != first["text"].strip():
        raise Missing(f"re-asked {first.get('prompt')!r} (greedy), the server says {text[:50]!r}, not the "
                      f"logged {first['text'][:50]!r}")
    return f"{summary}; re-asked {first.get('prompt')!r}: same greedy reply"


@task("L5.kv", level="advanced", title="KV-cache quantization at a long context",
      hint=f"cache = kvcache.make_cache('int8', model.config); model(ids, past_key_values=cache) "
           f"with ≥ {LONG_CONTEXT} tokens; kvcache.cache_bytes(cache)")
def _check_kv(answer) -> str:
    from .kvcache import cache_bytes, kv_bytes

    cache, model = _field(answer, "cache"), _field(answer, "model")
    if not hasattr(cache, "layers") or not hasattr(cache, "get_seq_length"):
        raise Missing("'cache' should be the transformers Cache the model filled")
    tokens = int(cache.get_seq_length())
    if tokens < LONG_CONTEXT:
        raise Missing(f"the cache holds {tokens} tokens: run a context of at least {LONG_CONTEXT}")
    measured = cache_bytes(cache)
    if not _close(_field(answer, "bytes", (int, float)), measured, 0.01):
        raise Missing(f"bytes={answer['bytes']:,.0f}, but the cache holds {measured:,}")
    ratio = measured / kv_bytes(model.config, tokens, 16)
    if ratio > 0.6:
        raise Missing(f"the cache is {ratio:.2f}× a bf16 cache: it is not quantized (int8 ≈ 0.5–0.6)")
    return f"{tokens} tokens cached in {measured / 2**20:.1f} MiB = {ratio:.2f}× bf16 (re-measured)"


# ---- lesson 6: evaluation -----------------------------------------------------------------------

def _rescored(result) -> tuple[float, dict]:
    """Accuracy (percent) recomputed from a result's predictions file against the dataset's answers."""
    from .errors import CourseError
    from .eval_data import load_dataset, read_predictions
    from .evidence import readable

    path = Path(getattr(result, "predictions_path", "") or "")
    if not isinstance(result.dataset, str) or "/" in result.dataset or "\\" in result.dataset:
        readable(result.dataset)  # a dataset named by path: confined like any other file
    if not path.is_file():
        raise Missing("pass evaluate()'s result: its predictions file is missing")
    try:  # the loaders' messages already name the file, line and fix
        rows, torn = read_predictions(path)
        data = load_dataset(result.dataset)
    except CourseError as exc:
        raise Missing(str(exc)) from None
    if torn is not None:
        raise Missing(f"{path.name} line {torn} was cut off mid-write (the run was stopped): finish it with "
                      "evaluate(..., reuse=True) and pass that result")
    gold = {r["id"]: r[data.reader.output_column] for r in data.records}
    if not rows or any(r["id"] not in gold for r in rows):
        raise Missing(f"{path.name} does not hold predictions for {result.dataset}")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):  # a question counted twice would skew the accuracy
        twice = next(i for i in ids if ids.count(i) > 1)
        raise Missing(f"{path.name} holds question {twice!r} more than once: pass the result of a fresh "
                      "evaluate() run, which writes each question once")
    right = sum(r["prediction"] == gold[r["id"]] for r in rows)
    return round(100 * right / len(rows), 2), {r["id"]: r["prediction"] for r in rows}


def _accuracy_field(answer, key: str, truth: float) -> None:
    import math
    import numbers

    reported = _field(answer, key)
    if isinstance(reported, bool) or not isinstance(reported, numbers.Real):
        raise Missing(f"{key!r} should be a number (the accuracy in percent), got {type(reported).__name__}")
    if not math.isfinite(reported):  # NaN compares false with everything, so the check below would pass it
        raise Missing(f"{key}={reported} is not an accuracy: report the percentage evaluate() returned "
                      "(result.accuracy), a number from 0 to 100")
    if abs(reported - truth) > 0.01:
        raise Missing(f"{key}={reported}, but the predictions file scores {truth}")


@task("L6.modes", level="basic", title="one slice, both modes, read the summary table",
      hint="evaluate.evaluate(model, 'course_en', mode='ppl', test_range='[0:20]') and mode='gen'; "
           "read both accuracies from evaluate.summary_table([ppl, gen])")
def _check_modes(answer) -> str:
    ppl, gen = _field(answer, "ppl"), _field(answer, "gen")
    if (getattr(ppl, "mode", None), getattr(gen, "mode", None)) != ("ppl", "gen"):
        raise Missing("'ppl' and 'gen' should be the results of evaluate(..., mode='ppl') and mode='gen'")
    if ppl.dataset != gen.dataset or ppl.model != gen.model:
        raise Missing("evaluate the same model on the same dataset in both modes")
    ppl_acc, ppl_pred = _rescored(ppl)
    gen_acc, gen_pred = _rescored(gen)
    if set(ppl_pred) != set(gen_pred):
        raise Missing("the two runs scored different questions: use the same test_range")
    _accuracy_field(answer, "ppl_accuracy", ppl_acc)
    _accuracy_field(answer, "gen_accuracy", gen_acc)
    differ = sum(ppl_pred[i] != gen_pred[i] for i in ppl_pred)
    return (f"re-scored {len(ppl_pred)} questions of {ppl.dataset}: ppl {ppl_acc}%, gen {gen_acc}%, "
            f"the modes disagree on {differ}")


def _numbers(text: str) -> list[float]:
    import re

    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text)]


_CJK = r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"  # Chinese characters (unified ideographs)


def _word_count(text: str) -> int:
    """Words in English or Chinese: each Chinese character counts as one, as Chinese has no spaces."""
    import re

    return len(re.findall(_CJK, text)) + len(re.sub(_CJK, " ", text).split())


def _weights(result) -> str:
    """The weights fingerprint that evaluate() wrote on every prediction of ``result``."""
    from .eval_data import read_predictions

    rows, _ = read_predictions(Path(result.predictions_path))
    made_by = {r.get("weights") for r in rows}
    if None in made_by:
        raise Missing(f"{Path(result.predictions_path).name} does not say which weights made it (evaluate() "
                      "of this course version records them): run evaluate(..., reuse=False) again")
    if len(made_by) > 1:
        raise Missing(f"{Path(result.predictions_path).name} mixes predictions of different weights: "
                      "run evaluate(..., reuse=False) again")
    return made_by.pop()


@task("L6.compare", level="advanced", title="evaluate your fine-tuned or quantized model and explain",
      hint="evaluate the base and the variant (other weights: an adapter or a quantized model, not just "
           "another abbr) on the same slice and mode; the explanation (≥ 15 words, or 15 Chinese "
           "characters) should state the accuracy change in points and say why it happened")
def _check_compare(answer) -> str:
    base, variant = _field(answer, "base"), _field(answer, "variant")
    explanation = _field(answer, "explanation", str)
    if (base.dataset, base.mode) != (variant.dataset, variant.mode) or base.model == variant.model:
        raise Missing("compare two different models on the same dataset and mode")
    base_acc, base_pred = _rescored(base)
    var_acc, var_pred = _rescored(variant)
    if set(base_pred) != set(var_pred):
        raise Missing("the two runs scored different questions: use the same test_range")
    if _weights(base) == _weights(variant):
        raise Missing(f"{base.model!r} and {variant.model!r} were scored with the same weights: a new abbr "
                      "does not make a new model. Evaluate your fine-tuned model (adapter=...) or your "
                      "quantized (model, tokenizer)")
    delta = round(var_acc - base_acc, 2)
    if _word_count(explanation) < 15:
        raise Missing("explain the difference in at least 15 words (in Chinese: 15 characters)")
    said = _numbers(explanation)
    if not any(abs(abs(x) - abs(delta)) <= 0.51 for x in said) and \
            not all(any(abs(x - acc) <= 0.51 for x in said) for acc in (base_acc, var_acc)):
        raise Missing(f"the explanation should give the change ({delta:+.2f} points) or both accuracies "
                      f"({base_acc}%, {var_acc}%)")
    changed = sum(base_pred[i] != var_pred[i] for i in base_pred)
    return (f"re-scored: {base.model} {base_acc}% → {variant.model} {var_acc}% ({delta:+.2f} points, "
            f"{changed} answers changed); the explanation states it")
