"""The calculator against numbers computed by hand from the InternLM2.5 configs."""

import pytest

from course_utils import CourseError
from course_utils.memory import (GIB, INTERNLM2_5, ModelShape, fits_table, kv_bytes_per_token,
                                 total_memory_gb, weight_memory)

S18, S7, S20 = (INTERNLM2_5[k] for k in ("InternLM2.5-1.8B", "InternLM2.5-7B", "InternLM2.5-20B"))


def test_parameter_counts_match_the_published_sizes():
    # 7B by hand: embeddings 2*92544*4096 = 758,120,448; per layer
    # Wqkv 4096*(32+16)*128 = 25,165,824 + Wo 16,777,216 + MLP 3*4096*14336 = 176,160,768
    # + norms 8192 = 218,112,000; 32 layers = 6,979,584,000; + final norm 4096.
    assert S7.params() == 758_120_448 + 6_979_584_000 + 4096
    assert round(S18.params() / 1e9, 2) == 1.89
    assert round(S20.params() / 1e9, 2) == 19.86


def test_weight_memory_per_precision():
    assert weight_memory(S7, "fp16") == S7.params() * 2
    assert weight_memory(S7, "int4") == S7.params() / 2
    assert round(weight_memory(S7, "fp16") / GIB, 2) == 14.41


def test_kv_cache_per_token():
    # 2 (K,V) * layers * kv_heads * head_dim * 2 bytes
    assert kv_bytes_per_token(S18) == 2 * 24 * 8 * 128 * 2 == 98_304
    assert kv_bytes_per_token(S7) == 131_072
    assert kv_bytes_per_token(S20, "int8") == 2 * 48 * 8 * 128


def test_total_memory_and_verdicts():
    # 7B fp16, 4096 tokens: 14.41 GiB weights + 0.5 GiB KV + 1 GiB overhead
    assert total_memory_gb(S7, "fp16", context=4096) == pytest.approx(15.91, abs=0.01)
    table = fits_table(context=4096).set_index(["model", "precision"])
    assert table.loc[("InternLM2.5-7B", "fp16"), "10% A100 (8 GB)"] == "❌"
    assert table.loc[("InternLM2.5-7B", "fp16"), "30% A100 (24 GB)"] == "✅"
    assert table.loc[("InternLM2.5-7B", "int4"), "10% A100 (8 GB)"] == "✅"
    assert table.loc[("InternLM2.5-20B", "fp16"), "50% A100 (40 GB)"] == "✅"
    assert table.loc[("InternLM2.5-20B", "fp16"), "24 GB card"] == "❌"


def test_shape_from_config_dict():
    cfg = {"num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 16,
           "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 92544}
    assert ModelShape.from_config(cfg, "x").params() == S18.params()


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(CourseError, match="fp16"):
        weight_memory(S7, "fp8")


def test_weight_plot_uses_one_unit_and_keeps_every_label_inside_the_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from course_utils.memory import GPU_BUDGETS_GB, plot_weight_memory

    fig = plot_weight_memory()
    fig.canvas.draw()
    renderer, ax = fig.canvas.get_renderer(), fig.axes[0]
    texts = [t for t in ax.texts if t.get_text()]
    budget_labels = [t.get_text() for t in texts if ":" in t.get_text()]
    # one label per budget size, each naming the size in GiB, like the axis
    assert sorted(int(t.split()[0]) for t in budget_labels) == sorted(set(GPU_BUDGETS_GB.values()))
    words = [t.get_text() for t in texts] + [ax.get_ylabel(), ax.get_title()]
    assert all("GiB" in t for t in budget_labels) and "GiB" in ax.get_ylabel()
    assert not any("GB" in w.replace("GiB", "") for w in words), words
    for t in texts:  # nothing cut off at the figure's edge (the old "8 GB" label showed as "3 GB")
        box = t.get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, t
    for t in texts:
        if ":" in t.get_text():  # budget labels sit right of the plot, where no bar can cover them
            assert t.get_window_extent(renderer).x0 >= ax.bbox.x1
    plt.close(fig)


def test_formulas_honour_a_config_that_sets_its_own_head_dim():
    """Mistral-NeMo-12B sets head_dim 128, not hidden / heads = 160: count against transformers' own model."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from course_utils.memory import count_parameters, kv_bytes
    from course_utils.paths import REPO_ROOT

    raw = json.loads((REPO_ROOT / "tests/data/mistral-nemo-12b-config.json").read_text())
    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):  # shapes only: no 24 GB of weights
        model = AutoModelForCausalLM.from_config(config)
    real_params = sum(p.numel() for p in model.parameters())
    assert count_parameters(raw) == count_parameters(config) == real_params == 12_247_782_400
    k_proj = model.model.layers[0].self_attn.k_proj  # kv_heads x head_dim outputs per token
    real_kv = 2 * len(model.model.layers) * k_proj.out_features * 2  # K and V, bf16
    assert kv_bytes(config, tokens=1) == kv_bytes_per_token(ModelShape.from_config(raw), "bf16") == real_kv
    assert ModelShape.from_config(raw).head_dim == 128 != raw["hidden_size"] // raw["num_attention_heads"]
