"""W4A16 weight quantization (RTN and AWQ) written to be read, and the measurements that judge it.

W4A16 = 4-bit integer weights, 16-bit activations: each linear layer keeps its weight as
4-bit codes packed two per byte plus one fp16 scale and zero point per group of ``group_size``
input channels, and de-quantizes on the fly in ``forward``. This is what LMDeploy's
``lite auto_awq`` produces (asymmetric, group 128); LMDeploy's TurboMind then runs fused CUDA
kernels on it. On a CPU we have no fused kernel, so the memory saving is real but the speed-up
is not: see lesson 5.

Group size: SmolLM2's hidden size 576 is not a multiple of 128 (576 = 4 x 128 + 64). We keep
LMDeploy's default of 128 and let the last group of such rows be ragged (64 channels); every
function here takes any ``group_size`` and handles a short last group.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CourseError
from .paths import DATA_DIR

GROUP_SIZE = 128  # LMDeploy's default; a ragged last group covers 576 = 4 x 128 + 64
BITS = 4
MAX_CODE = 2**BITS - 1  # codes 0..15
# Projections inside the decoder blocks: llama-style (SmolLM2) and InternLM2 names.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "wqkv", "wo", "w1", "w2", "w3")


# --------------------------------------------------------------------------------------------
# Group-wise quantization and packing: plain tensor functions
# --------------------------------------------------------------------------------------------

def n_groups(in_features: int, group_size: int) -> int:
    """Groups per output row; the last one is shorter when ``group_size`` does not divide the row."""
    if group_size < 2 or group_size % 2:
        raise CourseError(f"group_size={group_size}: use an even number >= 2 (LMDeploy uses 128).")
    return math.ceil(in_features / group_size)


def grouped(weight, group_size: int = GROUP_SIZE):
    """(out, in) -> (out, groups, group_size); a ragged last group is padded with copies of its own
    last column, so its min and max stay the same."""
    out_f, in_f = weight.shape
    pad = n_groups(in_f, group_size) * group_size - in_f
    padded = torch.cat([weight, weight[:, -1:].expand(-1, pad)], 1) if pad else weight
    return padded.reshape(out_f, -1, group_size)


def quantize_groups(weight, group_size: int = GROUP_SIZE):
    """Asymmetric 4-bit RTN per group: returns (codes uint8 (out, in), scales fp16, zeros fp16).

    Each group of ``group_size`` input channels of one output row maps its [min, max] range onto
    the codes 0..15: ``w ~ (code - zero) * scale``. The scale is rounded to fp16 first, so the
    codes match exactly what is stored.
    """
    w = weight.detach().float()
    out_f, in_f = w.shape
    groups = grouped(w, group_size)  # (out, groups, group_size)
    wmin = groups.amin(-1).clamp(max=0)  # keep 0 representable, as AWQ/LMDeploy do
    wmax = groups.amax(-1).clamp(min=0)
    scales = ((wmax - wmin) / MAX_CODE).clamp(min=1e-6).half()
    zeros = torch.round(-wmin / scales.float()).clamp(0, MAX_CODE).half()
    # Broadcasting one scale over its group is much faster than repeating it per column.
    codes = torch.round(groups / scales.float()[..., None] + zeros.float()[..., None])
    codes = codes.clamp(0, MAX_CODE).to(torch.uint8).view(out_f, -1)[:, :in_f]
    return codes, scales, zeros


def dequantize_groups(codes, scales, zeros, group_size: int = GROUP_SIZE, dtype=None, out=None):
    """Weights back from codes: ``(code - zero) * scale`` per group, in ``dtype`` (default fp32).

    ``out`` (rows, in) lets a caller reuse one buffer instead of allocating a new weight per call.
    """
    w = out.copy_(codes) if out is not None else codes.to(dtype or torch.float32)
    dtype = w.dtype
    rows, in_f = codes.shape
    full = in_f // group_size * group_size
    g_full = full // group_size
    body = w[:, :full].view(rows, g_full, group_size)  # (rows, groups, group_size), a view into w
    body.sub_(zeros[:, :g_full, None].to(dtype)).mul_(scales[:, :g_full, None].to(dtype))
    if full < in_f:  # the ragged last group
        w[:, full:].sub_(zeros[:, -1:].to(dtype)).mul_(scales[:, -1:].to(dtype))
    return w


def pack_int4(codes):
    """Two 4-bit codes per byte: (out, in) -> (out, ceil(in / 2)) uint8.

    Byte ``j`` of a row holds column ``j`` in its low nibble and column ``j + half`` in its high
    nibble (half = ceil(in / 2)). Unpacking then writes two contiguous half-rows, which a CPU
    vectorizes; interleaving neighbouring columns would force a strided, much slower write.
    """
    if codes.dtype != torch.uint8 or int(codes.max()) > MAX_CODE:
        raise CourseError("pack_int4 expects uint8 codes in 0..15 (from quantize_groups).")
    if codes.shape[1] % 2:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], 1)], 1)
    half = codes.shape[1] // 2
    return codes[:, :half] | (codes[:, half:] << 4)


def unpack_int4(packed, in_features: int, out=None):
    """Inverse of :func:`pack_int4`: (out, ceil(in / 2)) uint8 -> (out, in) codes (``out`` reused)."""
    rows, half = packed.shape
    out = torch.empty(rows, 2 * half, dtype=torch.uint8, device=packed.device) if out is None else out
    torch.bitwise_and(packed, 0x0F, out=out[:, :half])  # low nibbles: first half of the row
    torch.bitwise_right_shift(packed, 4, out=out[:, half:])  # high nibbles: second half
    return out[:, :in_features]


ROW_CHUNK = 4096  # output rows de-quantized at a time: bounds the scratch buffer (lm_head has 49152)
_SCRATCH: dict = {}  # (rows, in, dtype, device) -> (codes, weight) buffers shared by all layers


def _scratch(rows: int, in_features: int, dtype, device):
    """Reused buffers for one layer's de-quantized weight.

    Without them every layer would allocate and free a weight-sized tensor on every call; one
    buffer per shape keeps memory flat (a real W4A16 kernel never materializes the weight at all).
    Not thread-safe: one model forward at a time per process, which is how ``generate`` runs.
    """
    key = (rows, in_features, dtype, device)
    if key not in _SCRATCH:
        _SCRATCH[key] = (torch.empty(rows, in_features + in_features % 2, dtype=torch.uint8, device=device),
                         torch.empty(rows, in_features, dtype=dtype, device=device))
    return _SCRATCH[key]


# --------------------------------------------------------------------------------------------
# Layers that hold packed weights
# --------------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """A W4A16 linear layer: packed 4-bit codes + fp16 scales/zeros, de-quantized per call.

    ``input_scale`` (optional, fp16, one per input channel) is AWQ's ``1/s``: the weight was
    quantized as ``W * s``, so the input is multiplied by ``1/s`` to keep ``x @ W.T`` unchanged.
    Real AWQ folds it into the previous RMSNorm or linear; we keep it here so it is visible.
    """

    def __init__(self, in_features, out_features, group_size, qweight, scales, zeros,
                 input_scale=None, bias=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", qweight)  # (out, ceil(in/2)) uint8
        self.register_buffer("scales", scales)  # (out, groups) fp16
        self.register_buffer("zeros", zeros)  # (out, groups) fp16, integer-valued
        self.register_buffer("input_scale", input_scale)  # (in,) fp16 or None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_weight(cls, weight, group_size=GROUP_SIZE, scale=None, bias=None, clip=None):
        """Quantize a float weight (out, in); ``scale`` (in,) is AWQ's per-channel ``s``,
        ``clip`` (out, groups) its per-group range ratio (see :func:`awq_search_clip`)."""
        w = weight.detach().float()
        if scale is not None:
            w = w * scale.float()
        if clip is not None:
            w = clip_groups(w, clip, group_size)
        codes, scales, zeros = quantize_groups(w, group_size)
        inv = (1.0 / scale.float()).half() if scale is not None else None
        return cls(w.shape[1], w.shape[0], group_size, pack_int4(codes), scales, zeros, inv, bias)

    def dequantized_weight(self, dtype=torch.float32):
        """The effective float weight (out, in), ``1/s`` folded back in (for checks, not forward)."""
        w = dequantize_groups(unpack_int4(self.qweight, self.in_features), self.scales,
                              self.zeros, self.group_size, dtype)
        return w * self.input_scale.to(dtype) if self.input_scale is not None else w

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        if self.input_scale is not None:
            x2 = x2 * self.input_scale.to(x.dtype)
        y = x2.new_empty(x2.shape[0], self.out_features)  # (tokens, out)
        for start in range(0, self.out_features, ROW_CHUNK):
            rows = slice(start, min(start + ROW_CHUNK, self.out_features))
            n = rows.stop - rows.start
            codes_buf, w_buf = _scratch(n, self.in_features, x.dtype, x.device)
            codes = unpack_int4(self.qweight[rows], self.in_features, codes_buf)
            w = dequantize_groups(codes, self.scales[rows], self.zeros[rows], self.group_size, out=w_buf)
            torch.mm(x2, w.t(), out=y[:, rows])
        if self.bias is not None:
            y += self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, w4 group={self.group_size}"


class QuantEmbedding(nn.Module):
    """A token embedding that reads rows from a (tied) ``QuantLinear``'s packed buffers."""

    def __init__(self, head, dtype):
        super().__init__()
        self.head = [head]  # a list, so the shared buffers are not registered (or counted) twice
        self.dtype = dtype  # the activation dtype the rest of the model runs in

    def forward(self, input_ids):
        h, ids = self.head[0], input_ids.reshape(-1)
        # Only the looked-up rows are unpacked: (tokens, in/2) uint8 -> (tokens, in)
        w = dequantize_groups(unpack_int4(h.qweight[ids], h.in_features), h.scales[ids],
                              h.zeros[ids], h.group_size, self.dtype)
        if h.input_scale is not None:
            w = w * h.input_scale.to(self.dtype)
        return w.view(*input_ids.shape, h.in_features)


