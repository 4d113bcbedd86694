"""Lesson 1 helpers: the InternLM stack at a glance, the route from a model to an application, published facts
(WanJuan, OpenCompass), the course data, a tokenizer peek, next-token predictions."""

from __future__ import annotations

from pathlib import Path

# (stage, InternLM project, what it does, where this course does it)
STACK = [
    ("数据 Data", "OpenDataLab / MinerU", "open datasets; PDF → Markdown extraction", "data/ (lessons 3, 4, 6)"),
    ("预训练 Pre-training", "InternEvo", "large-scale pre-training: next-token prediction", "lesson 1 (next-token demo)"),
    ("微调 Fine-tuning", "XTuner", "LoRA / QLoRA / full fine-tuning, chat templates", "lesson 4 · course_utils.finetune"),
    ("部署 Deployment", "LMDeploy", "TurboMind engine, W4A16 / KV-cache quantization, api_server", "lesson 5 · course_utils.quantize, serving"),
    ("评测 Evaluation", "OpenCompass", "ppl / gen evaluation, CompassRank leaderboard", "lesson 6 · course_utils.evaluate"),
    ("应用 Agents & RAG", "Lagent / AgentLego / MindSearch / HuixiangDou",
     "ReAct agent framework, its multimodal tool library, retrieval assistants", "lessons 2–3 · course_utils.agent, rag"),
]


def stack_table():
    """The stack as a table: stage, project, what it does, where the course covers it."""
    import pandas as pd

    return pd.DataFrame(STACK, columns=["stage", "project", "what it does", "in this course"])


def _count(path: Path) -> int:
    """Records in a JSONL file, or files below a folder."""
    if path.is_dir():
        return sum(1 for f in path.rglob("*") if f.is_file())
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


# (what, used in, path under data/, unit)
COURSE_DATA = [
    ("knowledge base, English", "lesson 3 (RAG)", "knowledge_base/en", "pages"),
    ("knowledge base, Chinese", "lesson 3 on InternStudio", "knowledge_base/zh", "pages"),
    ("retrieval questions, English", "lesson 3 (hit@k, MRR)", "rag_eval/questions_en.jsonl", "questions"),
    ("retrieval questions, Chinese", "lesson 3 on InternStudio", "rag_eval/questions_zh.jsonl", "questions"),
    ("multiple-choice eval, English (C-Eval columns)", "lesson 6", "eval/course_en/val.jsonl", "questions"),
    ("multiple-choice eval, Chinese (C-Eval columns)", "lesson 6 on InternStudio", "eval/course_zh/val.jsonl", "questions"),
    ("few-shot examples (dev split)", "lesson 6", "eval/course_en/dev.jsonl", "questions"),
    ("held-out / calibration text", "lesson 5 (perplexity, AWQ)", "ppl", "files"),
    ("hub mirror (InternLM-20B config, InternLM2-chat-1.8B metadata)", "lesson 2 homework", "hub_mirror/internlm", "files"),
]


def course_data_table():
    """What the course ships under data/, counted from the files (nothing is downloaded)."""
    import pandas as pd

    from .paths import DATA_DIR

    rows = [(what, used, f"data/{rel}", _count(DATA_DIR / rel), unit) for what, used, rel, unit in COURSE_DATA]
    return pd.DataFrame(rows, columns=["data", "used in", "path", "count", "unit"])


def tokenizer_peek(tokenizer, texts: dict[str, str]):
    """Characters, tokens and tokens per character for each labelled text."""
    import pandas as pd

    rows = []
    for label, text in texts.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append({"text": label, "characters": len(text), "tokens": len(ids),
                     "tokens / char": round(len(ids) / len(text), 2)})
    return pd.DataFrame(rows)


def show_tokens(tokenizer, text: str) -> list[str]:
    """The pieces a tokenizer cuts ``text`` into, decoded one token at a time."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode([i]) for i in ids]


def next_token_table(model, tokenizer, prompt: str, k: int = 5):
    """The model's top-``k`` next tokens for ``prompt`` with their probabilities."""
    import pandas as pd
    import torch

    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]  # (vocab,)
    probs = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probs, k)
    return pd.DataFrame({"next token": [repr(tokenizer.decode([int(i)])) for i in top.indices],
                         "probability": [round(float(p), 3) for p in top.values]})


# ---- from task-specific models to general models -------------------------------------------------

# (year, model, what it does, kind): public milestones; a specialist solves the one task it was trained for
MODEL_ERAS = [
    (2012, "AlexNet", "image classification (ImageNet)", "task-specific"),
    (2016, "AlphaGo", "the game of Go", "task-specific"),
    (2020, "AlphaFold 2", "protein structure prediction", "task-specific"),
    (2020, "GPT-3", "many text tasks from a prompt and a few examples", "general"),
    (2022, "ChatGPT", "dialogue: follows instructions across tasks", "general"),
    (2023, "InternLM", "open general model: chat, knowledge, reasoning, code, tools", "general"),
]


def eras_table():
    """Milestones from one-model-per-task to one general model, oldest first."""
    import pandas as pd

    return pd.DataFrame(MODEL_ERAS, columns=["year", "model", "what it does", "kind"])


def one_model_many_tasks(session, prompts: dict[str, str]):
    """Ask one chat model several different tasks, by prompt only: the general-model idea, live."""
    import pandas as pd

    rows = []
    for task, prompt in prompts.items():
        session.reset()
        reply = " ".join(session.ask(prompt).split())  # one line per task: newlines and code fences collapsed
        rows.append({"task": task, "prompt": prompt, "reply": reply})
    return pd.DataFrame(rows)


# ---- from model to application: a decision flow ----------------------------------------------------

