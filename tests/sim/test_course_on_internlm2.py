"""The course's own code on InternLM2.5's own model code, in the internstudio profile."""

import json

import pytest
import torch

from simenv import ROOT


def test_the_profile_finds_the_share_models(chat_dir):
    from course_utils.env import profile
    from course_utils.models import doctor
    from course_utils.models import default_name, embedding_path, resolve

    assert profile() == "internstudio" and default_name() == "internlm2_5-1_8b-chat"
    assert resolve() == chat_dir
    assert embedding_path().parent.name == "sentence-transformer"  # the share path of the multilingual MiniLM
    table = doctor()
    assert table.loc["model: internlm2_5-1_8b-chat", "value"] == f"share: {chat_dir}"
    assert table.loc["env", "value"].startswith("InternStudio lock")


def test_load_and_cached_generation(chat_model):
    model, tok = chat_model
    assert type(model).__name__ == "InternLM2ForCausalLM" and type(tok).__name__ == "InternLM2TokenizerFast"
    assert type(model).__module__.startswith("transformers_modules.")  # the folder's own code, not a port
    ids = tok.apply_chat_template([{"role": "user", "content": "Please introduce yourself."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    greedy = dict(max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **greedy)
        uncached = model.generate(ids, use_cache=False, **greedy)
        full = model(cached).logits  # one forward over the whole sequence, no cache
    assert torch.equal(cached, uncached)
    # The last token of each step is what full-sequence attention also picks (greedy, no cache).
    assert torch.equal(full[0, ids.shape[1] - 1:-1].argmax(-1), cached[0, ids.shape[1]:])


def test_chat_session_streams_the_same_reply(chat_model):
    from course_utils.chat import ChatSession

    session = ChatSession.load(chat_model, max_new_tokens=16, temperature=0)
    whole = session.ask("Who are you?")
    session.reset()
    streamed = "".join(session.ask("Who are you?", stream=True))
    assert whole and streamed == whole
    assert [m["role"] for m in session.history] == ["user", "assistant"]


def test_rag_chain_with_the_local_model(chat_model, tmp_path):
    from course_utils import rag
    from course_utils.chat import ChatSession

    store, report = rag.build_vectorstore(ROOT / "data/knowledge_base/en/lmdeploy", tmp_path / "store",
                                          embeddings=rag.load_embeddings(), progress=False)
    chain = rag.make_rag_chain(ChatSession.load(chat_model, max_new_tokens=8), store, k=2)
    result = chain.invoke("Which port does lmdeploy serve api_server listen on by default?")
    assert isinstance(result["answer"], str) and len(result["sources"]) == 2
    assert result["sources"][0]["path"] == "api_server.md"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few LoRA steps on the tiny InternLM2.5, through the course's train() and its eval hook."""
    from course_utils.finetune import FinetuneConfig, train
    from course_utils.sft_data import make_identity_dataset

    out = tmp_path_factory.mktemp("finetune")
    data = make_identity_dataset("Ada", base="InternLM2.5-1.8B", repeats=2, out_dir=out / "data")
    cfg = FinetuneConfig(data_path=str(data["conversation"]), work_dir=str(out / "run"), max_steps=12,
                         lr=1e-2, batch_size=4, evaluation_freq=6, save_steps=6,
                         evaluation_inputs=["Please introduce yourself."])
    return cfg, train(cfg)


def test_lora_training_with_the_evaluation_hook(trained):
    cfg, result = trained
    assert result.global_step == 12 and cfg.model is None  # the profile's model: InternLM2.5 from the share
    assert list(result.eval_replies.step) == [0, 6, 12]  # before step 1, every 6 steps (cached generate)
    losses = result.log.loss.tolist()
    assert losses[-1] < 0.8 * losses[0], losses  # random weights, but LoRA still fits the replies
    assert (result.adapter_dir / "adapter_config.json").is_file()
    targets = json.loads((result.adapter_dir / "adapter_config.json").read_text())["target_modules"]
    assert {"wqkv", "wo", "w1", "w2", "w3"} <= set(targets)  # InternLM2's own layer names


def test_merge_save_and_reload(trained, tmp_path):
    from peft import PeftModel

    from course_utils.finetune import merge_adapter
    from course_utils.models import reply
    from course_utils.models import load_model

    _, result = trained
    merged = merge_adapter(None, result.adapter_dir, tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    assert (merged / "modeling_internlm2.py").is_file()  # save_pretrained carried the remote code along
    base, tok = load_model()
    with_adapter = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    reloaded, tok2 = load_model(merged)
    for q in ["Please introduce yourself.", "What is 2 + 2?"]:
        assert reply(reloaded, tok2, q) == reply(with_adapter, tok, q)


@pytest.mark.parametrize("mode", ["ppl", "gen"])
def test_evaluate_on_four_questions(chat_model, mode):
    from course_utils.evaluate import evaluate

    result = evaluate(chat_model, "course_en", mode=mode, test_range="[0:4]", progress=False)
    assert result.num_questions == 4 and 0 <= result.accuracy <= 100
    rows = [json.loads(line) for line in result.predictions_path.read_text().splitlines()]
    assert len(rows) == 4 and all(r["prediction"] is None or r["prediction"] in "ABCD" for r in rows)


def test_kv_cache_quantization_on_internlm2(chat_model):
    from course_utils import kvcache as kv
    from course_utils.quantize import perplexity

    model, tok = chat_model
    texts = ["The river winds across the plain, past fields and a mill. " * 8]
    plain = perplexity(model, tok, texts)
    int8 = perplexity(model, tok, texts, cache_factory=kv.cache_factory("int8", model.config))
    assert abs(int8 - plain) / plain < 0.01  # int8 K/V per head and token: a tiny change
    table = kv.memory_table(model.config, 256, kinds=("bf16", "int8", "int4"))
    assert table.loc["int8", "measured (MB)"] == table.loc["int8", "formula (MB)"]
