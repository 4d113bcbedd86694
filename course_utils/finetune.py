"""LoRA / QLoRA fine-tuning in the shape of an XTuner run, on the Hugging Face ``Trainer``.

``FinetuneConfig`` mirrors the five parts of an XTuner config; ``train(cfg)`` runs it (LoRA on
the CPU, QLoRA NF4 through bitsandbytes on a GPU or, when asked, on the CPU), prints the
model's replies every ``evaluation_freq`` steps like XTuner's ``EvaluateChatHook``, saves
checkpoints every ``save_steps`` and resumes from the last one with ``resume=True``.
``merge_adapter`` folds the adapter into a full-precision base and checks the reply first;
``export_xtuner_config`` writes the same run as a real XTuner config file.
Data and tokenisation live in ``course_utils.sft_data`` and are re-exported here (one import per lesson).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .compat import quiet_libraries
from .errors import CourseError, is_number, is_whole
from .models import reply
from .sft_data import *  # noqa: F403  re-exported: a notebook needs one import per lesson

PARTS = {  # XTuner config part -> {FinetuneConfig field: XTuner variable name}
    "1 settings": {"data_path": "data_path", "work_dir": "--work-dir",
                   "seed": "randomness.seed"},
    "2 model & tokenizer": {"model": "pretrained_model_name_or_path",
                            "quantization": "model.llm.quantization_config", "lora_r": "model.lora.r",
                            "lora_alpha": "model.lora.lora_alpha", "lora_dropout": "model.lora.lora_dropout",
                            "lora_targets": "model.lora.target_modules"},
    "3 dataset & dataloader": {"max_length": "max_length",
                               "pack_to_max_length": "pack_to_max_length",
                               "batch_size": "batch_size"},
    "4 scheduler & optimizer": {"accumulative_counts": "accumulative_counts",
                                "max_epochs": "max_epochs", "max_steps": "max_iters",
                                "lr": "lr", "weight_decay": "weight_decay",
                                "max_norm": "max_norm", "warmup_ratio": "warmup_ratio"},
    "5 runtime": {"system_prompt": "SYSTEM", "evaluation_inputs": "evaluation_inputs",
                  "evaluation_freq": "evaluation_freq",
                  "eval_max_new_tokens": "EvaluateChatHook.max_new_tokens",
                  "save_steps": "save_steps", "save_total_limit": "save_total_limit",
                  "gradient_checkpointing": "model.use_activation_checkpointing"},
}


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Defaults suit the tiny profile (SmolLM2-135M on a 2-core CPU)."""

    # PART 1 settings
    data_path: str | None = None  # None: the identity dataset make_identity_dataset() wrote
    work_dir: str | None = None  # None: outputs/finetune/run
    seed: int = 42
    # PART 2 model & tokenizer
    model: str | None = None  # registry name or folder; None: the profile's chat model
    quantization: str | None = None  # "4bit": QLoRA (NF4 + double quant); None: plain LoRA
    lora_r: int = 8
    lora_alpha: int = 16  # the update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.0
    lora_targets: str | list[str] = "all-linear"  # XTuner's default: every linear layer
    # PART 3 dataset & dataloader
    max_length: int = 128  # tokens per row, longer ones cut (a batch pads only to its longest row)
    pack_to_max_length: bool = False  # concatenate short examples into max_length rows
    batch_size: int = 4  # rows per step and device
    # PART 4 scheduler & optimizer
    accumulative_counts: int = 1  # gradient accumulation: optimizer step every N batches
    # 2 epochs at lr 2.5e-3 (6 steps on the identity data): the exact reply for every name measured,
    # in two-thirds of the steps of 3 epochs at 1e-3; 3e-3 leaks it into other answers (issue 17)
    max_epochs: float = 2
    max_steps: int | None = None  # when set, overrides max_epochs (optimizer steps)
    lr: float = 2.5e-3
    weight_decay: float = 0.0
    max_norm: float = 1.0  # gradient clipping
    warmup_ratio: float = 0.0  # linear warm-up share, then cosine decay
    # PART 5 runtime
    system_prompt: str | None = None  # None: the chat template's own default
    evaluation_inputs: list[str] = field(
        default_factory=lambda: ["Please introduce yourself.", "Who are you?"])
    evaluation_freq: int = 3  # EvaluateChatHook: print replies every N steps (0: only at the end)
    eval_max_new_tokens: int = 24  # the target reply is ~15 tokens
    save_steps: int = 3  # checkpoint every N steps (resume=True starts from the last one)
    save_total_limit: int = 2
    gradient_checkpointing: bool = False  # recompute activations: less memory, ~30% slower

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides) -> "FinetuneConfig":
        """The tiny defaults, or the bootcamp's XTuner QLoRA settings on InternStudio."""
        from .env import profile as active_profile

        base = GPU_SETTINGS if (profile or active_profile()) == "internstudio" else {}
        return cls(**{**base, **overrides})

    def table(self):
        """The config as a table grouped like an XTuner config file."""
        import pandas as pd

        rows = [(part, xtuner, name, repr(_shown(getattr(self, name))))
                for part, names in PARTS.items() for name, xtuner in names.items()]
        return pd.DataFrame(rows, columns=["part", "XTuner name", "field", "value"]).set_index(
            ["part", "field"])


