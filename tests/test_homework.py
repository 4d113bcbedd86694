"""Homework: the check framework, the grader (on fixture notebooks), the shipped student notebooks,
the reference solutions injected into them, and wrong answers that must fail."""

import json
import re
from pathlib import Path

import nbformat
import pytest

from course_utils import grading, homework
from course_utils.paths import REPO_ROOT

HOMEWORK = REPO_ROOT / "homework"
SOLUTIONS = Path(__file__).parent / "homework_solutions"
FIXTURES = Path(__file__).parent / "fixtures" / "homework"
LESSONS = ["01_internlm_stack", "02_chat_and_agents", "03_rag_knowledge_base", "04_xtuner_finetune",
           "05_lmdeploy_quantization", "06_opencompass_evaluation"]


@pytest.fixture(autouse=True)
def scratch_progress(tmp_path, monkeypatch):
    """Never touch the learner's homework/.progress.json."""
    monkeypatch.setenv(homework.PROGRESS_ENV, str(tmp_path / "progress.json"))
    return tmp_path / "progress.json"


def tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def load_solutions(lesson: str) -> dict[str, str]:
    """``{task id: cell source}`` from the ``# %% task:<id>`` sections of a solution file."""
    parts = re.split(r"^# %% task:(\S+)\n", (SOLUTIONS / f"{lesson}.py").read_text(), flags=re.M)
    return {task_id: body.strip() + "\n" for task_id, body in zip(parts[1::2], parts[2::2])}


def inject(lesson: str, dest: Path, replacements: dict[str, str]) -> Path:
    """Copy a homework notebook to ``dest`` with the ``task:<id>`` cells replaced."""
    nb = nbformat.read(HOMEWORK / f"{lesson}.ipynb", as_version=4)
    used = set()
    for cell in nb.cells:
        for tag in tags(cell):
            if tag.startswith("task:") and tag[5:] in replacements:
                cell.source = replacements[tag[5:]]
                used.add(tag[5:])
    assert used == set(replacements), f"no task cell for {set(replacements) - used}"
    dest.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest / f"{lesson}.ipynb")
    return dest / f"{lesson}.ipynb"


def grade_with_solutions(lesson: str, tmp_path: Path):
    path = inject(lesson, tmp_path / "solved", load_solutions(lesson))
    return grading.grade([path], out_dir=tmp_path / "graded", quiet=True)


def assert_all_passed(table, lesson: int):
    assert sorted(table.task) == sorted(t.id for t in homework.lesson_tasks(lesson))
    failed = table[~table.passed]
    assert failed.empty, failed[["task", "detail"]].to_string()


# ---- the framework ------------------------------------------------------------------------------

def test_attempt_turns_stub_and_bug_into_values(capsys):
    def stub():
        raise NotImplementedError("TODO: write me")

    def buggy():
        return 1 / 0

    assert homework.attempt(stub) == homework.NotDone("TODO: write me")
    assert "not done yet: TODO: write me" in capsys.readouterr().out
    crashed = homework.attempt(buggy)
    assert isinstance(crashed, homework.Crashed) and "ZeroDivisionError" in crashed.error
    assert "ZeroDivisionError" in capsys.readouterr().err
    assert homework.attempt(lambda x, y=1: x + y, 1, y=2) == 3


def test_check_never_raises_and_saves_progress(scratch_progress, capsys, monkeypatch):
    def exploding_checker(answer):
        raise KeyError("inside the checker")

    monkeypatch.setitem(homework.TASKS, "L9.boom", homework.Task(
        "L9.boom", 9, "basic", "boom", "a hint", exploding_checker))
    homework.check("L9.boom", 1)
    homework.check("L0.nope", 1)
    homework.check("L1.max_context", None)
    homework.check("L1.env", homework.NotDone("TODO: x"))
    out = capsys.readouterr().out
    assert "❌ L1.max_context: no answer: the task function returned None" in out
    assert "❌ L9.boom: could not check the answer (KeyError" in out and "hint: a hint" in out
    assert "❌ L0.nope: unknown task id" in out
    assert "❌ L1.env: not done yet (TODO: x)" in out
    saved = json.loads(scratch_progress.read_text())
    assert saved["tasks"]["L1.env"]["passed"] is False
    assert set(saved["tasks"]) == {"L9.boom", "L0.nope", "L1.max_context", "L1.env"}


