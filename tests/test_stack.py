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


def test_route_follows_the_bootcamp_flow():
    from course_utils.memory import GIB, INTERNLM2_5

    s18 = INTERNLM2_5["InternLM2.5-1.8B"]
    assert stack.full_finetune_gib(s18) == s18.params() * 16 / GIB  # mixed-precision Adam: 16 bytes/param
    assert 24 < stack.full_finetune_gib(s18) < 40
    simple = stack.route(complex_scene=False, needs_tools=False, shape=s18, gpu_gib=80)
    assert [s.split()[0] for s in simple] == ["选型", "提示工程", "评测", "部署"]  # no training when not needed
    full = stack.route(True, False, shape=s18, gpu_gib=40)
    partial = stack.route(True, True, shape=s18, gpu_gib=24)
    assert "续训或全参数微调" in full[1] and "部分参数微调" in partial[1]
    assert partial[-3:] == ["构建智能体 build an agent", "评测 evaluate", "部署 deploy"]
    assert stack.route(True, False)[1].startswith("部分参数微调")  # unknown compute: the cheap branch
    every = {s for c in (False, True) for t in (False, True) for g in (8, 80) for s in stack.route(c, t, shape=s18, gpu_gib=g)}
    assert every == set(stack.ROUTE_STEPS)  # every step is reachable and has a tool and a lesson


def test_route_table_lists_every_branch_once():
    from course_utils.memory import INTERNLM2_5

    table = stack.route_table(INTERNLM2_5["InternLM2.5-1.8B"], {"24": 24, "40": 40})
    assert len(table) == 2 + 4 and table.route.is_unique
    row = table[(table["complex scene?"] == "yes") & (table.GPU == "40") & (table["needs tools?"] == "yes")]
    assert row.route.item() == "选型 → 续训或全参数微调 → 构建智能体 → 评测 → 部署"
    assert set(stack.route_steps_table()["InternLM tool"]) >= {"XTuner", "LMDeploy", "OpenCompass", "Lagent + AgentLego"}


def test_published_facts_tables_name_their_parts():
    assert [m.split()[1] for m in stack.wanjuan_table().modality] == ["text", "image-text", "video"]
    assert "2308.10755" in stack.WANJUAN_SOURCE
    dims = stack.opencompass_dimensions()
    assert dims.group.value_counts().to_dict() == {"general": 6, "special": 4}
    for name in ("examination", "knowledge", "language", "understanding", "reasoning", "safety",
                 "long context", "code", "tools"):
        assert dims.dimension.str.contains(name).any(), name
    eras = stack.eras_table()
    assert list(eras.year) == sorted(eras.year) and set(eras.kind) == {"task-specific", "general"}
    assert "AgentLego" in stack.stack_table().project.iloc[-1]


def test_one_model_answers_several_tasks_from_a_fresh_history(tiny_model):
    from course_utils.chat import ChatSession

    session = ChatSession.load(model=tiny_model, max_new_tokens=8)
    table = stack.one_model_many_tasks(session, {"a": "What is the capital of France?", "b": "Say hello."})
    assert list(table.task) == ["a", "b"] and table.reply.str.len().gt(0).all()
    assert len(session.history) == 2  # reset before each task: only the last exchange is kept
