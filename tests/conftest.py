"""Shared fixtures. The tiny model is loaded once per test session (about 2 s after the first
conversion) because many modules' tests need a real model."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The converted SmolLM2-135M-Instruct safetensors folder in the course cache."""
    from course_utils.models import resolve

    return resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct on the CPU, fp32, eval mode. Do not mutate."""
    from course_utils.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def embedding_dir():
    """The bundled all-MiniLM-L6-v2 sentence-transformers folder."""
    from course_utils.models import embedding_path

    return embedding_path("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def random_llama(tiny_tokenizer):
    """A 2-layer random Llama over SmolLM2's vocabulary: real attention and rotary positions, in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tiny_tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()
