"""course_utils.toolchain: the bootcamp's CLIs started from a lesson, against the real toolchain env."""

import os
import sys
import time
from pathlib import Path

import pytest

from course_utils.errors import CourseError
from course_utils.paths import REPO_ROOT
from course_utils.toolchain import ENV_VAR, run_tool, sanitize, toolchain_bin


def test_a_missing_tool_says_how_to_install_it():
    with pytest.raises(CourseError, match="make toolchain"):
        toolchain_bin("no-such-tool")


def test_the_env_var_wins(tmp_path, monkeypatch):
    tool = tmp_path / "xtuner"
    tool.write_text("#!/bin/sh\necho from-env-var\n")
    tool.chmod(0o755)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert toolchain_bin("xtuner") == tmp_path
    assert run_tool("xtuner", "--version", cwd=tmp_path).log.strip() == "from-env-var"


def test_the_log_keeps_no_machine_path_or_clock(tmp_path):
    line = f"\x1b[32m12/01 21:44:13\x1b[0m - mmengine - \x1b[4m\x1b[97mINFO\x1b[0m - Saving {tmp_path}/work/iter_3.pth from {REPO_ROOT}/.cache/models/m"
    assert sanitize(line, tmp_path) == "[mmengine INFO] Saving ./work/iter_3.pth from <cache>/models/m"


@pytest.mark.parametrize("code, message", [("raise SystemExit(3)", "exit 3"), ("print('ok')", "without writing")])
def test_failures_raise_with_the_log_end(tmp_path, code, message):
    with pytest.raises(CourseError, match=message) as info:
        run_tool("python", "-c", f"print('line one'); {code}", cwd=tmp_path, expect=[tmp_path / "model.pth"])
    assert "line one" in str(info.value)


def test_a_run_past_its_time_is_stopped_with_its_children(tmp_path):
    marker = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(marker)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    start = time.perf_counter()
    with pytest.raises(CourseError, match="ran past 2 s"):
        run_tool("python", "-c", code, cwd=tmp_path, timeout=2)
    assert time.perf_counter() - start < 20
    child = int(marker.read_text())
    time.sleep(0.5)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"  # gone, or dead and unreaped


def test_progress_lines_shown_and_stdin(tmp_path, capsys):
    code = "import sys; [print(f'Iter(train) [{i}/3] loss') for i in (1, 2, 3)]; print(sys.stdin.read().upper())"
    run = run_tool("python", "-c", code, cwd=tmp_path, show=r"Iter", progress=r"\[(\d+)/(\d+)\]", stdin="exit\n")
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("$ python -c") and out.count("\nIter(train)") == 3
    assert run.lines("EXIT") == ["EXIT"] and run.log_file.is_file()


def test_xtuner_of_the_toolchain_lists_the_bootcamp_configs(tmp_path):
    """The real XTuner of the InternStudio env (make toolchain), as lesson 4 runs it."""
    run = run_tool("xtuner", "list-cfg", "-p", "internlm2_chat_1_8b", cwd=tmp_path)
    assert "internlm2_chat_1_8b_qlora_alpaca_e3" in run.log
    assert toolchain_bin("xtuner") != Path(sys.executable).parent  # the CPU env holds no XTuner
