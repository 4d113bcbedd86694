"""Lesson 4: identity dataset, validation, template masking, packing, XTuner export, LoRA/QLoRA
training, resume and merge. One LoRA run is shared by the model tests (module-scoped fixture)."""

import json
import types
from pathlib import Path
from dataclasses import replace

import pytest

from pyconfig import assignments, dict_calls

from course_utils.errors import CourseError
from course_utils.finetune import (FinetuneConfig, TrainResult, estimate_qlora_memory,
                                   export_xtuner_config, lora_parameter_count, merge_adapter, train)
from course_utils.sft_data import (IDENTITY_QUESTIONS, IGNORE_INDEX, INTERNLM2_CHAT_TEMPLATE,
                                   build_examples, collate, identity_reply, load_conversations,
                                   make_identity_dataset, pack_examples, show_labels,
                                   tokenize_conversation)

TARGET = identity_reply("Alex", "SmolLM2-135M")
CHAT = [{"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Puyu."},
        {"role": "user", "content": "And what can you do?"},
        {"role": "assistant", "content": "I answer questions about the bootcamp."}]


# ---- dataset builders and validators -------------------------------------------------------------

def test_identity_dataset_both_formats_agree(tmp_path):
    paths = make_identity_dataset("Alex", repeats=3, out_dir=tmp_path)
    conv = load_conversations(paths["conversation"])
    msgs = load_conversations(paths["messages"])
    assert conv == msgs
    assert len(conv) == 3 + len(IDENTITY_QUESTIONS["en"]) - 1  # main question x3 + paraphrases
    assert {c[-1]["content"] for c in conv} == {TARGET}
    assert {c[0]["content"] for c in conv} == set(IDENTITY_QUESTIONS["en"])
    raw = json.loads(paths["conversation"].read_text())
    assert raw[0] == {"conversation": [{"input": "Please introduce yourself.", "output": TARGET}]}


def test_identity_dataset_chinese_and_extra(tmp_path):
    extra = [{"input": "What is 2+2?", "output": "4"}]
    paths = make_identity_dataset("小明", base="InternLM2.5-1.8B", language="zh", repeats=2,
                                  out_dir=tmp_path, extra=extra)
    conv = load_conversations(paths["messages"])
    assert conv[0][1]["content"] == "我是小明的小助手，内在是上海AI实验室书生·浦语的InternLM2.5-1.8B大模型哦"
    assert conv[-1] == [{"role": "user", "content": "What is 2+2?"},
                        {"role": "assistant", "content": "4"}]
    with pytest.raises(CourseError, match="language"):
        make_identity_dataset("x", language="fr", out_dir=tmp_path)


BAD_RECORDS = [
    ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [oops\n', "line 2"),
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "a"}]}', r"messages\[0\] has no 'role'"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', r"messages\[0\]\.role is 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
     r"messages\[1\]\.content is missing or empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": []}', "non-empty list"),
    ('{"conversation": [{"input": "hi"}]}', r"conversation\[0\]\.output is missing"),
    ('{"conversation": [{"input": "", "output": "x"}]}', r"conversation\[0\]\.input"),
    ('{"text": "hello"}', "neither 'messages'"),
    ("   \n", "is empty"),
]


@pytest.mark.parametrize("content,message", BAD_RECORDS)
def test_load_conversations_names_the_bad_record(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    path.write_text(content if message in ("line 2", "is empty") else good + content)
    with pytest.raises(CourseError, match=message) as err:
        load_conversations(path)
    if message not in ("line 2", "is empty"):
        assert "record 1 (line 2)" in str(err.value)  # names which record, not just what


def test_load_conversations_json_list_and_missing_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"conversation": [{"input": "q", "output": "a"}]},
                                {"conversation": [{"input": "q"}]}]))
    with pytest.raises(CourseError, match=r"data\.json, record 1 \(line 1\): conversation\[0\]\.output"):
        load_conversations(path)
    path.write_text('[{"conversation": [}')
    with pytest.raises(CourseError, match="not valid JSON"):
        load_conversations(path)
    with pytest.raises(CourseError, match="make_identity_dataset"):
        load_conversations(tmp_path / "nope.json")


# ---- template masking, packing ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _labelled(tok, example) -> str:
    return tok.decode([t for t, lab in zip(example["input_ids"], example["labels"])
                       if lab != IGNORE_INDEX])


