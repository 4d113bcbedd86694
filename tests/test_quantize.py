"""W4A16: packing, per-group error bounds, AWQ vs RTN, the quantized model, perplexity, benchmarks."""

import copy
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