def _shown(value):
    """Paths inside the repository as repo-relative strings (no absolute paths in outputs)."""
    from .paths import REPO_ROOT

    if isinstance(value, (str, Path)) and os.path.isabs(value):
        try:
            return str(Path(value).resolve().relative_to(REPO_ROOT))
        except ValueError:
            return str(value)
    return value


# The bootcamp's internlm2_5_chat_*_qlora_*_e3 settings (XTuner configs), for a CUDA GPU.
GPU_SETTINGS = dict(
    model="internlm2_5-1_8b-chat", quantization="4bit", lora_r=64, lora_alpha=16,
    lora_dropout=0.1, max_length=2048, pack_to_max_length=True, batch_size=1,
    accumulative_counts=16, max_epochs=3, lr=2e-4, warmup_ratio=0.03,
    evaluation_inputs=["请介绍一下你自己", "Please introduce yourself"], evaluation_freq=10,
    eval_max_new_tokens=128, save_steps=20, gradient_checkpointing=True,
)


@dataclass
class TrainResult:
    """What ``train`` returns; ``model``/``tokenizer`` are the trained PEFT model, still loaded."""

    adapter_dir: Path
    train_seconds: float
    global_step: int
    log: object  # pandas DataFrame: step, epoch, loss, lr
    eval_replies: object  # pandas DataFrame: step, question, reply
    peak_memory_gb: float  # peak RSS of this process (CPU) or peak CUDA memory (GPU)
    resumed_from: int | None = None
    model: object = field(default=None, repr=False)
    tokenizer: object = field(default=None, repr=False)

    @property
    def replies(self) -> dict[str, str]:
        """The last evaluation's reply to each evaluation input."""
        last = self.eval_replies[self.eval_replies.step == self.eval_replies.step.max()]
        return dict(zip(last.question, last.reply))


def _callbacks(cfg: FinetuneConfig, tokenizer, sink: dict):
    """The concise step log and the EvaluateChatHook, as ``TrainerCallback`` objects."""
    from transformers import TrainerCallback

    class ConciseLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                sink["log"].append({"step": state.global_step, "epoch": round(state.epoch, 2),
                                    "loss": logs["loss"], "lr": logs.get("learning_rate")})
                print(f"step {state.global_step:>3}/{state.max_steps}  loss {logs['loss']:.3f}")

    class EvaluateChat(TrainerCallback):
        def evaluate(self, model, step):
            was_training = model.training
            model.eval()
            for q in cfg.evaluation_inputs:
                text = reply(model, tokenizer, q, system=cfg.system_prompt,
                             max_new_tokens=cfg.eval_max_new_tokens)
                sink["eval"].append({"step": step, "question": q, "reply": text})
                print(f"  [eval @ step {step}] {q} -> {text}")
            model.train(was_training)

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.evaluate(model, state.global_step)

        def on_log(self, args, state, control, logs=None, model=None, **kw):
            # on_log (after ConciseLog's line), not on_step_end: the step's loss prints first
            due = cfg.evaluation_freq and state.global_step % cfg.evaluation_freq == 0
            if logs and "loss" in logs and due:
                self.evaluate(model, state.global_step)

        def on_train_end(self, args, state, control, model=None, **kw):
            if not sink["eval"] or sink["eval"][-1]["step"] != state.global_step:
                self.evaluate(model, state.global_step)

    return [ConciseLog(), EvaluateChat()]


