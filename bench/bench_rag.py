"""Lesson 3 benchmark: index-build throughput next to raw embedding throughput, query latency, retrieval modes.

    .venv/bin/python bench/bench_rag.py            # throughput, latency, and dense / BM25 / hybrid retrieval on
                                                   # the tuned and the held-out question sets (about a minute)
    .venv/bin/python bench/bench_rag.py --tune     # also the chunking x retrieval grid (hit@k, MRR),
                                                   # saved to data/rag_eval/tuning_<profile>.json for lesson 3

Both throughputs use the same model on the same chunks in the same run, so their ratio is the cost
of everything around the embedding (splitting, hashing, Chroma writes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from course_utils import rag  # noqa: E402
from course_utils.env import profile  # noqa: E402
from course_utils.paths import DATA_DIR  # noqa: E402

GRID_SPLITS = [rag.SplitConfig(300, 50), rag.SplitConfig(500, 150), rag.SplitConfig(800, 150),
               rag.SplitConfig(300, 50, False), rag.SplitConfig(500, 150, False), rag.SplitConfig(800, 150, False)]
GRID_RETRIEVAL = [{"k": 1}, {"k": 3}, {"k": 4}, {"k": 5}, {"k": 4, "mmr": True}, {"k": 5, "mmr": True}]
# The set the chunking was tuned on, and one written afterwards from the pages alone (never used for tuning).
QUESTION_SETS = {"tuned": None, "held-out": DATA_DIR / "rag_eval" / "heldout_questions_en.jsonl"}


def load() -> str:
    """The machine's load, printed beside timings: this machine is shared, so it changes them."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def throughput(kb: Path, embeddings) -> dict:
    """Raw embedding and full index-build rates on the same chunks, chunks per second."""
    chunks = rag.split_documents(rag.load_documents(kb, rag.default_patterns(kb)))
    texts = [c.page_content for c in chunks]
    embeddings.embed_documents(texts[:8])  # warm-up: first-call allocations are not throughput
    start = time.perf_counter()
    embeddings.embed_documents(texts)
    raw = len(texts) / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        _, report = rag.build_vectorstore(kb, tmp, embeddings=embeddings, progress=False)
        build = report.chunks_added / (time.perf_counter() - start)
        start = time.perf_counter()
        rag.build_vectorstore(kb, tmp, embeddings=embeddings, progress=False)
        noop = time.perf_counter() - start
    return {"chunks": len(texts), "raw": raw, "build": build, "noop_s": noop}


def latency(store, questions: list[str]) -> dict:
    """Median and p95 milliseconds: embedding + search, and search alone."""
    full, search = [], []
    for q in questions:
        start = time.perf_counter()
        vector = store.embeddings.embed_query(q)
        middle = time.perf_counter()
        rag.retrieve(store, q, k=4, vector=vector)
        end = time.perf_counter()
        full.append((end - start) * 1000)
        search.append((end - middle) * 1000)
    p95 = lambda xs: sorted(xs)[int(0.95 * (len(xs) - 1))]
    return {"median": statistics.median(full), "p95": p95(full), "search_median": statistics.median(search)}


def tune(kb: Path, embeddings, qa) -> list[dict]:
    """hit@k and MRR for every split config x retrieval setting."""
    rows = []
    for split in GRID_SPLITS:
        with tempfile.TemporaryDirectory() as tmp:
            store, report = rag.build_vectorstore(kb, tmp, config=split, embeddings=embeddings, progress=False)
            table = rag.compare_retrieval(store, qa, GRID_RETRIEVAL)
        for row in table.to_dict("records"):
            rows.append({"chunk_size": split.chunk_size, "overlap": split.chunk_overlap,
                         "headers": split.header_context, "chunks": report.total_chunks,
                         "k": row["k"], "mmr": bool(row.get("mmr") is True), "hit@k": row["hit@k"],
                         "MRR": row["MRR"]})
        print(f"  done {split.signature()} ({report.total_chunks} chunks)", flush=True)
    return rows


def compare_modes(store, sets: dict[str, list[dict]]) -> list[dict]:
    """hit@1, hit@3, hit@4 and MRR (within the top 4) of every retrieval mode on every question set."""
    rows = []
    for mode in rag.RETRIEVAL_MODES:
        row = {"mode": mode}
        for name, qa in sets.items():
            report = rag.evaluate_retrieval(store, qa, k=4, mode=mode)
            row |= {f"{name} hit@1": report.hit_at(1), f"{name} hit@3": report.hit_at(3),
                    f"{name} hit@4": report.hit_rate, f"{name} MRR": report.mrr}
        rows.append({key: f"{value:.3f}" if isinstance(value, float) else value for key, value in row.items()})
    return rows


def save_tuning(rows: list[dict], path: Path, n_questions: int) -> None:
    """The grid as JSON: lesson 3 renders its tuning table from this file instead of typing the numbers."""
    from course_utils.models import default_name, spec

    record = {"profile": profile(), "embedding": spec(default_name("embedding")).hf_id.split("/")[-1],
              "questions": n_questions, "rows": rows}  # MRR: ranks within each row's top k
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"saved {path.relative_to(DATA_DIR.parent) if path.is_relative_to(DATA_DIR.parent) else path}")


def main() -> None:
    """Throughput, latency and retrieval quality at the defaults; with --tune the whole grid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kb", type=Path, default=DATA_DIR / "knowledge_base")
    parser.add_argument("--tune", action="store_true", help="also run the chunking x retrieval grid")
    parser.add_argument("--out", type=Path, default=None,
                        help="where --tune saves the grid (default data/rag_eval/tuning_<profile>.json)")
    args = parser.parse_args()

    print(f"profile {profile()}, {load()}")
    embeddings = rag.load_embeddings()
    t = throughput(args.kb, embeddings)
    print(f"embedding, raw      : {t['raw']:7.1f} chunks/s  ({t['chunks']} chunks, same model, same run)")
    print(f"index build (Chroma): {t['build']:7.1f} chunks/s  ({t['build'] / t['raw']:.0%} of raw)")
    print(f"rebuild, no changes : {t['noop_s'] * 1000:7.0f} ms")

    qa = rag.load_eval_set()
    with tempfile.TemporaryDirectory() as tmp:
        store, _ = rag.build_vectorstore(args.kb, tmp, embeddings=embeddings, progress=False)
        lat = latency(store, [item["question"] for item in qa])
        report = rag.evaluate_retrieval(store, qa, k=4)
        sets = {name: rag.load_eval_set(path) if path else qa for name, path in QUESTION_SETS.items()}
        modes = compare_modes(store, sets)
    print(f"query latency       : median {lat['median']:.1f} ms, p95 {lat['p95']:.1f} ms "
          f"(search alone {lat['search_median']:.1f} ms), {len(qa)} questions")
    print(f"retrieval (defaults): {report}")
    sizes = ", ".join(f"{name} {len(items)}" for name, items in sets.items())
    print(f"retrieval modes (default split, k=4; questions: {sizes}; default mode {rag.DEFAULT_MODE!r}):")
    print(rag.markdown_table(modes))
    print(f"after: {load()}")

    if args.tune:
        rows = tune(args.kb, embeddings, qa)
        print(rag.markdown_table(rows))
        save_tuning(rows, args.out or DATA_DIR / "rag_eval" / f"tuning_{profile()}.json", len(qa))


if __name__ == "__main__":
    main()
