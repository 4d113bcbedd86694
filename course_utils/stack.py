"""Lesson 1 helpers: the InternLM stack at a glance, a tokenizer peek, next-token predictions."""

from __future__ import annotations

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
