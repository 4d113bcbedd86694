"""Checks of homework/05_lmdeploy_quantization.ipynb: W4A16 weights, a served model under load, a quantized
KV cache."""

from __future__ import annotations

from .framework import Missing, answer_field, task, within

MAX_W4A16_RATIO = 0.6  # of the bf16 weights; SmolLM2 keeps its tied embedding (21%) in bf16
LONG_CONTEXT = 2048  # tokens


@task("L5.w4a16", level="basic", title="W4A16: weight memory and perplexity",
      hint="quantize.quantize_w4a16(model) then quantize.weight_bytes(model) and "
           "quantize.perplexity(model, tokenizer, quantize.load_texts('heldout'))")
def _check_w4a16(answer) -> str:
    import course_utils.quantize as q

    from ..memory import ModelShape, weight_memory

    model, tokenizer = answer_field(answer, "model"), answer_field(answer, "tokenizer")
    packed = sum(isinstance(m, q.QuantLinear) for m in model.modules())
    if not packed:
        raise Missing("the model has no QuantLinear layers: quantize_w4a16(model) replaces its projections")
    measured = q.weight_bytes(model)
    reported = answer_field(answer, "weight_bytes", (int, float))
    if not within(reported, measured, 0.01):
        raise Missing(f"weight_bytes={reported:,.0f}, but the model's weights occupy {measured:,}")
    ratio = measured / weight_memory(ModelShape.from_config(model.config), "bf16")
    if ratio > MAX_W4A16_RATIO:
        raise Missing(f"the weights are {ratio:.2f}× their bf16 size: expected ≤ {MAX_W4A16_RATIO}")
    ppl = q.perplexity(model, tokenizer, q.load_texts("heldout"))
    if not within(answer_field(answer, "perplexity", (int, float)), ppl, 0.02):
        raise Missing(f"perplexity={answer['perplexity']:.2f}, but re-measured on the held-out text "
                      f"it is {ppl:.2f}")
    return (f"{packed} packed layers; weights {measured / 2**20:.0f} MiB = {ratio:.2f}× bf16 "
            f"(re-measured); perplexity {ppl:.2f} (re-measured)")


MIN_LOAD_REQUESTS = 4  # per concurrency level


def _load_run(run, which: str) -> tuple[dict, list]:
    """One benchmark_concurrency result, its log checked record by record."""
    if not isinstance(run, dict):
        raise Missing("'load' should hold the dicts serving.benchmark_concurrency returned")
    log = answer_field(run, "log", (list, tuple))
    if len(log) < MIN_LOAD_REQUESTS:
        raise Missing(f"the {which} run sent {len(log)} requests: send at least {MIN_LOAD_REQUESTS}")
    for r in log:
        if not isinstance(r, dict) or not all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                              for k in ("start_s", "end_s", "completion_tokens")):
            raise Missing(f"the {which} run's 'log' is not the per-request log benchmark_concurrency writes")
        if not isinstance(r.get("text"), str) or not r["text"].strip() or r["end_s"] < r["start_s"]:
            raise Missing(f"the {which} run has an empty or impossible reply to {str(r.get('prompt'))[:40]!r}")
    return run, log


@task("L5.serve", level="basic", title="serve the model and load-test it at two concurrencies",
      hint="server = serving.serve(port=serving.free_port(), extra_args=list(serving.CPU_BATCHING_ARGS)); "
           "api = serving.client(server); load = [serving.benchmark_concurrency(api, server.model, prompts, "
           "concurrency=c) for c in (1, 8)]; return {'server': server, 'load': load}")
