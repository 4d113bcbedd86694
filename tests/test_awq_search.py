"""AWQ's search details (issue 17): shared scales per input, clipping search, sequential calibration."""

import copy

import pytest
import torch

from course_utils import quantize as q


def _heavy_tailed(seed, out=96, inp=192):
    """A weight with a few outlier entries and inputs with a few loud channels: where clipping pays."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * 0.02
    w.view(-1)[torch.randint(0, w.numel(), (40,), generator=gen)] *= 12
    x = torch.randn(256, inp, generator=gen)
    x[:, :4] *= 20
    return w, x


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("group_size", [64, 128])
def test_clip_search_never_increases_the_layer_output_mse(seed, group_size):
    w, x = _heavy_tailed(seed)
    for scale in (None, q.awq_search_scale(w, x, group_size, n_grid=10)[0]):
        ratio, loss, base = q.awq_search_clip(w, x, scale, group_size)
        assert base == pytest.approx(q.layer_output_mse(w, x, scale, group_size))
        assert loss <= base
        if ratio is not None:  # the loss it reports is the one of the clip it returns
            assert ratio.shape == (96, q.n_groups(192, group_size)) and float(ratio.min()) >= 0.55
            assert loss == pytest.approx(q.layer_output_mse(w, x, scale, group_size, clip=ratio))


def test_clip_search_helps_on_outlier_weights_and_is_what_quant_linear_stores():
    w, x = _heavy_tailed(0)
    ratio, loss, base = q.awq_search_clip(w, x, None, 64)
    assert ratio is not None and loss < 0.9 * base and bool((ratio < 1).any())
    scale = torch.rand(192, generator=torch.Generator().manual_seed(1)) + 0.5
    ratio, _, _ = q.awq_search_clip(w, x, scale, 64)
    layer = q.QuantLinear.from_weight(w, 64, scale=scale, clip=ratio)
    assert torch.allclose(layer.dequantized_weight(), q.fake_quantize(w, 64, scale, ratio), atol=1e-6)


def test_clip_search_on_a_real_layer_and_its_calibration_input(tiny_model):
    model, tok = tiny_model
    layers = {n: m for n, m in q.target_linears(model).items()
              if n.startswith("model.layers.0.") and n.endswith(("o_proj", "up_proj", "down_proj"))}
    inputs = q.collect_inputs(model, tok, q.load_texts("calib")[:2], layers, max_tokens=128)
    for name, lin in layers.items():
        ratio, loss, base = q.awq_search_clip(lin.weight, inputs[name], None, 64)
        assert loss <= base == pytest.approx(q.layer_output_mse(lin.weight, inputs[name], None, 64))


def test_input_groups_follow_the_shared_inputs_in_llama_and_internlm2_names():
    llama = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
            [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")] + \
            ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    assert [[n.rsplit(".", 1)[1] for n in g] for g in q.input_groups(llama)] == [
        ["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"],
        ["q_proj", "k_proj"]]  # block 1's q/k are not grouped with block 0's
    internlm2 = [f"model.layers.3.{p}" for p in ("attention.wqkv", "attention.wo", "feed_forward.w1",
                                                 "feed_forward.w3", "feed_forward.w2")]
    assert [len(g) for g in q.input_groups(internlm2)] == [1, 1, 2, 1]
    assert q.decoder_blocks(llama + ["lm_head"]) == [llama[:7], llama[7:], ["lm_head"]]


def _block_with_a_dead_layer(seed=0):
    """Synthetic q/k/v + gate/up of one block reading outlier inputs; k and up are all zero, so alone
    they gain nothing from a scale (their best is RTN) while q, v and gate do."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 192, generator=gen)
    x[:, :6] *= 30
    layers = {}
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        lin = torch.nn.Linear(192, 64, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(64, 192, generator=gen) * 0.02 if "k_" not in name and "up" not in name
                             else torch.zeros(64, 192))
        layers[f"model.layers.0.{name}"] = lin
    return layers, {n: x for n in layers}


def test_group_scale_search_gives_layers_that_share_an_input_one_scale():
    layers, inputs = _block_with_a_dead_layer()
    short = {n.rsplit(".", 1)[1]: n for n in layers}
    alone = q.awq_layer_plan(layers, inputs, 64, 10, group_scales=False, search_clip=False)
    assert alone[short["q_proj"]][0] is not None and alone[short["k_proj"]][0] is None  # they differ alone
    plan = q.awq_layer_plan(layers, inputs, 64, 10, group_scales=True, search_clip=False)
    scale = {p: plan[n][0] for p, n in short.items()}
    assert scale["q_proj"] is not None and scale["gate_proj"] is not None
    assert torch.equal(scale["q_proj"], scale["k_proj"]) and torch.equal(scale["q_proj"], scale["v_proj"])
    assert torch.equal(scale["gate_proj"], scale["up_proj"])
    qkv = [layers[short[p]].weight for p in ("q_proj", "k_proj", "v_proj")]
    joint = q.awq_search_scale(qkv, inputs[short["q_proj"]], 64, 10)[0]  # searched on q, k, v together
    assert torch.equal(scale["q_proj"], joint)
    x = inputs[short["q_proj"]]
    assert q.group_output_mse(qkv, x, joint, 64) < q.group_output_mse(qkv, x, None, 64)


def _three_blocks(model):
    """The tiny model cut to its first three decoder blocks: a real model, fast to calibrate."""
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:3]
    small.config.num_hidden_layers = 3
    return small


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_calibration_feeds_block_i_the_quantized_blocks_before_it(tiny_model, monkeypatch,
                                                                            sequential):
    model, tok = tiny_model
    calls, real_collect = [], q.collect_inputs

    def spy(m, tokenizer, texts, layers, **kwargs):
        quantized = sorted({n.split(".")[2] for n, mod in m.named_modules() if isinstance(mod, q.QuantLinear)})
        inputs = real_collect(m, tokenizer, texts, layers, **kwargs)
        calls.append((sorted({n.split(".")[2] for n in layers}), quantized, inputs))
        return inputs

    monkeypatch.setattr(q, "collect_inputs", spy)
    small, calib = _three_blocks(model), q.load_texts("calib")[:2]
    float_inputs = real_collect(small, tok, calib, q.target_linears(small), max_tokens=64)
    q.quantize_w4a16(small, "awq", 64, calib, tokenizer=tok, n_grid=3, max_calib_tokens=64,
                     progress=False, group_scales=True, search_clip=False, sequential=sequential)
    if not sequential:  # one calibration pass on the float model
        assert [(c[0], c[1]) for c in calls] == [(["0", "1", "2"], [])]
        return
    assert [(c[0], c[1]) for c in calls] == [(["0"], []), (["1"], ["0"]), (["2"], ["0", "1"])]
    for block, (_, _, inputs) in enumerate(calls):
        name = f"model.layers.{block}.self_attn.q_proj"
        same = torch.allclose(inputs[name], float_inputs[name], atol=1e-6)
        assert same == (block == 0)  # block 0 reads the embeddings; later blocks the quantized outputs
    assert len(small.w4a16_report) == 21 and all(r["mse_awq"] >= 0 for r in small.w4a16_report)
