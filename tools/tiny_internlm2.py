"""Build a tiny random-weight checkpoint in the exact InternLM2.5 folder layout, offline, in seconds.

    python tools/tiny_internlm2.py DEST              # one model folder
    python tools/tiny_internlm2.py DEST --share      # a fake InternStudio share root (COURSE_SHARE_ROOTS)

The folder is what `/share/new_models/Shanghai_AI_Laboratory/internlm2_5-1_8b-chat` holds, shrunk:
config.json with `auto_map` to the model's own code, that code (`modeling_internlm2.py`, the hub's
"PyTorch InternLM2.5 model", as PyPI's xtuner 0.2.0 wheel ships it), the remote tokenizer classes
(`tokenization_internlm2*.py`, as PyPI's aigc-zoo 0.2.11 ships them), a sentencepiece BPE
`tokenizer.model` trained on the course's own text with InternLM2's special tokens, no
tokenizer.json (as on the hub), and bf16 safetensors. Nothing is copied into this repository: the
code comes from the installed packages at build time. The CI simulation stage (`make sim`) and
`make gpu-check` build it; see docs/architecture.md, "Simulating InternStudio on a CPU".
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# InternLM2's special tokens, in the order of ids 92538-92543 in the real tokenizer.
SPECIAL = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
           "<|im_start|>"]
CHAT_NAME = "internlm2_5-1_8b-chat"  # the registry entry the fake share root provides
# Defaults: head_dim 64 and widths that are multiples of 128, so TurboMind and AWQ (group 128) take it.
SHAPE = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512)


def _package_file(package: str, *parts: str) -> Path:
    """A file inside an installed package, found without importing it."""
    found = importlib.util.find_spec(package)
    if found is None:
        raise SystemExit(f"{package} is not installed: run `make sim` (or pip install -r "
                         "requirements/gpu.txt -r requirements/models.txt --no-deps).")
    path = Path(found.submodule_search_locations[0], *parts)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: {package} changed its layout.")
    return path


def model_code() -> dict[str, Path]:
    """InternLM2.5's own configuration and modeling files, from the installed xtuner wheel."""
    folder = ("_lite", "modelings", "internlm2")
    files = {n: _package_file("xtuner", *folder, n)
             for n in ("configuration_internlm2.py", "modeling_internlm2.py")}
    if '"""PyTorch InternLM2.5 model."""' not in files["modeling_internlm2.py"].read_text():
        raise SystemExit("xtuner's modeling_internlm2.py is not the InternLM2.5 model file any more.")
    return files


def tokenizer_code() -> dict[str, Path]:
    """InternLM2's remote tokenizer classes (slow and fast), from the installed aigc-zoo wheel."""
    folder = ("model_zoo", "internlm2")
    return {n: _package_file("aigc_zoo", *folder, n)
            for n in ("tokenization_internlm2.py", "tokenization_internlm2_fast.py")}


def corpus() -> list[str]:
    """Course text in English and Chinese: the knowledge base and the perplexity texts."""
    files = sorted((ROOT / "data" / "knowledge_base").rglob("*.md")) + sorted((ROOT / "data" / "ppl").glob("*.txt"))
    return [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_tokenizer(vocab_size: int = 2000) -> bytes:
    """A sentencepiece BPE model like InternLM2's: byte fallback, digits split, spaces kept."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        user_defined_symbols=SPECIAL, byte_fallback=True, split_digits=True, character_coverage=0.9995,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return model.getvalue()


def tokenizer_files(vocab: dict[str, int]) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json as the hub's InternLM2.5 chat models have them."""
    from course_utils.sft_data import INTERNLM2_CHAT_TEMPLATE

    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    decoder = {str(vocab[t]): {"content": t, **flags} for t in ["<unk>", "<s>", "</s>", *SPECIAL]}
    extra = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>",
             "<|plugin|>"]
    config = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": extra,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "chat_template": INTERNLM2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False, "eos_token": "</s>", "model_max_length": 32768,
        "pad_token": "</s>", "sp_model_kwargs": None, "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>"}
    special = {"additional_special_tokens": extra, "bos_token": "<s>", "eos_token": "</s>",
               "pad_token": "</s>", "unk_token": "<unk>"}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def model_config(vocab_size: int, im_end: int, shape: dict) -> tuple[dict, dict]:
    """config.json and generation_config.json of InternLM2.5-1.8B-chat, with a tiny shape."""
    config = {
        "architectures": ["InternLM2ForCausalLM"], "attn_implementation": "eager",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 32768, "model_type": "internlm2", "pad_token_id": 2, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1000000,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.0",
        "use_cache": True, "vocab_size": vocab_size, **shape}
    generation = {"bos_token_id": 1, "eos_token_id": [2, im_end], "pad_token_id": 2}
    return config, generation


def write_weights(folder: Path, seed: int) -> None:
    """Random weights (the model's own init, seeded) as one bf16 safetensors file."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, torch_dtype=torch.float32)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def build(dest: str | Path, *, seed: int = 0, vocab_size: int = 2000, **shape) -> Path:
    """Write the checkpoint to ``dest`` (replaced atomically); returns ``dest``."""
    import sentencepiece as spm

    dest = Path(dest)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, path in {**model_code(), **tokenizer_code()}.items():
            shutil.copyfile(path, tmp / name)
        proto = train_tokenizer(vocab_size)
        (tmp / "tokenizer.model").write_bytes(proto)
        sp = spm.SentencePieceProcessor(model_proto=proto)
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        for name, data in tokenizer_files(vocab).items():
            (tmp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        config, generation = model_config(sp.get_piece_size(), vocab["<|im_end|>"], {**SHAPE, **shape})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_weights(tmp, seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def build_share(root: str | Path, **kwargs) -> Path:
    """A fake InternStudio share root: the tiny chat model, and the bundled MiniLM where the
    multilingual embedding model lives on /share. Point ``COURSE_SHARE_ROOTS`` at it."""
    from course_utils.models import REGISTRY, embedding_path

    root = Path(root)
    build(root / REGISTRY[CHAT_NAME].share_path, **kwargs)
    embed = root / REGISTRY["paraphrase-multilingual-minilm-l12-v2"].share_path
    if not embed.exists():
        embed.parent.mkdir(parents=True, exist_ok=True)
        embed.symlink_to(embedding_path("all-minilm-l6-v2"), target_is_directory=True)
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest")
    parser.add_argument("--share", action="store_true", help="write a fake share root, not one folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print((build_share if args.share else build)(args.dest, seed=args.seed))


if __name__ == "__main__":
    main()
