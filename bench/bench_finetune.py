"""Lesson 4 benchmark: the notebook's default LoRA run vs a plain Trainer+peft baseline.

Measures, in one process on the tiny profile: training seconds, whether (and at which evaluation)
the greedy reply becomes the exact target self-introduction, and peak RSS. The baseline uses
the bootcamp's XTuner QLoRA hyper-parameters (r=64, alpha=16, dropout=0.1, lr=2e-4, batch 1 x
accumulation 16, 3 epochs, warm-up 3%) as plain LoRA on the same tokenised data, without any
course_utils training code. ``--qlora`` adds a 4-bit NF4 run on the CPU.

``--names`` (issue 17) trains the identity data of six names (one word, two words, accents,
Chinese, a long one, a hyphen) with today's defaults and with the defaults before issue 17, side by
side: whether the final greedy reply is the exact self-introduction, the first step at which it is
(a teacher-forced check after every step, its time not counted), training seconds as ``train``
reports them (with the replies at the start and the end), the optimizer steps' seconds alone, and
CPU seconds.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_finetune.py [--qlora | --names]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_average() -> str:
    """The 1-minute load average: timings on a shared 2-core machine mean little without it."""
    return f"{os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})"


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def course_run(data_path: Path, work: Path, target: str, **overrides) -> dict:
    """The notebook's default config through course_utils.finetune.train."""
    from course_utils.finetune import FinetuneConfig, train

    cfg = FinetuneConfig(data_path=str(data_path), work_dir=str(work), **overrides)
    result = train(cfg)
    hits = result.eval_replies[(result.eval_replies.question == cfg.evaluation_inputs[0])
                               & (result.eval_replies.reply == target)]
    return {"train_s": result.train_seconds, "steps": result.global_step,
            "exact_at_step": int(hits.step.min()) if len(hits) else None,
            "final_exact": result.replies[cfg.evaluation_inputs[0]] == target,
            "peak_rss_gb": result.peak_memory_gb}


NAMES = ["Alex", "Mei Lin", "José García", "张伟", "Maximilian Schwarzenegger", "Anne-Marie"]
OLD_DEFAULTS = {"lr": 1e-3, "max_epochs": 3, "max_length": 64}  # FinetuneConfig before issue 17


def exact_probe(tokenizer, question: str, target: str):
    """A callback that checks after every step whether greedy decoding would give ``target``.

    One teacher-forced forward: the reply is exact iff each next token (and the end marker) is the
    argmax. Its own wall and CPU time are recorded so that they can be left out of the timing.
    """
    import torch
    from transformers import TrainerCallback

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    wanted = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, wanted = torch.tensor([prompt_ids + wanted]), torch.tensor(wanted)

    class ExactProbe(TrainerCallback):
        def __init__(self):
            self.steps, self.spent_s, self.spent_cpu, self.steps_s = [], 0.0, 0.0, 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()  # after the hook's step-0 replies (it runs first)

        def on_step_end(self, args, state, control, model=None, **kw):
            wall, cpu = time.perf_counter(), time.process_time()
            self.steps_s = wall - self.start - self.spent_s  # the optimizer steps alone so far
            was_training = model.training
            model.eval()  # no dropout in the check
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1]
            model.train(was_training)
            if bool((logits.argmax(-1) == wanted).all()):
                self.steps.append(state.global_step)
            self.spent_s += time.perf_counter() - wall
            self.spent_cpu += time.process_time() - cpu

    return ExactProbe()


def name_run(name: str, work: Path, **overrides) -> dict:
    """One identity fine-tune for ``name`` (CI mode: replies only at the start and the end)."""
    from transformers import AutoTokenizer

    from course_utils.finetune import FinetuneConfig, train
    from course_utils.models import resolve
    from course_utils.sft_data import identity_reply, make_identity_dataset

    target = identity_reply(name, "SmolLM2-135M")
    data = make_identity_dataset(name, out_dir=work / "data")["conversation"]
    cfg = FinetuneConfig(data_path=str(data), work_dir=str(work / "run"), evaluation_freq=0,
                         **overrides)
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model))
    probe = exact_probe(tokenizer, cfg.evaluation_inputs[0], target)
    cpu = time.process_time()
    result = train(cfg, callbacks=[probe])
    train_s = result.train_seconds - probe.spent_s
    final = result.replies[cfg.evaluation_inputs[0]]
    return {"name": name, "exact": final == target, "exact from step": min(probe.steps, default=None),
            "steps": result.global_step, "train s": round(train_s, 1),
            "steps s": round(probe.steps_s, 1), "s/step": round(probe.steps_s / result.global_step, 2),
            "cpu s": round(time.process_time() - cpu - probe.spent_cpu, 1),
            "peak RSS GiB": result.peak_memory_gb, "final reply": final}


