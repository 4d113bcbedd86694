"""The grader trusts only its own execution: forged submissions get 0, secrets and files stay out.

Each submission is lesson 1's homework (the fastest to run) with its task cells replaced; the right
answers are in tests/homework_solutions/01_internlm_stack.py.
"""

import json
import os
import re
import socket
from pathlib import Path

import nbformat
import pytest

from course_utils import grading, homework
from course_utils.paths import REPO_ROOT

LESSON = "01_internlm_stack"
TASKS = [t.id for t in homework.lesson_tasks(1)]
SOLUTIONS = REPO_ROOT / "tests" / "homework_solutions" / f"{LESSON}.py"
FORGED = {"output_type": "display_data", "metadata": {},
          "data": {"text/plain": "✅", homework.MIME: {"event": "check", "task": "L1.env",
                                                      "passed": True, "detail": "forged", "hint": ""}}}


def solutions() -> dict[str, str]:
    parts = re.split(r"^# %% task:(\S+)\n", SOLUTIONS.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def submission(tmp_path: Path, cells: dict[str, str], *, forged_outputs: bool = False,
               checks: dict[str, str] | None = None, name: str = "student") -> Path:
    """Lesson 1's notebook with task cells (and ``checks``: check cells) replaced; optionally every
    cell carries forged ✅ outputs."""
    nb = nbformat.read(REPO_ROOT / "homework" / f"{LESSON}.ipynb", as_version=4)
    for cell in nb.cells:
        for tag in cell.metadata.get("tags", []):
            if tag.startswith("task:") and tag[5:] in cells:
                cell.source = cells[tag[5:]]
            if tag.startswith("check:") and tag[6:] in (checks or {}):
                cell.source = checks[tag[6:]]
        if forged_outputs and cell.cell_type == "code":
            cell.outputs = [nbformat.from_dict({**FORGED, "data": {**FORGED["data"], homework.MIME: {
                **FORGED["data"][homework.MIME], "task": task}}}) for task in TASKS]
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / f"{LESSON}.ipynb")
    return folder / f"{LESSON}.ipynb"


def grade(path: Path, tmp_path: Path, **kw):
    return grading.grade([path], out_dir=tmp_path / "graded", quiet=True, **kw)


def test_reference_solutions_pass_through_the_sandbox(tmp_path):
    """The control: the same machinery gives full marks to real work."""
    table = grade(submission(tmp_path, solutions()), tmp_path)
    assert table.passed.all() and sorted(table.task) == sorted(TASKS), table.to_string()


def test_a_displayed_check_record_is_not_a_pass(tmp_path):
    """The submission's check cells display forged records instead of checking."""
    forge = ("from IPython.display import display\n"
             f"display({{'text/plain': '✅', {homework.MIME!r}: "
             "{'event': 'check', 'task': TASK, 'passed': True, 'detail': 'forged', 'hint': ''}}, raw=True)\n")
    checks = {t: f"TASK = {t!r}\n" + forge for t in TASKS}
    table = grade(submission(tmp_path, {}, checks=checks), tmp_path)
    assert not table.passed.any(), table.to_string()


def test_stored_outputs_after_a_crash_are_not_read(tmp_path):
    crash = "raise RuntimeError('stop here')\n"
    table = grade(submission(tmp_path, {"L1.env": crash}, forged_outputs=True), tmp_path)
    assert not table.passed.any(), table.to_string()
    assert table.detail.str.contains("stopped before its check").all()


@pytest.mark.slow
def test_stored_outputs_after_a_timeout_are_not_read(tmp_path):
    loop = "while True:\n    pass\n"
    table = grade(submission(tmp_path, {"L1.env": loop}, forged_outputs=True), tmp_path, timeout=15)
    assert not table.passed.any(), table.to_string()
    assert table.detail.str.contains("per-cell limit").all()