def test_progress_remembers_first_pass_and_student(scratch_progress, capsys):
    homework.start(1, student="Ada")
    homework.record_progress(homework.Result("L1.env", True, "ok"))
    first = homework.load_progress()["tasks"]["L1.env"]["first_passed_at"]
    homework.record_progress(homework.Result("L1.env", False, "broke it"))
    saved = homework.load_progress()
    assert saved["student"] == "Ada"
    assert saved["tasks"]["L1.env"] == {**saved["tasks"]["L1.env"], "passed": False,
                                        "first_passed_at": first}
    homework.start(1)  # the name is remembered
    homework.summary(1)
    out = capsys.readouterr().out
    assert out.count("student: Ada") == 2 and "❌ not yet" in out and "0/3 tasks passed" in out
    scratch_progress.write_text("{not json")
    assert homework.load_progress() == {"tasks": {}}  # a broken file never stops a notebook


def test_each_lesson_module_checks_its_own_notebook():
    for number, notebook in enumerate(LESSONS, 1):
        module = getattr(homework, f"lesson{number}")
        registered = {t.id for t in homework.TASKS.values() if t.checker.__module__ == module.__name__}
        assert registered == {t.id for t in homework.lesson_tasks(number)}
        assert f"homework/{notebook}.ipynb" in module.__doc__


def test_every_lesson_has_basic_and_advanced_tasks():
    for lesson in range(1, 7):
        levels = {t.level for t in homework.lesson_tasks(lesson)}
        assert levels == {"basic", "advanced"}, f"lesson {lesson}: {levels}"
    assert all(t.hint for t in homework.TASKS.values())


# ---- lesson 1 checks: right and wrong answers ----------------------------------------------------

def l1_env_report():
    """The report as a learner writes it: facts read from the machine, parameters counted from config.json."""
    import json
    import os
    import platform

    import torch

    from course_utils.env import profile
    from course_utils.memory import ModelShape
    from course_utils.models import default_name, resolve

    cuda = torch.cuda.is_available()
    memory = (torch.cuda.get_device_properties(0).total_memory if cuda
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2**30
    name = default_name("chat")
    config = json.loads((resolve(name) / "config.json").read_text(encoding="utf-8"))
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "memory_gib": round(memory, 1),
            "profile": profile(), "chat_model": name, "chat_model_params": ModelShape.from_config(config).params()}


def test_l1_checks_recompute_from_the_machine():
    report = l1_env_report()
    assert homework.run_check("L1.env", report).passed
    wrong = homework.run_check("L1.env", {**report, "cuda": not report["cuda"]})
    assert not wrong.passed and "cuda=" in wrong.detail
    assert not homework.run_check("L1.env", "Python 3.11").passed
    # the memory and the parameter count are checked against the machine and the weight files
    assert "memory_gib=" in homework.run_check("L1.env", {**report, "memory_gib": report["memory_gib"] * 2}).detail
    as_gb = {**report, "memory_gib": round(report["memory_gib"] * 2**30 / 1e9, 1)}  # GB, not GiB: 7% more
    assert "memory_gib=" in homework.run_check("L1.env", as_gb).detail
    off = homework.run_check("L1.env", {**report, "chat_model_params": report["chat_model_params"] * 0.9})
    assert "chat_model_params=" in off.detail and "weights of" in off.detail
    old_report = {k: v for k, v in report.items() if k not in ("memory_gib", "chat_model_params")}
    assert "lacks memory_gib, chat_model_params" in homework.run_check("L1.env", old_report).detail


def test_l1_env_counts_parameters_from_the_weight_files(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros((5,), np.float32)}, tmp_path / "x.safetensors")
    save_file({"c": np.zeros((2, 2, 2), np.float32)}, tmp_path / "y.safetensors")
    assert homework.lesson1._weights_on_disk(tmp_path) == 12 + 5 + 8
    assert homework.lesson1._weights_on_disk(tmp_path / "none") is None


