"""KV-cache quantization: error bounds, memory accounting, and the cache inside real generation."""

import pytest
import torch

from course_utils import CourseError
from course_utils.memory import kv_bytes
from course_utils import kvcache as kv


@pytest.fixture(scope="module")
def small_config():
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=3, hidden_size=128, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=256, vocab_size=100)


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_error_within_half_a_step(bits):
    x = torch.randn(2, 3, 17, 64, generator=torch.Generator().manual_seed(0)) * 3  # (B, H, T, D)
    codes, scale, zero = kv.quantize_per_token(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 17, 64 * bits // 8)
    assert scale.shape == zero.shape == (2, 3, 17, 1) and scale.dtype == torch.float16
    err = (kv.dequantize_per_token(codes, scale, zero, bits) - x).abs()
    assert bool((err <= 0.5 * scale.float() * 1.01 + 1e-6).all())
    if bits == 8:
        assert err.max() < 0.02 * x.abs().max()


def test_bad_bits():
    with pytest.raises(CourseError, match="bits"):
        kv.quantize_per_token(torch.zeros(1, 1, 1, 4), 3)


@pytest.mark.parametrize("kind,bits,dtype", [("fp32", 32, torch.float32), ("bf16", 16, torch.bfloat16),
                                             ("int8", 8, torch.bfloat16), ("int4", 4, torch.bfloat16)])
def test_measured_bytes_match_the_formula(small_config, kind, bits, dtype):
    cache = kv.fill_cache(kv.make_cache(kind, small_config), small_config, 100, dtype)
    assert cache.get_seq_length() == 100
    # 2 (K,V) x 3 layers x 2 kv heads x 100 tokens x (32 dims x bits/8 [+ 4 bytes scale/zero])
    per = 32 * bits // 8 + (4 if bits <= 8 else 0)
    assert kv.cache_bytes(cache) == kv_bytes(small_config, 100, bits) == 2 * 3 * 2 * 100 * per


def test_cache_appends_and_returns_dequantized_history(small_config):
    layer = kv.QuantizedKVStore(8)
    k1, v1 = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    layer.update(k1, v1)
    k, v = layer.update(k1[:, :, :1], v1[:, :, :1])
    assert k.shape == (1, 2, 6, 32) and layer.get_seq_length() == 6
    assert torch.allclose(k[:, :, :5], k1, atol=0.05) and torch.allclose(v[:, :, 5:], v1[:, :, :1], atol=0.05)


def test_quanto_cache_is_smaller_than_bf16(small_config):
    cache = kv.fill_cache(kv.make_cache("quanto-int4", small_config), small_config, 256, torch.bfloat16)
    assert 0 < kv.cache_bytes(cache) < 0.5 * kv_bytes(small_config, 256, 16)


def test_memory_table_at_2k_tokens_for_smollm2(tiny_model):
    table = kv.memory_table(tiny_model[0].config, 2048, kinds=("bf16", "int8", "int4"))
    # SmolLM2: 30 layers x 3 KV heads x 64 dims; bf16 = 2*30*3*2048*64*2 bytes = 47.19 MB
    assert table.loc["bf16", "measured (MB)"] == 47.19
    assert table.loc["int8", "vs bf16"] == 0.53 and table.loc["int4", "vs bf16"] == 0.28


def test_unknown_kind(small_config):
    with pytest.raises(CourseError, match="int8"):
        kv.make_cache("int2", small_config)


@pytest.mark.slow
def test_int8_cache_in_generation_and_perplexity(tiny_model):
    from course_utils.quantize import generation_benchmark, load_texts, perplexity

    model, tok = tiny_model
    texts = load_texts("heldout")[:1]
    fp = perplexity(model, tok, texts)
    int8 = perplexity(model, tok, texts, cache_factory=kv.cache_factory("int8", model.config))
    int4 = perplexity(model, tok, texts, cache_factory=kv.cache_factory("int4", model.config))
    assert abs(int8 - fp) / fp < 0.02 < abs(int4 - fp) / fp  # int8 ~lossless, int4 visibly not
    caches = []
    factory = kv.cache_factory("int8", model.config)
    out = generation_benchmark(model, tok, "Name a fruit.", max_new_tokens=5,
                               cache_factory=lambda: caches.append(factory()) or caches[-1])
    assert out["new_tokens"] == 5 and out["text"].strip()
    tokens = caches[-1].get_seq_length()
    assert kv.cache_bytes(caches[-1]) == kv_bytes(model.config, tokens, 8)