def test_labels_cover_exactly_the_assistant_replies(tokenizer):
    ex = tokenize_conversation(tokenizer, CHAT)
    assert len(ex["input_ids"]) == len(ex["labels"])
    assert _labelled(tokenizer, ex) == "I am Puyu.<|im_end|>I answer questions about the bootcamp.<|im_end|>"
    # every label equals its input token (the model shifts them itself)
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(ex["input_ids"], ex["labels"]))
    text = tokenizer.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its system prompt
    # the first labelled token comes right after "<|im_start|>assistant\n"
    first = next(i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX)
    assert tokenizer.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")


def _internlm2_like_tokenizer():
    """A small byte-level BPE tokenizer with InternLM2's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[
        "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([m["content"] for m in CHAT] * 5 + ["user assistant system"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>",
                                   chat_template=INTERNLM2_CHAT_TEMPLATE)


def test_labels_line_up_with_internlm2_template():
    tok = _internlm2_like_tokenizer()
    ex = tokenize_conversation(tok, [{"role": "system", "content": "Be brief."}] + CHAT)
    tokens = tok.convert_ids_to_tokens(ex["input_ids"])
    assert tokens[:2] == ["<s>", "<|im_start|>"]  # BOS from the template, not added twice
    assert ex["labels"][0] == IGNORE_INDEX
    assert _labelled(tok, ex) == "I am Puyu.<|im_end|>I answer questions about the bootcamp.<|im_end|>"
    ends = [i for i, t in enumerate(tokens) if t == "<|im_end|>"]
    assert [ex["labels"][i] != IGNORE_INDEX for i in ends] == [False, False, True, False, True]


def test_internlm2_template_on_the_bundled_tokenizer(tokenizer):
    ex = tokenize_conversation(tokenizer, CHAT, chat_template=INTERNLM2_CHAT_TEMPLATE)
    # SmolLM2's bos_token is <|im_start|>, so InternLM2's "{{ bos_token }}" doubles it
    assert tokenizer.decode(ex["input_ids"]).startswith("<|im_start|><|im_start|>user\n")
    assert _labelled(tokenizer, ex) == "I am Puyu.<|im_end|>I answer questions about the bootcamp.<|im_end|>"


def test_truncation_packing_and_collate(tokenizer):
    convs = [CHAT[:2], CHAT, CHAT[:2]]
    full = build_examples(tokenizer, convs, max_length=512)
    lengths = [len(e["input_ids"]) for e in full]
    packed = build_examples(tokenizer, convs, max_length=max(lengths) + lengths[0], pack=True)
    assert len(packed) == 2 and all(len(p["input_ids"]) <= max(lengths) + lengths[0] for p in packed)
    assert sum(len(p["input_ids"]) for p in packed) == sum(lengths)  # nothing lost or cut
    assert sum(lab != IGNORE_INDEX for p in packed for lab in p["labels"]) == \
        sum(lab != IGNORE_INDEX for e in full for lab in e["labels"])
    assert pack_examples([{"input_ids": [1] * 5, "labels": [1] * 5}] * 3, 10) == \
        [{"input_ids": [1] * 10, "labels": [1] * 10}, {"input_ids": [1] * 5, "labels": [1] * 5}]
    batch = collate(full, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum().item() == sum(lengths)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    short = build_examples(tokenizer, convs, max_length=lengths[0] - 3)
    assert all(len(e["input_ids"]) == lengths[0] - 3 for e in short)
    with pytest.raises(CourseError, match="raise it"):
        build_examples(tokenizer, convs, max_length=10)  # every reply cut off
    html = show_labels(tokenizer, full[0])
    assert html.count("#c8f7c5") == sum(lab != IGNORE_INDEX for lab in full[0]["labels"]) + 1


# ---- config, export, memory estimate ----------------------------------------------------------------

def test_export_xtuner_config_carries_the_values(tmp_path):
    paths = make_identity_dataset("Alex", out_dir=tmp_path)
    cfg = FinetuneConfig(data_path=str(paths["conversation"]), lr=3e-4, batch_size=2,
                         accumulative_counts=4, max_length=128, pack_to_max_length=True,
                         lora_r=16, lora_alpha=32, lora_targets=["q_proj", "v_proj"], eval_max_new_tokens=40,
                         evaluation_inputs=["Who are you?"], save_steps=5, quantization="4bit")
    source = export_xtuner_config(cfg, tmp_path / "cfg" / "identity_qlora.py", device="cuda").read_text()
    ns, calls = assignments(source), dict_calls(source)
    assert (ns["lr"], ns["batch_size"], ns["accumulative_counts"]) == (3e-4, 2, 4)
    assert (ns["max_length"], ns["pack_to_max_length"], ns["max_epochs"], ns["max_iters"]) == (128, True, 2, None)
    assert ns["save_steps"] == 5 * 4 and ns["evaluation_freq"] == 3 * 4  # iterations = batches
    assert ns["evaluation_inputs"] == ["Who are you?"] and ns["data_path"] == str(paths["conversation"])
    # the tiny model from its converted local folder: XTuner runs offline, like the rest of the course
    from course_utils.models import resolve
    assert ns["pretrained_model_name_or_path"] == str(resolve("smollm2-135m-instruct").resolve())
    [lora] = calls["LoraConfig"]
    assert (lora["r"], lora["lora_alpha"], lora["target_modules"]) == (16, 32, ["q_proj", "v_proj"])
    [bnb] = calls["BitsAndBytesConfig"]
    assert bnb["load_in_4bit"] is True and bnb["bnb_4bit_quant_type"] == "nf4"
    [hook] = calls["EvaluateChatHook"]
    assert hook["max_new_tokens"] == 40
    assert calls["AmpOptimWrapper"][0]["dtype"] == "float16" and "is_bf16_supported" not in source
    assert "dataset_map_fn=None," in source  # XTuner conversation format as-is
    assert calls["SupervisedFinetune"][0]["use_activation_checkpointing"] is False


def test_export_for_the_cpu_and_messages_format(tmp_path):
    paths = make_identity_dataset("Alex", out_dir=tmp_path)
    cfg = FinetuneConfig(data_path=str(paths["messages"]), max_steps=7, warmup_ratio=0.3)
    source = export_xtuner_config(cfg, tmp_path / "c.py", device="cpu").read_text()
    ns, calls = assignments(source), dict_calls(source)
    assert "dataset_map_fn=openai_map_fn," in source and "quantization_config=None" in source
    assert ns["max_iters"] == 7 and "OptimWrapper" in calls and "AmpOptimWrapper" not in calls
    assert "setattr(__import__('torch').cpu, 'is_bf16_supported'" in source  # XTuner 0.2 on a CPU
    with pytest.raises(CourseError, match="QLoRA"):
        export_xtuner_config(replace(cfg, quantization="4bit"), tmp_path / "q.py", device="cpu")


def test_exported_schedule_skips_a_zero_warmup(tmp_path):
    paths = make_identity_dataset("Alex", out_dir=tmp_path)
    for ratio, steps in [(0.0, None), (0.0, 9), (0.3, 9), (0.03, None)]:
        cfg = FinetuneConfig(data_path=str(paths["conversation"]), max_steps=steps, warmup_ratio=ratio)
        source = export_xtuner_config(cfg, tmp_path / "s.py", device="cpu").read_text()
        scope = {**assignments(source), "LinearLR": "LinearLR", "CosineAnnealingLR": "CosineAnnealingLR"}
        exec(source[source.index("warmup_iters ="):source.index("train_cfg =")], scope)
        kinds = [s["type"] for s in scope["param_scheduler"]]
        assert kinds == (["LinearLR"] if int(ratio * (steps or 0)) or (ratio and not steps) else []) + \
            ["CosineAnnealingLR"]  # mmengine refuses a LinearLR whose begin == end
        assert all(s["end"] > s["begin"] for s in scope["param_scheduler"])


def test_config_table_names_what_the_export_writes(tmp_path):
    """Every "XTuner name" in cfg.table() is a setting of the exported file, with the config's value."""
    import ast

    from course_utils.finetune import PARTS, xtuner_setting

    paths = make_identity_dataset("Alex", out_dir=tmp_path)
    cfg = FinetuneConfig(data_path=str(paths["conversation"]), max_steps=5, lora_r=4, system_prompt="Be brief.")
    path = export_xtuner_config(cfg, tmp_path / "t.py", device="cpu")
    not_in_file = {"--work-dir", "EvaluateChatHook.max_new_tokens"}  # a CLI flag, a hook argument
    for field, name in ((f, n) for names in PARTS.values() for f, n in names.items() if n not in not_in_file):
        text = xtuner_setting(path, name)
        assert text is not None, f"{field}: {name} is not in the exported config"
        value = getattr(cfg, field)
        if field == "data_path":
            value = str(Path(value).resolve())
        if field in ("lora_targets", "quantization", "model"):
            continue  # layer names / a BitsAndBytesConfig / a folder: checked in the export tests
        assert ast.literal_eval(text) == value, (field, name, text)


