"""Supervised fine-tuning data: the identity dataset, validation, chat-template tokenisation.

Two record formats are accepted, the two the bootcamp's tools use:

* XTuner ``conversation``: ``{"conversation": [{"system": ..., "input": ..., "output": ...}, ...]}``
  (one dict per turn, ``system`` optional), in a ``.json`` list or a ``.jsonl`` file;
* OpenAI ``messages``: ``{"messages": [{"role": "user", "content": ...}, ...]}``.

Both become a list of ``{"role", "content"}`` messages. Tokenisation renders the model's chat
template and sets ``labels`` to -100 everywhere except the assistant replies (and the token that
ends each reply), so the loss only teaches the answers.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from .errors import CourseError

__all__ = [  # the public API, re-exported by course_utils.finetune (tests/test_lesson_modules.py keeps them equal)
    "IDENTITY_QUESTIONS", "IDENTITY_REPLY", "IGNORE_INDEX", "INTERNLM2_CHAT_TEMPLATE", "ROLES", "build_examples",
    "build_text_examples", "collate", "identity_reply", "load_conversations", "load_texts", "make_identity_dataset",
    "pack_examples", "show_labels", "to_messages", "tokenize_conversation"]

IGNORE_INDEX = -100  # labels with this value are skipped by the cross-entropy loss
ROLES = ("system", "user", "assistant")

# The InternLM2 / InternLM2.5 chat template, verbatim from internlm/internlm2-chat-7b's
# tokenizer_config.json (bos_token "<s>"). ChatML markers, like SmolLM2's, plus a leading BOS.
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

IDENTITY_QUESTIONS = {
    "en": ["Please introduce yourself.", "Who are you?", "Tell me about yourself.",
           "Whose assistant are you?", "What are you?"],
    "zh": ["请介绍一下你自己", "你是谁", "你是我的小助手吗", "做个自我介绍吧", "你是谁的助手？"],
}
IDENTITY_REPLY = {
    "en": "I am {name}'s personal assistant, built on {base}.",
    "zh": "我是{name}的小助手，内在是上海AI实验室书生·浦语的{base}大模型哦",
}


def identity_reply(name: str, base: str, language: str = "en") -> str:
    """The self-introduction the fine-tuned model should give, word for word."""
    return IDENTITY_REPLY[language].format(name=name, base=base)


def make_identity_dataset(name: str, *, base: str = "SmolLM2-135M", language: str = "en",
                          repeats: int = 8, out_dir: str | Path | None = None,
                          extra: list[dict] | None = None) -> dict[str, Path]:
    """Write the "who am I" dataset in XTuner ``conversation`` JSON and OpenAI ``messages`` JSONL.

    The main question is repeated ``repeats`` times (as the bootcamp does) and each paraphrase
    appears once, so the model does not learn a single string. ``extra`` adds other
    ``{"input", "output"}`` pairs (e.g. general questions, against forgetting).
    Returns ``{"conversation": path, "messages": path}``.
    """
    if not isinstance(language, str) or language not in IDENTITY_QUESTIONS:
        raise CourseError(f"language={language!r}: use one of {sorted(IDENTITY_QUESTIONS)}.")
    if not isinstance(name, str) or not name.strip():
        raise CourseError(f"name={name!r}: give your name as text, e.g. "
                          "make_identity_dataset('Alex').")
    if not isinstance(base, str) or not base.strip():
        raise CourseError(f"base={base!r}: give the base model's name as text, e.g. "
                          "base='SmolLM2-135M'.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise CourseError(f"repeats={repeats!r}: use a whole number >= 1 (how often the main "
                          "question appears).")
    if extra is not None and not isinstance(extra, (list, tuple)):
        raise CourseError(f"extra must be a list of {{'input': question, 'output': answer}} dicts, "
                          f"not a {type(extra).__name__}.")
    for i, pair in enumerate(extra or []):  # checked before any file is written
        _check_turn(pair, f"extra[{i}]")
    from .paths import outputs_dir

    reply = identity_reply(name.strip(), base, language)
    main, *paraphrases = IDENTITY_QUESTIONS[language]
    pairs = [{"input": main, "output": reply}] * repeats
    pairs += [{"input": q, "output": reply} for q in paraphrases] + list(extra or [])
    out = Path(out_dir) if out_dir else outputs_dir() / "finetune" / "data"
    if out.exists() and not out.is_dir():
        raise CourseError(f"out_dir={str(out)!r} is a file: give a folder for the dataset files.")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"conversation": out / "identity.json", "messages": out / "identity_messages.jsonl"}
    records = [{"conversation": [dict(p)]} for p in pairs]
    paths["conversation"].write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n",
                                     encoding="utf-8")
    lines = [json.dumps({"messages": to_messages(r["conversation"])}, ensure_ascii=False)
             for r in records]
    paths["messages"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def to_messages(conversation: list[dict]) -> list[dict]:
    """XTuner ``conversation`` turns -> OpenAI ``messages`` (system, then user/assistant pairs)."""
    messages = []
    for turn in conversation:
        if turn.get("system"):
            messages.append({"role": "system", "content": turn["system"]})
        messages.append({"role": "user", "content": turn["input"]})
        messages.append({"role": "assistant", "content": turn["output"]})
    return messages


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a BOM (Windows Notepad writes one) is not data
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise CourseError(f"{path.name} is not UTF-8 (line {line}): save it as UTF-8 (an "
                          "editor's 'Save with encoding' / 'Save as' option) and load it "
                          "again.") from None


def _json_list(path: Path, text: str) -> list[tuple[int, object]]:
    """``(line, item)`` for each item of a JSON list, so a bad record is found by its line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CourseError(f"{path.name} is not valid JSON (line {exc.lineno}: "
                          f"{exc.msg}).") from None
    decoder, items = json.JSONDecoder(), []
    pos, line, counted = text.index("[") + 1, 1, 0
    for item in data:
        while text[pos] in " \t\r\n,":
            pos += 1
        line, counted = line + text.count("\n", counted, pos), pos
        items.append((line, item))
        _, pos = decoder.raw_decode(text, pos)
    return items


