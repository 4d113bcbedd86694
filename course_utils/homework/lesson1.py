"""Checks of homework/01_internlm_stack.ipynb: the environment report and the GPU-memory questions."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .framework import Missing, task, within

# (model, precision, GPU slice, context tokens, batch): "will model X fit on GPU slice Y at precision Z"
MEMORY_QUESTIONS = [
    ("InternLM2.5-1.8B", "fp16", "10% A100 (8 GB)", 4096, 1),
    ("InternLM2.5-7B", "fp16", "10% A100 (8 GB)", 4096, 1),
    ("InternLM2.5-7B", "int4", "10% A100 (8 GB)", 4096, 1),
    ("InternLM2.5-20B", "fp16", "30% A100 (24 GB)", 4096, 1),
    ("InternLM2.5-20B", "int4", "30% A100 (24 GB)", 4096, 1),
    ("InternLM2.5-7B", "int8", "30% A100 (24 GB)", 32768, 2),
    ("InternLM2.5-7B", "fp16", "30% A100 (24 GB)", 32768, 4),
]
MAX_CONTEXT_QUESTION = ("InternLM2.5-7B", "int4", "10% A100 (8 GB)")  # batch 1, fp16 KV cache


ENV_KEYS = ("python", "torch", "cuda", "gpu", "memory_gib", "profile", "chat_model", "chat_model_params")


def _weights_on_disk(folder) -> int | None:
    """Parameters stored in a model folder, counted from the safetensors headers (no tensor is loaded)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def _machine_truth() -> dict:
    """What the grader's side of the machine says, for each key of the report."""
    from ..env import detect, profile
    from ..memory import ModelShape
    from ..models import default_name, resolve

    facts = detect()
    name = default_name("chat")
    try:  # the weights the course really loads: counted from the files, not from the same formula
        folder = resolve(name)
        params = _weights_on_disk(folder) or ModelShape.from_config(
            json.loads((folder / "config.json").read_text(encoding="utf-8"))).params()
    except Exception:  # the model is not on this machine: the learner's resolve() fails the same way
        params = None
    memory = facts.gpu_memory_gb if facts.cuda else facts.ram_gb
    return {"python": facts.python, "torch": facts.torch, "cuda": facts.cuda, "gpu": facts.gpu_name,
            "memory_gib": memory, "profile": profile(), "chat_model": name, "chat_model_params": params}


@task("L1.env", level="basic", title="environment report",
      hint="read each fact from the machine yourself: platform.python_version(), torch.__version__, "
           "torch.cuda.is_available() / get_device_name(0) / get_device_properties(0).total_memory, else "
           "os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') for RAM; profile(), default_name('chat'); "
           "the chat model's parameters: ModelShape.from_config(json of resolve(name) / 'config.json').params()")
def _check_env(answer) -> str:
    truth = _machine_truth()
    if not isinstance(answer, dict):
        raise Missing(f"return a dict with keys {', '.join(ENV_KEYS)}")
    absent = [k for k in ENV_KEYS if k not in answer]
    if absent:
        raise Missing(f"the report lacks {', '.join(absent)}")
    wrong = [f"{k}={answer[k]!r} but this kernel has {truth[k]!r}"
             for k in ("python", "torch", "cuda", "gpu", "profile", "chat_model") if answer[k] != truth[k]]
    mem = answer["memory_gib"]
    where = "GPU memory" if truth["cuda"] else "RAM"
    if isinstance(mem, bool) or not isinstance(mem, (int, float)):
        wrong.append(f"memory_gib should be a number (GiB of {where}), got {type(mem).__name__}")
    elif truth["memory_gib"] and not within(mem, truth["memory_gib"], 0.05):
        wrong.append(f"memory_gib={mem} but this machine's {where} is {truth['memory_gib']} GiB "
                     f"(GiB = 2**30 bytes; GPU memory if CUDA, else RAM)")
    params = answer["chat_model_params"]
    if isinstance(params, bool) or not isinstance(params, (int, float)):
        wrong.append(f"chat_model_params should be a number, got {type(params).__name__}")
    elif truth["chat_model_params"] and not within(params, truth["chat_model_params"], 0.01):
        wrong.append(f"chat_model_params={params:,} but the weights of {truth['chat_model']} hold "
                     f"{truth['chat_model_params']:,} parameters")
    if wrong:
        raise Missing("; ".join(wrong))
    gpu = truth["gpu"] or "no GPU"
    return (f"Python {truth['python']}, torch {truth['torch']}, {gpu}, {truth['memory_gib']} GiB of "
            f"{where}, profile {truth['profile']}, chat model {truth['chat_model']} with "
            f"{truth['chat_model_params']:,} parameters (counted from its weight files): all match this machine")


def _question_total(model: str, precision: str, context: int, batch: int) -> float:
    from ..memory import INTERNLM2_5, total_memory_gb

    return total_memory_gb(INTERNLM2_5[model], precision, context=context, batch=batch)


@task("L1.memory", level="basic", title="memory calculator questions",
      hint="course_utils.memory.total_memory_gb(INTERNLM2_5[model], precision, context=..., batch=...) "
           "<= the slice's size (GPU_BUDGETS_GB, read as GiB like the totals)")
def _check_memory(answer) -> str:
    from ..memory import GPU_BUDGETS_GB

    if not isinstance(answer, (list, tuple)) or len(answer) != len(MEMORY_QUESTIONS):
        raise Missing(f"return a list with one (total_gb, fits) per question: "
                      f"{len(MEMORY_QUESTIONS)} of them")
    wrong = []
    for n, (item, (model, precision, gpu, context, batch)) in enumerate(zip(answer, MEMORY_QUESTIONS), 1):
        total, fits = (item["total_gb"], item["fits"]) if isinstance(item, dict) else item
        expected = _question_total(model, precision, context, batch)
        if not within(total, expected, 0.03):
            wrong.append(f"Q{n} total {float(total):.2f} GiB, expected about {expected:.2f}")
        elif bool(fits) != (expected <= GPU_BUDGETS_GB[gpu]):
            wrong.append(f"Q{n} fits={bool(fits)} but {expected:.2f} GiB vs {GPU_BUDGETS_GB[gpu]} GiB")
    if wrong:
        raise Missing("; ".join(wrong))
    return f"all {len(MEMORY_QUESTIONS)} totals within 3% and every fits/doesn't-fit verdict right"


@task("L1.max_context", level="advanced", title="longest context that fits",
      hint="solve total_memory_gb(shape, 'int4', context=n) <= 8 for n: "
           "(8 - 1 GiB overhead - weights) / kv_bytes_per_token")
def _check_max_context(answer) -> str:
    from ..memory import GPU_BUDGETS_GB

    model, precision, gpu = MAX_CONTEXT_QUESTION
    budget = GPU_BUDGETS_GB[gpu]
    if isinstance(answer, bool) or not isinstance(answer, (int, float)) or answer <= 0:
        raise Missing("return the number of tokens, a positive int")
    n = int(answer)
    if _question_total(model, precision, n, 1) > budget:
        raise Missing(f"{n} tokens need {_question_total(model, precision, n, 1):.4f} GiB > {budget} GiB")
    if _question_total(model, precision, int(n * 1.01) + 1, 1) <= budget:
        raise Missing(f"{n} tokens fit, but so do 1% more: find the largest context")
    return f"{n} tokens fit in {budget} GiB and 1% more would not"
