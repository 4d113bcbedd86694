"""Lesson 1 helpers: the InternLM stack at a glance, the course data, a tokenizer peek, next-token predictions."""

from __future__ import annotations

from pathlib import Path

# (stage, InternLM project, what it does, where this course does it)
STACK = [
    ("数据 Data", "OpenDataLab / MinerU", "open datasets; PDF → Markdown extraction", "data/ (lessons 3, 4, 6)"),
    ("预训练 Pre-training", "InternEvo", "large-scale pre-training: next-token prediction", "lesson 1 (next-token demo)"),
    ("微调 Fine-tuning", "XTuner", "LoRA / QLoRA / full fine-tuning, chat templates", "lesson 4 · course_utils.finetune"),
    ("部署 Deployment", "LMDeploy", "TurboMind engine, W4A16 / KV-cache quantization, api_server", "lesson 5 · course_utils.quantize, serving"),
    ("评测 Evaluation", "OpenCompass", "ppl / gen evaluation, CompassRank leaderboard", "lesson 6 · course_utils.evaluate"),
    ("应用 Agents & RAG", "Lagent / MindSearch / HuixiangDou", "ReAct agents with tools, retrieval assistants", "lessons 2–3 · course_utils.agent, rag"),
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
    ("hub mirror (InternLM2-chat-1.8B metadata)", "lesson 2 homework", "hub_mirror/internlm", "files"),
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