def test_l1_memory_and_context_checks_catch_wrong_numbers():
    from course_utils.memory import GIB, GPU_BUDGETS_GB, INTERNLM2_5, kv_bytes_per_token
    from course_utils.memory import total_memory_gb, weight_memory

    right = []
    for model, precision, gpu, context, batch in homework.MEMORY_QUESTIONS:
        total = total_memory_gb(INTERNLM2_5[model], precision, context=context, batch=batch)
        right.append((total, total <= GPU_BUDGETS_GB[gpu]))
    assert homework.run_check("L1.memory", right).passed
    flipped = [right[0], (right[1][0], not right[1][1])] + right[2:]
    assert "Q2 fits=" in homework.run_check("L1.memory", flipped).detail
    weights_only = [(weight_memory(INTERNLM2_5[q[0]], q[1]) / GIB, f) for q, (_, f)
                    in zip(homework.MEMORY_QUESTIONS, right)]  # forgot KV cache and overhead
    assert not homework.run_check("L1.memory", weights_only).passed
    assert not homework.run_check("L1.memory", right[:3]).passed
    shape = INTERNLM2_5["InternLM2.5-7B"]
    best = int((7 * GIB - weight_memory(shape, "int4")) // kv_bytes_per_token(shape))
    assert homework.run_check("L1.max_context", best).passed
    assert not homework.run_check("L1.max_context", best + 500).passed
    assert not homework.run_check("L1.max_context", 4096).passed


# ---- the grader on fixture notebooks -------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_grades(tmp_path_factory):
    out = tmp_path_factory.mktemp("graded")
    return grading.grade([FIXTURES], out_dir=out, quiet=True), out


def test_grader_reads_checks_names_and_crashes(fixture_grades):
    table, out = fixture_grades
    got = {(r.student, r.task): (r.passed, r.detail) for r in table.itertuples()}
    assert got[("Alice", "L1.env")][0] and got[("Alice", "L1.memory")][0]
    assert got[("Alice", "L1.max_context")] == (False, "1000 tokens fit, but so do 1% more: "
                                                       "find the largest context")
    assert got[("bob", "L1.env")][0]  # no name given: the submission folder names the student
    # bob's extra cell raising RuntimeError('boom') is not a task cell: the grader never runs it
    assert got[("bob", "L1.memory")][0]
    assert got[("Carol", "L1.env")][1].startswith("your code raised TypeError")
    # Carol deleted her last check cell: the grader's own copy checks the task anyway
    assert got[("Carol", "L1.max_context")][1].startswith("not done yet (TODO:")
    assert len(table) == 9 and set(table.lesson) == {1}
    assert (out / "alice" / "01_internlm_stack.ipynb").is_file()  # the notebook that ran, for the TA


def test_grader_table(fixture_grades):
    table, _ = fixture_grades
    text = grading.format_table(table)
    assert text.splitlines()[0].split() == grading.COLUMNS
    assert "Alice: 2/3 tasks passed" in text and "bob: 2/3 tasks passed" in text


def test_grade_command_end_to_end(tmp_path):
    """`python -m course_utils grade ... --json` as a TA types it: course_utils/__main__.py's `grade`
    subcommand (arguments from grading.add_arguments) in a fresh interpreter."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "course_utils", "grade", str(FIXTURES / "alice"),
                           "--json", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert {k for row in rows for k in row} >= set(grading.COLUMNS) and len(rows) == 3
    assert [r["passed"] for r in rows] == [True, True, False] and rows[0]["student"] == "Alice"


def test_grader_rejects_empty_and_wrong_paths(tmp_path, capsys):
    assert grading.main([str(tmp_path)]) == 2
    assert "No notebooks" in capsys.readouterr().err
    assert grading.main([str(tmp_path / "missing.txt")]) == 2


# ---- the shipped student notebooks ---------------------------------------------------------------

@pytest.mark.parametrize("lesson", LESSONS)
def test_student_notebook_shape(lesson):
    nb = nbformat.read(HOMEWORK / f"{lesson}.ipynb", as_version=4)
    number = int(lesson[:2])
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.metadata["homework"]["lesson"] == number
    task_ids = [t.id for t in homework.lesson_tasks(number)]
    for kind in ("task", "check"):
        cells = [c for c in nb.cells for t in tags(c) if t.startswith(f"{kind}:")]
        assert sorted(t[len(kind) + 1:] for c in cells for t in tags(c)) == sorted(task_ids)
    for cell in nb.cells:
        for tag in tags(cell):
            if tag.startswith("task:"):
                assert "NotImplementedError(\"TODO:" in cell.source and "homework.attempt(" in cell.source
            if tag.startswith("check:"):
                assert f'homework.check("{tag[6:]}",' in cell.source
        assert not cell.get("outputs"), "student notebooks ship without outputs"
    assert set(load_solutions(lesson)) == set(task_ids)


def test_student_notebooks_run_and_every_check_fails(tmp_path):
    """As shipped, every notebook runs top to bottom and every task reports ❌ 'not done yet'."""
    table = grading.grade([HOMEWORK / f"{name}.ipynb" for name in LESSONS], out_dir=tmp_path,
                          quiet=True)
    assert len(table) == len(homework.TASKS)
    assert not table.passed.any()
    assert table.detail.str.startswith("not done yet (TODO:").all(), table.detail.tolist()


# ---- reference solutions injected into the notebooks ---------------------------------------------

@pytest.mark.parametrize("lesson", [
    pytest.param(n, marks=[pytest.mark.slow] if n > 1 else [], id=LESSONS[n - 1]) for n in range(1, 7)])
def test_reference_solutions_pass(lesson, tmp_path):
    assert_all_passed(grade_with_solutions(LESSONS[lesson - 1], tmp_path), lesson)


# ---- wrong answers must fail ---------------------------------------------------------------------

def test_short_or_padded_story_fails():
    story = " ".join(f"Sentence number {n} of a story about a robot who paints." for n in range(40))
    assert homework.run_check("L2.story", story).passed  # 400 words, all sentences distinct
    short = homework.run_check("L2.story", "Once upon a time a robot learned to paint. The end.")
    assert not short.passed and "11 English words" in short.detail
    padded = homework.run_check("L2.story", "The robot painted a red flower. " * 60)
    assert not padded.passed and "repetition" in padded.detail
    zh = homework.run_check("L2.story", "从前有一个机器人，它每天都在学习画画。" * 5)
    assert not zh.passed and "Chinese characters" in zh.detail  # 字 are counted, not words


@pytest.fixture(scope="module")
def downloaded_files(tmp_path_factory):
    from course_utils import hub

    cache = tmp_path_factory.mktemp("hub")
    with hub.serve_mirror() as mirror:
        return {repo: hub.download(repo, "config.json", endpoint=mirror.endpoint, cache_dir=cache)
                for repo in (homework.lesson2.HUB_REPO, "internlm/internlm2-chat-1_8b")}


def test_download_check_reparses_the_files(downloaded_files):
    answer = {"config": downloaded_files[homework.lesson2.HUB_REPO], "layers": 60, "parameters": 20_088_714_240}
    assert homework.run_check("L2.download", answer).passed
    assert homework.run_check("L2.download", {**answer, "parameters": 20.1e9}).passed  # within 1%
    wrong_layers = homework.run_check("L2.download", {**answer, "layers": 32})
    assert not wrong_layers.passed and "num_hidden_layers=60" in wrong_layers.detail
    assert not homework.run_check("L2.download", {**answer, "parameters": 7e9}).passed
    mirror_copy = REPO_ROOT / "data" / "hub_mirror" / homework.lesson2.HUB_REPO / "config.json"
    assert "mirror's own copy" in homework.run_check("L2.download", {**answer, "config": mirror_copy}).detail
    other_model = {**answer, "config": downloaded_files["internlm/internlm2-chat-1_8b"]}
    assert "not InternLM-20B's" in homework.run_check("L2.download", other_model).detail


def test_story_hint_guides_without_giving_the_code():
    hint = homework.TASKS["L2.story"].hint
    assert "continue" in hint and "write_story(" not in hint and "min_words" not in hint


def fake_eval(tmp_path, name: str, mode: str, model: str, wrong: int, n: int = 10):
    """An evaluate()-like result whose predictions file gets ``wrong`` of ``n`` questions wrong."""
    from types import SimpleNamespace

    from course_utils.eval_data import load_dataset

    records = load_dataset("course_en").records[:n]
    flip = {"A": "B", "B": "C", "C": "D", "D": "A"}
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"id": r["id"], "prediction": flip[r["answer"]] if i < wrong
                                        else r["answer"], "gold": r["answer"], "correct": True,
                                        "weights": f"weights-of-{model}"}) + "\n"
                            for i, r in enumerate(records)))
    return SimpleNamespace(dataset="course_en", mode=mode, model=model, predictions_path=path,
                           accuracy=100.0)  # "correct" and "accuracy" lie: the check re-scores


def test_eval_checks_rescore_the_predictions(tmp_path):
    ppl, gen = fake_eval(tmp_path, "ppl", "ppl", "m", 3), fake_eval(tmp_path, "gen", "gen", "m", 5)
    answer = {"ppl": ppl, "gen": gen, "ppl_accuracy": 70.0, "gen_accuracy": 50.0}
    assert homework.run_check("L6.modes", answer).passed
    lied = homework.run_check("L6.modes", {**answer, "ppl_accuracy": 100.0})
    assert not lied.passed and "scores 70.0" in lied.detail
    assert not homework.run_check("L6.modes", {**answer, "gen": ppl}).passed
    variant = fake_eval(tmp_path, "variant", "ppl", "w4a16", 4)
    words = "because rounding the weights to four bits changes which option the model finds most likely"
    good = {"base": ppl, "variant": variant, "explanation": f"Accuracy fell by 10 points, {words}."}
    assert homework.run_check("L6.compare", good).passed
    assert not homework.run_check("L6.compare", {**good, "explanation": f"It got better, {words}."}).passed
    assert not homework.run_check("L6.compare", {**good, "variant": ppl}).passed  # the same model


def test_forgetting_check_counts_lost_answers(monkeypatch):
    """The check's rule on canned replies: one changed answer is noise, two are forgetting."""
    questions = list(homework.GENERAL_QUESTIONS)
    right = {q: f"It is {homework.GENERAL_QUESTIONS[q][0]}." for q in questions}
    wrong = set()

    def replies(model, tokenizer, question, tokens=32):
        if question == homework.identity_question():
            return "I am an AI.", "I am Ada's assistant."
        return right[question], "I am Ada's assistant." if question in wrong else right[question]

    monkeypatch.setattr(homework.lesson4, "_peft_model", lambda answer: (None, None))
    monkeypatch.setattr(homework.lesson4, "_replies", replies)
    answer = {"name": "Ada", "result": None}
    assert "all 10 general answers" in homework.run_check("L4.forgetting", answer).detail
    wrong.add(questions[0])
    assert homework.run_check("L4.forgetting", answer).passed
    wrong.add(questions[1])
    result = homework.run_check("L4.forgetting", answer)
    assert not result.passed and "forgot 2 of 10" in result.detail
    right[questions[2]] = "I do not know."  # a question the base model gets wrong does not count
    wrong.add(questions[2])
    assert "forgot 2 of 9" in homework.run_check("L4.forgetting", answer).detail


@pytest.mark.slow
def test_untrained_or_unquantized_model_fails(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from course_utils.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    untrained = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    untrained.save_pretrained(tmp_path / "adapter")  # LoRA B starts at zero: the base model's replies
    result = homework.run_check("L4.identity", {"name": "Ada", "adapter": tmp_path / "adapter",
                                                "before": "I am an AI.", "after": "I am Ada's assistant."})
    assert not result.passed and "no 'Ada'" in result.detail
    plain = {"model": model, "tokenizer": tokenizer, "weight_bytes": 1, "perplexity": 1.0}
    assert "no QuantLinear" in homework.run_check("L5.w4a16", plain).detail


