"""How much GPU memory a model needs: weights at a precision, KV cache per token, does it fit.

Pure arithmetic over a model's config facts, so it runs anywhere and is checked against
hand-computed numbers in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}

# InternStudio hands out A100-80GB slices; the bootcamp's "10%/30%/50% A100" are these sizes. The keys keep
# the platform's names ("8 GB"); the values are compared with GiB totals: GPU memory is sized in binary
# units (an A100 80GB has 80 GiB = 81920 MiB), so the course reads every budget as GiB.
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
    head_dim: int = 0  # 0: hidden / heads; some configs (Mistral-NeMo, Qwen3) set their own

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @classmethod
    def from_config(cls, config, name: str = "model") -> "ModelShape":
        """Read the shape from a ``config.json`` dict or a transformers config (llama and InternLM2 keys)."""
        if not isinstance(config, dict):
            config = config.to_dict()
        return cls(
            name=name,
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            intermediate=config["intermediate_size"],
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim") or 0,
        )

    def params(self) -> int:
        """Parameter count: embeddings, attention, SwiGLU MLP and RMSNorm weights."""
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim  # Wq, Wk, Wv
        attn += self.heads * self.head_dim * self.hidden  # Wo
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        norms = 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * (attn + mlp + norms) + embeddings + self.hidden  # + final norm


def count_parameters(config) -> int:
    """Parameters of a llama-style decoder (InternLM2, Llama, Qwen2, Mistral) from its config."""
    return ModelShape.from_config(config).params()


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


def kv_bytes_per_token(shape: ModelShape, precision: str = "fp16", *, scale_zero_bytes: int = 0) -> float:
    """KV-cache bytes for one token: K and V, every layer, every KV head.

    A quantized cache also stores a scale and a zero point per head and token: ``scale_zero_bytes``.
    """
    per_head = shape.head_dim * _bytes_per(precision) + (scale_zero_bytes if precision in ("int8", "int4") else 0)
    return 2 * shape.layers * shape.kv_heads * per_head


KV_PRECISION = {32: "fp32", 16: "bf16", 8: "int8", 4: "int4"}  # cache bits -> precision name
KV_SCALE_ZERO_BYTES = 4  # the course's quantized cache: one fp16 scale + one fp16 zero per (head, token)


def kv_bytes(config, tokens: int, bits: int = 16, batch: int = 1) -> int:
    """Bytes of the course's KV cache (course_utils.kvcache) for ``tokens`` tokens of a model config."""
    if bits not in KV_PRECISION:
        from .errors import CourseError

        raise CourseError(f"KV-cache bits must be one of {', '.join(map(str, KV_PRECISION))}, not {bits!r}.")
    per_token = kv_bytes_per_token(ModelShape.from_config(config), KV_PRECISION[bits],
                                   scale_zero_bytes=KV_SCALE_ZERO_BYTES)
    return int(per_token * tokens * batch)


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
    """Grouped bars of weight memory per model and precision, with the GPU budgets as lines, all in GiB.

    One unit throughout: the slices InternStudio names "8 GB", "24 GB", "40 GB" are drawn at 8, 24 and
    40 GiB, the unit ``total_memory_gb`` and ``fits_table`` compare against (GPU memory is sized in
    binary units: nvidia-smi reports an A100 80GB as 81920 MiB = 80 GiB).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.transforms import blended_transform_factory

    shapes = list(shapes or INTERNLM2_5.values())
    x = np.arange(len(shapes))
    width = 0.8 / len(precisions)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i, precision in enumerate(precisions):
        gib = [weight_memory(s, precision) / GIB for s in shapes]
        bars = ax.bar(x + i * width, gib, width, label=precision)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    budgets: dict[int, list[str]] = {}
    for gpu, gb in GPU_BUDGETS_GB.items():  # one line per size, named by every budget of that size
        name = "consumer card" if gpu.endswith("card") else gpu.split(" (")[0]  # "10% A100 (8 GB)" -> "10% A100"
        budgets.setdefault(gb, []).append(name)
    # x in axes coordinates, y in data: the label sits just right of the plot, never on a bar
    right = blended_transform_factory(ax.transAxes, ax.transData)
    for gb, names in sorted(budgets.items()):
        ax.axhline(gb, color="grey", linestyle="--", linewidth=0.8)
        ax.text(1.01, gb, f"{gb} GiB: " + " / ".join(names), transform=right, va="center",
                fontsize=8, color="dimgrey", clip_on=False)
    ax.set_xticks(x + width * (len(precisions) - 1) / 2, [s.name for s in shapes])
    ax.set_ylabel("weights (GiB)")
    ax.set_ylim(0, max(max(budgets), max(weight_memory(s, precisions[0]) / GIB for s in shapes)) * 1.12)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Weight memory vs GPU memory (GiB)", fontsize=10)
    fig.tight_layout()
    return fig


# ---- full-parameter training with DeepSpeed ZeRO (Rajbhandari et al., 2020) ---------------------------
# Mixed-precision AdamW keeps, per parameter: fp16/bf16 weights (2 bytes), their gradients (2 bytes) and the
# optimizer states (12 bytes: fp32 master weights, momentum, variance). ZeRO splits them over N GPUs:
# stage 1 the optimizer states, stage 2 also the gradients, stage 3 also the weights themselves.
ZERO_SHARDS = {0: (), 1: ("optimizer",), 2: ("optimizer", "gradients"), 3: ("optimizer", "gradients", "weights")}
TRAINING_BYTES = {"weights": 2, "gradients": 2, "optimizer": 12}


def zero_memory_gb(shape: ModelShape, gpus: int, stage: int) -> dict[str, float]:
    """GiB per GPU for weights, gradients and optimizer states under ZeRO ``stage`` (0: plain data parallel).

    Model states only: activations, buffers and the CUDA context come on top.
    """
    from .errors import CourseError

    if stage not in ZERO_SHARDS:
        raise CourseError(f"ZeRO stage {stage!r}: use 0 (none), 1, 2 or 3.")
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise CourseError(f"gpus={gpus!r} must be a whole number of at least 1.")
    n = shape.params()
    parts = {part: n * b / (gpus if part in ZERO_SHARDS[stage] else 1) / GIB for part, b in TRAINING_BYTES.items()}
    parts["total"] = sum(parts.values())
    return {k: round(v, 1) for k, v in parts.items()}


def zero_table(shape: ModelShape, gpus=(1, 2, 4, 8)):
    """Per-GPU GiB of model states by ZeRO stage (rows) and number of GPUs (columns)."""
    import pandas as pd

    names = {0: "no ZeRO", 1: "ZeRO-1 (optimizer)", 2: "ZeRO-2 (+ gradients)", 3: "ZeRO-3 (+ weights)"}
    return pd.DataFrame({f"{g} GPU": [zero_memory_gb(shape, g, s)["total"] for s in names] for g in gpus},
                        index=pd.Index(names.values(), name=f"{shape.name}, GiB per GPU"))