def _check_serve(answer) -> str:
    from ..serving import LOOPBACK, client, load_summary

    server = answer_field(answer, "server")
    if server.host not in LOOPBACK:
        raise Missing(f"the server listens on {server.host}: keep it on 127.0.0.1 (or use an api_key)")
    load = answer_field(answer, "load", (list, tuple))
    if len(load) != 2:
        raise Missing(f"'load' holds {len(load)} runs: benchmark once at concurrency 1 and once at ≥ 4")
    (serial, s_log), (batched, b_log) = sorted(
        (_load_run(run, which) for run, which in zip(load, ("first", "second"))),
        key=lambda pair: answer_field(pair[0], "concurrency", int))
    if serial["concurrency"] != 1 or batched["concurrency"] < MIN_LOAD_REQUESTS:
        raise Missing(f"concurrencies {serial['concurrency']} and {batched['concurrency']}: use 1 and ≥ 4")
    if sorted(r.get("prompt") for r in s_log) != sorted(r.get("prompt") for r in b_log):
        raise Missing("send the same prompts at both concurrencies, or the two runs are not comparable")
    redone = []
    for run, log in ((serial, s_log), (batched, b_log)):
        wall = answer_field(run, "wall_s", (int, float))
        last = max(r["end_s"] for r in log)
        if not last <= wall <= 1.05 * last + 0.1:  # the wall clock ends just after the last reply
            raise Missing(f"wall_s={wall:.2f} but the last reply of that run came at {last:.2f} s")
        again = load_summary(log, wall=wall)
        for key in ("throughput_tok_s", "latency_mean_s"):
            if not within(answer_field(run, key, (int, float)), again[key], 0.01):
                raise Missing(f"{key}={run[key]:.2f} at concurrency {run['concurrency']}, but its log "
                              f"gives {again[key]:.2f}")
        redone.append(again)
    if redone[0]["max_in_flight"] != 1:
        raise Missing("at concurrency 1 the log shows requests overlapping: send them one after another")
    if redone[1]["max_in_flight"] < 2:
        raise Missing(f"at concurrency {batched['concurrency']} no two requests were ever open at once: "
                      "send them from a thread pool (benchmark_concurrency does)")
    speedup = redone[1]["throughput_tok_s"] / redone[0]["throughput_tok_s"]
    # Not a pass/fail criterion: batching gave 4.6x on an idle 2-core CPU but nothing on an overloaded one.
    note = "" if speedup >= 1.25 else (" — no throughput gain: was continuous batching on "
                                        "(extra_args=list(serving.CPU_BATCHING_ARGS)), and was the machine busy?")
    summary = (f"recomputed from {len(s_log) + len(b_log)} logged requests: concurrency 1 → "
               f"{redone[0]['throughput_tok_s']:.1f} tok/s, {batched['concurrency']} → "
               f"{redone[1]['throughput_tok_s']:.1f} tok/s ({speedup:.1f}×, up to {redone[1]['max_in_flight']} "
               f"in flight); mean latency {redone[0]['latency_mean_s']:.2f} → {redone[1]['latency_mean_s']:.2f} s{note}")
    if not server.running:
        return f"{summary} (server already stopped, not re-queried)"
    first = s_log[0]
    reply = client(server).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": first.get("prompt") or ""}],
        max_tokens=max(1, int(first["completion_tokens"])), temperature=0)
    text = (reply.choices[0].message.content or "") if reply.choices else ""
    if text.strip() != first["text"].strip():
        raise Missing(f"re-asked {first.get('prompt')!r} (greedy), the server says {text[:50]!r}, not the "
                      f"logged {first['text'][:50]!r}")
    return f"{summary}; re-asked {first.get('prompt')!r}: same greedy reply"


@task("L5.kv", level="advanced", title="KV-cache quantization at a long context",
      hint=f"cache = kvcache.make_cache('int8', model.config); model(ids, past_key_values=cache) "
           f"with ≥ {LONG_CONTEXT} tokens; kvcache.cache_bytes(cache)")
def _check_kv(answer) -> str:
    from ..kvcache import cache_bytes
    from ..memory import kv_bytes

    cache, model = answer_field(answer, "cache"), answer_field(answer, "model")
    if not hasattr(cache, "layers") or not hasattr(cache, "get_seq_length"):
        raise Missing("'cache' should be the transformers Cache the model filled")
    tokens = int(cache.get_seq_length())
    if tokens < LONG_CONTEXT:
        raise Missing(f"the cache holds {tokens} tokens: run a context of at least {LONG_CONTEXT}")
    measured = cache_bytes(cache)
    if not within(answer_field(answer, "bytes", (int, float)), measured, 0.01):
        raise Missing(f"bytes={answer['bytes']:,.0f}, but the cache holds {measured:,}")
    ratio = measured / kv_bytes(model.config, tokens, 16)
    if ratio > 0.6:
        raise Missing(f"the cache is {ratio:.2f}× a bf16 cache: it is not quantized (int8 ≈ 0.5–0.6)")
    return f"{tokens} tokens cached in {measured / 2**20:.1f} MiB = {ratio:.2f}× bf16 (re-measured)"
