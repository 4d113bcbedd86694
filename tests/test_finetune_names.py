"""Issue 17: the identity fine-tune gives the exact self-introduction for any learner's name."""

import pytest

from course_utils.finetune import FinetuneConfig, train
from course_utils.sft_data import (IGNORE_INDEX, build_examples, identity_reply, load_conversations,
                                   make_identity_dataset)

BASE = "SmolLM2-135M"
# One word, two words, accents, Chinese (two and four characters), a long one, a hyphen.
NAMES = ["Alex", "Mei Lin", "José García", "张伟", "欧阳娜娜", "Maximilian Schwarzenegger", "Anne-Marie"]


@pytest.mark.parametrize("name", NAMES)
def test_every_target_reply_keeps_the_name_and_the_base_model_intact(name, tmp_path):
    paths = make_identity_dataset(f"  {name} ", out_dir=tmp_path)  # stray spaces from a form are dropped
    replies = {m["content"] for conv in load_conversations(paths["conversation"])
               for m in conv if m["role"] == "assistant"}
    assert replies == {f"I am {name}'s personal assistant, built on {BASE}."}
    assert replies == {identity_reply(name, BASE)}


def test_the_default_max_length_keeps_each_reply_and_its_end_marker(tmp_path, tiny_model_dir):
    """Cut replies never teach the base model's name or where to stop (64 tokens cut 欧阳娜娜's)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for i, name in enumerate(NAMES):
        convs = load_conversations(make_identity_dataset(name, out_dir=tmp_path / str(i))["conversation"])
        for example in build_examples(tokenizer, convs, FinetuneConfig().max_length):
            learned = [t for t in example["labels"] if t != IGNORE_INDEX]
            assert tokenizer.decode(learned) == identity_reply(name, BASE) + tokenizer.eos_token, name


@pytest.mark.slow
def test_the_defaults_teach_a_chinese_name_the_exact_reply(tmp_path, tiny_model_dir):
    data = make_identity_dataset("张伟", out_dir=tmp_path / "data")
    cfg = FinetuneConfig(data_path=str(data["conversation"]), work_dir=str(tmp_path / "run"),
                         evaluation_freq=0)  # CI mode: replies at the start and the end only
    result = train(cfg)
    assert result.replies["Please introduce yourself."] == identity_reply("张伟", BASE)
    assert result.replies["Who are you?"] == identity_reply("张伟", BASE)
    assert result.global_step == 6  # 12 conversations, batch 4, 2 epochs
