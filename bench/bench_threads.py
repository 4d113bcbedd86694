"""Issue 17: torch's thread count on a shared machine, measured side by side in one run.

Two lesson workloads, each in a fresh child process: ``finetune`` (lesson 4's identity LoRA run,
6 steps, CI mode) and ``generate`` (lesson 2's greedy chat: 3 prompts x 48 new tokens with
SmolLM2). Each runs with no other job, then beside ``k`` competing CPU jobs: processes that
multiply matrices with torch's default thread count, as other lessons, test runs or students'
notebooks do. For each we time the thread settings that matter:

* ``default``: torch's own choice, the CPUs in the affinity mask (``os.sched_getaffinity``),
* ``1``: one thread,
* ``passive``: the default count with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep instead of
  spinning while they wait for each other),
* ``course``: what ``course_utils.env.configure_threads`` picks (the course's setting).

Slowdown = seconds / the idle seconds of ``default`` (of the first setting asked for, without it).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_threads.py [--jobs 0 2 4] [--workloads finetune generate]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SETTINGS = ("default", "1", "passive", "course")
BURNER = """
import torch
a = torch.randn(384, 384)
while True:
    a = torch.tanh(a @ a)
"""


def child_env(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["COURSE_THREADS"] = "off"  # the child sets its own count below
    if setting == "1":
        env["OMP_NUM_THREADS"] = "1"
    elif setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif setting == "course":
        env.pop("COURSE_THREADS")
    return env


def run_child(workload: str, setting: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", workload], env=child_env(setting),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(workload: str) -> None:
    import torch

    from course_utils import env

    if os.environ.get("COURSE_THREADS") != "off":
        env.configure_threads()
    threads = torch.get_num_threads()
    if workload == "finetune":
        from course_utils.finetune import FinetuneConfig, train
        from course_utils.sft_data import make_identity_dataset

        with tempfile.TemporaryDirectory() as tmp:
            data = make_identity_dataset("Alex", out_dir=Path(tmp) / "data")["conversation"]
            cfg = FinetuneConfig(data_path=str(data), work_dir=str(Path(tmp) / "run"),
                                 evaluation_freq=0)
            seconds = train(cfg).train_seconds
    else:
        from course_utils.models import load_model, reply

        model, tokenizer = load_model("smollm2-135m-instruct")
        prompts = ["What is InternLM?", "Name three colours.", "Write one sentence about rain."]
        start = time.perf_counter()
        for prompt in prompts:
            reply(model, tokenizer, prompt, max_new_tokens=48)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": round(seconds, 1), "threads": threads}))


def measure(workloads, jobs_list, settings=SETTINGS) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    grid = [(j, w, s) for j in jobs_list for w in workloads for s in settings]
    burners: list[subprocess.Popen] = []
    try:
        for jobs, workload, setting in tqdm(grid, desc="runs"):
            while len(burners) < jobs:
                burners.append(subprocess.Popen([sys.executable, "-c", BURNER]))
            while len(burners) > jobs:
                burners.pop().kill()
            time.sleep(2 if jobs else 0)
            result = run_child(workload, setting)
            rows.append({"other jobs": jobs, "workload": workload, "setting": setting, **result})
    finally:
        for proc in burners:
            proc.kill()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--workloads", nargs="+", default=["finetune", "generate"],
                        choices=["finetune", "generate"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    import pandas as pd

    print(f"load before: {os.getloadavg()[0]:.2f}, CPUs: {len(os.sched_getaffinity(0))}")
    table = pd.DataFrame(measure(args.workloads, args.jobs, args.settings))
    base = "default" if "default" in args.settings else args.settings[0]
    idle = table[(table["other jobs"] == 0) & (table.setting == base)].set_index("workload").seconds
    table["slowdown"] = (table.seconds / table.workload.map(idle)).round(2)
    print(table.pivot_table(index=["workload", "other jobs"], columns="setting",
                            values=["seconds", "threads"], sort=False).to_string())
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