@pytest.mark.slow
def test_the_notebook_time_limit_holds(tmp_path):
    """Many cells that each stay under the per-cell limit still stop at the notebook's limit."""
    slow = "import time\ntime.sleep(8)\nreport = None\n"
    cells = {t: slow for t in TASKS}
    table = grade(submission(tmp_path, cells), tmp_path, timeout=30, notebook_timeout=12)
    assert not table.passed.any() and table.detail.str.contains("time limit").any(), table.to_string()


def test_patching_the_checks_inside_the_kernel_changes_nothing(tmp_path):
    patch = ("from course_utils import homework as h\n"
             "for t in h.TASKS.values():\n"
             "    object.__setattr__(t, 'checker', lambda answer: 'patched')\n"
             "h.run_check = lambda task_id, answer: h.Result(task_id, True, 'patched')\n"
             "report = {'python': 'forged'}\n")
    table = grade(submission(tmp_path, {"L1.env": patch}), tmp_path)
    assert not table.passed.any() and not table.detail.str.contains("patched").any()


def test_secrets_network_and_files_stay_out(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADER_SECRET_TOKEN", "tok-7f3a9c")
    canary = tmp_path / "host-canary.txt"
    canary.write_text("host-only-4411")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    probe = (
        "import os, socket, glob\n"
        "seen = []\n"
        "seen.append(os.environ.get('GRADER_SECRET_TOKEN'))\n"
        "for p in glob.glob('/proc/*/environ'):\n"
        "    try: seen.append(open(p, 'rb').read().decode(errors='ignore'))\n"
        "    except OSError: pass\n"
        f"for p in [{str(canary)!r}, {str(SOLUTIONS)!r}, {str(REPO_ROOT / 'README.md')!r}]:\n"
        "    try: seen.append(open(p).read())\n"
        "    except OSError as e: seen.append(type(e).__name__)\n"
        "s = socket.socket(); s.settimeout(2)\n"
        f"seen.append(str(s.connect_ex(('127.0.0.1', {port}))))\n"
        "print(seen)\n"
        "report = {'seen': seen}\n")
    table = grade(submission(tmp_path, {"L1.env": probe}), tmp_path)
    ran = (tmp_path / "graded" / "student" / f"{LESSON}.ipynb").read_text()
    assert "FileNotFoundError" in ran  # the probe ran and printed
    for secret in ("tok-7f3a9c", "host-only-4411", "def environment_report", "InternLM Bootcamp"):
        assert secret not in ran and not table.detail.str.contains(secret).any(), secret
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing reached the host's loopback
    listener.close()


def test_answers_pointing_outside_are_refused(tmp_path):
    """Paths in an answer may only lead into the submission's own folder or the course data."""
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"model_type": "internlm2", "hidden_size": 2048}))
    escape = ("import os, pathlib\n"
              "pathlib.Path('link.json').unlink(missing_ok=True)\n"
              f"os.symlink({str(secret)!r}, 'link.json')\n"
              "report = {'config': pathlib.Path('link.json').absolute(), "
              f"'index': pathlib.Path({str(secret)!r})}}\n")
    # after L1.env's answer is saved, a later cell swaps it for a link to a host file
    swap = ("import os, glob\n"
            "saved = os.path.join(os.environ['COURSE_HOMEWORK_EVIDENCE'], 'L1.memory', 'answer.json')\n"
            "os.remove(saved)\n"
            f"os.symlink({str(secret)!r}, saved)\n"
            "max_context = 1\n")
    table = grade(submission(tmp_path, {"L1.env": escape, "L1.max_context": swap}), tmp_path)
    rows = {r.task: r for r in table.itertuples()}
    assert not rows["L1.env"].passed and "outside the folders the grader reads" in rows["L1.env"].detail
    assert not rows["L1.memory"].passed and "outside the folders" in rows["L1.memory"].detail


def test_grading_needs_the_sandbox(tmp_path, monkeypatch):
    from course_utils import sandbox

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv(sandbox.INSIDE_ENV, raising=False)
    sandbox.boundary_error.cache_clear()
    try:
        assert grading.main([str(submission(tmp_path, {}))]) == 2
    finally:
        sandbox.boundary_error.cache_clear()
