"""How much GPU memory a model needs: weights at a precision, KV cache per token, does it fit.

Pure arithmetic over a model's config facts, so it runs anywhere and is checked against
hand-computed numbers in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}

# InternStudio hands out A100-80GB slices; the bootcamp's "10%/30%/50% A100" are these sizes.
GPU_BUDGETS_GB = {
    "10% A100 (8 GB)": 8,
    "30% A100 (24 GB)": 24,
    "50% A100 (40 GB)": 40,
    "24 GB card": 24,
    "8 GB card": 8,
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int  # grouped-query attention: K/V have fewer heads than Q
    intermediate: int  # MLP width (SwiGLU: three hidden x intermediate matrices)
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, config: dict, name: str = "model") -> "ModelShape":
        """Read the shape from a Hugging Face ``config.json`` dict (llama and InternLM2 keys)."""
        return cls(
            name=name,
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            intermediate=config["intermediate_size"],
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    def params(self) -> int:
        """Parameter count: embeddings, attention, SwiGLU MLP and RMSNorm weights."""
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim  # Wq, Wk, Wv
        attn += self.heads * self.head_dim * self.hidden  # Wo
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * (attn + mlp + norms) + embeddings + self.hidden  # + final norm


# From the published config.json of each model (Shanghai AI Laboratory, internlm2_5-*-chat).
INTERNLM2_5 = {
    "InternLM2.5-1.8B": ModelShape("InternLM2.5-1.8B", 24, 2048, 16, 8, 8192, 92544),
    "InternLM2.5-7B": ModelShape("InternLM2.5-7B", 32, 4096, 32, 8, 14336, 92544),
    "InternLM2.5-20B": ModelShape("InternLM2.5-20B", 48, 6144, 48, 8, 16384, 92544),
}


def _bytes_per(precision: str) -> float:
    from .errors import CourseError

    if precision not in BYTES_PER_PARAM:
        raise CourseError(f"Unknown precision {precision!r}; use one of {', '.join(BYTES_PER_PARAM)}.")
    return BYTES_PER_PARAM[precision]


def weight_memory(shape: ModelShape, precision: str = "fp16") -> float:
    """Bytes the weights take at ``precision`` (int4 ignores the small group-scale overhead)."""
    return shape.params() * _bytes_per(precision)


def kv_bytes_per_token(shape: ModelShape, precision: str = "fp16") -> float:
    """KV-cache bytes for one token: K and V, every layer, every KV head."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * _bytes_per(precision)


def total_memory_gb(shape: ModelShape, precision: str = "fp16", *, context: int = 4096,
                    batch: int = 1, kv_precision: str = "fp16", overhead_gb: float = 1.0) -> float:
    """Weights + KV cache for ``batch`` sequences of ``context`` tokens + runtime overhead, in GiB."""
    kv = kv_bytes_per_token(shape, kv_precision) * context * batch
    return (weight_memory(shape, precision) + kv) / GIB + overhead_gb


def fits_table(shapes=None, precisions=("fp16", "int8", "int4"), *, context: int = 4096):
    """One row per model and precision: weights, KV per token, total, and a ✅/❌ per GPU budget."""
    import pandas as pd

    rows = []
    for shape in (shapes or INTERNLM2_5.values()):
        for precision in precisions:
            total = total_memory_gb(shape, precision, context=context)
            row = {
                "model": shape.name,
                "precision": precision,
                "weights (GiB)": round(weight_memory(shape, precision) / GIB, 2),
                "KV/token (KiB)": kv_bytes_per_token(shape) / 1024,
                f"total @ {context} tok (GiB)": round(total, 2),
            }
            row.update({gpu: "✅" if total <= gb else "❌" for gpu, gb in GPU_BUDGETS_GB.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def plot_weight_memory(shapes=None, precisions=("fp16", "int8", "int4")):
    """Grouped bars of weight memory per model and precision, with the GPU budgets as lines."""
    import matplotlib.pyplot as plt
    import numpy as np

    shapes = list(shapes or INTERNLM2_5.values())
    x = np.arange(len(shapes))
    width = 0.8 / len(precisions)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, precision in enumerate(precisions):
        ax.bar(x + i * width, [weight_memory(s, precision) / GIB for s in shapes], width, label=precision)
    for gb in sorted(set(GPU_BUDGETS_GB.values())):
        ax.axhline(gb, color="grey", linestyle="--", linewidth=0.8)
        ax.text(len(shapes) - 0.2, gb, f"{gb} GB", va="bottom", fontsize=8, color="grey")
    ax.set_xticks(x + width * (len(precisions) - 1) / 2, [s.name for s in shapes])
    ax.set_ylabel("weights (GiB)")
    ax.legend()
    fig.tight_layout()
    return fig
