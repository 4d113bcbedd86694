"""The whole GPU path on a CUDA machine with the InternStudio env, offline: `make gpu-check`.

    python tools/gpu_check.py --out build/gpu-check                 # every step
    python tools/gpu_check.py --out build/gpu-check --steps awq,serve
    python tools/gpu_check.py --allow-cpu --steps checkpoint,awq     # the steps a CPU can run

Each step runs on the tiny InternLM2.5-format checkpoint (tools/tiny_internlm2.py, under a fake share
root) and, for the engines, on SmolLM2 too: LMDeploy's pipeline with KV quant policies 0/4/8,
`lmdeploy chat`, the course's `serve()` (LMDeploy api_server) with the OpenAI client, `auto_awq` with
local calibration text then the W4A16 model in TurboMind, a few QLoRA steps, XTuner's
train/convert/merge/chat, OpenCompass on 4 questions, and one lesson notebook in the internstudio
profile. Writes report.md and report.json to --out and exits 1 if any step failed. Nothing is
downloaded. Record the result in README's "Tested versions" table and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
CUDA_STEPS = ("pipeline", "chat", "serve", "qlora", "xtuner", "opencompass", "notebook")
CPU_STEPS = ("env", "checkpoint", "awq")  # awq quantizes on the CPU too; its engine test needs CUDA
PROMPTS = ["Please introduce yourself.", "请介绍一下你自己"]


class Check:
    """Paths and models shared by the steps; each step returns a one-line detail or raises."""

    def __init__(self, out: Path, cuda: bool):
        self.out, self.cuda, self.device = out, cuda, "cuda" if cuda else "cpu"
        self.share = out / "share"
        self.awq_dir = out / "internlm2-w4a16"

    @property
    def tiny(self) -> Path:
        from tiny_internlm2 import CHAT_NAME

        from course_utils.models import REGISTRY

        return self.share / REGISTRY[CHAT_NAME].share_path

    def smollm2(self) -> Path:
        from course_utils.models import resolve

        return resolve("smollm2-135m-instruct")

    def cli(self, *args, stdin: str | None = None, timeout: int = 900) -> str:
        """Run a console script of this env (xtuner, lmdeploy, opencompass); its output."""
        exe = Path(sys.executable).with_name(str(args[0]))
        env = {**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ['PATH']}"}
        done = subprocess.run([str(exe), *map(str, args[1:])], capture_output=True, text=True, input=stdin,
                              timeout=timeout, cwd=self.out, env=env)
        output = done.stdout + done.stderr
        (self.out / "logs").mkdir(exist_ok=True)
        (self.out / "logs" / f"{args[0]}-{Path(str(args[1])).stem}-{time.strftime('%H%M%S')}.log").write_text(output)
        if done.returncode:
            raise RuntimeError(f"{' '.join(map(str, args[:3]))} exited {done.returncode}: {output[-1500:]}")
        return output

    # ---- steps ---------------------------------------------------------------------------------
    def env(self) -> str:
        from course_utils.models import doctor

        table = doctor()
        (self.out / "doctor.txt").write_text(table.to_string())
        return f"{table.loc['env', 'value']}; GPU {table.loc['gpu name', 'value']} ({table.loc['gpu memory gb', 'value']} GB)"

    def checkpoint(self) -> str:
        from tiny_internlm2 import build_share

        build_share(self.share)
        return f"tiny InternLM2.5 at {self.tiny.relative_to(self.out)}; SmolLM2 at {self.smollm2().name}"

    def pipeline(self) -> str:
        from course_utils import lmdeploy_lite as ll

        seen = []
        for folder, policies in ((self.tiny, (0, 8, 4)), (self.smollm2(), (0,))):
            for policy in policies:
                pipe = ll.make_pipeline(str(folder), quant_policy=policy, cache_max_entry_count=0.2)
                stats = ll.pipeline_benchmark(pipe, PROMPTS, max_new_tokens=32)
                pipe.close()
                if stats["tokens"] < 1:
                    raise RuntimeError(f"{folder.name} quant_policy={policy} generated nothing")
                seen.append(f"{folder.name} kv{policy or 16}: {stats['tokens/s']:.0f} tok/s")
        return "; ".join(seen)

    def chat_command(self) -> list:
        """`lmdeploy chat` as a learner types it (a double Enter ends a prompt; "exit" quits)."""
        return ["lmdeploy", "chat", self.tiny, "--backend", "turbomind", "--cache-max-entry-count", "0.2"]

    def chat(self) -> str:
        out = self.cli(*self.chat_command(), stdin=f"{PROMPTS[0]}\n\nexit\n\n", timeout=600)
        if "double enter to end input" not in out:
            raise RuntimeError(f"lmdeploy chat showed no prompt: {out[-800:]}")
        return "lmdeploy chat answered and exited"

    def serve(self) -> str:
        from course_utils import serving

        replies = []
        for model, extra in ((str(self.tiny), {}), (str(self.smollm2()), {}),
                             *([(str(self.awq_dir), {"model_format": "awq", "quant_policy": 8})]
                               if (self.awq_dir / "config.json").is_file() else [])):
            with serving.serve(model, backend="lmdeploy", port=serving.free_port(), cache_max_entry_count=0.2,
                               **extra) as server:
                client = serving.client(server)
                reply = client.chat.completions.create(model=server.model, max_tokens=16, temperature=0,
                                                       messages=[{"role": "user", "content": PROMPTS[0]}])
                parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model=server.model, max_tokens=16, temperature=0, stream=True,
                    messages=[{"role": "user", "content": PROMPTS[0]}]) if c.choices]
                if "".join(parts) != reply.choices[0].message.content:
                    raise RuntimeError(f"{server.model}: streamed and whole replies differ")
                replies.append(f"{server.model} ready in {server.started_s:.0f} s")
        return "; ".join(replies)

    def awq(self) -> str:
        from course_utils import lmdeploy_lite as ll
        from course_utils.lmdeploy_awq import AwqJob, run_auto_awq

        job = AwqJob(model=str(self.tiny), work_dir=str(self.awq_dir), calib_samples=8, calib_seqlen=256,
                     device=self.device)
        run_auto_awq(job)
        config = json.loads((self.awq_dir / "config.json").read_text())["quantization_config"]
        detail = f"W4A16 g{config['group_size']} written ({self.device})"
        if self.cuda:
            pipe = ll.make_pipeline(str(self.awq_dir), model_format="awq", quant_policy=8, cache_max_entry_count=0.2)
            stats = ll.pipeline_benchmark(pipe, PROMPTS, max_new_tokens=32)
            pipe.close()
            detail += f"; TurboMind W4A16 + KV int8: {stats['tokens/s']:.0f} tok/s"
        return detail

    def qlora(self) -> str:
        from course_utils.finetune import FinetuneConfig, merge_adapter, train
        from course_utils.sft_data import make_identity_dataset

        os.environ["COURSE_OUTPUT_DIR"] = str(self.out / "outputs")
        data = make_identity_dataset("Ada", base="InternLM2.5-1.8B", repeats=4)
        cfg = FinetuneConfig(model=str(self.tiny), data_path=str(data["conversation"]), quantization="4bit",
                             max_steps=12, lr=1e-2, evaluation_freq=6, save_steps=6)
        result = train(cfg)
        losses = result.log.loss.tolist()
        if not losses[-1] < 0.8 * losses[0]:
            raise RuntimeError(f"QLoRA did not learn: losses {losses}")
        merge_adapter(str(self.tiny), result.adapter_dir, self.out / "qlora-merged")
        return f"loss {losses[0]:.2f} -> {losses[-1]:.2f} in {result.train_seconds} s, peak {result.peak_memory_gb} GB; merged"

    def xtuner(self) -> str:
        from course_utils.finetune import FinetuneConfig, export_xtuner_config
        from course_utils.sft_data import make_identity_dataset

        data = make_identity_dataset("Ada", base="InternLM2.5-1.8B", repeats=4, out_dir=self.out / "xtuner-data")
        cfg = FinetuneConfig(model=str(self.tiny), data_path=str(data["conversation"]), quantization="4bit",
                             max_steps=3, batch_size=2, evaluation_freq=2, eval_max_new_tokens=8, save_steps=3)
        config = export_xtuner_config(cfg, self.out / "xtuner_qlora.py", device="cuda")
        work = self.out / "xtuner-work"
        self.cli("xtuner", "train", config, "--work-dir", work)
        last = Path((work / "last_checkpoint").read_text().strip())  # xtuner exits 0 even on failure
        self.cli("xtuner", "convert", "pth_to_hf", config, last, work / "hf")
        self.cli("xtuner", "convert", "merge", self.tiny, work / "hf", work / "merged")
        chat = self.cli("xtuner", "chat", work / "merged", "--prompt-template", "internlm2_chat",
                        "--max-new-tokens", "12", "--temperature", "0", stdin=f"{PROMPTS[0]}\n\nEXIT\n\n")
        return f"QLoRA {last.name} -> hf adapter -> merged -> chat ({len(chat)} chars)"

    def opencompass(self) -> str:
        from course_utils.evaluate import export_opencompass_config

        rows = []
        for mode in ("gen", "ppl"):
            config = self.out / f"opencompass_{mode}.py"
            export_opencompass_config([str(self.tiny)], ["course_en"], config, mode=mode, test_range="[0:4]",
                                      work_dir=str(self.out / f"opencompass-{mode}"),
                                      data_root=str(ROOT / "data/eval"), num_gpus=1)
            self.cli("opencompass", config, "--debug")
            [summary] = (self.out / f"opencompass-{mode}").glob("*/summary/summary_*.csv")
            rows.append(f"{mode}: {summary.read_text().splitlines()[-1]}")
        return "; ".join(rows)

    def notebook(self) -> str:
        from course_utils.notebooks import execute_notebook

        path = ROOT / "notebooks" / "05_lmdeploy_quantization.ipynb"
        result = execute_notebook(path, out=self.out / "notebooks" / path.name,
                                  html=self.out / "notebooks" / path.with_suffix(".html").name)
        if result.status != "ok":
            raise RuntimeError(f"{path.name}: {result.error}")
        return f"{path.name} ran end to end in {result.seconds} s (internstudio profile)"


def run(steps: list[str], out: Path, cuda: bool) -> list[dict]:
    """Run ``steps`` in order; one row per step, failures recorded, never raised."""
    check, rows = Check(out, cuda), []
    for step in steps:
        start = time.perf_counter()
        if step in CUDA_STEPS and not cuda:
            rows.append({"step": step, "status": "not run", "seconds": 0, "detail": "needs a CUDA GPU"})
            continue
        try:
            detail, status = getattr(check, step)(), "ok"
        except Exception as exc:  # a failed step is a result: report it and go on
            detail, status = f"{type(exc).__name__}: {exc}"[:1500], "FAILED"
            (out / "logs").mkdir(exist_ok=True)
            (out / "logs" / f"{step}.traceback").write_text(traceback.format_exc())
        rows.append({"step": step, "status": status, "seconds": round(time.perf_counter() - start, 1),
                     "detail": detail})
        print(f"[{status}] {step} ({rows[-1]['seconds']} s): {detail}", flush=True)
    return rows


def write_report(rows: list[dict], out: Path) -> Path:
    """report.json and report.md: one row per step."""
    (out / "report.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    lines = ["# GPU check", "", f"{time.strftime('%Y-%m-%d %H:%M')}", "", "| step | status | seconds | detail |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['detail'].replace('|', '/')} |" for r in rows]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "report.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "build" / "gpu-check"))
    parser.add_argument("--steps", default=",".join(CPU_STEPS[:2] + CUDA_STEPS[:3] + CPU_STEPS[2:] + CUDA_STEPS[3:]))
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (CUDA steps: not run)")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("No CUDA GPU here: run this on InternStudio (or pass --allow-cpu for the CPU steps).")
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(COURSE_PROFILE="internstudio", COURSE_SHARE_ROOTS=str(out / "share"), HF_HUB_OFFLINE="1",
                      HF_DATASETS_OFFLINE="1", COURSE_OUTPUT_DIR=str(out / "outputs"))
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(CPU_STEPS + CUDA_STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; choose from {', '.join(CPU_STEPS + CUDA_STEPS)}")
    if "checkpoint" not in steps and not (out / "share").is_dir():
        steps.insert(0, "checkpoint")  # every other step needs the tiny checkpoint
    rows = run(steps, out, cuda)
    print(f"report: {write_report(rows, out)}")
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