def _paths(cfg: FinetuneConfig) -> tuple[Path, Path]:
    from .paths import outputs_dir

    for name in ("data_path", "work_dir"):  # "" would silently mean the default, like None
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise CourseError(f"{name} must be a path (text) or None, not a "
                              f"{type(value).__name__}.")
        if value is not None and not str(value).strip():
            raise CourseError(f"{name} is an empty string: give a path, or None for the default.")
    work = Path(cfg.work_dir) if cfg.work_dir else outputs_dir() / "finetune" / "run"
    if work.exists() and not work.is_dir():
        raise CourseError(f"work_dir={str(work)!r} is a file: give a folder for the checkpoints "
                          "and the adapter.")
    default_data = outputs_dir() / "finetune" / "data" / "identity.json"
    data = Path(cfg.data_path) if cfg.data_path else default_data
    if cfg.data_path is None and not data.is_file():
        raise CourseError("No dataset yet: run make_identity_dataset('your name') first, or set "
                          "FinetuneConfig(data_path=...).")
    return work, data


def _check(cfg: FinetuneConfig) -> None:
    """Every field a learner sets, checked before anything slow (a NaN lr trains NaN losses)."""
    if not isinstance(cfg, FinetuneConfig):
        raise CourseError(f"train() needs a FinetuneConfig, not a {type(cfg).__name__}: "
                          "train(FinetuneConfig(lr=..., ...)).")
    if cfg.quantization not in (None, "4bit"):
        raise CourseError(f"quantization={cfg.quantization!r}: use None (LoRA) or '4bit' (QLoRA).")
    for name in ("lora_r", "max_length", "batch_size", "accumulative_counts", "save_steps",
                 "eval_max_new_tokens"):
        value = getattr(cfg, name)
        if not is_whole(value) or value < 1:
            raise CourseError(f"{name}={value!r} must be a whole number of at least 1.")
    for name in ("max_steps", "save_total_limit"):
        value = getattr(cfg, name)
        if value is not None and (not is_whole(value) or value < 1):
            raise CourseError(f"{name}={value!r} must be None or a whole number of at least 1.")
    if not is_whole(cfg.evaluation_freq) or cfg.evaluation_freq < 0:
        raise CourseError(f"evaluation_freq={cfg.evaluation_freq!r} must be a whole number >= 0 "
                          "(0: replies only at the start and the end).")
    if not is_whole(cfg.seed) or not 0 <= cfg.seed < 2**32:
        raise CourseError(f"seed={cfg.seed!r} must be a whole number from 0 to 2**32 - 1.")
    for name in ("lr", "max_epochs", "lora_alpha"):
        value = getattr(cfg, name)
        if not is_number(value) or value <= 0:
            raise CourseError(f"{name}={value!r} must be a finite number above 0 (no quotes, not "
                              "NaN or inf).")
    for name in ("weight_decay", "max_norm"):
        value = getattr(cfg, name)
        if not is_number(value) or value < 0:
            raise CourseError(f"{name}={value!r} must be a finite number >= 0.")
    if not is_number(cfg.lora_dropout) or not 0 <= cfg.lora_dropout < 1:
        raise CourseError(f"lora_dropout={cfg.lora_dropout!r} must be a number from 0 up to (not "
                          "including) 1.")
    if not is_number(cfg.warmup_ratio) or not 0 <= cfg.warmup_ratio <= 1:
        raise CourseError(f"warmup_ratio={cfg.warmup_ratio!r} must be a share from 0 to 1 "
                          "(0.03: the first 3% of the steps).")
    for name in ("pack_to_max_length", "gradient_checkpointing"):
        if not isinstance(getattr(cfg, name), bool):
            raise CourseError(f"{name}={getattr(cfg, name)!r} must be True or False.")
    targets = cfg.lora_targets
    if not (isinstance(targets, str) and targets.strip()) and not (
            isinstance(targets, (list, tuple)) and targets
            and all(isinstance(t, str) and t.strip() for t in targets)):
        raise CourseError(f"lora_targets={targets!r}: use 'all-linear', or a list of module names "
                          "such as ['q_proj', 'v_proj'].")
    if cfg.system_prompt is not None and not isinstance(cfg.system_prompt, str):
        raise CourseError(f"system_prompt must be text or None, not a "
                          f"{type(cfg.system_prompt).__name__}.")
    if isinstance(cfg.evaluation_inputs, str):  # a string would be asked one letter at a time
        raise CourseError(f"evaluation_inputs={cfg.evaluation_inputs!r:.60} is one string: put "
                          "the question(s) in a list, e.g. evaluation_inputs=['Who are you?'].")
    if not cfg.evaluation_inputs:
        raise CourseError("evaluation_inputs is empty: give at least one question to watch.")
    for i, question in enumerate(cfg.evaluation_inputs):
        if not isinstance(question, str) or not question.strip():
            raise CourseError(f"evaluation_inputs[{i}]={question!r} must be a non-empty question "
                              "(text).")