def names_table(tmp: Path) -> object:
    """Every name with the old and the new defaults, one row each (pandas DataFrame)."""
    import pandas as pd

    rows = []
    for label, overrides in (("defaults before issue 17", OLD_DEFAULTS), ("defaults now", {})):
        for i, name in enumerate(NAMES):
            print(f"{label}: {name} (load {load_average()})", flush=True)
            row = name_run(name, tmp / f"{'old' if overrides else 'new'}{i}", **overrides)
            rows.append({"config": label, **row, "load": f"{os.getloadavg()[0]:.2f}"})
    return pd.DataFrame(rows)


def baseline_run(data_path: Path, work: Path, target: str) -> dict:
    """Plain Trainer + peft with the bootcamp's XTuner defaults, on the same examples."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from course_utils.models import reply
    from course_utils.models import resolve
    from course_utils.sft_data import build_examples, collate, load_conversations

    torch.manual_seed(0)
    folder = resolve("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    examples = build_examples(tokenizer, load_conversations(data_path), 64)
    args = TrainingArguments(output_dir=str(work), per_device_train_batch_size=1,
                             gradient_accumulation_steps=16, num_train_epochs=3, learning_rate=2e-4,
                             warmup_steps=0.03, lr_scheduler_type="cosine", max_grad_norm=1.0,
                             use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
                             logging_steps=1, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=lambda b: collate(b, tokenizer.pad_token_id))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    answer = reply(model, tokenizer, "Please introduce yourself.", max_new_tokens=24)
    return {"train_s": round(seconds, 1), "steps": trainer.state.global_step,
            "exact_at_step": None, "final_exact": answer == target, "final_reply": answer}


def nf4_storage_check() -> dict:
    """Bytes bitsandbytes really stores for NF4 + double quant vs the estimate's 4.127 bits/weight."""
    import bitsandbytes as bnb

    from course_utils.models import load_model

    model, _ = load_model("smollm2-135m-instruct", quantization="4bit")
    params = stored = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            params += m.in_features * m.out_features
            stored += m.weight.numel() * m.weight.element_size() + qs.absmax.nbytes
            stored += qs.state2.absmax.nbytes if qs.nested else 0
    return {"linear params": params, "bits/weight measured": round(8 * stored / params, 3),
            "bits/weight estimate": round(8 * (0.5 + 1 / 64 + 4 / (64 * 256)), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--qlora", action="store_true", help="also time QLoRA (NF4) on the CPU")
    parser.add_argument("--names", action="store_true",
                        help="exactness over six names, old vs new defaults (issue 17)")
    args = parser.parse_args(argv)
    from course_utils.compat import quiet_libraries
    from course_utils.paths import outputs_dir
    from course_utils.sft_data import identity_reply, make_identity_dataset

    quiet_libraries()
    if args.names:
        return names_main(outputs_dir() / "bench" / "finetune_names.json")
    target = identity_reply("Alex", "SmolLM2-135M")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_identity_dataset("Alex", out_dir=Path(tmp) / "data")["conversation"]
        print("load average before:", load_average(), flush=True)
        rows["course default (notebook)"] = course_run(data, Path(tmp) / "course", target)
        rows["course default, no eval hook"] = course_run(data, Path(tmp) / "course-noeval", target,
                                                          evaluation_freq=0)
        rows["plain Trainer+peft, bootcamp hparams"] = baseline_run(data, Path(tmp) / "base", target)
        if args.qlora:
            rows["course QLoRA 4-bit on CPU"] = course_run(data, Path(tmp) / "qlora", target,
                                                           quantization="4bit")
        print("load average after:", load_average())
        storage = nf4_storage_check()
        print("NF4 storage:", storage)
    rows = {name: {**row, "peak_rss_gb": row.get("peak_rss_gb", peak_rss_gb())}
            for name, row in rows.items()}
    import pandas as pd

    print(pd.DataFrame(rows).T.to_string())
    out = outputs_dir() / "bench" / "finetune.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"load_average": load_average(), "runs": rows, "nf4": storage},
                              indent=1))
    ok = rows["course default (notebook)"]["final_exact"]
    return 0 if ok else 1


def names_main(out: Path) -> int:
    """``--names``: the per-name table, old vs new defaults, in one process."""
    import contextlib
    import io

    print("load average before:", load_average(), flush=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as log:
        table = names_table(Path(tmp))
    print("".join(line + "\n" for line in log.getvalue().splitlines() if "(load" in line), end="")
    print("load average after:", load_average())
    print(table.drop(columns="final reply").to_string(index=False))
    garbled = table[~table.exact]
    for _, row in garbled.iterrows():
        print(f"not exact ({row.config}, {row['name']}): {row['final reply']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table.to_dict("records"), ensure_ascii=False, indent=1) + "\n")
    return 0 if table[table.config == "defaults now"].exact.all() else 1


if __name__ == "__main__":
    sys.exit(main())
