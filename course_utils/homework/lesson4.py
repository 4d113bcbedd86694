"""Checks of homework/04_xtuner_finetune.ipynb: the fine-tuned assistant knows your name and keeps its
general answers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .framework import Missing, answer_field, contains, task

# Held-out general questions SmolLM2-135M (greedy) and InternLM2.5 answer right, with words every right
# answer contains. The forgetting check asks them with the adapter off and on.
GENERAL_QUESTIONS = {
    "What is the capital of France?": ("paris",),
    "What is the capital of Japan?": ("tokyo",),
    "What is the capital of Germany?": ("berlin",),
    "How many days are there in a week?": ("seven", "7"),
    "How many months are there in a year?": ("twelve", "12"),
    "What is the opposite of hot?": ("cold",),
    "What is the opposite of up?": ("down",),
    "What is the chemical symbol for water?": ("h2o",),
    "What is the boiling point of water in Celsius?": ("100",),
    "What is the largest ocean on Earth?": ("pacific",),
}
# A 135M model's greedy answer to a fact it barely knows can flip on noise alone (seen on an
# identity-only run with another seed), so one changed answer is not yet forgetting.
MAX_FORGOTTEN = 1


def identity_question() -> str:
    """The question the identity fine-tune is judged on (English on the tiny profile)."""
    from ..env import profile
    from ..sft_data import IDENTITY_QUESTIONS

    return IDENTITY_QUESTIONS["en" if profile() == "tiny" else "zh"][0]


def _peft_model(answer):
    """The fine-tuned PEFT model and tokenizer: train()'s result, or loaded from the adapter folder."""
    result = answer.get("result") if isinstance(answer, dict) else answer
    model = getattr(result, "model", None)
    if model is not None and hasattr(model, "disable_adapter"):
        return model, result.tokenizer
    adapter = getattr(result, "adapter_dir", None) or answer_field(answer, "adapter", (str, os.PathLike))
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise Missing(f"{adapter.name!r} is not a LoRA adapter folder (no adapter_config.json)")
    from peft import PeftModel

    from ..evidence import course_model
    from ..models import load_model

    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model, tokenizer = load_model(course_model(base))  # never a model folder the learner made
    return PeftModel.from_pretrained(model, adapter).eval(), tokenizer


def _trained_questions(answer) -> set[str]:
    """The user turns of the run's training data (from the adapter's saved config), if known."""
    from ..evidence import readable
    from ..sft_data import load_conversations

    result = answer.get("result") if isinstance(answer, dict) else answer
    adapter = getattr(result, "adapter_dir", None) or (answer.get("adapter") if isinstance(answer, dict) else None)
    saved = Path(adapter or "") / "finetune_config.json"
    data_path = json.loads(saved.read_text()).get("data_path") if saved.is_file() else None
    if not data_path or not readable(data_path).is_file():
        return set()
    return {m["content"] for conv in load_conversations(data_path) for m in conv if m["role"] == "user"}


def _replies(model, tokenizer, question: str, tokens: int = 32) -> tuple[str, str]:
    """(base, fine-tuned) greedy replies of a PEFT model to ``question``."""
    from ..models import reply

    with model.disable_adapter():
        before = reply(model, tokenizer, question, max_new_tokens=tokens)
    return before, reply(model, tokenizer, question, max_new_tokens=tokens)


def _learner_name(answer) -> str:
    name = answer_field(answer, "name", str).strip()
    if not name or name.lower() in ("your name", "learner", "todo"):
        raise Missing("set 'name' to your own name")
    return name


@task("L4.identity", level="basic", title="the assistant knows your name",
      hint="finetune.train(FinetuneConfig(data_path=...)) on sft_data.make_identity_dataset(MY_NAME); "
           "return {'name', 'result' (or 'adapter'), 'before', 'after'}")
def _check_identity(answer) -> str:
    name = _learner_name(answer)
    model, tokenizer = _peft_model(answer)
    question = identity_question()
    before, after = _replies(model, tokenizer, question)
    if contains(before, name):
        raise Missing(f"the base model already says {name!r}: pick a name it cannot guess")
    if not contains(after, name):
        raise Missing(f"asked {question!r}, the fine-tuned model says {after[:80]!r}: no {name!r} "
                      "(train longer or with a higher lr)")
    said_before, said_after = answer_field(answer, "before", str), answer_field(answer, "after", str)
    if contains(said_before, name) or not contains(said_after, name):
        raise Missing("'before' and 'after' should be the base and fine-tuned replies you printed")
    return f"asked again {question!r}: base {before[:40]!r}… → fine-tuned {after[:60]!r}"


@task("L4.forgetting", level="advanced", title="general answers survive the fine-tune",
      hint="mix the base model's own answers into the data: make_identity_dataset(name, extra="
           "finetune.base_answers(model, tokenizer, questions)), and/or fewer steps or a lower lr")
def _check_forgetting(answer) -> str:
    name = _learner_name(answer)
    model, tokenizer = _peft_model(answer)
    trained_on = _trained_questions(answer) & set(GENERAL_QUESTIONS)
    if trained_on:
        raise Missing(f"{sorted(trained_on)[0]!r} is in the training data: the check's questions are "
                      "held out, mix in other general questions")
    _, after = _replies(model, tokenizer, identity_question())
    if not contains(after, name):
        raise Missing(f"the identity is gone: the model says {after[:60]!r}")
    known, lost = 0, []
    for question, words in GENERAL_QUESTIONS.items():
        before, now = _replies(model, tokenizer, question, tokens=24)
        if any(w in before.lower() for w in words):
            known += 1
            if not any(w in now.lower() for w in words):
                lost.append(f"{question!r} → {now[:50]!r}")
    if known < 3:
        raise Missing(f"the base model knows only {known} of the general questions: use the course model")
    if len(lost) > MAX_FORGOTTEN:
        raise Missing(f"forgot {len(lost)} of {known} general answers (at most {MAX_FORGOTTEN} may "
                      "change): " + "; ".join(lost[:2]))
    kept = f"all {known}" if not lost else f"{known - len(lost)} of {known} (changed: {lost[0]})"
    return f"identity kept ({name!r}) and {kept} general answers the base model knew"