def _check_model(cfg: FinetuneConfig) -> None:
    """The model folder, checked on disk before torch and peft are even imported."""
    from .models import check_model_folder, resolve

    check_model_folder(resolve(cfg.model))


def load_for_training(cfg: FinetuneConfig):
    """``(peft_model, tokenizer)``: the base model (4-bit for QLoRA) with fresh LoRA adapters."""
    import torch
    from peft import prepare_model_for_kbit_training

    from .models import load_model

    torch.manual_seed(cfg.seed)  # LoRA's A matrices are drawn here
    model, tokenizer = load_model(cfg.model, quantization=cfg.quantization)
    if cfg.quantization:  # fp32 norms/head and input grads, as XTuner does for QLoRA
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return add_lora(model, cfg), tokenizer


def add_lora(model, cfg: FinetuneConfig):
    """The lesson's LoRA: small trainable matrices B·A beside the frozen linear layers."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets,  # "all-linear": every linear layer but the head
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)  # base weights frozen; only lora_A / lora_B train


def make_trainer(cfg: FinetuneConfig, model, tokenizer, examples, callbacks=()):
    """The lesson's Hugging Face ``Trainer``: the FinetuneConfig's fields as ``TrainingArguments``."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from .compat import warmup_kwargs
    from .sft_data import collate

    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(_paths(cfg)[0]), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.accumulative_counts, num_train_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps or -1, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_norm, lr_scheduler_type="cosine", **warmup_kwargs(cfg.warmup_ratio),
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed,
        bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda, optim="adamw_torch",
        report_to=[], disable_tqdm=True, remove_unused_columns=False, dataloader_pin_memory=cuda)
    trainer = Trainer(model=model, args=args, train_dataset=examples, callbacks=list(callbacks),
                      data_collator=lambda rows: collate(rows, tokenizer.pad_token_id))  # pads, labels -100
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; the lesson prints its own lines
    return trainer


def _peak_memory_gb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB -> GiB


def _complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last: without a readable one, a save was cut off."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any((checkpoint / name).is_file() for name in (
        "adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin"))


