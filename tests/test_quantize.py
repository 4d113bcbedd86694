"""W4A16: packing, per-group error bounds, AWQ vs RTN, the quantized model, perplexity, benchmarks."""

import copy
import time
from types import SimpleNamespace

import pytest
import torch

from course_utils import CourseError
from course_utils import quantize as q


def test_pack_unpack_round_trip_even_and_odd_widths():
    gen = torch.Generator().manual_seed(0)
    for width in (576, 577, 2):
        codes = torch.randint(0, 16, (7, width), generator=gen, dtype=torch.uint8)
        packed = q.pack_int4(codes)
        assert packed.dtype == torch.uint8 and packed.shape == (7, (width + 1) // 2)
        assert torch.equal(q.unpack_int4(packed, width), codes)


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(CourseError, match="0..15"):
        q.pack_int4(torch.full((2, 4), 16, dtype=torch.uint8))


@pytest.mark.parametrize("group_size", [128, 64])
def test_error_within_half_a_step_per_group_with_ragged_last_group(group_size):
    w = torch.randn(96, 576, generator=torch.Generator().manual_seed(1)) * 0.05
    codes, scales, zeros = q.quantize_groups(w, group_size)
    assert scales.shape == (96, q.n_groups(576, group_size)) == zeros.shape
    assert scales.dtype == zeros.dtype == torch.float16 and int(codes.max()) <= 15
    err = (q.dequantize_groups(codes, scales, zeros, group_size) - w).abs()
    step = scales.float().repeat_interleave(group_size, dim=1)[:, :576]
    assert bool((err <= 0.5 * step * 1.01 + 1e-7).all())  # 1%: the scale itself is rounded to fp16


def test_ragged_last_group_uses_only_its_own_columns():
    w = torch.randn(4, 576, generator=torch.Generator().manual_seed(2))
    w[:, 512:] *= 0.01  # the 64-column tail is tiny: a padded or shared group would blow its step up
    _, scales, _ = q.quantize_groups(w, 128)
    tail = w[:, 512:]
    expected = (tail.amax(1).clamp(min=0) - tail.amin(1).clamp(max=0)) / 15
    assert torch.allclose(scales[:, -1].float(), expected, rtol=1e-3)


def test_quant_linear_equals_its_dequantized_weight(monkeypatch):
    w = torch.randn(300, 576, generator=torch.Generator().manual_seed(3))
    layer = q.QuantLinear.from_weight(w, 128, scale=torch.rand(576) + 0.5)
    x = torch.randn(2, 5, 576)
    ref = x @ layer.dequantized_weight().T
    assert torch.allclose(layer(x), ref, atol=1e-4)
    monkeypatch.setattr(q, "ROW_CHUNK", 128)  # several row chunks give the same result
    assert torch.allclose(layer(x), ref, atol=1e-4)
    assert layer.qweight.numel() == 300 * 288 and layer.qweight.dtype == torch.uint8


def _outlier_fixture(seed=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 192, generator=gen)
    x[:, :6] *= 30  # a few channels fire much harder: the case AWQ exists for
    return torch.randn(128, 192, generator=gen) * 0.02, x


def test_awq_beats_rtn_when_activations_have_outlier_channels():
    w, x = _outlier_fixture()
    scale, alpha, loss, rtn = q.awq_search_scale(w, x, group_size=64, n_grid=20)
    assert scale is not None and 0 < alpha < 1
    assert loss < 0.8 * rtn
    assert loss == pytest.approx(q.layer_output_mse(w, x, scale, 64))


def test_awq_falls_back_to_rtn_when_no_scale_helps():
    w, x = _outlier_fixture()
    x = torch.ones_like(x)  # every channel equal: s = 1 for every alpha, AWQ == RTN
    scale, alpha, loss, rtn = q.awq_search_scale(w, x, group_size=64, n_grid=5)
    assert loss <= rtn and (scale is None or torch.allclose(scale, torch.ones_like(scale)))


def test_load_texts_and_bad_names():
    texts = q.load_texts("heldout")
    assert len(texts) >= 5 and all(len(t) > 100 for t in texts)
    assert set(texts).isdisjoint(q.load_texts("calib"))  # held-out really is held out
    with pytest.raises(CourseError, match="data/ppl"):
        q.load_texts("nope")


def test_group_size_must_be_even():
    with pytest.raises(CourseError, match="group_size"):
        q.quantize_groups(torch.randn(2, 8), 3)


class _UniformLM(torch.nn.Module):
    """Logits all equal: perplexity must be exactly the vocabulary size."""

    device = torch.device("cpu")

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*ids.shape, self.vocab))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_model):
    _, tok = tiny_model
    vocab = len(tok)
    ppl = q.perplexity(_UniformLM(vocab), tok, q.load_texts("heldout")[:2], window=64)
    assert ppl == pytest.approx(vocab)


