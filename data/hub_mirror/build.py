"""Write the hub-mirror files for internlm/internlm2-chat-1_8b from its published shape.

Run from the repo root: `python data/hub_mirror/build.py`. Only the small JSON files the
homework needs are written (no weights): config.json and model.safetensors.index.json, whose
byte total is what the 2 bf16 shards of the published checkpoint add up to.

Not written here: ``internlm/internlm-20b/config.json`` is a verbatim copy of the file published on the
Hugging Face hub (the version ``hf_hub_download`` returned to the bootcamp's homework in early 2024, with
``"rotary": {"base": 10000, "type": "dynamic"}``). Its shape gives 20,088,714,240 parameters, which in bf16
are exactly the 40,177,428,480 bytes of the hub's ``pytorch_model.bin.index.json`` (tests/test_hub.py).
The mirror also answers ModelScope's download URL, mapping ``Shanghai_AI_Laboratory/<name>`` to
``internlm/<name>`` (``hub.MODELSCOPE_ORGS``).
"""

import json
from pathlib import Path

REPO = Path(__file__).parent / "internlm" / "internlm2-chat-1_8b"
CONFIG = {
    "architectures": ["InternLM2ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    },
    "attn_implementation": "eager",
    "bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 32768,
    "model_type": "internlm2",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "pad_token_id": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.37.1",
    "use_cache": True,
    "vocab_size": 92544,
}


def tensors(c: dict) -> list[tuple[str, int]]:
    """(name, element count) of every weight, in checkpoint order."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * head_dim * h
    out = [("model.tok_embeddings.weight", v * h)]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "attention.wqkv.weight", qkv), (p + "attention.wo.weight", h * h),
                (p + "feed_forward.w1.weight", i * h), (p + "feed_forward.w3.weight", i * h),
                (p + "feed_forward.w2.weight", h * i), (p + "attention_norm.weight", h),
                (p + "ffn_norm.weight", h)]
    return out + [("model.norm.weight", h), ("output.weight", v * h)]


def index(c: dict, shard_bytes: int = 2_000_000_000) -> dict:
    """A safetensors index: 2-byte (bf16) tensors packed into shards of at most ``shard_bytes``."""
    items, shard, used, placed = tensors(c), 1, 0, []
    for name, count in items:
        if used + 2 * count > shard_bytes and used:
            shard, used = shard + 1, 0
        placed.append((name, shard))
        used += 2 * count
    n = placed[-1][1]
    return {"metadata": {"total_size": sum(2 * k for _, k in items)},
            "weight_map": {name: f"model-{s:05d}-of-{n:05d}.safetensors" for name, s in placed}}


if __name__ == "__main__":
    REPO.mkdir(parents=True, exist_ok=True)
    (REPO / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (REPO / "model.safetensors.index.json").write_text(json.dumps(index(CONFIG), indent=2) + "\n")
    print("wrote", *sorted(p.name for p in REPO.iterdir()))
