"""KV-cache quantization: int8 / int4 keys and values per head and per token, and what the cache weighs.

During generation every layer keeps the keys and values of all earlier tokens; for long contexts
and many parallel requests this cache, not the weights, fills the GPU. LMDeploy's
``quant_policy=8`` (int8) and ``quant_policy=4`` (int4) store it quantized asymmetrically with
one scale and zero point per head and per token. :class:`QuantizedKVStore` does the same in plain
torch: it quantizes on write and hands attention the de-quantized keys and values, so the error
shows up in perplexity and the saving in :func:`cache_bytes`.
"""

from __future__ import annotations

from .errors import CourseError
from .memory import ModelShape, kv_bytes
from .quantize import pack_int4, unpack_int4

KINDS = ("fp32", "bf16", "int8", "int4", "quanto-int4")


def quantize_per_token(x, bits: int = 8):
    """Asymmetric ``bits``-bit quantization over the last dim of ``x`` (batch, heads, tokens, head_dim).

    Returns (codes uint8, scale fp16, zero fp16); scale and zero have shape (batch, heads, tokens, 1).
    int4 codes are packed two per byte, so they have head_dim / 2 columns.
    """
    import torch

    if bits not in (4, 8):
        raise CourseError(f"bits={bits}: KV-cache quantization supports 8 (quant_policy=8) or 4.")
    top = 2**bits - 1
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale = ((hi - lo) / top).clamp(min=1e-6).half()
    zero = torch.round(-lo / scale.float()).clamp(0, top).half()
    codes = torch.round(xf / scale.float() + zero.float()).clamp(0, top).to(torch.uint8)
    if bits == 4:
        codes = pack_int4(codes.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    return codes, scale, zero


def dequantize_per_token(codes, scale, zero, bits: int = 8, dtype=None):
    """Inverse of :func:`quantize_per_token`, in ``dtype`` (default fp32)."""
    import torch

    if bits == 4:
        d = codes.shape[-1] * 2
        codes = unpack_int4(codes.reshape(-1, codes.shape[-1]), d).reshape(*codes.shape[:-1], d)
    dtype = dtype or torch.float32
    return (codes.to(dtype) - zero.to(dtype)) * scale.to(dtype)


class QuantizedKVStore:
    """One decoder layer's K/V, stored as int8/int4 codes + fp16 scale/zero per head and token.

    ``update`` quantizes the new tokens and hands attention the de-quantized history, including
    this step's own tokens. :func:`course_utils.compat.store_cache` turns a list of these into a
    transformers cache on either major.
    """

    def __init__(self, bits: int = 8):
        self.bits = bits
        self.stored: dict[str, list] = {"k": [], "v": []}  # chunks of (codes, scale, zero)
        self.length = 0
        self.dtype = None

    def _read(self, which: str):
        import torch

        parts = [torch.cat(p, dim=-2) for p in zip(*self.stored[which])]  # along tokens
        return dequantize_per_token(*parts, bits=self.bits, dtype=self.dtype)

    def update(self, key_states, value_states):
        self.dtype = key_states.dtype
        self.stored["k"].append(quantize_per_token(key_states, self.bits))
        self.stored["v"].append(quantize_per_token(value_states, self.bits))
        self.length += key_states.shape[-2]
        return self._read("k"), self._read("v")

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.stored, self.length = {"k": [], "v": []}, 0

    def tensors(self) -> list:
        """Every tensor this layer keeps, for memory accounting."""
        return [t for which in ("k", "v") for chunk in self.stored[which] for t in chunk]


def make_cache(kind: str, config):
    """An empty cache for one generation: fp32/bf16 (plain), int8/int4 (ours), quanto-int4 (transformers)."""
    from . import compat

    if kind in ("fp32", "bf16"):
        return compat.dynamic_cache(config)
    if kind in ("int8", "int4"):
        return compat.store_cache([QuantizedKVStore(int(kind[3:])) for _ in range(config.num_hidden_layers)])
    if kind == "quanto-int4":  # KIVI-style: a 128-token full-precision window, then 4-bit groups
        return compat.quanto_cache(config, nbits=4)
    raise CourseError(f"Unknown KV cache kind {kind!r}; use one of {', '.join(KINDS)}.")


def cache_factory(kind: str, config):
    """A zero-argument function returning a fresh cache (what perplexity/generation_benchmark take)."""
    make_cache(kind, config)  # fail now, not in the middle of a benchmark
    return lambda: make_cache(kind, config)


def _tensor_bytes(t) -> int:
    # quanto's quantized tensors are wrapper subclasses: count the plain tensors inside them.
    if hasattr(t, "__tensor_flatten__") and type(t).__name__ != "Tensor":
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def cache_bytes(cache) -> int:
    """Bytes the cache really holds: codes, scales, zeros, and any full-precision part."""
    from .compat import cache_layer_tensors

    return sum(_tensor_bytes(t) for layer in cache_layer_tensors(cache) for t in layer if t is not None)


def fill_cache(cache, config, tokens: int, dtype=None, seed: int = 0):
    """Write ``tokens`` tokens of random K/V into every layer (sizes, not values, are what we measure)."""
    import torch

    dims = ModelShape.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    shape = (1, dims.kv_heads, tokens, dims.head_dim)  # (batch, kv_heads, tokens, head_dim)
    for i in range(config.num_hidden_layers):
        k = torch.randn(shape, generator=gen).to(dtype or torch.float32)
        cache.update(k, torch.randn(shape, generator=gen).to(k.dtype), i)
    return cache


def memory_table(config, tokens: int = 2048, kinds=KINDS):
    """Measured (filled cache) and expected bytes per cache kind at ``tokens`` tokens, in MB."""
    import pandas as pd
    import torch

    rows = []
    for kind in kinds:
        dtype = torch.float32 if kind == "fp32" else torch.bfloat16
        measured = cache_bytes(fill_cache(make_cache(kind, config), config, tokens, dtype))
        bits = {"fp32": 32, "bf16": 16, "int8": 8, "int4": 4}.get(kind)
        rows.append({"cache": kind, "measured (MB)": round(measured / 1e6, 2),
                     "formula (MB)": round(kv_bytes(config, tokens, bits) / 1e6, 2) if bits else None,
                     "vs bf16": None, "bytes": measured})
    df = pd.DataFrame(rows).set_index("cache")
    df["vs bf16"] = (df["bytes"] / kv_bytes(config, tokens, 16)).round(2)
    return df.drop(columns="bytes")