# Mixed-precision Adam keeps fp16 weights and gradients (2 + 2 bytes) plus fp32 master weights, momentum
# and variance (4 + 4 + 4): 16 bytes per parameter before activations (ZeRO paper, Rajbhandari et al. 2020).
FULL_FINETUNE_BYTES_PER_PARAM = 16

# step -> (InternLM tool, where this course does it)
ROUTE_STEPS = {
    "选型 choose a model": ("OpenCompass / CompassRank", "lesson 6"),
    "提示工程 prompt only": ("InternLM chat + a system prompt", "lesson 2"),
    "续训或全参数微调 continue pre-training / full fine-tune": ("InternEvo / XTuner", "lesson 4 (on a GPU)"),
    "部分参数微调 partial fine-tune (LoRA / QLoRA)": ("XTuner", "lesson 4"),
    "构建智能体 build an agent": ("Lagent + AgentLego", "lesson 2"),
    "评测 evaluate": ("OpenCompass", "lesson 6"),
    "部署 deploy": ("LMDeploy", "lesson 5"),
}


def full_finetune_gib(shape) -> float:
    """GiB that full fine-tuning with mixed-precision Adam needs for weights, gradients and optimizer states."""
    from .memory import GIB

    return shape.params() * FULL_FINETUNE_BYTES_PER_PARAM / GIB


def route(complex_scene: bool, needs_tools: bool, *, shape=None, gpu_gib: float = 0.0) -> list[str]:
    """The steps from a model to an application (the bootcamp's flow chart) for one business case.

    ``complex_scene``: the base chat model alone is not good enough for the business (domain knowledge,
    a fixed style); ``needs_tools``: the application must act in its environment (search, code, APIs).
    Compute is "enough" when full fine-tuning of ``shape`` fits in ``gpu_gib`` (``full_finetune_gib``).
    """
    steps = ["选型 choose a model"]
    if not complex_scene:
        steps.append("提示工程 prompt only")
    elif shape is not None and full_finetune_gib(shape) <= gpu_gib:
        steps.append("续训或全参数微调 continue pre-training / full fine-tune")
    else:
        steps.append("部分参数微调 partial fine-tune (LoRA / QLoRA)")
    if needs_tools:
        steps.append("构建智能体 build an agent")
    return steps + ["评测 evaluate", "部署 deploy"]


def route_table(shape, gpus: dict[str, float]):
    """Every branch of the flow for one model: complex scene x tools x each GPU budget -> the steps."""
    import pandas as pd

    rows = []
    for complex_scene in (False, True):
        for needs_tools in (False, True):
            for gpu, gib in gpus.items():
                if not complex_scene and gpu != next(iter(gpus)):
                    continue  # without training, compute does not change the route: one row is enough
                steps = route(complex_scene, needs_tools, shape=shape, gpu_gib=gib)
                rows.append({"complex scene?": "yes" if complex_scene else "no",
                             "GPU": gpu if complex_scene else "any",
                             "needs tools?": "yes" if needs_tools else "no",
                             "route": " → ".join(s.split()[0] for s in steps)})
    return pd.DataFrame(rows)


def route_steps_table():
    """Each step of the route with the InternLM tool that does it and the lesson that teaches it."""
    import pandas as pd

    return pd.DataFrame([(s, tool, where) for s, (tool, where) in ROUTE_STEPS.items()],
                        columns=["step", "InternLM tool", "in this course"])


# ---- OpenDataLab / WanJuan, OpenCompass, AgentLego: published facts, with their source ------------

WANJUAN_SOURCE = "github.com/opendatalab/WanJuan1.0 (README) · arXiv:2308.10755"
# (part, what is in it, documents or files, size as published): WanJuan 1.0, over 2 TB in all, CC BY 4.0
WANJUAN_1 = [
    ("文本 text", "web pages, encyclopedias, books, patents, textbooks, exam questions; jsonl",
     "over 500 million documents", "over 1 TB"),
    ("图文 image-text", "interleaved image-text documents from public web pages (images as URLs)",
     "over 22 million documents", "over 140 GB without the images"),
    ("视频 video", "programmes from China Media Group and Shanghai Media Group",
     "over 1,000 video files", "over 900 GB"),
]


def wanjuan_table():
    """书生·万卷 1.0 (OpenDataLab), the open corpus InternLM was trained on: parts and sizes as published."""
    import pandas as pd

    return pd.DataFrame(WANJUAN_1, columns=["modality", "content", "count", "size"])


OPENCOMPASS_SOURCE = "OpenCompass docs, user guide 'Overview' → Capability Dimensions (open-compass/opencompass)"
# (group, dimension, example benchmarks that OpenCompass ships configs for)
OPENCOMPASS_DIMENSIONS = [
    ("general", "考试 examination", "C-Eval, CMMLU, MMLU"),
    ("general", "知识 knowledge", "TriviaQA, NaturalQuestions"),
    ("general", "语言 language", "word recognition, grammar, translation (e.g. FLORES)"),
    ("general", "理解 understanding", "reading comprehension, summarisation (e.g. RACE)"),
    ("general", "推理 reasoning (incl. math, code)", "GSM8K, MATH, BBH, HumanEval"),
    ("general", "安全 safety", "fairness, legality, harmlessness, ethics, privacy"),
    ("special", "长文本 long context", "LongBench, L-Eval, NeedleBench"),
    ("special", "代码 code", "HumanEval, MBPP"),
    ("special", "工具 tools / agents", "T-Eval, CIBench"),
    ("special", "知识增强 knowledge enhancement", "retrieval-augmented QA"),
]


def opencompass_dimensions():
    """OpenCompass's capability dimensions as its documentation lists them, with example benchmarks."""
    import pandas as pd

    return pd.DataFrame(OPENCOMPASS_DIMENSIONS, columns=["group", "dimension", "example benchmarks"])
