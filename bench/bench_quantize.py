"""Lesson 5 benchmark: W4A16 (RTN/AWQ), KV-cache int8/int4, perplexity, tokens/s, serving load test.

    .venv/bin/python bench/bench_quantize.py [--out FILE.md] [--new-tokens 64] [--no-serve]

Prints a markdown report (and writes it to --out). Timings depend on the machine's load: the
report starts with the load average and torch's thread count.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time


def markdown(df, index: bool = True) -> str:
    """A DataFrame as a GitHub markdown table (no tabulate dependency)."""
    df = df.reset_index() if index else df
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def variant_rows(model, tokenizer, texts, calib, new_tokens: int):
    """Measure every variant of the lesson's table plus the group-size and lm_head options."""
    import torch

    from course_utils import quantize as q
    from course_utils.tradeoffs import measure_variant

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    start = time.perf_counter()
    rtn = q.quantize_w4a16(copy.deepcopy(model), "rtn", progress=False)
    t_rtn = time.perf_counter() - start
    start = time.perf_counter()
    awq = q.quantize_w4a16(copy.deepcopy(model), "awq", calib_texts=calib, tokenizer=tokenizer,
                           progress=False)
    t_awq = time.perf_counter() - start
    extra = {
        "W4A16-RTN g64": q.quantize_w4a16(copy.deepcopy(model), "rtn", 64, progress=False),
        "W4A16-AWQ + lm_head": q.quantize_w4a16(copy.deepcopy(model), "awq", calib_texts=calib,
                                                tokenizer=tokenizer, quantize_lm_head=True,
                                                progress=False),
    }
    plan = [("fp32", model, "fp32"), ("bf16", bf16, "bf16"), ("W4A16-RTN", rtn, "bf16"),
            ("W4A16-AWQ", awq, "bf16"), ("KV int8", bf16, "int8"), ("KV int4", bf16, "int4"),
            ("AWQ + KV int8", awq, "int8")] + [(k, m, "bf16") for k, m in extra.items()]
    rows = [measure_variant(name, m, tokenizer, texts, kv=kind, new_tokens=new_tokens)
            for name, m, kind in plan]
    return rows, {"RTN quantize (s)": round(t_rtn, 1),
                  "AWQ quantize, 20 alphas x 512 tokens (s)": round(t_awq, 1)}


def serving_rows(max_tokens: int = 32) -> list[dict]:
    """8 requests one at a time and 8 at once, with and without continuous batching."""
    from course_utils import serving

    prompts = [f"Write one sentence about the number {i}." for i in range(8)]
    rows = []
    for cb in (False, True):
        extra = list(serving.CPU_BATCHING_ARGS) if cb else []
        with serving.serve("smollm2-135m-instruct", port=serving.free_port(), extra_args=extra) as srv:
            client = serving.client(srv)
            for concurrency in (1, 8):
                res = serving.benchmark_concurrency(client, srv.model, prompts, concurrency=concurrency,
                                                    max_tokens=max_tokens)
                rows.append({"continuous batching": cb, "server start (s)": round(srv.started_s, 1), **res})
    return rows


def main(argv=None) -> str:
    """Run the benchmark and return (and optionally write) the markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-serve", action="store_true", help="skip the transformers serve load test")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import pandas as pd
    import torch
    from transformers.utils import logging as hf_logging

    from course_utils import quantize as q
    from course_utils.models import load_model
    from course_utils.tradeoffs import tradeoff_table

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    load = os.getloadavg()
    lines = [f"# Lesson 5 benchmark ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch threads {torch.get_num_threads()}, "
             f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f})", ""]
    model, tokenizer = load_model("smollm2-135m-instruct")
    texts, calib = q.load_texts("heldout"), q.load_texts("calib")
    rows, timings = variant_rows(model, tokenizer, texts, calib, args.new_tokens)
    table = tradeoff_table(rows)
    lines += [markdown(table), "", f"Quantization time: {timings}", ""]
    if not args.no_serve:
        serve = pd.DataFrame(serving_rows()).round(2)
        lines += ["## transformers serve, 8 requests x 32 tokens", "", markdown(serve, index=False), ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(report + "\n")
    return report


if __name__ == "__main__":
    main()
