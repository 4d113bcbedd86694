"""Reference solutions for homework/01_internlm_stack.ipynb.

Each ``# %% task:<id>`` section replaces the notebook cell tagged ``task:<id>`` (tests/test_homework.py).
"""

# %% task:L1.env
import json
import os
import platform

from course_utils.env import profile
from course_utils.memory import ModelShape
from course_utils.models import default_name, resolve


def environment_report() -> dict:
    """Facts read from this machine: python, torch, cuda, gpu, memory_gib, profile, chat_model, chat_model_params."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        gpu, memory = props.name, props.total_memory / 2**30
    else:
        gpu, memory = None, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    name = default_name("chat")
    config = json.loads((resolve(name) / "config.json").read_text(encoding="utf-8"))
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": cuda, "gpu": gpu,
            "memory_gib": round(memory, 1), "profile": profile(), "chat_model": name,
            "chat_model_params": ModelShape.from_config(config).params()}


report = homework.attempt(environment_report)

# %% task:L1.memory
from course_utils.memory import GPU_BUDGETS_GB, INTERNLM2_5, total_memory_gb


def answer_memory_questions(questions) -> list[tuple[float, bool]]:
    """For each (model, precision, gpu, context, batch): (total GiB, fits on the slice?)."""
    answers = []
    for model, precision, gpu, context, batch in questions:
        total = total_memory_gb(INTERNLM2_5[model], precision, context=context, batch=batch)
        answers.append((round(total, 2), total <= GPU_BUDGETS_GB[gpu]))
    return answers


memory_answers = homework.attempt(answer_memory_questions, homework.MEMORY_QUESTIONS)

# %% task:L1.max_context
from course_utils.memory import GIB, kv_bytes_per_token, weight_memory


def longest_context() -> int:
    """The most tokens InternLM2.5-7B (int4 weights, fp16 KV, batch 1) can hold in the 8 GiB slice."""
    shape = INTERNLM2_5["InternLM2.5-7B"]
    free = (8 - 1) * GIB - weight_memory(shape, "int4")  # bytes left for the KV cache
    return int(free // kv_bytes_per_token(shape, "fp16"))


max_context = homework.attempt(longest_context)