# --------------------------------------------------------------------------------------------
# AWQ: activation-aware per-channel scales
# --------------------------------------------------------------------------------------------

# Projections of one decoder block that read the same tensor: q/k/v read the attention norm's
# output, gate/up the MLP norm's. Real AWQ folds 1/s into that one norm, so they must share s.
SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "w1": "mlp_in", "w3": "mlp_in"}
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))  # AutoAWQ's auto_clip: 1.0 down to 0.55, step 0.05
# AutoAWQ leaves q and k unclipped: attention scores amplify their errors (its own comment).
NO_CLIP = ("q_proj", "k_proj", "wqkv")
# Which refinements of the AWQ search quantize_w4a16(method="awq") uses unless told otherwise: the
# fast search (18 s on SmolLM2, 2 CPU cores), which keeps lessons 5-6 and their homework short.
AWQ_DEFAULTS = {"group_scales": False, "search_clip": False, "sequential": False}
# The paper's search, all three (**AWQ_PAPER): 52 % of RTN's perplexity gap closed at group 64 against
# 30 % for the defaults, in 95 s (bench/bench_quantize.py --awq-ablation, docs/benchmarks.md).
AWQ_PAPER = {"group_scales": True, "search_clip": True, "sequential": True}


def load_texts(name: str = "heldout") -> list[str]:
    """Paragraphs of ``data/ppl/<name>.txt`` (held-out text for perplexity, ``calib`` for AWQ)."""
    path = Path(name) if Path(name).suffix else DATA_DIR / "ppl" / f"{name}.txt"
    if not path.is_file():
        raise CourseError(f"Text file {path.name} not found in data/ppl/: use 'heldout' or 'calib', "
                          "or pass the path of a UTF-8 .txt file with paragraphs separated by blank lines.")
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def target_linears(model, include_lm_head: bool = False) -> dict:
    """The linear layers W4A16 replaces: every projection in the decoder blocks (+ lm_head)."""
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in LINEAR_NAMES}
    if include_lm_head:  # "lm_head" in llama, "output" in InternLM2
        head = model.get_output_embeddings()
        found[next(n for n, m in model.named_modules() if m is head)] = head
    if not found:
        raise CourseError("No q/k/v/o/gate/up/down projections found: quantize_w4a16 supports "
                          "llama-style models (SmolLM2, InternLM2.5 via LMDeploy on a GPU).")
    return found


