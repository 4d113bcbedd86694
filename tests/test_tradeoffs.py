"""The lesson's table of variants: one measured row per (weights, KV cache) pair, the ratios, the chart."""

import matplotlib
import pytest

from course_utils import kvcache as kv
from course_utils import quantize as q
from course_utils import tradeoffs
from course_utils.memory import kv_bytes

matplotlib.use("Agg")

ROWS = [{"variant": "bf16", "weight_bytes": 200, "kv_bytes_2k": 100, "perplexity": 10.0, "tokens/s": 5},
        {"variant": "W4", "weight_bytes": 60, "kv_bytes_2k": 100, "perplexity": 11.111, "tokens/s": 3}]


def test_tradeoff_table_ratios():
    table = tradeoffs.tradeoff_table(ROWS)
    assert table.loc["W4", "weights vs bf16"] == 0.3 and table.loc["W4", "KV vs bf16"] == 1.0
    assert table.loc["W4", "perplexity"] == 11.11


def test_plot_has_one_chart_per_measured_column():
    fig = tradeoffs.plot_tradeoffs(tradeoffs.tradeoff_table(ROWS))
    assert [ax.get_title() for ax in fig.axes] == ["weights (MB)", "KV @2k (MB)", "perplexity", "tokens/s"]
    assert [b.get_height() for b in fig.axes[2].patches] == [10.0, 11.11]  # bf16, W4 in the table's order


def test_a_row_is_measured_on_its_model_and_cache(tiny_model):
    model, tok = tiny_model
    texts = q.load_texts("heldout")[:1]
    row = tradeoffs.measure_variant("KV int8", model, tok, texts, kv="int8", context=64, new_tokens=2)
    assert row["weight_bytes"] == q.weight_bytes(model)
    assert row["kv_bytes_2k"] == kv_bytes(model.config, 64, 8)  # a filled int8 cache, scales and zeros included
    assert row["perplexity"] == pytest.approx(
        q.perplexity(model, tok, texts, cache_factory=kv.cache_factory("int8", model.config)))
    assert row["tokens/s"] > 0
    given = tradeoffs.measure_variant("fp32", model, tok, texts, kv="fp32", context=64, new_tokens=2, ppl=1.5)
    assert given["perplexity"] == 1.5 and given["kv_bytes_2k"] == kv_bytes(model.config, 64, 32)
