"""Lesson 5 benchmark: W4A16 (RTN/AWQ), KV-cache int8/int4, perplexity, tokens/s, serving load test.

    .venv/bin/python bench/bench_quantize.py [--out FILE.md] [--new-tokens 64] [--no-serve]
    .venv/bin/python bench/bench_quantize.py --awq-ablation [--out FILE.md]

Prints a markdown report (and writes it to --out). Timings depend on the machine's load: the
report starts with the load average and torch's thread count. ``--awq-ablation`` measures only
what each of the AWQ paper's search details adds (issue 17), at group sizes 64 and 128.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
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


# Each AWQ row adds one of the paper's search details to the row above it (the last: quantize.AWQ_PAPER).
AWQ_STEPS = [("AWQ (old)", {}), ("+ groups", {"group_scales": True}),
             ("+ clip", {"group_scales": True, "search_clip": True}),
             ("+ sequential", {"group_scales": True, "search_clip": True, "sequential": True})]


def awq_ablation_rows(model, tokenizer, texts, calib, group_size: int, calib_tokens: int = 512) -> list[dict]:
    """bf16, RTN and AWQ with each search detail added in turn: perplexity, gap closed, bytes, seconds."""
    import torch

    from course_utils import quantize as q

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    fp16_bytes, ppl_bf16 = q.weight_bytes(bf16), q.perplexity(bf16, tokenizer, texts)
    rows = [{"variant": "bf16", "perplexity": ppl_bf16, "weights / fp16": 1.0, "seconds": 0.0}]
    plan = [("RTN", "rtn", {})] + [(name, "awq", opts) for name, opts in AWQ_STEPS]
    for name, method, opts in plan:
        start = time.perf_counter()
        m = q.quantize_w4a16(copy.deepcopy(model), method, group_size, calib if method == "awq" else None,
                             tokenizer=tokenizer, progress=False, max_calib_tokens=calib_tokens,
                             **{"group_scales": False, "search_clip": False, "sequential": False, **opts})
        seconds = time.perf_counter() - start
        rows.append({"variant": name, "perplexity": q.perplexity(m, tokenizer, texts),
                     "weights / fp16": q.weight_bytes(m) / fp16_bytes, "seconds": seconds})
        print(f"g{group_size} {rows[-1]} load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    ppl_rtn = rows[1]["perplexity"]
    for row in rows:  # the share of RTN's perplexity gap to bf16 that a variant closes
        row["gap closed %"] = 100 * (ppl_rtn - row["perplexity"]) / (ppl_rtn - ppl_bf16)
    return [{"group": group_size, **row} for row in rows]


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


def awq_ablation_report(model, tokenizer, texts, calib, groups=(64, 128),
                        calib_tokens: int = 512) -> list[str]:
    """The ablation table for the group sizes, as markdown lines (load average at the end)."""
    import pandas as pd

    rows = [r for g in groups for r in awq_ablation_rows(model, tokenizer, texts, calib, g, calib_tokens)]
    df = pd.DataFrame(rows)[["group", "variant", "perplexity", "gap closed %", "weights / fp16", "seconds"]]
    df = df.round({"perplexity": 2, "gap closed %": 1, "weights / fp16": 3, "seconds": 1})
    title = f"## AWQ search details, perplexity on held-out text (data/ppl/calib, {calib_tokens} tokens per layer)"
    return [title, "", markdown(df, index=False), "",
            f"1-minute load average after the run: {os.getloadavg()[0]:.2f}", ""]


def main(argv=None) -> str:
    """Run the benchmark and return (and optionally write) the markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-serve", action="store_true", help="skip the transformers serve load test")
    parser.add_argument("--awq-ablation", action="store_true",
                        help="only the AWQ search details side by side (bf16, RTN, AWQ + each step)")
    parser.add_argument("--groups", type=int, nargs="+", default=[64, 128],
                        help="group sizes of --awq-ablation")
    parser.add_argument("--calib-tokens", type=int, default=512,
                        help="calibration rows per layer in --awq-ablation")
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
    if args.awq_ablation:
        lines += awq_ablation_report(model, tokenizer, texts, calib, args.groups, args.calib_tokens)
    else:
        rows, timings = variant_rows(model, tokenizer, texts, calib, args.new_tokens)
        table = tradeoff_table(rows)
        lines += [markdown(table), "", f"Quantization time: {timings}", ""]
    if not args.no_serve and not args.awq_ablation:
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