def input_groups(names) -> list[list[str]]:
    """Layer names grouped by the input they share: [q, k, v], [o], [gate, up], [down] per block."""
    groups: dict[tuple, list] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        groups.setdefault((parent, SHARED_INPUT.get(leaf, leaf)), []).append(name)
    return list(groups.values())


def decoder_blocks(names) -> list[list[str]]:
    """Layer names grouped by decoder block (``model.layers.7.*``), in model order; lm_head alone."""
    blocks: dict[str, list] = {}
    for name in names:
        match = re.match(r"(.*?\.\d+)\.", name)
        blocks.setdefault(match.group(1) if match else name, []).append(name)
    return list(blocks.values())


def collect_inputs(model, tokenizer, texts: list[str], layers: dict, *, max_tokens: int = 512,
                   seq_len: int = 256) -> dict:
    """Run the calibration texts once and keep each layer's inputs: {name: (tokens, in_features)}.

    At most ``max_tokens`` rows per layer are kept (evenly spaced), which bounds memory and the
    cost of the AWQ search. The model runs as it is now: layers already quantized stay quantized.
    """
    if not texts:
        raise CourseError("AWQ needs calibration text: pass calib_texts=load_texts('calib').")
    seen: dict[str, list] = {n: [] for n in layers}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: seen[n].append(args[0].detach()
                                         .reshape(-1, args[0].shape[-1]).float()))
             for n, m in layers.items()]
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=seq_len).input_ids
                model(ids.to(model.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, chunks in seen.items():
        x = torch.cat(chunks)
        keep = torch.linspace(0, len(x) - 1, min(max_tokens, len(x))).long()
        out[n] = x[keep]
    return out


def clip_groups(weight, ratio, group_size: int = GROUP_SIZE):
    """Shrink each group's [min, max] range to ``ratio`` (out, groups) of itself and clamp the weight into it.

    Clipping a few outliers makes the 4-bit step of the whole group finer: AWQ's "auto_clip".
    """
    groups = grouped(weight, group_size)  # (out, groups, group_size)
    ratio = torch.as_tensor(ratio, dtype=groups.dtype)[..., None]
    lo = groups.amin(-1, keepdim=True).clamp(max=0) * ratio  # the range RTN maps, 0 included
    hi = groups.amax(-1, keepdim=True).clamp(min=0) * ratio
    return torch.maximum(torch.minimum(groups, hi), lo).view(weight.shape[0], -1)[:, :weight.shape[1]]


def fake_quantize(weight, group_size: int = GROUP_SIZE, scale=None, clip=None):
    """The float weight a :class:`QuantLinear` built with ``scale`` and ``clip`` computes with."""
    w = weight.detach().float()
    w = w * scale if scale is not None else w
    w = clip_groups(w, clip, group_size) if clip is not None else w
    wq = dequantize_groups(*quantize_groups(w, group_size), group_size)
    return wq * (1.0 / scale).half().float() if scale is not None else wq  # the fp16 1/s it stores


def layer_output_mse(weight, x, scale=None, group_size: int = GROUP_SIZE, clip=None) -> float:
    """Mean squared error of ``x @ W.T`` after quantizing ``W * scale`` (scale None = plain RTN)."""
    w = weight.detach().float()
    return float((x @ (w - fake_quantize(w, group_size, scale, clip)).T).pow(2).mean())


def group_output_mse(weights, x, scale=None, group_size: int = GROUP_SIZE) -> float:
    """The output MSE of layers reading the same ``x``, their outputs taken as one (q, k, v -> qkv)."""
    rows = [w.shape[0] for w in weights]
    losses = [layer_output_mse(w, x, scale, group_size) for w in weights]
    return sum(loss * r for loss, r in zip(losses, rows)) / sum(rows)


def awq_search_scale(weight, x, group_size: int = GROUP_SIZE, n_grid: int = 20):
    """AWQ's grid search: ``s = mean|x| ** alpha`` per input channel, alpha in [0, 1).

    ``weight`` is one weight, or a list of the weights that read the same ``x`` (q/k/v): they
    then get one scale, the one that minimizes the error of their outputs together.
    Returns (best scale or None, best alpha, best loss, RTN loss). alpha = 0 gives s = 1, which
    is exactly RTN, so AWQ's calibration loss is never worse than RTN's.
    """
    weights = weight if isinstance(weight, (list, tuple)) else [weight]
    act = x.abs().mean(0).clamp(min=1e-5)  # (in,) how strongly each input channel fires
    rtn = group_output_mse(weights, x, None, group_size)
    best = (None, 0.0, rtn)
    for i in range(1, n_grid):
        alpha = i / n_grid
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1, as AWQ does
        s = s.half().float()  # the 1/s we store is fp16; search with what will be stored
        loss = group_output_mse(weights, x, s, group_size)
        if loss < best[2]:
            best = (s, alpha, loss)
    return (*best, rtn)


def group_output_errors(weight, wq, x, group_size: int = GROUP_SIZE):
    """Each group's share of the output error, ``mean_t (x_g . (w_g - wq_g))^2``: (out, groups).

    With ``d`` the error of one row's group and ``G = x_g.T @ x_g / tokens`` the group's Gram
    matrix, that mean is ``d @ G @ d``: far cheaper than multiplying every token again.
    """
    in_f = weight.shape[1]
    pad = n_groups(in_f, group_size) * group_size - in_f  # zeros: a ragged group's padding adds nothing
    xg = F.pad(x, (0, pad)).view(len(x), -1, group_size)  # (tokens, groups, size)
    gram = torch.einsum("tgk,tgl->gkl", xg, xg) / len(x)
    d = F.pad(weight - wq, (0, pad)).view(len(weight), -1, group_size)  # (out, groups, size)
    return (torch.einsum("ogk,gkl->ogl", d, gram) * d).sum(-1)


def awq_search_clip(weight, x, scale=None, group_size: int = GROUP_SIZE, ratios=CLIP_RATIOS):
    """AWQ's clipping search (AutoAWQ ``auto_clip``), after scaling: per row and group, the range
    ratio in ``ratios`` whose quantized group gives the least output error on ``x``.

    Returns (ratio (out, groups) or None, loss, loss without clipping). Each group is judged on
    its own share of the output; the cross terms between groups can still add up, so the whole
    layer is checked at the end and clipping is dropped if it did not help.
    """
    w = weight.detach().float()
    ws, xs = (w * scale, x * (1.0 / scale).half().float()) if scale is not None else (w, x)
    errors = torch.stack([group_output_errors(ws, fake_quantize(ws, group_size, clip=r), xs, group_size)
                          for r in ratios])  # (ratios, out, groups)
    ratio = torch.tensor(ratios)[errors.argmin(0)]
    base = layer_output_mse(w, x, scale, group_size)
    loss = layer_output_mse(w, x, scale, group_size, clip=ratio)
    return (ratio, loss, base) if loss < base else (None, base, base)


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------

def set_module(model, name: str, module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (e.g. ``model.layers.0.mlp.up_proj``)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _cast_rest(model, dtype) -> None:
    """Cast the float parameters that stay unquantized (embeddings, norms); packed buffers keep theirs."""
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(dtype)
    model.config.dtype = dtype


def awq_layer_plan(layers: dict, inputs: dict, group_size: int, n_grid: int, *,
                   group_scales: bool, search_clip: bool) -> dict:
    """AWQ's choices for some layers from their calibration inputs: {name: (scale, clip, report row)}."""
    groups = input_groups(layers) if group_scales else [[n] for n in layers]
    plan = {}
    for group in groups:
        x = inputs[group[0]]  # the layers of a group all read this same input
        scale, alpha, _, _ = awq_search_scale([layers[n].weight for n in group], x, group_size, n_grid)
        for name in group:
            w = layers[name].weight
            clip_it = search_clip and name.rsplit(".", 1)[-1] not in NO_CLIP
            clip, loss, _ = (awq_search_clip(w, inputs[name], scale, group_size) if clip_it else
                             (None, layer_output_mse(w, inputs[name], scale, group_size), None))
            row = {"layer": name, "alpha": alpha, "mse_rtn": layer_output_mse(w, inputs[name], None, group_size),
                   "mse_awq": loss}
            if search_clip:  # the share of groups clipped; absent otherwise, so lesson 5's table keeps its columns
                row["clipped"] = 0.0 if clip is None else float((clip < 1).float().mean())
            plan[name] = (scale, clip, row)
    return plan


def quantize_w4a16(model, method: str = "rtn", group_size: int = GROUP_SIZE, calib_texts=None, *,
                   tokenizer=None, quantize_lm_head: bool = False, dtype="bfloat16",
                   n_grid: int = 20, max_calib_tokens: int = 512, progress: bool = True,
                   group_scales: bool | None = None, search_clip: bool | None = None,
                   sequential: bool | None = None):
    """Replace the model's projections by packed 4-bit :class:`QuantLinear` layers, in place.

    ``method`` "rtn" rounds each group to nearest; "awq" first searches per-channel scales on
    ``calib_texts`` (needs ``tokenizer``). The unquantized rest (embeddings, norms) is cast to
    ``dtype`` (the "A16"). ``quantize_lm_head`` also packs the tied embedding / lm_head matrix,
    which LMDeploy leaves in fp16. Returns the model; ``model.w4a16_report`` holds per-layer
    calibration losses (AWQ) for inspection.

    The AWQ paper's search details (None = :data:`AWQ_DEFAULTS`): ``group_scales`` gives layers
    that read one input (q/k/v, gate/up) one scale; ``search_clip`` also searches each group's
    clipping range; ``sequential`` calibrates one decoder block at a time on the inputs it gets
    once the blocks before it are quantized, instead of on the unquantized model's.
    """
    from .progress import progress as progress_bar

    if method not in ("rtn", "awq"):
        raise CourseError(f"method={method!r}: use 'rtn' (round to nearest) or 'awq'.")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise CourseError("This model is already quantized: quantize a fresh copy (copy.deepcopy).")
    if method == "awq" and (tokenizer is None or not calib_texts):
        raise CourseError("method='awq' needs calib_texts and tokenizer=, e.g. "
                          "calib_texts=load_texts('calib'), tokenizer=tokenizer.")
    given = {"group_scales": group_scales, "search_clip": search_clip, "sequential": sequential}
    awq = {k: AWQ_DEFAULTS[k] if v is None else v for k, v in given.items()}
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    layers = target_linears(model, quantize_lm_head)
    # Sequential AWQ calibrates block by block; otherwise every layer at once, on the float model.
    batches = decoder_blocks(layers) if method == "awq" and awq["sequential"] else [list(layers)]
    report = []
    bar = progress_bar(total=len(layers), desc=f"W4A16 {method}", disable=not progress)
    for names in batches:
        batch = {n: layers[n] for n in names}
        plan = {n: (None, None, None) for n in names}
        if method == "awq":
            inputs = collect_inputs(model, tokenizer, calib_texts, batch, max_tokens=max_calib_tokens)
            plan = awq_layer_plan(batch, inputs, group_size, n_grid, group_scales=awq["group_scales"],
                                  search_clip=awq["search_clip"])
        for name, lin in batch.items():
            scale, clip, row = plan[name]
            report += [row] if row else []
            bias = lin.bias.to(dtype) if lin.bias is not None else None
            set_module(model, name, QuantLinear.from_weight(lin.weight, group_size, scale, bias, clip))
            bar.update(1)
    bar.close()
    if quantize_lm_head and model.config.tie_word_embeddings:
        model.set_input_embeddings(QuantEmbedding(model.get_output_embeddings(), dtype))
    _cast_rest(model, dtype)
    model.w4a16_report = report
    return model


def weight_bytes(model) -> int:
    """Bytes the weights really occupy: every parameter and buffer once (tied ones count once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------
# Quality and speed
# --------------------------------------------------------------------------------------------

def perplexity(model, tokenizer, texts: list[str], *, window: int = 256, cache_factory=None) -> float:
    """Perplexity on ``texts`` joined, in non-overlapping windows of ``window`` tokens.

    ``cache_factory`` (e.g. from :mod:`course_utils.kvcache`) returns a fresh cache per window;
    a cache that quantizes on write makes attention read quantized K/V, so its cost shows here.
    """
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if len(ids) < 2:
        raise CourseError("perplexity needs at least two tokens of text.")
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window].unsqueeze(0).to(model.device)
            if chunk.shape[1] < 2:
                break
            kwargs = {"past_key_values": cache_factory(), "use_cache": True} if cache_factory else {}
            logits = model(chunk, **kwargs).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def generation_benchmark(model, tokenizer, prompt: str = "Write a short story about a lighthouse.",
                         *, max_new_tokens: int = 32, cache_factory=None) -> dict:
    """Greedy-decode exactly ``max_new_tokens`` after a short warm-up: tokens/s and the text."""
    messages = [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True).to(model.device)
    gen = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=2, **gen)  # warm-up: first-call allocations
        kwargs = {"past_key_values": cache_factory()} if cache_factory else {}
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             **gen, **kwargs)
        seconds = time.perf_counter() - start
    new = out[0, enc["input_ids"].shape[1]:]
    return {"new_tokens": len(new), "seconds": seconds, "tokens_per_s": len(new) / seconds,
            "text": tokenizer.decode(new, skip_special_tokens=True)}
