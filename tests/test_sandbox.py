"""The sandbox's everyday behaviour: results, limits, messages, and what happens without a boundary.
The attacks it must contain are in tests/security/test_sandbox_attacks.py."""

import pytest

from course_utils import sandbox
from course_utils.errors import CourseError
from course_utils.sandbox import SandboxResult, isolation, run_python


@pytest.fixture
def no_boundary(monkeypatch):
    """This machine as one without bubblewrap: nothing on PATH."""
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv(sandbox.INSIDE_ENV, raising=False)
    sandbox.boundary_error.cache_clear()
    yield
    sandbox.boundary_error.cache_clear()


def test_runs_code_in_a_fresh_working_folder():
    res = run_python("import os\nopen('note.txt', 'w').write('hi')\n"
                     "print(open('note.txt').read(), os.getcwd() == os.environ['HOME'])")
    assert res.ok and res.output.strip() == "hi True" and res.error is None
    again = run_python("import os\nprint(sorted(os.listdir('.')))")
    assert again.ok and "note.txt" not in again.output


def test_environment_has_no_secrets(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    res = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('HF_TOKEN'))")
    assert res.ok
    assert "sk-secret" not in res.output and "OPENAI_API_KEY" not in res.output
    assert res.output.strip().endswith("None")


def test_infinite_loop_is_stopped_by_the_timeout():
    res = run_python("while True:\n    pass", timeout=2)
    assert not res.ok and "timed out after 2 s" in res.error
    assert res.seconds < 10


def test_allocating_8_gb_is_stopped():
    res = run_python("data = bytearray(8 * 2**30)\nprint('allocated')", memory_mb=512)
    assert not res.ok and "MemoryError" in res.error and "allocated" not in res.output


def test_fork_bomb_hits_the_process_limit():
    res = run_python("import os\nwhile True:\n    os.fork()", timeout=5)
    assert not res.ok and "process limit" in res.error
    assert res.seconds < 6


def test_file_size_limit_is_named():
    res = run_python("open('big.bin', 'wb').write(b'0' * (3 * 2**20))", file_mb=1)
    assert not res.ok and "file size limit is 1 MB" in res.error


def test_output_limit_is_named():
    res = run_python("print('x' * 10**7)")
    assert not res.ok and "output limit" in res.error
    assert len(res.output) <= sandbox.MAX_OUTPUT_CHARS + 100


def test_syntax_error_shows_the_learners_line_only():
    res = run_python("def f(:\n    pass")
    assert not res.ok and res.error.startswith("SyntaxError")
    assert 'File "main.py", line 1' in res.output and "def f(:" in res.output
    assert "_child_main" not in res.output and "<string>" not in res.output


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


def test_isolation_report_is_measured_inside():
    report = isolation()
    assert report["level"] == "os"
    assert report["runs as"] == "uid 65534, no capabilities"
    assert report["network"] == "none (loopback only)"
    seen = report["files it can see"]  # where Python lives differs by machine; these do not
    assert "'sandbox'" in seen and "'usr'" in seen and "'home'" not in seen


def test_without_a_boundary_it_refuses_unless_told(no_boundary):
    assert isolation()["level"] == "none"
    with pytest.raises(CourseError, match="unsandboxed=True") as err:
        run_python("print(1)")
    assert "bubblewrap" in str(err.value)
    res = run_python("print(6 * 7)", unsandboxed=True)
    assert res.ok and res.output.strip() == "42"


def test_the_agent_tool_refuses_without_a_boundary(no_boundary):
    from course_utils.agent import python_tool

    with pytest.raises(CourseError, match="allow_unsandboxed=True"):
        python_tool()
    ret = python_tool(allow_unsandboxed=True).run("print(6 * 7)")
    assert ret.result[0]["content"] == "42"


def test_inside_the_sandbox_run_python_relies_on_the_outer_boundary(monkeypatch):
    """The grader's kernel is already behind the boundary (user namespaces are off in there):
    a nested run gets the limits and a fresh folder, and says whose boundary holds."""
    monkeypatch.setenv(sandbox.INSIDE_ENV, "1")
    res = run_python("import os\nprint(os.getcwd() == os.environ['HOME'], os.getuid() == 0)")
    assert res.ok and res.output.split()[0] == "True"
    assert isolation()["boundary"] == "the course sandbox this code already runs in"
    assert not run_python("while True:\n    pass", timeout=1).ok


def test_a_non_root_caller_gets_the_same_boundary(tmp_path):
    """A learner's laptop: no root, only the inner, unprivileged bwrap. As root (CI), become uid 65534
    first; the system Python stands in for the course's (root's pyenv is closed to other users)."""
    import os
    import subprocess

    from course_utils.paths import REPO_ROOT

    script = ("import sys; sys.path.insert(0, %r)\n"
              "from course_utils import sandbox\n"
              "r = sandbox.run_python('import os\\nprint(os.getuid(), sorted(os.listdir(\"/\")))')\n"
              "print(r.ok, r.output.strip())\n" % str(REPO_ROOT))
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    done = subprocess.run([*drop, "/usr/bin/python3", "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "True 65534" in done.stdout and "'sandbox'" in done.stdout and "'home'" not in done.stdout
