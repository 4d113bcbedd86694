"""course_utils.evaluate / eval_data: datasets, prompts, both inferencers, outputs, summary, config export."""

import ast
import contextlib
import json
import math
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from course_utils.errors import CourseError
from pyconfig import dict_calls

from course_utils.eval_data import (OPTIONS, build_messages, extract_choice, list_datasets, load_dataset,
                                    parse_range, render_plain)
from course_utils.evaluate import (EndpointLM, LocalLM, disagreements, evaluate, export_opencompass_config,
                                   load_predictions, summarize, summary_table)
from course_utils.hub import send_json


# ---- data --------------------------------------------------------------------------------------
def test_course_datasets_are_complete_and_balanced():
    assert {"course_en", "course_zh"} <= set(list_datasets())
    total = 0
    for name, lang in (("course_en", "en"), ("course_zh", "zh")):
        data = load_dataset(name)
        total += len(data)
        assert data.language == lang and len(data.dev) >= 5
        assert set(Counter(r["category"] for r in data.records)) == {
            "general_knowledge", "reasoning", "internlm_stack"}
        letters = Counter(r["answer"] for r in data.records)
        assert set(letters) == set(OPTIONS) and min(letters.values()) >= len(data) // 5, letters
        for r in data.records + data.dev:
            assert len({r[o] for o in OPTIONS}) == 4, r["id"]  # four distinct options
        assert len({r["question"] for r in data.records + data.dev}) == len(data.records) + len(data.dev)
    assert total >= 100


def test_test_range_slices_like_opencompass():
    assert parse_range("[0:20]", 50) == slice(0, 20)
    assert parse_range("[:10]", 50) == slice(None, 10)
    assert parse_range("[5:]", 50) == slice(5, None)
    assert parse_range(3, 50) == slice(0, 3)
    full, part = load_dataset("course_en"), load_dataset("course_en", test_range="[2:7]")
    assert [r["id"] for r in part.records] == [r["id"] for r in full.records[2:7]]
    with pytest.raises(CourseError, match="not a slice"):
        parse_range("first ten", 50)


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "A": "1", "B": "2", "C": "3", "answer": "A"}', "lacks column"),
    ('{"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "E"}', "not one of"),
    ('{"question": "q", "A": "1",', "not valid JSON"),
])
def test_malformed_records_name_the_line_and_the_fix(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "ok", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "b"}\n' + line + "\n")
    with pytest.raises(CourseError, match=message) as info:
        load_dataset(path)
    assert "line 2" in str(info.value)


def test_jsonl_path_dataset_gets_ids_and_normalised_answers(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "ok", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "b"}\n')
    data = load_dataset(path)
    assert data.name == "mine" and data.records[0]["id"] == "mine-0000" and data.records[0]["answer"] == "B"
    with pytest.raises(CourseError, match="not found"):
        load_dataset("no_such_set")


# ---- prompts -----------------------------------------------------------------------------------
def test_k_shot_prompt_uses_the_first_dev_examples_in_order():
    data = load_dataset("course_en", test_range="[0:1]")
    messages = build_messages(data.records[0], data, shots=3)
    assert len(messages) == 7 and [m["role"] for m in messages[:2]] == ["user", "assistant"]
    assert [m["content"] for m in messages[1:6:2]] == [r["answer"] for r in data.dev[:3]]
    assert messages[0]["content"].startswith("The following are multiple choice questions about")
    text = render_plain(messages, "en")
    assert text.endswith("D. " + data.records[0]["D"] + "\nAnswer:")
    assert text.count("Answer: ") == 3  # the three examples' answers, then the open cue
    with pytest.raises(CourseError, match="dev examples"):
        build_messages(data.records[0], data, shots=6)


def test_chinese_prompt_follows_ceval_wording():
    data = load_dataset("course_zh", test_range="[0:1]")
    text = render_plain(build_messages(data.records[0], data, shots=1, mode="gen"), "zh")
    assert text.startswith("以下是关于常识的单项选择题，请选出其中的正确答案。")
    assert "答案：" + data.dev[0]["answer"] + "\n\n" in text and text.endswith("答案：")


