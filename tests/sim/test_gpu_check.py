"""`make gpu-check`'s own plumbing, on the steps a CPU can run; the rest needs InternStudio's GPU."""

import json
import subprocess
import sys

from simenv import ROOT
from test_lmdeploy import parse


def test_cpu_steps_run_and_cuda_steps_are_reported_not_run(tmp_path):
    done = subprocess.run([sys.executable, ROOT / "tools/gpu_check.py", "--allow-cpu", "--out", tmp_path,
                           "--steps", "env,checkpoint,awq,serve"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["step"]: r for r in json.loads((tmp_path / "report.json").read_text())}
    assert [rows[s]["status"] for s in ("env", "checkpoint", "awq", "serve")] == ["ok", "ok", "ok", "not run"]
    assert rows["env"]["detail"].startswith("InternStudio lock") and "W4A16 g128 written (cpu)" in rows["awq"]["detail"]
    assert "| awq | ok |" in (tmp_path / "report.md").read_text()


def test_without_a_gpu_it_refuses_unless_asked(tmp_path):
    done = subprocess.run([sys.executable, ROOT / "tools/gpu_check.py", "--out", tmp_path],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "No CUDA GPU" in done.stdout


def test_the_lmdeploy_chat_it_types_parses(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from gpu_check import Check

    args = parse([str(a) for a in Check(tmp_path, cuda=False).chat_command()])
    assert args.run.__qualname__ == "CLI.chat" and args.backend == "turbomind" and args.cache_max_entry_count == 0.2


def test_cli_runs_this_envs_tools_logs_them_and_raises_on_failure(tmp_path):
    import pytest

    sys.path.insert(0, str(ROOT / "tools"))
    from gpu_check import Check

    check = Check(tmp_path, cuda=False)
    out = check.cli("xtuner", "list-cfg", "-p", "internlm2_5_chat_7b_qlora")
    assert "internlm2_5_chat_7b_qlora_alpaca_e3" in out
    assert [p.name.split("-")[:2] for p in (tmp_path / "logs").iterdir()] == [["xtuner", "list"]]
    with pytest.raises(RuntimeError, match="exited 2"):
        check.cli("lmdeploy", tmp_path / "not-a-command")  # a path argument: the log name must stay a name
