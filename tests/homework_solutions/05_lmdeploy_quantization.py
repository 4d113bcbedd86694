"""Reference solutions for homework/05_lmdeploy_quantization.ipynb.

Each ``# %% task:<id>`` section replaces the notebook cell tagged ``task:<id>`` (tests/test_homework.py).
"""

# %% task:L5.w4a16
from course_utils import quantize as q
from course_utils.models import load_model


def quantize_and_measure() -> dict:
    """W4A16 the chat model; report the weights' bytes and the held-out perplexity."""
    model, tokenizer = load_model()
    q.quantize_w4a16(model, "rtn", progress=False)
    report = {"model": model, "tokenizer": tokenizer, "weight_bytes": q.weight_bytes(model),
              "perplexity": q.perplexity(model, tokenizer, q.load_texts("heldout"))}
    print(f"weights {report['weight_bytes'] / 2**20:.0f} MiB, perplexity {report['perplexity']:.1f}")
    return report


w4a16 = homework.attempt(quantize_and_measure)

# %% task:L5.serve
from course_utils import serving


def serve_and_load_test() -> dict:
    """Serve the model with batching; benchmark the same 8 prompts one at a time and 8 at a time."""
    server = serving.serve(port=serving.free_port(), extra_args=list(serving.CPU_BATCHING_ARGS))
    api = serving.client(server)
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]
    load = [serving.benchmark_concurrency(api, server.model, prompts, concurrency=c, max_tokens=24) for c in (1, 8)]
    for run in load:
        print(f"concurrency {run['concurrency']}: {run['throughput_tok_s']:.0f} tok/s, "
              f"mean latency {run['latency_mean_s']:.2f} s")
    return {"server": server, "load": load}


served = homework.attempt(serve_and_load_test)

# %% task:L5.kv
import torch

from course_utils import kvcache as kv


def long_context_cache() -> dict:
    """Run ≥ 2048 tokens through the model with a quantized KV cache; report the cache's bytes."""
    model, tokenizer = load_model()
    text = "\n\n".join(q.load_texts("heldout"))
    ids = tokenizer(text, return_tensors="pt").input_ids
    ids = ids.repeat(1, 2048 // ids.shape[1] + 1)[:, :2048]  # (1, 2048) tokens of real text
    cache = kv.make_cache("int8", model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    print(f"{cache.get_seq_length()} tokens, {kv.cache_bytes(cache) / 2**20:.1f} MiB")
    return {"model": model, "cache": cache, "bytes": kv.cache_bytes(cache)}


long_kv = homework.attempt(long_context_cache)