@pytest.mark.slow
def test_quantized_model_memory_quality_and_generation(tiny_model):
    model, tok = tiny_model
    texts = q.load_texts("heldout")[:2]
    bf16 = q.weight_bytes(copy.deepcopy(model).to(torch.bfloat16))
    assert q.weight_bytes(model) == 2 * bf16  # fp32; the tied embedding counted once
    rtn = q.quantize_w4a16(copy.deepcopy(model), "rtn", 128, progress=False)
    assert sum(isinstance(m, q.QuantLinear) for m in rtn.modules()) == 30 * 7
    assert 0.40 < q.weight_bytes(rtn) / bf16 < 0.44  # the bf16 tied embedding is ~42% of the rest
    ppl_fp, ppl_rtn = q.perplexity(model, tok, texts), q.perplexity(rtn, tok, texts)
    assert ppl_fp < ppl_rtn < 1.5 * ppl_fp
    out = q.generation_benchmark(rtn, tok, "Name a colour.", max_new_tokens=6)
    assert out["new_tokens"] == 6 and out["text"].strip() and out["tokens_per_s"] > 0
    with pytest.raises(CourseError, match="already quantized"):
        q.quantize_w4a16(rtn)


@pytest.mark.slow
def test_awq_never_worse_than_rtn_on_the_calibration_loss(tiny_model):
    model, tok = tiny_model
    awq = q.quantize_w4a16(copy.deepcopy(model), "awq", 128, q.load_texts("calib")[:2], tokenizer=tok,
                           n_grid=4, max_calib_tokens=64, progress=False)
    report = awq.w4a16_report
    assert len(report) == 210
    assert all(r["mse_awq"] <= r["mse_rtn"] for r in report)
    assert sum(r["mse_awq"] for r in report) < 0.9 * sum(r["mse_rtn"] for r in report)


@pytest.mark.slow
def test_quantizing_the_tied_lm_head_packs_the_embedding_too(tiny_model):
    model, tok = tiny_model
    bf16 = q.weight_bytes(copy.deepcopy(model).to(torch.bfloat16))
    m = q.quantize_w4a16(copy.deepcopy(model), "rtn", 64, quantize_lm_head=True, progress=False)
    assert isinstance(m.get_input_embeddings(), q.QuantEmbedding)
    assert 0.26 < q.weight_bytes(m) / bf16 < 0.30
    ids = tok("The sea is", return_tensors="pt").input_ids
    head = m.get_output_embeddings()
    emb = m.get_input_embeddings()(ids)[0]  # rows must equal the head's de-quantized weight rows
    assert torch.allclose(emb.float(), head.dequantized_weight()[ids[0]], atol=1e-2)


def test_quantize_w4a16_argument_errors(tiny_model):
    model, _ = tiny_model
    with pytest.raises(CourseError, match="rtn"):
        q.quantize_w4a16(model, "gptq")
    with pytest.raises(CourseError, match="calib_texts"):
        q.quantize_w4a16(model, "awq")


class _FakeCompletions:
    def __init__(self, delay):
        self.delay, self.seen = delay, []

    def create(self, model, messages, max_tokens, temperature):
        self.seen.append(messages[0]["content"])
        time.sleep(self.delay)
        message = SimpleNamespace(content=f"reply to {messages[0]['content']}")
        return SimpleNamespace(usage=SimpleNamespace(completion_tokens=max_tokens),
                               choices=[SimpleNamespace(message=message)])


def test_benchmark_concurrency_runs_requests_in_parallel():
    fake = SimpleNamespace(chat=SimpleNamespace(completions=_FakeCompletions(0.3)))
    res = q.benchmark_concurrency(fake, "m", [f"p{i}" for i in range(8)], concurrency=8, max_tokens=5)
    assert sorted(fake.chat.completions.seen) == [f"p{i}" for i in range(8)]
    assert res["completion_tokens"] == 40 and res["requests"] == 8
    assert res["wall_s"] < 1.5  # eight 0.3 s requests at once, not 2.4 s one after another
    assert res["latency_max_s"] >= res["latency_p50_s"] >= 0.3
    assert res["max_in_flight"] == 8 and [r["text"] for r in res["log"]] == [f"reply to p{i}" for i in range(8)]
    one = q.benchmark_concurrency(fake, "m", ["a", "b", "c"], concurrency=1, max_tokens=5)
    assert one["max_in_flight"] == 1 and one["wall_s"] >= 0.9


