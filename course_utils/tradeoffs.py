"""The lesson's table of variants, weights x KV cache: one measured row each, ratios, a chart.

A variant is a model (fp32, bf16, W4A16 RTN/AWQ from :mod:`course_utils.quantize`) paired with a
KV-cache kind (:mod:`course_utils.kvcache`); every number in a row is measured on that pair.
"""

from __future__ import annotations

from .kvcache import cache_bytes, cache_factory, fill_cache, make_cache
from .quantize import generation_benchmark, perplexity, weight_bytes


def measure_variant(name: str, model, tokenizer, texts: list[str], *, kv: str = "bf16",
                    context: int = 2048, new_tokens: int = 32, ppl: float | None = None) -> dict:
    """One row of the lesson's table: weight bytes, KV bytes at ``context`` tokens, perplexity, tokens/s.

    ``kv`` is the cache kind of :mod:`course_utils.kvcache` ("fp32", "bf16", "int8", "int4"); the
    KV bytes are measured on a cache filled with ``context`` tokens, not taken from a formula.
    ``ppl``: a perplexity already measured on ``texts`` (skips recomputing it).
    """
    quantized_kv = kv not in ("fp32", "bf16")
    factory = cache_factory(kv, model.config) if quantized_kv else None
    filled = fill_cache(make_cache(kv, model.config), model.config, context, model.dtype)
    speed = generation_benchmark(model, tokenizer, max_new_tokens=new_tokens, cache_factory=factory)
    return {"variant": name, "weight_bytes": weight_bytes(model), "kv_bytes_2k": cache_bytes(filled),
            "perplexity": ppl if ppl is not None else perplexity(model, tokenizer, texts,
                                                                 cache_factory=factory),
            "tokens/s": round(speed["tokens_per_s"], 1)}


def tradeoff_table(rows: list[dict], baseline: str = "bf16"):
    """A DataFrame of the variants with memory ratios against ``baseline`` (rounded for display)."""
    import pandas as pd

    df = pd.DataFrame(rows).set_index("variant")
    df["weights (MB)"] = (df["weight_bytes"] / 1e6).round(1)
    df["KV @2k (MB)"] = (df["kv_bytes_2k"] / 1e6).round(1)
    df["weights vs " + baseline] = (df["weight_bytes"] / df.loc[baseline, "weight_bytes"]).round(2)
    df["KV vs " + baseline] = (df["kv_bytes_2k"] / df.loc[baseline, "kv_bytes_2k"]).round(2)
    df["perplexity"] = df["perplexity"].round(2)
    return df[["weights (MB)", "KV @2k (MB)", "weights vs " + baseline, "KV vs " + baseline,
               "perplexity", "tokens/s"]]


def plot_tradeoffs(table):
    """Four bar charts side by side: weights, KV cache at 2k tokens, perplexity, tokens/s."""
    import matplotlib.pyplot as plt

    cols = ["weights (MB)", "KV @2k (MB)", "perplexity", "tokens/s"]
    fig, axes = plt.subplots(1, len(cols), figsize=(13, 3.2))
    for ax, col in zip(axes, cols):
        ax.bar(table.index, table[col], color=plt.cm.tab10.colors[:len(table)])
        ax.set_title(col)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    return fig