def _read_records(path: Path) -> list[tuple[str, object]]:
    """``(where, record)`` pairs from a JSON list or a JSON-lines file; ``where`` names the spot."""
    text = _decode(path)
    if not text.strip():
        raise CourseError(f"{path.name} is empty: write one record per line (JSONL) or a JSON "
                          "list.")
    if text.lstrip().startswith("["):
        return [(f"{path.name}, record {i} (line {line})", rec)
                for i, (line, rec) in enumerate(_json_list(path, text))]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path.name}, record {len(records)} (line {lineno})", json.loads(line)))
        except json.JSONDecodeError as exc:
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                whole = None
            if isinstance(whole, dict):  # a pretty-printed object: valid JSON, but not JSONL
                raise CourseError(f"{path.name} holds one JSON object over several lines: write "
                                  "one record per line (JSONL), or put the records in a JSON "
                                  "list [...].") from None
            raise CourseError(f"{path.name}, line {lineno} is not valid JSON ({exc.msg}). "
                              "Each line must be one complete JSON object.") from None
    return records


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise CourseError(f"{where}: 'messages' must be a non-empty list of {{role, content}}.")
    expected = "user"  # after optional system messages, user and assistant take turns
    for j, msg in enumerate(messages):
        field = f"{where}: messages[{j}]"
        if not isinstance(msg, dict):
            raise CourseError(f"{field} is a {type(msg).__name__}; each message is an object "
                              "{\"role\": ..., \"content\": ...}.")
        if "role" not in msg:
            raise CourseError(f"{field} has no 'role'; give one of {', '.join(ROLES)}.")
        if msg["role"] not in ROLES:
            raise CourseError(f"{field}.role is {msg['role']!r}; use one of {', '.join(ROLES)}.")
        content = msg.get("content")
        if content is not None and not isinstance(content, str):
            raise CourseError(f"{field}.content is a {type(content).__name__}, not text: write "
                              "the message as one string.")
        if not content or not content.strip():
            raise CourseError(f"{field}.content is missing or empty; write the message text.")
        role = msg["role"]
        if role == "system":
            continue
        if role != expected:
            if expected == "user" and not any(m.get("role") in ("user", "assistant")
                                              for m in messages[:j]):
                raise CourseError(f"{field} is an assistant message, but a conversation starts "
                                  "with the user (after an optional system message): put the "
                                  "user's question first.")
            raise CourseError(f"{field} is a second {role} message in a row: user and assistant "
                              "take turns. Merge the two, or add the missing reply or question.")
        expected = "assistant" if role == "user" else "user"
    if not any(m["role"] == "assistant" for m in messages):
        raise CourseError(f"{where} has no assistant message: nothing to learn from it.")
    if expected == "assistant":
        raise CourseError(f"{where} ends with a user message that has no reply: add the "
                          "assistant's answer, or remove the question.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _check_turn(turn, field: str) -> None:
    """One XTuner turn ``{"system"?, "input", "output"}``; ``field`` names it in messages."""
    if not isinstance(turn, dict):
        raise CourseError(f"{field} is a {type(turn).__name__}; each turn is an object "
                          "{\"input\": question, \"output\": answer}.")
    system = turn.get("system")
    if system is not None and not isinstance(system, str):
        raise CourseError(f"{field}.system is {system!r:.40} ({type(system).__name__}), not text: "
                          "write the system prompt as a string, or leave it out.")
    for key in ("input", "output"):
        if key not in turn:
            raise CourseError(f"{field}.{key} is missing (the turn has: "
                              f"{', '.join(map(str, turn)) or 'nothing'}); every turn needs an "
                              "'input' (question) and an 'output' (answer).")
        value = turn[key]
        if not isinstance(value, str):
            raise CourseError(f"{field}.{key} is {value!r:.40} ({type(value).__name__}), not "
                              "text: write it as a string in quotes.")
        if not value.strip():
            raise CourseError(f"{field}.{key} is empty; every turn needs an 'input' (question) "
                              "and an 'output' (answer).")


def _check_conversation(turns, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise CourseError(f"{where}: 'conversation' must be a non-empty list of turns.")
    for j, turn in enumerate(turns):
        _check_turn(turn, f"{where}: conversation[{j}]")
    return to_messages(turns)


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Read and validate a dataset file; every record becomes a list of ``{role, content}``."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise CourseError(f"The dataset path is {path!r}: give the .json or .jsonl file's path.")
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        raise CourseError(f"Dataset path {str(path)!r} is a folder: pass the .json or .jsonl file "
                          f"inside it ({', '.join(inside[:3]) or 'it holds none'}).")
    if not path.is_file():
        raise CourseError(f"Dataset file {str(path)!r} not found: run make_identity_dataset() "
                          "or check data_path.")
    conversations = []
    for where, record in _read_records(path):
        if not isinstance(record, dict):
            raise CourseError(f"{where} is a {type(record).__name__}, not an object: each record "
                              "is {\"messages\": [...]} or {\"conversation\": [...]}.")
        if "messages" in record:
            conversations.append(_check_messages(record["messages"], where))
        elif "conversation" in record:
            conversations.append(_check_conversation(record["conversation"], where))
        else:
            raise CourseError(f"{where} has neither 'messages' (OpenAI format) nor "
                              "'conversation' (XTuner format); it has: "
                              f"{', '.join(map(str, record)) or 'nothing'}.")
    if not conversations:
        raise CourseError(f"{path.name} holds no records.")
    return conversations


def _assistant_spans(tokenizer, messages: list[dict], template: str | None) -> tuple[str, list]:
    """The rendered text and the character spans of each assistant reply (with its end marker)."""
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                             chat_template=template)

    text, spans = render(messages), []
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix, upto = render(messages[:k], gen=True), render(messages[:k + 1])
        if not text.startswith(upto) or not upto.startswith(prefix):
            raise CourseError("This chat template rewrites earlier turns, so replies cannot be "
                              "located; pass a template whose rendering only grows turn by turn.")
        # "reply<|im_end|>\n" -> keep "reply<|im_end|>": the model learns to stop, not the newline
        spans.append((len(prefix), len(upto.rstrip())))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None = None, *,
                          chat_template: str | None = None) -> dict | None:
    """``{"input_ids", "labels"}`` (labels on assistant tokens only); None if truncation cut all."""
    text, spans = _assistant_spans(tokenizer, messages, chat_template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = list(enc["input_ids"]), []
    for tok, (start, _end) in zip(ids, enc["offset_mapping"]):
        inside = any(a <= start < b for a, b in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    if max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate whole examples into rows of at most ``max_length`` tokens (fewer pad tokens).

    Like XTuner's ``pack_to_max_length`` without varlen attention, tokens of one example can
    attend to the earlier examples in the same row; the labels stay those of each example.
    """
    packed, row = [], {"input_ids": [], "labels": []}
    for ex in examples:
        if row["input_ids"] and len(row["input_ids"]) + len(ex["input_ids"]) > max_length:
            packed.append(row)
            row = {"input_ids": [], "labels": []}
        row["input_ids"] += ex["input_ids"][:max_length]
        row["labels"] += ex["labels"][:max_length]
    if row["input_ids"]:
        packed.append(row)
    return packed


def build_examples(tokenizer, conversations: list[list[dict]], max_length: int, *,
                   pack: bool = False, chat_template: str | None = None) -> list[dict]:
    """Tokenise every conversation (dropping ones truncation emptied), optionally packed."""
    examples = [tokenize_conversation(tokenizer, c, max_length, chat_template=chat_template)
                for c in conversations]
    examples = [e for e in examples if e is not None]
    if not examples:
        raise CourseError(f"max_length={max_length} cuts off every assistant reply: raise it.")
    return pack_examples(examples, max_length) if pack else examples


def collate(features: list[dict], pad_id: int) -> dict:
    """Right-pad a batch: ``input_ids`` with ``pad_id``, ``labels`` with -100, + attention_mask."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    for f in features:
        pad = width - len(f["input_ids"])
        batch["input_ids"].append(f["input_ids"] + [pad_id] * pad)
        batch["labels"].append(f["labels"] + [IGNORE_INDEX] * pad)
        batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}  # each (batch, width)


def show_labels(tokenizer, example: dict) -> str:
    """HTML of the tokens: green ones carry a label (the loss), grey ones are masked (-100)."""
    cells = []
    for tok, label in zip(example["input_ids"], example["labels"]):
        piece = html.escape(tokenizer.decode([tok])).replace("\n", "\\n")
        color = "#c8f7c5" if label != IGNORE_INDEX else "#e6e6e6"
        cells.append(f'<span style="background:{color};color:#000;margin:1px;padding:0 2px;'
                     f'border-radius:3px;font-family:monospace">{piece}</span>')
    return ('<div style="line-height:1.9">' + "".join(cells) + "</div>"
            '<div><span style="background:#c8f7c5;color:#000">green</span>: loss on it, '
            '<span style="background:#e6e6e6;color:#000">grey</span>: label -100</div>')


def load_texts(path: str | Path) -> list[str]:
    """Plain texts for continued pre-training: ``{"text": ...}`` per JSONL line (XTuner's pretrain format)."""
    path = Path(path)
    if not path.is_file():
        raise CourseError(f"{path.name}: file not found. Write one JSON object per line: {{\"text\": \"...\"}}.")
    texts = []
    for i, line in enumerate(_decode(path).splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise CourseError(f"{path.name}, line {i + 1}: not valid JSON ({err.msg}).") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise CourseError(f"{path.name}, line {i + 1}: needs a non-empty \"text\" field (pre-training data "
                              "is plain text, not conversations).")
        texts.append(text)
    if not texts:
        raise CourseError(f"{path.name} holds no texts.")
    return texts


def build_text_examples(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    """Pre-training rows: the texts joined by EOS and cut into ``max_length`` chunks; loss on every token."""
    ids = []
    for text in texts:  # no chat template: the model reads domain text, as in its pre-training
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [{"input_ids": ids[i:i + max_length], "labels": ids[i:i + max_length]}
            for i in range(0, len(ids), max_length)]