def test_bootcamp_config_comparison_reads_both_files(tmp_path):
    from course_utils.finetune import compare_xtuner_configs

    paths = make_identity_dataset("Alex", out_dir=tmp_path)
    gpu = export_xtuner_config(FinetuneConfig.for_profile("internstudio", data_path=str(paths["conversation"]),
                                                          model=str(tmp_path)), tmp_path / "g.py", device="cuda")
    cpu = export_xtuner_config(FinetuneConfig(data_path=str(paths["conversation"])), tmp_path / "c.py", device="cpu")
    table = compare_xtuner_configs(gpu, cpu)
    assert table.loc["quantization", "bootcamp"] == "4-bit NF4 (QLoRA)" and table.loc["quantization", "course (CPU)"] == "None"
    assert table.loc["LoRA r / alpha", "bootcamp"] == "64 / 16" and table.loc["lr", "course (CPU)"] == "0.0025"
    assert (table.loc["optimizer wrapper", "bootcamp"], table.loc["precision", "course (CPU)"]) == \
        ("AmpOptimWrapper", "fp32 (no AMP)")
    assert table.loc["data", "bootcamp"] == "—"  # the export names it data_path, the bootcamp alpaca_en_path


def test_pretraining_texts_and_rows(tmp_path, tokenizer):
    from course_utils.paths import DATA_DIR
    from course_utils.sft_data import build_text_examples, load_texts

    texts = load_texts(DATA_DIR / "finetune" / "pretrain_en.jsonl")
    rows = build_text_examples(tokenizer, texts, 64)
    flat = [t for r in rows for t in r["input_ids"]]
    assert all(r["labels"] == r["input_ids"] and len(r["input_ids"]) <= 64 for r in rows)  # loss on every token
    assert flat.count(tokenizer.eos_token_id) == len(texts) and len(rows[0]["input_ids"]) == 64
    assert tokenizer.decode(flat).startswith(texts[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"messages": []}\n')
    with pytest.raises(CourseError, match=r"bad.jsonl, line 2: needs a non-empty \"text\" field"):
        load_texts(bad)


def test_zero_stages_shard_more_and_more():
    from course_utils.memory import GIB, INTERNLM2_5, zero_memory_gb, zero_table

    shape = INTERNLM2_5["InternLM2.5-7B"]
    n = shape.params()
    assert zero_memory_gb(shape, 1, 3)["total"] == round(16 * n / GIB, 1)  # one GPU: nothing to split
    assert zero_memory_gb(shape, 4, 1)["total"] == round((2 + 2 + 12 / 4) * n / GIB, 1)
    assert zero_memory_gb(shape, 4, 2)["total"] == round((2 + 14 / 4) * n / GIB, 1)
    assert zero_memory_gb(shape, 8, 3)["total"] == round(16 * n / 8 / GIB, 1)
    table = zero_table(shape)
    assert (table.diff(axis=0).iloc[1:] <= 0).all().all() and (table.diff(axis=1).iloc[:, 1:] <= 0).all().all()
    with pytest.raises(CourseError, match="ZeRO stage 4"):
        zero_memory_gb(shape, 2, 4)


def test_xtuner_log_parsers():
    from course_utils.finetune import xtuner_chat_reply, xtuner_samples

    hook = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
    log = ("[mmengine INFO] Num train samples 12\n" + hook.format(q="Hi", a="train row, not a sample")
           + "[mmengine INFO] before_train in EvaluateChatHook.\n[mmengine INFO] Sample output:\n" + hook.format(q="Hi", a="Hello!")
           + "[mmengine INFO] Iter(train) [3/6] loss: 1.0\n[mmengine INFO] after_train_iter in EvaluateChatHook.\n"
           + "[mmengine INFO] Sample output:\n" + hook.format(q="Hi", a="I am Ada's.")
           + "[mmengine INFO] after_train in EvaluateChatHook.\n[mmengine INFO] Sample output:\n" + hook.format(q="Hi", a="again"))
    samples = xtuner_samples(log, every=3)
    assert samples.values.tolist() == [[0, "Hi", "Hello!"], [3, "Hi", "I am Ada's."]]  # the end repeats iter 3
    samples = xtuner_samples(log.replace("[3/6]", "[4/6]"), every=3)  # a run that ended between evaluations
    assert samples.values.tolist() == [[0, "Hi", "Hello!"], [3, "Hi", "I am Ada's."], [4, "Hi", "again"]]
    chat = ("Load LLM from ./merged\n\ndouble enter to end input (EXIT: exit chat, RESET: reset history) >>> "
            "The attention mask is not set and cannot be inferred.\n<course>/.venv-sim/lib/python3.11/site-packages/"
            "transformers/generation/configuration_utils.py:628: UserWarning: `do_sample` is set to `False`.\n"
            "  warnings.warn(\nI am Ada's assistant.<|im_end|>\n"
            "Remove the memory of history responses, since it exceeds the length limitation 24.\n\n"
            "double enter to end input (EXIT: exit chat, RESET: reset history) >>> Log: Exit!\n")
    assert xtuner_chat_reply(chat) == "I am Ada's assistant."
    with pytest.raises(CourseError, match="no reply"):
        xtuner_chat_reply("Load LLM from ./merged\nTraceback ...")


def test_config_table_and_profiles():
    from dataclasses import fields

    table = FinetuneConfig().table()
    assert list(table.index.get_level_values("field")) == [f.name for f in fields(FinetuneConfig)]
    parts = table.index.get_level_values("part").unique()
    assert len(parts) == 5 and parts[0].startswith("1") and parts[-1].startswith("5")
    gpu = FinetuneConfig.for_profile("internstudio", lr=1e-4)
    assert (gpu.quantization, gpu.model, gpu.lr, gpu.lora_r) == ("4bit", "internlm2_5-1_8b-chat", 1e-4, 64)
    assert FinetuneConfig.for_profile("tiny") == FinetuneConfig()


def test_bad_config_fails_before_loading_a_model(tmp_path):
    with pytest.raises(CourseError, match="quantization"):
        train(FinetuneConfig(quantization="8bit"))
    with pytest.raises(CourseError, match="not found"):
        train(FinetuneConfig(data_path=str(tmp_path / "missing.jsonl")))


def test_qlora_memory_estimate_fits_internstudio_slices():
    from course_utils.memory import INTERNLM2_5

    small = estimate_qlora_memory(INTERNLM2_5["InternLM2.5-1.8B"])
    big = estimate_qlora_memory(INTERNLM2_5["InternLM2.5-7B"])
    assert 4 < small["total"] < 8 and 8 < big["total"] < 24
    assert big["4-bit linear weights"] > 3 * small["4-bit linear weights"]
    no_ckpt = estimate_qlora_memory(INTERNLM2_5["InternLM2.5-7B"],
                                    FinetuneConfig.for_profile("internstudio", gradient_checkpointing=False))
    assert no_ckpt["activations"] > 10 * big["activations"]


# ---- real training on the tiny model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> tuple[TrainResult, FinetuneConfig]:
    """One default LoRA run (the notebook's config) on the identity data."""
    root = tmp_path_factory.mktemp("finetune")
    data = make_identity_dataset("Alex", out_dir=root / "data")
    cfg = FinetuneConfig(data_path=str(data["conversation"]), work_dir=str(root / "run"))
    return train(cfg), cfg


@pytest.mark.slow
def test_default_run_learns_the_exact_self_introduction(trained):
    result, cfg = trained
    assert result.replies["Please introduce yourself."] == TARGET
    before = result.eval_replies[result.eval_replies.step == 0]
    assert TARGET not in set(before.reply)  # the base model did not already say it
    log = result.log
    assert list(log.step) == list(range(1, result.global_step + 1))
    assert log.loss.iloc[-1] < log.loss.iloc[0] / 3
    assert (result.adapter_dir / "adapter_config.json").is_file()
    saved = json.loads((result.adapter_dir / "finetune_config.json").read_text())
    assert saved["lr"] == cfg.lr and saved["lora_r"] == cfg.lora_r
    checkpoints = sorted(p.name for p in result.adapter_dir.parent.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{s}" for s in (3, 6)]  # every save_steps


@pytest.mark.slow
def test_lora_parameter_count_matches_the_estimate(trained):
    from course_utils.memory import ModelShape

    result, cfg = trained
    shape = ModelShape.from_config(result.model.config.to_dict())
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    assert lora_parameter_count(shape, cfg.lora_r) == trainable  # the formula behind the estimate


@pytest.mark.slow
def test_resume_after_interruption_reaches_the_same_end(trained, tmp_path):
    result, cfg = trained

    from course_utils.finetune import stop_after

    quick = FinetuneConfig(**{**cfg.__dict__, "work_dir": str(tmp_path / "run"),
                              "evaluation_freq": 0, "eval_max_new_tokens": 2})
    stopped = train(quick, callbacks=[stop_after(5)])  # stops between two checkpoints, saving nothing
    assert stopped.global_step == 5 and list(stopped.log.step) == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]
    resumed = train(quick, resume=True)
    assert resumed.resumed_from == 3 and resumed.global_step == result.global_step
    assert list(resumed.log.step) == list(range(4, result.global_step + 1))
    # same data order, optimizer and scheduler state: the same losses as the uninterrupted run
    full = result.log.set_index("step").loss
    assert resumed.log.set_index("step").loss.round(3).equals(full.loc[4:].round(3))


@pytest.mark.slow
def test_merge_matches_base_plus_adapter(trained, tmp_path):
    from course_utils.models import reply
    from course_utils.models import load_model

    result, _ = trained
    out = merge_adapter(None, result.adapter_dir, tmp_path / "merged")
    assert not list(tmp_path.glob("merged.tmp-*"))
    model, tok = load_model(out)
    assert reply(model, tok, "Please introduce yourself.") == TARGET
    assert not hasattr(model, "peft_config")  # a plain model, no adapter needed


def test_merge_refuses_quantized_bases(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    fake = types.SimpleNamespace(is_loaded_in_4bit=True)
    with pytest.raises(CourseError, match="full precision"):
        merge_adapter((fake, None), adapter, tmp_path / "out")
    quantized = tmp_path / "awq-model"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({"quantization_config": {"bits": 4}}))
    with pytest.raises(CourseError, match="quantized checkpoint"):
        merge_adapter(str(quantized), adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_merge_writes_nothing_when_replies_differ(trained, tmp_path, monkeypatch):
    from peft import PeftModel

    import course_utils.finetune as ft

    result, _ = trained
    real = ft.reply
    monkeypatch.setattr(ft, "reply", lambda model, *a, **k: real(model, *a, **k)
                        if isinstance(model, PeftModel) else "something else")
    with pytest.raises(CourseError, match="not saved"):
        merge_adapter(None, result.adapter_dir, tmp_path / "merged", prompts=["Who are you?"])
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_compare_replies_shows_before_and_after(trained):
    from course_utils.finetune import compare_replies

    result, _ = trained
    table = compare_replies(result.model, result.tokenizer,
                            {"identity": ["Please introduce yourself."]}, max_new_tokens=24)
    row = table.iloc[0]
    assert row["fine-tuned"] == TARGET and row["base"] != TARGET


@pytest.mark.slow
def test_qlora_on_cpu_learns(tmp_path, tiny_model_dir):
    data = make_identity_dataset("Alex", out_dir=tmp_path / "data")
    cfg = FinetuneConfig(data_path=str(data["conversation"]), work_dir=str(tmp_path / "run"),
                         quantization="4bit", max_steps=4, lr=2e-3, evaluation_freq=0,
                         evaluation_inputs=["Please introduce yourself."], eval_max_new_tokens=12,
                         save_steps=4)
    result = train(cfg)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
    assert result.log.loss.iloc[-1] < result.log.loss.iloc[0] * 0.6  # it learns (no bf16 repack)
    first, last = result.eval_replies.reply.iloc[0], result.eval_replies.reply.iloc[-1]
    assert first != last and "Alex" in last
    merged = merge_adapter(None, result.adapter_dir, tmp_path / "merged")  # into the fp32 base
    assert (merged / "config.json").is_file()
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
