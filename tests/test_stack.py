"""Lesson 1 helpers: the stack map, the course data inventory, tokenizer peek, next-token table."""

import json

from course_utils import rag, stack
from course_utils.paths import DATA_DIR


def test_stack_table_covers_every_stage_once():
    table = stack.stack_table()
    assert [s.split()[0] for s in table.stage] == ["数据", "预训练", "微调", "部署", "评测", "应用"]
    assert {"XTuner", "LMDeploy", "OpenCompass"} <= set(table.project)


def test_course_data_counts_what_the_lessons_read():
    table = stack.course_data_table().set_index("path")
    assert table.loc["data/rag_eval/questions_en.jsonl", "count"] == len(rag.load_eval_set(languages=["en"]))
    en_pages = sorted((DATA_DIR / "knowledge_base" / "en").rglob("*.md"))
    assert table.loc["data/knowledge_base/en", "count"] == len(en_pages) > 20
    val = (DATA_DIR / "eval" / "course_en" / "val.jsonl").read_text().splitlines()
    assert table.loc["data/eval/course_en/val.jsonl", "count"] == len(val)
    assert all(set(json.loads(line)) >= {"question", "A", "B", "C", "D", "answer"} for line in val)
    assert (table["count"] > 0).all()


def test_tokenizer_peek_and_show_tokens(tiny_model):
    _, tokenizer = tiny_model
    texts = {"en": "InternLM is an open-source model.", "zh": "书生·浦语是开源的大语言模型。"}
    table = stack.tokenizer_peek(tokenizer, texts).set_index("text")
    # SmolLM2's English-only vocabulary cuts Chinese into byte pieces: many more tokens per character.
    assert table.loc["zh", "tokens / char"] > 3 * table.loc["en", "tokens / char"]
    assert "".join(stack.show_tokens(tokenizer, texts["en"])) == texts["en"]


def test_next_token_table_is_a_sorted_distribution(tiny_model):
    model, tokenizer = tiny_model
    table = stack.next_token_table(model, tokenizer, "The capital of France is", k=5)
    probs = list(table.probability)
    assert len(table) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert "Paris" in table["next token"].iloc[0]