# ---- gen answer extraction ----------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("答案是 B", "B"), ("正确答案：C。", "C"), ("我选D", "D"),
    ("(c)", "C"), ("（A）", "A"), ("B. because the sky is blue", "B"), ("b", "B"),
    ("the answer is d", "D"), ("The correct answer is D. Madrid.", "D"), ("Answer: (b) Paris", "B"),
    ("A. Sydney\n\nThe correct answer is C. Canberra.", "C"), ("I think option c is right", "C"),
    ("I don't know.", None), ("", None), ("A rainbow forms when light bends.", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_extract_choice_falls_back_to_a_quoted_option():
    record = {"A": "Sydney", "B": "Melbourne", "C": "Canberra", "D": "Perth"}
    assert extract_choice("It is Canberra, of course.", record) == "C"
    assert extract_choice("Sydney or Perth?", record) is None  # two options quoted: no answer


# ---- ppl inferencer: hand-computed log-likelihoods and padding ------------------------------------
VOCAB = "_abcd"  # id 0 is padding
PROBS = [  # P(next | previous) for a bigram model; rows: previous token
    [0.2, 0.2, 0.2, 0.2, 0.2],
    [0.1, 0.1, 0.5, 0.2, 0.1],  # after "a": "b" is likely
    [0.1, 0.4, 0.1, 0.1, 0.3],
    [0.1, 0.1, 0.1, 0.6, 0.1],
    [0.25, 0.25, 0.25, 0.125, 0.125],
]


class CharTokenizer:
    pad_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [VOCAB.index(c) for c in text]}


class BigramLM:
    """logits[t] = log P(. | token t): its log-likelihoods can be written down by hand."""

    device = "cpu"

    def __init__(self):
        import torch

        self.table = torch.tensor(PROBS).log()

    def __call__(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
        logits = self.table[input_ids]  # a bigram needs no past: the cache below only has to exist
        cache = SimpleNamespace(batch_select_indices=lambda index: None)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits,
                               past_key_values=cache)


def test_ppl_scores_equal_hand_computed_log_likelihoods():
    lm = LocalLM(BigramLM(), CharTokenizer(), abbr="bigram", batch_size=3)
    pairs = [("a", "b"), ("a", "c"), ("ab", "bd"), ("dca", "bbc"), ("c", "c")]
    expected = [
        math.log(0.5), math.log(0.2),  # P(b | a), P(c | a): one forward pass serves both
        math.log(0.1) + math.log(0.3),  # P(b | b) P(d | b)
        math.log(0.5) + math.log(0.1) + math.log(0.1),  # P(b | a) P(b | b) P(c | b)
        math.log(0.6),
    ]
    got = lm.loglikelihood(pairs)
    assert [n for _, n in got] == [1, 1, 2, 3, 1]
    assert [s for s, _ in got] == pytest.approx(expected, abs=1e-6)
    right = LocalLM(BigramLM(), CharTokenizer(), padding_side="right").loglikelihood(pairs)
    assert [s for s, _ in right] == pytest.approx(expected, abs=1e-6)