def _start_step(work: Path, resume: bool, cfg: FinetuneConfig) -> str | None:
    """The checkpoint to resume from; without ``resume`` old checkpoints are cleared.

    A checkpoint a killed run was still writing is removed (it would be rewritten anyway, and
    the Trainer cannot load it); the newest complete one is used instead.
    """
    found = sorted(((int(m.group(1)), p) for p in work.glob("checkpoint-*")
                    if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))), reverse=True)
    if not resume:
        for _, old in found:
            shutil.rmtree(old)  # a fresh run must not mix with an older one's checkpoints
        return None
    complete = [p for _, p in found if _complete(p)]
    torn = [p for _, p in found if p not in complete]
    for p in torn:
        shutil.rmtree(p)
    names = ", ".join(p.name for p in torn)
    cut = f"{names} {'was' if len(torn) == 1 else 'were'} cut off while saving"
    if not complete:
        print(f"resume=True but no complete checkpoint in the work dir ({cut}, removed): starting "
              "from step 0." if torn else "resume=True but no checkpoint in the work dir: starting "
              "from step 0.")
        return None
    last = complete[0]
    if torn:
        print(f"{cut} (trainer_state.json missing or unreadable) and removed; resuming from "
              f"{last.name}.")
    try:  # other LoRA shapes fail deep in the Trainer's load with a tensor size mismatch
        lora = json.loads((last / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        lora = None
    if isinstance(lora, dict) and "r" in lora:
        if (lora.get("r"), lora.get("lora_alpha")) != (cfg.lora_r, cfg.lora_alpha):
            raise CourseError(f"{last.name} was saved with lora_r={lora.get('r')}, "
                              f"lora_alpha={lora.get('lora_alpha')}; this config has "
                              f"lora_r={cfg.lora_r}, lora_alpha={cfg.lora_alpha}: resume with the "
                              "settings it was saved with, or train(cfg) without resume=True to "
                              "start over.")
    return str(last)


def train(cfg: FinetuneConfig | None = None, *, resume: bool = False, callbacks=()) -> TrainResult:
    """Fine-tune with LoRA/QLoRA as ``cfg`` says; returns the adapter folder, log and replies."""
    from .sft_data import build_examples, load_conversations

    cfg = FinetuneConfig() if cfg is None else cfg
    _check(cfg)  # every check before the imports below, which take seconds
    work, data = _paths(cfg)
    conversations = load_conversations(data)
    _check_model(cfg)
    checkpoint = _start_step(work, resume, cfg)
    import pandas as pd
    from transformers import set_seed

    quiet_libraries()
    set_seed(cfg.seed)
    model, tokenizer = load_for_training(cfg)
    examples = build_examples(tokenizer, conversations, cfg.max_length, pack=cfg.pack_to_max_length)
    sink = {"log": [], "eval": []}
    trainer = make_trainer(cfg, model, tokenizer, examples,
                           callbacks=_callbacks(cfg, tokenizer, sink) + list(callbacks))
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except KeyboardInterrupt:
        print("Interrupted. Continue from the last checkpoint with train(cfg, resume=True).")
        raise
    seconds = time.perf_counter() - start
    adapter_dir = save_adapter(model, tokenizer, cfg, work / "adapter")
    return TrainResult(adapter_dir, round(seconds, 1), trainer.state.global_step,
                       pd.DataFrame(sink["log"]), pd.DataFrame(sink["eval"]), _peak_memory_gb(),
                       int(Path(checkpoint).name.split("-")[1]) if checkpoint else None,
                       model.eval(), tokenizer)


def stop_after(step: int):
    """A callback that ends training after optimizer step ``step``, as a crash or a closed laptop would.

    Nothing is saved on the way out: a resumed run starts from the newest ``checkpoint-N`` before it.
    """
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= step:
                control.should_training_stop = True
                control.should_save = False  # a crash writes nothing at this step

    return StopAfter()


def save_adapter(model, tokenizer, cfg: FinetuneConfig, out: Path) -> Path:
    """Save the LoRA adapter in PEFT format (what ``xtuner convert pth_to_hf`` writes) + config."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "finetune_config.json").write_text(json.dumps(asdict(cfg), indent=1, ensure_ascii=False))
    return out


def plot_loss(log, title: str = "training loss"):
    """The loss per optimizer step as a line plot; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(log["step"], log["loss"], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)  # shown once by the notebook's display, not twice
    return fig


def compare_replies(model, tokenizer, questions: dict[str, list[str]], *, base: bool = True,
                    max_new_tokens: int = 32):
    """A table of replies per question: the base (adapter switched off) and the fine-tuned model."""
    import pandas as pd

    rows = []
    for kind, qs in questions.items():
        for q in qs:
            row = {"kind": kind, "question": q}
            if base:
                with model.disable_adapter():
                    row["base"] = reply(model, tokenizer, q, max_new_tokens=max_new_tokens)
            row["fine-tuned"] = reply(model, tokenizer, q, max_new_tokens=max_new_tokens)
            rows.append(row)
    return pd.DataFrame(rows)


def base_answers(model, tokenizer, questions: list[str], *, max_new_tokens: int = 48) -> list[dict]:
    """The base model's own replies as ``{"input", "output"}`` pairs, to mix into the training data.

    Training on them keeps those answers as they were (a guard against forgetting); on a PEFT
    model the adapter is switched off while they are generated.
    """
    import contextlib

    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with off:
        return [{"input": q, "output": reply(model, tokenizer, q, max_new_tokens=max_new_tokens)}
                for q in questions]


def _is_quantized(model) -> bool:
    flags = ("is_loaded_in_4bit", "is_loaded_in_8bit")
    quantizer = getattr(model, "hf_quantizer", None)
    return any(getattr(model, f, False) for f in flags) or quantizer is not None


def _full_precision_base(base, adapter: Path):
    """Load (or accept) the base model, refusing anything quantized."""
    from .models import load_model, read_config, resolve

    if base is None:
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    if isinstance(base, tuple):
        model, tokenizer = base
    else:
        config = read_config(resolve(base))
        if "quantization_config" in config:
            raise CourseError(f"{base} is a quantized checkpoint; merge into the full-precision "
                              "original instead.")
        model, tokenizer = load_model(base)
    if _is_quantized(model):
        raise CourseError("The base is loaded in 4/8 bit: merging a LoRA adapter into quantized "
                          "weights gives wrong replies. Load it in full precision "
                          "(load_model(name) without quantization) and merge into that.")
    return model, tokenizer


def merge_adapter(base, adapter: str | Path, out: str | Path, *,
                  prompts: list[str] | None = None) -> Path:
    """Merge a LoRA adapter into a full-precision base and save it, after checking the replies.

    ``base`` is a registry name, a folder, ``(model, tokenizer)`` (merged in place) or None
    (the base recorded in the adapter). The merged model must give the same greedy reply as
    base+adapter to every prompt, else nothing is written.
    """
    from peft import PeftModel

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise CourseError(f"{adapter.name!r} has no adapter_config.json: pass train()'s "
                          "adapter_dir.")
    quiet_libraries()
    model, tokenizer = _full_precision_base(base, adapter)
    prompts = prompts or _adapter_prompts(adapter)
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    expected = [reply(peft_model, tokenizer, p) for p in prompts]
    merged = peft_model.merge_and_unload()
    for p, want in zip(prompts, expected):
        got = reply(merged, tokenizer, p)
        if got != want:
            raise CourseError(f"Merged model answers {p!r} with {got!r}, base+adapter with "
                              f"{want!r}: not saved. Is the base the one the adapter was "
                              "trained on?")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # a half-written folder never carries the final name
    return out


def _adapter_prompts(adapter: Path) -> list[str]:
    saved = adapter / "finetune_config.json"
    if saved.is_file():
        return list(json.loads(saved.read_text())["evaluation_inputs"])
    return ["Please introduce yourself."]


def _xtuner_model_path(name: str | None) -> str:
    """What XTuner should load: a local folder (the share's, or the tiny model converted once), else the hub id."""
    from .models import REGISTRY, default_name, locate, resolve

    name = name or default_name("chat")
    if name not in REGISTRY:
        return str(Path(name).resolve())
    place, folder = locate(name)
    if place in ("bundled", "cache"):  # the tiny model: offline, from its converted safetensors folder
        return str(resolve(name).resolve())
    return str(folder) if place != "missing" else REGISTRY[name].hf_id


# The linear layers peft's "all-linear" adapts, by model type: XTuner's own search would also adapt
# InternLM2's output head (it skips only lm_head), so the exported run would differ from the course's.
ALL_LINEAR = {"internlm2": ["wqkv", "wo", "w1", "w2", "w3"],
              "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# CPU only: XTuner 0.2 asks torch.cpu.is_bf16_supported() (xtuner/model/sft.py), which torch 2.5
# lacks; mmengine reads this config with lazy imports, so the patch must reach the real torch.
CPU_PATCH = ("# CPU only: XTuner 0.2.0 calls torch.cpu.is_bf16_supported(), which torch 2.5 does not have.\n"
             "setattr(__import__('torch').cpu, 'is_bf16_supported', lambda: False)\n")


def _lora_targets(cfg: FinetuneConfig, model_path: str):
    if cfg.lora_targets != "all-linear":
        return repr(list(cfg.lora_targets))
    config = Path(model_path) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    return repr(ALL_LINEAR[model_type]) if model_type in ALL_LINEAR else None


def export_xtuner_config(cfg: FinetuneConfig, path: str | Path, *, device: str | None = None) -> Path:
    """Write a real XTuner config for the same run (``xtuner train PATH``).

    ``device``: "cuda" (AMP fp16, as the bootcamp runs it) or "cpu" (fp32; XTuner's AMP wrapper
    needs a GPU); default: this machine's.
    """
    from string import Template

    from .paths import DATA_DIR

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise CourseError(f"device={device!r}: use 'cuda' or 'cpu'.")
    if device == "cpu" and cfg.quantization:
        raise CourseError("QLoRA (quantization='4bit') in XTuner needs a CUDA GPU: bitsandbytes 0.45 "
                          "(XTuner's pin) quantizes on CUDA only. Export with quantization=None for the CPU.")
    _check(cfg)
    path = Path(path)
    _, data = _paths(cfg)
    model_path = _xtuner_model_path(cfg.model)
    per_step = cfg.accumulative_counts  # XTuner iterations are batches, not optimizer steps
    bnb = ("dict(type=BitsAndBytesConfig, load_in_4bit=True, load_in_8bit=False, "
           "llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False, "
           "bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=True, "
           "bnb_4bit_quant_type='nf4')")
    messages = data.suffix == ".jsonl" and '"messages"' in data.read_text(encoding="utf-8")[:2000]
    values = dict(
        config_name=path.name, run_name=path.stem, device=device, model_path=repr(model_path),
        model_path_plain=model_path, data_path=repr(str(data.resolve())),
        data_format="OpenAI messages" if messages else "XTuner conversation",
        dataset_map_fn="openai_map_fn" if messages else "None",
        max_length=cfg.max_length, pack_to_max_length=cfg.pack_to_max_length,
        batch_size=cfg.batch_size, accumulative_counts=cfg.accumulative_counts,
        max_epochs=cfg.max_epochs, max_iters=cfg.max_steps and cfg.max_steps * per_step,
        lr=cfg.lr, weight_decay=cfg.weight_decay, max_norm=cfg.max_norm,
        warmup_ratio=cfg.warmup_ratio, save_iters=cfg.save_steps * per_step,
        save_total_limit=cfg.save_total_limit,
        evaluation_iters=max(cfg.evaluation_freq, 1) * per_step,
        eval_max_new_tokens=cfg.eval_max_new_tokens,
        log_interval=1 if cfg.max_steps and cfg.max_steps * per_step <= 50 else 10,  # short runs: every loss
        system=repr(cfg.system_prompt or ""),
        evaluation_inputs=repr(list(cfg.evaluation_inputs)),
        quantization_config=bnb if cfg.quantization == "4bit" else "None",
        lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=_lora_targets(cfg, model_path), gradient_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
        optim_wrapper="AmpOptimWrapper" if device == "cuda" else "OptimWrapper",
        torch_dtype="torch.float16" if device == "cuda" else "torch.float32",
        amp=",\n    loss_scale='dynamic',\n    dtype='float16'" if device == "cuda" else "",
        cpu_patch=CPU_PATCH if device == "cpu" else "",
    )
    template = Template((DATA_DIR / "finetune" / "xtuner_config.py.tmpl").read_text())
    text = template.substitute(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# NF4 with double quantization, bytes per weight: 4-bit codes, an 8-bit scale per 64 weights, and an
# fp32 scale of those scales per 256 blocks.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


def lora_parameter_count(shape, r: int) -> int:
    """Trainable parameters of rank-``r`` LoRA on every linear layer of a llama-style model."""
    h, inter = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # r * (in + out) per adapted matrix: q, k, v, o, gate, up, down
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h)
    return shape.layers * r * per_layer


def estimate_qlora_memory(shape, cfg: FinetuneConfig | None = None) -> dict[str, float]:
    """GiB a QLoRA run needs on a GPU, by part (an estimate; see docs/benchmarks.md for sources).

    ``shape`` is a ``course_utils.memory.ModelShape``. NF4 with double quantization stores
    ``NF4_BYTES * 8`` (~4.13) bits per linear weight; peft's prepare_model_for_kbit_training keeps embeddings and
    the output head in fp32; LoRA weights, grads and AdamW moments take 16 bytes per parameter;
    with gradient checkpointing each layer keeps its bf16 input, and the loss holds fp32 logits
    (and their gradient) for every token.
    """
    cfg = cfg or FinetuneConfig.for_profile("internstudio")
    h, inter = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim  # projection widths
    linear = h * (q + 2 * kv) + q * h + 3 * h * inter  # per layer: q, k, v, o, gate, up, down
    embed = shape.vocab * h * (1 if shape.tied_embeddings else 2)
    tokens = cfg.batch_size * cfg.max_length
    layer_act = 34 * tokens * h  # bytes one bf16 layer keeps for backward (Korthikanti et al.)
    act = shape.layers * tokens * h * 2 + layer_act if cfg.gradient_checkpointing else \
        shape.layers * layer_act  # with checkpointing: each layer's input + one recomputed layer
    parts = {
        "4-bit linear weights": shape.layers * linear * NF4_BYTES,
        "fp32 embeddings + head": embed * 4,
        "LoRA weights+grads+AdamW": lora_parameter_count(shape, cfg.lora_r) * 16,
        "activations": act,
        "logits + grad (fp32)": tokens * shape.vocab * 4 * 2,
        "CUDA context + allocator": 1.0 * 2**30,
    }
    parts = {k: round(v / 2**30, 2) for k, v in parts.items()}
    parts["total"] = round(sum(parts.values()), 2)
    return parts


# ---- reading what the XTuner command line wrote ----------------------------------------------------------

def xtuner_setting(path: str | Path, name: str) -> str | None:
    """The source text of one setting in an XTuner config: ``lr`` or a nested key such as ``model.lora.r``."""
    import ast

    source = Path(path).read_text(encoding="utf-8")
    first, *keys = name.split(".")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == first for t in node.targets):
            value = node.value
            for key in keys:  # dict(type=..., lora=dict(r=...)): follow the keyword arguments
                found = [k.value for k in getattr(value, "keywords", []) if k.arg == key]
                if not found:
                    return None
                value = found[0]
            return ast.get_source_segment(source, value)
    return None


# (what, name in the bootcamp's config, name in the course's export)
XTUNER_ROWS = [("base model", "pretrained_model_name_or_path", "pretrained_model_name_or_path"),
               ("data", "alpaca_en_path", "data_path"), ("max_length", "max_length", "max_length"),
               ("batch_size", "batch_size", "batch_size"),
               ("accumulative_counts", "accumulative_counts", "accumulative_counts"),
               ("max_epochs", "max_epochs", "max_epochs"), ("lr", "lr", "lr"),
               ("quantization", "model.llm.quantization_config", "model.llm.quantization_config"),
               ("LoRA r / alpha", "model.lora.r", "model.lora.r"),
               ("optimizer wrapper", "optim_wrapper.type", "optim_wrapper.type"),
               ("precision", "optim_wrapper.dtype", "optim_wrapper.dtype"),
               ("evaluation_freq", "evaluation_freq", "evaluation_freq")]


def compare_xtuner_configs(bootcamp: str | Path, course: str | Path):
    """The bootcamp's config next to the course's export, setting by setting (machine paths hidden)."""
    import pandas as pd

    from .toolchain import sanitize

    def value(path, name):
        text = xtuner_setting(path, name)
        if name == "model.lora.r":
            text = f"{text} / {xtuner_setting(path, 'model.lora.lora_alpha')}"
        if text and "quantization_config" in name and "load_in_4bit=True" in text:
            text = "4-bit NF4 (QLoRA)"
        if name == "optim_wrapper.dtype" and text is None:
            text = "fp32 (no AMP)"
        return "—" if text is None else " ".join(sanitize(text).split())

    rows = [(what, b, value(bootcamp, b), c, value(course, c)) for what, b, c in XTUNER_ROWS]
    return pd.DataFrame(rows, columns=["setting", "bootcamp name", "bootcamp", "course name", "course (CPU)"]
                        ).set_index("setting")


def xtuner_samples(log: str, every: int):
    """EvaluateChatHook's replies in an ``xtuner train`` log, one row per (iteration, question).

    ``every``: the config's ``evaluation_freq`` (the hook logs no iteration number of its own).
    """
    import pandas as pd

    rows, step, last = [], None, 0
    for block in re.split(r"(?=\b(?:before_train|after_train_iter|after_train) in EvaluateChatHook)|(?=Sample output:)"
                          r"|(?=Iter\(train\) \[)", log):
        if m := re.match(r"Iter\(train\) \[\s*(\d+)/", block):
            last = int(m.group(1))
        elif block.startswith("before_train in"):
            step = 0
        elif block.startswith("after_train_iter in"):
            step = (step or 0) + every
        elif block.startswith("after_train in"):
            step = last  # the hook asks once more at the end, which repeats the last evaluation when they coincide
        elif step is not None and (m := re.search(
                r"<\|im_start\|>user\n(.*?)<\|im_end\|>\n<\|im_start\|>assistant\n(.*?)(?:<\|im_end\|>|\n\n|$)",
                block, re.S)):
            rows.append({"iter": step, "question": m.group(1).strip(), "reply": m.group(2).strip()})
    table = pd.DataFrame(rows, columns=["iter", "question", "reply"])
    return table.drop_duplicates(["iter", "question"]).reset_index(drop=True)


def xtuner_chat_reply(log: str) -> str:
    """The first reply in an ``xtuner chat`` session's output (its prompt is ``... >>> ``)."""
    parts = log.split(">>> ")
    if len(parts) < 3:
        raise CourseError("xtuner chat printed no reply; its output ends:\n" + log[-1500:])
    text = parts[1].rsplit("double enter to end input", 1)[0].replace("<|im_end|>", "")
    # transformers' warnings (stderr, same stream here) and XTuner's history note are not the reply
    noise = ("Remove the memory of history", "The attention mask", "Setting `pad_token_id`", "`", "Starting from v4")
    lines = [ln for ln in text.splitlines()  # Python warnings: "path:line: UserWarning: ..." + indented source
             if not ln.startswith(noise) and not re.search(r"\w+Warning: ", ln) and not ln.startswith("  ")]
    return "\n".join(lines).strip()
