"""The sandbox stops what an agent's code must not do, and reports it instead of crashing."""

import pytest

from course_utils.errors import CourseError
from course_utils.sandbox import SandboxResult, isolation, run_python


def test_runs_code_in_a_fresh_scratch_dir():
    res = run_python("import os\nopen('note.txt', 'w').write('hi')\n"
                     "print(open('note.txt').read(), os.getcwd() == os.environ['HOME'])")
    assert res.ok and res.output.strip() == "hi True" and res.error is None


def test_scratch_is_fresh_each_run():
    run_python("open('left.txt', 'w').write('x')")
    res = run_python("import os\nprint(os.listdir('.'))")
    assert res.ok and "left.txt" not in res.output


def test_environment_has_no_secrets(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    res = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('HF_TOKEN'))")
    assert res.ok
    assert "sk-secret" not in res.output and "OPENAI_API_KEY" not in res.output
    assert res.output.strip().endswith("None")


def test_write_outside_scratch_is_stopped(tmp_path):
    target = tmp_path / "escaped.txt"
    res = run_python(f"open({str(target)!r}, 'w').write('x')")
    assert not res.ok and "outside the scratch" in res.error
    assert not target.exists()


def test_rename_and_delete_outside_scratch_are_stopped(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("important")
    res = run_python(f"import os\nos.remove({str(victim)!r})")
    assert not res.ok and "PermissionError" in res.error
    assert victim.read_text() == "important"


def test_reading_the_home_directory_is_stopped(tmp_path, monkeypatch):
    home = tmp_path / "learner"
    home.mkdir()
    (home / ".netrc").write_text("password hunter2")
    monkeypatch.setenv("HOME", str(home))
    res = run_python(f"print(open({str(home / '.netrc')!r}).read())")
    assert not res.ok and "learner's files" in res.error
    assert "hunter2" not in res.output
    listing = run_python(f"import os\nprint(os.listdir({str(home)!r}))")
    assert not listing.ok and ".netrc" not in listing.output


def test_reading_the_course_folder_and_working_directory_is_stopped(tmp_path, monkeypatch):
    from course_utils.paths import REPO_ROOT

    workdir = tmp_path / "project"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("my private notes")
    monkeypatch.chdir(workdir)
    for path in (REPO_ROOT / "README.md", workdir / "notes.txt"):
        res = run_python(f"print(open({str(path)!r}).read()[:40])")
        assert not res.ok and "learner's files" in res.error, path
    assert "private" not in res.output
    # the interpreter (a venv inside the course folder) still works, and so does the scratch dir
    ok = run_python("import json, pathlib\npathlib.Path('x.txt').write_text('1')\nprint(open('x.txt').read())")
    assert ok.ok and ok.output.strip() == "1"


def test_infinite_loop_is_stopped_by_the_timeout():
    res = run_python("while True:\n    pass", timeout=2)
    assert not res.ok and "timed out after 2 s" in res.error
    assert res.seconds < 10


def test_allocating_8_gb_is_stopped():
    res = run_python("data = bytearray(8 * 2**30)\nprint('allocated')", memory_mb=512)
    assert not res.ok and "MemoryError" in res.error and "allocated" not in res.output


def test_fork_bomb_is_stopped():
    res = run_python("import os\nwhile True:\n    os.fork()", timeout=5)
    assert not res.ok and "os.fork" in res.error
    assert res.seconds < 5


def test_subprocess_and_ctypes_escapes_are_stopped():
    sub = run_python("import subprocess\nsubprocess.run(['id'])")
    assert not sub.ok and "processes is not allowed" in sub.error
    libc = run_python("import ctypes\nctypes.CDLL(None).system(b'id')")
    assert not libc.ok and "system()" in libc.error


def test_network_is_cut():
    res = run_python("import socket\ns = socket.socket()\ns.settimeout(2)\n"
                     "s.connect(('127.0.0.1', 9))")
    assert not res.ok and "network access is not allowed" in res.error


def test_file_size_limit():
    res = run_python("open('big.bin', 'wb').write(b'0' * (3 * 2**20))", file_mb=1)
    assert not res.ok  # SIGXFSZ, or an OSError if the signal is ignored


def test_result_string_for_the_agent():
    assert str(SandboxResult(True, "42\n")) == "42\n"
    failed = run_python("1 / 0")
    assert not failed.ok and failed.error == "ZeroDivisionError: division by zero"
    assert str(failed).endswith("[error] ZeroDivisionError: division by zero")
    assert 'File "main.py", line 1' in failed.output


def test_bad_input_is_a_course_error():
    with pytest.raises(CourseError):
        run_python("")
    with pytest.raises(CourseError):
        run_python("print(1)", memory_mb=16)


def test_isolation_report_names_every_layer():
    report = isolation()
    assert report["audit hook (files, processes, sockets)"] == "yes"
    assert "network" in report and report["network"]