@pytest.fixture(scope="module")
def random_gpt2(tiny_tokenizer):
    """A 2-layer random GPT-2: learned absolute positions, where wrong position ids change every score."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=1024)
    return GPT2LMHeadModel(config).eval()


def _pairs():
    data = load_dataset("course_en", test_range="[0:4]")
    prompts = [render_plain(build_messages(r, data, shots=i % 3), "en") for i, r in enumerate(data.records)]
    return [(p, f" {x}") for p, r in zip(prompts, data.records) for x in ("A", "B", r["A"], r["B"] + " or so")]


@pytest.mark.parametrize("arch", ["random_llama", "random_gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_scores_equal_unbatched(request, tiny_tokenizer, arch, side):
    model = request.getfixturevalue(arch)
    pairs = _pairs()  # prompts of different lengths, one- and multi-token answers
    one = LocalLM(model, tiny_tokenizer, batch_size=1).loglikelihood(pairs)
    batched = LocalLM(model, tiny_tokenizer, batch_size=8, padding_side=side).loglikelihood(pairs)
    assert [n for _, n in batched] == [n for _, n in one]
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in one], abs=1e-4)


def test_left_padding_needs_position_ids(random_gpt2):
    """The check above is sensitive: with absolute positions, a left-padded row without position_ids
    scores differently. (Rotary models like Llama only see relative positions, so a shift is harmless.)"""
    import torch

    seq = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[0, 0, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        ref = random_gpt2(seq).logits[0, -1]
        naive = random_gpt2(padded, attention_mask=mask).logits[0, -1]
        fixed = random_gpt2(padded, attention_mask=mask, position_ids=positions).logits[0, -1]
    assert torch.allclose(fixed, ref, atol=1e-5) and not torch.allclose(naive, ref, atol=1e-3)


# ---- evaluate: outputs folder, reuse, resume, summary ---------------------------------------------
def test_outputs_folder_reuse_and_resume(random_llama, tiny_tokenizer, tmp_path):
    lm = LocalLM(random_llama, tiny_tokenizer, abbr="rand", batch_size=2)
    first = evaluate(lm, "course_en", test_range="[0:6]", out_dir=tmp_path, progress=False)
    rows = load_predictions(first.predictions_path)
    assert first.predictions_path == tmp_path / "predictions" / "rand" / "course_en_ppl.jsonl"
    assert len(rows) == 6 and set(rows.prediction) <= set(OPTIONS)
    assert first.accuracy == round(100 * rows.correct.mean(), 2)
    assert (rows.prediction == rows.gold).tolist() == rows.correct.tolist()
    assert json.loads(first.results_path.read_text())["accuracy"] == first.accuracy
    assert (tmp_path / "summary" / "summary.csv").is_file() and (tmp_path / "summary" / "summary.txt").is_file()

    # reuse: re-scored from disk; the model argument is never loaded (it does not even exist)
    again = evaluate("no/such/model", "course_en", test_range="[0:6]", out_dir=tmp_path, reuse=True,
                     abbr="rand", progress=False)
    assert (again.accuracy, again.reused, again.seconds) == (first.accuracy, 6, 0.0)

    # resume: an interrupted run left 3 predictions; only the other 3 are computed
    lines = first.predictions_path.read_text().splitlines()
    first.predictions_path.write_text("\n".join(lines[:3]) + "\n")
    resumed = evaluate(lm, "course_en", test_range="[0:6]", out_dir=tmp_path, reuse=True, progress=False)
    assert resumed.reused == 3 and resumed.accuracy == first.accuracy
    assert load_predictions(resumed.predictions_path).prediction.tolist() == rows.prediction.tolist()

    # a smaller slice re-scores the stored predictions; the file then holds exactly that result's rows
    part = evaluate(lm, "course_en", test_range="[0:3]", out_dir=tmp_path, reuse=True, progress=False)
    assert part.reused == 3 and len(load_predictions(part.predictions_path)) == 3

    with pytest.raises(CourseError, match="another prompt or dataset version"):
        evaluate(lm, "course_en", test_range="[0:6]", style="chat", out_dir=tmp_path, reuse=True, progress=False)


def test_reuse_without_any_run_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path))
    with pytest.raises(CourseError, match="no earlier run"):
        evaluate("x", "course_en", reuse=True, abbr="x")


def test_bad_mode_and_style():
    with pytest.raises(CourseError, match="mode="):
        evaluate("x", "course_en", mode="generate", abbr="x")
    with pytest.raises(CourseError, match="style="):
        evaluate("x", "course_en", style="fancy", abbr="x")


def test_summary_table_has_opencompass_shape():
    def result(model, acc, mode="ppl", shots=0, version="abc123"):
        return {"model": model, "dataset": "course_en", "version": version, "mode": mode, "shots": shots,
                "accuracy": acc, "by_category": {"reasoning": acc / 2}}

    table = summary_table([result("base", 40.0), result("tuned", 35.5), result("base", 30.0, "gen", 5, "def456")],
                          categories=True)
    assert list(table.columns) == ["dataset", "version", "metric", "mode", "base", "tuned"]
    assert table.dataset.tolist() == ["course_en", "course_en-reasoning", "course_en_5shot", "course_en_5shot-reasoning"]
    assert table.loc[0, "tuned"] == 35.5 and table.loc[2, "tuned"] == "-" and table.loc[2, "mode"] == "gen"
    assert set(table.metric) == {"accuracy"}


class CannedLM:
    """A duck-typed LM whose replies are fixed: tests the gen inferencer without a model."""

    abbr, batch_size = "canned", 4

    def __init__(self, reply):
        self.reply = reply

    def render(self, messages, style, language):
        return messages

    def generate(self, prompts, *, style, max_new_tokens):
        return [self.reply] * len(prompts)


def test_gen_mode_extracts_answers_and_disagreements(tmp_path):
    lm = CannedLM("答案是 B")
    gen = evaluate(lm, "course_zh", mode="gen", test_range="[0:8]", out_dir=tmp_path, progress=False)
    rows = gen.predictions()
    assert set(rows.prediction) == {"B"} and rows.output.tolist() == ["答案是 B"] * 8
    assert gen.accuracy == round(100 * (rows.gold == "B").mean(), 2)
    other = evaluate(CannedLM("(c)"), "course_zh", mode="gen", test_range="[0:8]", out_dir=tmp_path,
                     abbr="canned2", progress=False)
    table = disagreements(gen, other)
    assert len(table) == 8 and list(table.columns) == ["category", "gold", "canned", "canned output",
                                                      "canned2", "canned2 output"]
    assert set(table.canned) == {"B"} and set(table.canned2) == {"C"}
    assert list(summarize(tmp_path).columns[4:]) == ["canned", "canned2"]


# ---- endpoints (a local OpenAI-compatible stub) -------------------------------------------------
def _char_logprob(ch: str) -> float:
    return -(ord(ch) % 7) / 10 - 0.05


class _Stub(BaseHTTPRequestHandler):
    logprobs = True

    def log_message(self, *args):
        pass

    def _send(self, payload):
        send_json(self, payload)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "stub-model", "object": "model", "created": 0,
                                                "owned_by": "test"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        base = {"id": "x", "created": 0, "model": req["model"], "usage": {"prompt_tokens": 1,
                "completion_tokens": 1, "total_tokens": 2}}
        if self.path.endswith("/chat/completions"):
            self._send({**base, "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "The answer is (B)."}}]})
            return
        prompt = req["prompt"]  # one character per token: offsets are easy to check
        logprobs = None
        if self.logprobs and req.get("echo"):
            logprobs = {"tokens": list(prompt) + ["!"], "token_logprobs": [None] + [_char_logprob(c) for c in prompt[1:]] + [-1.0],
                        "text_offset": list(range(len(prompt) + 1)), "top_logprobs": None}
        self._send({**base, "object": "text_completion", "choices": [
            {"index": 0, "finish_reason": "length", "text": (prompt if req.get("echo") else "") + "!",
             "logprobs": logprobs}]})


@contextlib.contextmanager
def stub_server(logprobs=True):
    handler = type("Handler", (_Stub,), {"logprobs": logprobs})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


def test_endpoint_ppl_sums_continuation_logprobs_and_gen_extracts(tmp_path):
    with stub_server() as url:
        lm = EndpointLM(url)
        assert lm.model == "stub-model" and lm.abbr == "api-stub-model"
        (score, n), = lm.loglikelihood([("Answer:", " Canberra")])
        assert n == 9 and score == pytest.approx(sum(_char_logprob(c) for c in " Canberra"))
        ppl = evaluate(url, "course_en", mode="ppl", target="text", test_range="[0:4]", out_dir=tmp_path, progress=False)
        data = load_dataset("course_en", test_range="[0:4]")
        for row, record in zip(ppl.predictions().itertuples(), data.records):
            means = {o: sum(map(_char_logprob, " " + record[o])) / (len(record[o]) + 1) for o in OPTIONS}
            assert row.prediction == max(means, key=means.get)
        gen = evaluate(url, "course_en", mode="gen", test_range="[0:4]", out_dir=tmp_path, progress=False)
        assert set(gen.predictions().prediction) == {"B"}
        with pytest.raises(CourseError, match="style='plain'"):
            evaluate(url, "course_en", mode="ppl", style="chat", test_range="[0:1]", out_dir=tmp_path, progress=False)


def test_endpoint_without_logprobs_explains_ppl_cannot_run(tmp_path):
    with stub_server(logprobs=False) as url:
        with pytest.raises(CourseError, match="mode='gen'"):
            evaluate(url, "course_en", mode="ppl", test_range="[0:1]", out_dir=tmp_path, progress=False)


def test_endpoint_that_is_down():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(CourseError, match="No server answers"):
        EndpointLM(f"http://127.0.0.1:{port}/v1")


# ---- OpenCompass config export ------------------------------------------------------------------
# Here only the text: tests/sim/test_toolchain.py runs these configs with the real OpenCompass.
def test_export_opencompass_config(tmp_path):
    path = tmp_path / "eval_course.py"
    command = export_opencompass_config(
        ["internlm2_5-1_8b-chat", "/root/finetuned/merged", "http://127.0.0.1:23333/v1"],
        ["ceval", "course_en"], path, test_range="[0:20]", num_gpus=1)
    assert command == f"opencompass {path} --debug"
    source = path.read_text()
    tree = ast.parse(source)
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {"opencompass.configs.datasets.ceval.ceval_gen",
            "opencompass.configs.models.hf_internlm.hf_internlm2_5_1_8b_chat", "mmengine.config"} <= imported
    assert command in source  # the header tells how to run it
    assert "path='/share/new_models/Shanghai_AI_Laboratory/internlm2_5-1_8b-chat'" in source
    calls = dict_calls(source)
    [folder], [api] = calls["HuggingFacewithChatTemplate"], calls["OpenAISDK"]
    assert folder["path"] == "/root/finetuned/merged" and api["openai_api_base"] == "http://127.0.0.1:23333/v1"
    assert "_d['reader_cfg']['test_range'] = '[0:20]'" in source and "work_dir = './outputs/course_eval'" in source
    assert "dict(abbr='course_en', path='data/eval/course_en/val.jsonl', data_type='mcq', infer_method='gen', " \
           "test_range='[0:20]')" in source


def test_export_ppl_uses_the_base_model_class_and_refuses_endpoints(tmp_path):
    export_opencompass_config("internlm2_5-7b-chat", ["ceval", "course_en"], tmp_path / "c.py", mode="ppl", num_gpus=0)
    source = (tmp_path / "c.py").read_text()
    assert "opencompass.configs.datasets.ceval.ceval_ppl import ceval_datasets" in source
    assert "hf_internlm2_5_7b_chat" not in source  # OpenCompass's chat config cannot score ppl
    [model] = dict_calls(source)["HuggingFaceBaseModel"]
    assert model["path"] == "/share/new_models/Shanghai_AI_Laboratory/internlm2_5-7b-chat"
    assert "run_cfg=dict(num_gpus=0)" in source and "torch_dtype='float32'" in source
    with pytest.raises(CourseError, match="gen mode"):
        export_opencompass_config("http://127.0.0.1:23333/v1", "course_en", tmp_path / "e.py", mode="ppl")
    with pytest.raises(CourseError, match="not a slice"):
        export_opencompass_config("internlm2_5-7b-chat", "ceval", tmp_path / "d.py", test_range="0-20")


def test_config_without_imports_has_no_read_base_block(tmp_path):
    export_opencompass_config("/root/m", "course_en", tmp_path / "f.py", num_gpus=0)
    assert "read_base" not in (tmp_path / "f.py").read_text()  # mmengine rejects an empty block


def test_config_template_renders_both_optional_blocks_in_place(tmp_path):
    """data/eval/opencompass_config.py.tmpl filled in: read_base() block, lists, benchmark slice, work_dir."""
    command = export_opencompass_config("/root/m", ["ceval", "course_en"], tmp_path / "g.py", test_range="[0:2]",
                                        num_gpus=0, work_dir="./work")
    header, body = (tmp_path / "g.py").read_text().split("\n\nfrom opencompass.models import")
    assert f"#   {command}\n" in header and "(data/eval)" in header and "$" not in header
    model = ("dict(type=HuggingFacewithChatTemplate, abbr='m', path='/root/m', max_out_len=256, batch_size=8, "
             "model_kwargs=dict(torch_dtype='float32'), run_cfg=dict(num_gpus=0))")
    assert body == f""" HuggingFaceBaseModel, HuggingFacewithChatTemplate, OpenAISDK