def test_load_summary_recomputes_a_benchmark_from_its_log():
    log = [{"start_s": 0.0, "end_s": 1.0, "completion_tokens": 10},
           {"start_s": 0.5, "end_s": 2.0, "completion_tokens": 20},
           {"start_s": 1.0, "end_s": 3.0, "completion_tokens": 30}]
    summary = q.load_summary(log)
    assert summary["wall_s"] == 3.0 and summary["throughput_tok_s"] == 20.0
    assert summary["latency_mean_s"] == 1.5 and summary["max_in_flight"] == 2
    # one request ending exactly when the next starts is not two in flight
    assert q.max_in_flight([{"start_s": 0, "end_s": 1}, {"start_s": 1, "end_s": 2}]) == 1


def test_tradeoff_table_ratios():
    rows = [{"variant": "bf16", "weight_bytes": 200, "kv_bytes_2k": 100, "perplexity": 10.0, "tokens/s": 5},
            {"variant": "W4", "weight_bytes": 60, "kv_bytes_2k": 100, "perplexity": 11.111, "tokens/s": 3}]
    table = q.tradeoff_table(rows)
    assert table.loc["W4", "weights vs bf16"] == 0.3 and table.loc["W4", "KV vs bf16"] == 1.0
    assert table.loc["W4", "perplexity"] == 11.11


@pytest.mark.slow
def test_server_round_trip_stream_and_concurrency_with_the_openai_client():
    from course_utils import serving

    with serving.serve("smollm2-135m-instruct", port=serving.free_port(),
                       extra_args=q.CPU_BATCHING_ARGS) as server:
        client = serving.client(server)
        messages = [{"role": "user", "content": "Name a colour."}]
        chunks = [c.choices[0].delta.content for c in client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=6, temperature=0, stream=True)
            if c.choices and c.choices[0].delta.content]
        full = client.chat.completions.create(model=server.model, messages=messages, max_tokens=6,
                                              temperature=0)
        assert len(chunks) > 1 and "".join(chunks) == full.choices[0].message.content
        res = q.benchmark_concurrency(client, server.model, ["Say hi.", "Say yes."], concurrency=2,
                                      max_tokens=4)
        assert res["requests"] == 2 and res["completion_tokens"] > 0 and res["throughput_tok_s"] > 0


def _run(concurrency: int, spans: list[tuple[float, float]], tokens: int = 24) -> dict:
    """A benchmark_concurrency result as the homework returns it, built from request spans."""
    log = [{"prompt": f"p{i}", "start_s": a, "end_s": b, "completion_tokens": tokens, "text": f"reply {i}"}
           for i, (a, b) in enumerate(spans)]
    return {**q.load_summary(log), "concurrency": concurrency, "log": log}


def test_the_serve_homework_check_recomputes_the_load_test():
    from course_utils import homework

    server = SimpleNamespace(host="127.0.0.1", running=False, model="m", backend="transformers")
    serial = _run(1, [(i, i + 1.0) for i in range(8)])  # 8 s for 192 tokens
    batched = _run(8, [(0.0, 1.5 + 0.01 * i) for i in range(8)])  # all at once, done in 1.57 s
    passed = homework.run_check("L5.serve", {"server": server, "load": [serial, batched]})
    assert passed.passed and "concurrency 1 → 24.0 tok/s, 8 → 122.3 tok/s" in passed.detail, passed.detail

    def detail(load):
        result = homework.run_check("L5.serve", {"server": server, "load": load})
        assert not result.passed
        return result.detail

    edited = {**batched, "throughput_tok_s": batched["throughput_tok_s"] * 2}
    assert "but its log gives" in detail([serial, edited])
    one_by_one = _run(8, [(i * 0.2, i * 0.2 + 0.2) for i in range(8)])  # "concurrency 8" that never overlapped
    assert "no two requests were ever open at once" in detail([serial, one_by_one])
    unbatched = _run(8, [(0.0, 6.0 + 0.1 * i) for i in range(8)])  # parallel requests, no faster in total
    slow = homework.run_check("L5.serve", {"server": server, "load": [serial, unbatched]})
    assert slow.passed and "(1.2×" in slow.detail and "no throughput gain" in slow.detail  # reported, not failed
    assert "at concurrency 1 the log shows requests overlapping" in detail([_run(1, [(0.0, 2.0)] * 8), batched])
    assert "'load' holds 1 runs" in detail([serial])
    other_prompts = {**batched, "log": [{**r, "prompt": "x"} for r in batched["log"]]}
    assert "same prompts" in detail([serial, other_prompts])