from mmengine.config import read_base

with read_base():
    from opencompass.configs.datasets.ceval.ceval_gen import ceval_datasets

datasets = [*ceval_datasets, *[dict(abbr='course_en', path='data/eval/course_en/val.jsonl', data_type='mcq', \
infer_method='gen', test_range='[0:2]')]]
models = [*[{model}]]

# Evaluate a slice of each benchmark (OpenCompass's test_range), as the lesson does.
for _d in [*ceval_datasets]:
    _d['reader_cfg']['test_range'] = '[0:2]'

work_dir = './work'
"""


# ---- the real tiny model -------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_model_both_modes(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    pairs = _pairs()[:4]  # one prompt: two letters (one shared forward pass) and two option texts
    one = LocalLM(model, tokenizer, batch_size=1).loglikelihood(pairs)
    batched = LocalLM(model, tokenizer, batch_size=8).loglikelihood(pairs)
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in one], abs=1e-3)
    gen = evaluate(tiny_model, "course_en", mode="gen", test_range="[0:2]", max_out_len=12, out_dir=tmp_path,
                   progress=False)
    rows = gen.predictions()
    assert gen.model == "smollm2-135m-instruct" and rows.origin_prompt[0].startswith("<|im_start|>system")
    assert all(isinstance(o, str) and o for o in rows.output)
    assert rows.prediction.tolist() == [extract_choice(o, r) for o, r in
                                        zip(rows.output, load_dataset("course_en", test_range="[0:2]").records)]


def test_adapter_is_applied_on_load(random_llama, tiny_tokenizer, tmp_path):
    """load_lm(..., adapter=folder) wraps the base with the peft adapter (lesson 4's output)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from course_utils.evaluate import load_lm

    tuned = get_peft_model(copy.deepcopy(random_llama), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero update, so the adapter changes the scores
    tuned.save_pretrained(tmp_path / "adapter")
    pairs = _pairs()[:2]
    base = LocalLM(random_llama, tiny_tokenizer).loglikelihood(pairs)
    loaded = load_lm((copy.deepcopy(random_llama), tiny_tokenizer), adapter=tmp_path / "adapter", abbr="tuned")
    assert type(loaded.model).__name__.startswith("Peft") and loaded.abbr == "tuned"
    scores = [s for s, _ in loaded.loglikelihood(pairs)]
    assert scores == pytest.approx([s for s, _ in LocalLM(tuned.eval(), tiny_tokenizer).loglikelihood(pairs)], abs=1e-5)
    assert scores != pytest.approx([s for s, _ in base], abs=1e-3)


def test_reuse_continues_the_latest_run(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path))
    first = evaluate(CannedLM("B"), "course_en", mode="gen", test_range="[0:2]", progress=False)
    assert first.out_dir.parent == tmp_path / "eval" and first.out_dir.name[:2] == "20"  # a timestamp
    again = evaluate("unused", "course_en", mode="gen", test_range="[0:2]", reuse=True, abbr="canned")
    assert again.out_dir == first.out_dir and again.reused == 2


# ---- which weights made the predictions (L6.compare) ----------------------------------------------
def _explained(base, variant, words: str) -> dict:
    delta = variant.accuracy - base.accuracy
    return {"base": base, "variant": variant, "explanation": words.format(delta=f"{delta:+.2f}")}


@pytest.fixture
def lora_llama(random_llama):
    """random_llama with a non-zero LoRA update: other weights, same architecture."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    tuned = get_peft_model(copy.deepcopy(random_llama), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return tuned.eval()


def test_predictions_record_the_weights_and_reuse_refuses_other_weights(random_llama, lora_llama,
                                                                        tiny_tokenizer, tmp_path):
    from course_utils.evaluate import weights_fingerprint

    run = dict(test_range="[0:4]", out_dir=tmp_path, progress=False)
    base = evaluate(LocalLM(random_llama, tiny_tokenizer, abbr="base"), "course_en", **run)
    renamed = evaluate(LocalLM(random_llama, tiny_tokenizer, abbr="renamed"), "course_en", **run)
    tuned = evaluate(LocalLM(lora_llama, tiny_tokenizer, abbr="tuned"), "course_en", **run)
    assert base.weights == renamed.weights == weights_fingerprint(random_llama) != tuned.weights
    assert {r["weights"] for r in map(json.loads, tuned.predictions_path.read_text().splitlines())} == {tuned.weights}
    assert json.loads(base.results_path.read_text())["weights"] == base.weights
    # the tuned model must not silently take over the base model's stored predictions
    with pytest.raises(CourseError, match="made by other weights"):
        evaluate(LocalLM(lora_llama, tiny_tokenizer, abbr="base"), "course_en", reuse=True, **run)


def test_L6_compare_needs_different_weights_and_reads_chinese(random_llama, lora_llama, tiny_tokenizer, tmp_path):
    from course_utils import homework

    run = dict(test_range="[0:4]", out_dir=tmp_path, progress=False)
    base = evaluate(LocalLM(random_llama, tiny_tokenizer, abbr="base"), "course_en", **run)
    renamed = evaluate(LocalLM(random_llama, tiny_tokenizer, abbr="renamed"), "course_en", **run)
    tuned = evaluate(LocalLM(lora_llama, tiny_tokenizer, abbr="tuned"), "course_en", **run)
    english = ("Accuracy changed by {delta} points because the update moves the option log-likelihoods, "
               "so close calls between options flip one way or the other.")
    assert homework.run_check("L6.compare", _explained(base, tuned, english)).passed
    same = homework.run_check("L6.compare", _explained(base, renamed, english))
    assert not same.passed and "same weights" in same.detail  # a new abbr is not a new model
    chinese = "准确率变化了 {delta} 个百分点：LoRA 更新改变了每个选项的对数似然，接近的选项因此翻转。"
    assert homework.run_check("L6.compare", _explained(base, tuned, chinese)).passed
    short = homework.run_check("L6.compare", _explained(base, tuned, "变化 {delta} 点，因为权重变了。"))
    assert not short.passed and "15 words" in short.detail


def test_export_points_a_registry_model_at_the_local_copy(tmp_path, tiny_model_dir):
    """The tiny profile's model is exported as the folder this machine has: OpenCompass runs offline."""
    export_opencompass_config("smollm2-135m-instruct", "course_en", tmp_path / "t.py", mode="ppl", num_gpus=0)
    [model] = dict_calls((tmp_path / "t.py").read_text())["HuggingFaceBaseModel"]
    assert model["path"] == str(tiny_model_dir) and model["abbr"] == "smollm2-135m-instruct"
