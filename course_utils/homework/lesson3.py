"""Checks of homework/03_rag_knowledge_base.ipynb: RAG answers what the bare model misses, better retrieval,
your own knowledge base."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CourseError
from ..paths import DATA_DIR, outputs_dir
from .framework import Missing, answer_field, contains, task

@task("L3.kb", level="basic", title="a question the bare model gets wrong and RAG gets right",
      hint="store, _ = rag.build_vectorstore(folder, persist_dir); try the eval questions "
           "(rag.load_eval_set()) and compare chat.complete(...) with rag.make_rag_chain(chat, store)")
def _check_rag_question(answer) -> str:
    from .. import rag

    store, chat = answer_field(answer, "store"), answer_field(answer, "chat")
    question, fact = answer_field(answer, "question", str), answer_field(answer, "fact", str).strip()
    files = rag.indexed_files(store)
    if not files:
        raise Missing("the knowledge base is empty: build it over a folder first")
    if len(fact) < 3 or contains(question, fact):
        raise Missing("'fact' must be the words a right answer contains, not a part of the question")
    k = int(answer.get("k", 4)) if isinstance(answer, dict) else 4  # chunks in the RAG prompt
    hits = rag.retrieve(store, question, k=k)
    if not any(contains(h.text, fact) for h in hits):
        raise Missing(f"{fact!r} is not in the chunks retrieved for the question: it must come "
                      "from the knowledge base")
    bare = chat.complete([{"role": "user", "content": question}], temperature=0.0)
    if contains(bare, fact):
        raise Missing(f"the bare model already answers it: {bare[:80]!r}")
    # The chain's own prompt (rag.make_rag_chain's default template), answered greedily.
    got = chat.complete(rag.rag_messages(hits, question), temperature=0.0)
    if not contains(got, fact):
        raise Missing(f"the RAG chain does not answer it either: {got[:80]!r}")
    return (f"{len(files)} files indexed; asked again: the bare model misses {fact!r}, "
            f"the RAG chain says it (from {hits[0].path})")


def _default_hit_rate(k: int) -> tuple[float, set]:
    """hit@k of the naive pipeline (default split, dense similarity only) and the files it indexes."""
    from .. import rag

    store, _ = rag.build_vectorstore(DATA_DIR / "knowledge_base", outputs_dir() / "homework" /
                                     "rag-default", progress=False)
    return (rag.evaluate_retrieval(store, rag.load_eval_set(), k=k, mode="dense").hit_rate,
            set(rag.indexed_files(store)))


@task("L3.hit3", level="advanced", title="raise hit@3 above the naive pipeline's",
      hint="rebuild with another rag.SplitConfig (chunk size, overlap, header context), retrieve with "
           "mmr=True or mode='hybrid' (BM25 + dense); return {'store', 'mmr', 'mode'}; compare with "
           "rag.compare_retrieval / evaluate_retrieval(store, qa, k=3, mode=...)")
def _check_hit3(answer) -> str:
    from .. import rag

    store = answer_field(answer, "store")
    mmr = bool(answer.get("mmr", False)) if isinstance(answer, dict) else False
    mode = (answer.get("mode") if isinstance(answer, dict) else None) or "dense"  # the baseline's, unless you say
    if mode not in rag.RETRIEVAL_MODES:
        raise Missing(f"'mode' should be one of {', '.join(rag.RETRIEVAL_MODES)}, not {mode!r}")
    baseline, default_files = _default_hit_rate(3)
    missing = default_files - set(rag.indexed_files(store))
    if missing:
        raise Missing(f"the store leaves out {len(missing)} of the knowledge base's files (e.g. "
                      f"{sorted(missing)[0]}): a smaller haystack is not better retrieval")
    got = rag.evaluate_retrieval(store, rag.load_eval_set(), k=3, mmr=mmr, mode=mode).hit_rate
    if got <= baseline:
        raise Missing(f"hit@3 = {got:.3f} ({mode}), not above the naive dense pipeline's {baseline:.3f}")
    return (f"re-evaluated: hit@3 = {got:.3f} ({mode}{', mmr' if mmr else ''}) > the naive dense pipeline's "
            f"{baseline:.3f} on the full knowledge base")


OWN_MIN_QUESTIONS = 10  # the lesson's promise: "your own material, at least 10 questions"
SPLIT_FIELDS = ("chunk_size", "chunk_overlap", "header_context")


def _own_questions(answer) -> list[dict]:
    """The learner's labelled questions: a list of {"question", "source"} dicts or a JSONL file of them."""
    from .. import rag
    from ..evidence import readable

    value = answer_field(answer, "questions", (list, tuple, str, os.PathLike))
    try:
        qa = list(value) if isinstance(value, (list, tuple)) else rag.load_eval_set(readable(value))
    except CourseError as exc:
        raise Missing(str(exc)) from None
    bad = next((q for q in qa if not rag.is_question(q)), None)
    if bad is not None:
        raise Missing(f"{bad!r:.80} is not a question: each needs non-empty \"question\" and \"source\" strings")
    distinct = {" ".join(q["question"].lower().split()) for q in qa}
    if len(distinct) < OWN_MIN_QUESTIONS:
        raise Missing(f"{len(distinct)} distinct questions; write at least {OWN_MIN_QUESTIONS}")
    return qa


def _own_config(answer):
    """The split settings the learner built with (a SplitConfig or a dict; default SplitConfig())."""
    from .. import rag

    value = answer.get("config") if isinstance(answer, dict) else getattr(answer, "config", None)
    if value is None:
        return rag.SplitConfig()
    fields = value if isinstance(value, dict) else {f: getattr(value, f, None) for f in SPLIT_FIELDS}
    try:
        return rag.SplitConfig(**{f: fields[f] for f in SPLIT_FIELDS if fields.get(f) is not None})
    except CourseError as exc:
        raise Missing(f"'config': {exc}") from None


@task("L3.own", level="basic", title="your own knowledge base: 10+ questions, hit@k and MRR",
      hint="put your .md/.txt/.pdf files in a folder, write >= 10 {\"question\", \"source\"} dicts (source = "
           "the file's path relative to the folder), build the store, then report = rag.evaluate_retrieval("
           "store, qa, k=K) and return report.hit_rate and report.mrr")
def _check_own(answer) -> str:
    import tempfile

    from .. import rag
    from ..evidence import readable

    folder = Path(readable(answer_field(answer, "folder", (str, os.PathLike))))
    if not folder.is_dir():
        raise Missing(f"'folder' ({folder.name!r}) is not a folder: give the folder of your documents")
    if folder.resolve().is_relative_to((DATA_DIR / "knowledge_base").resolve()):
        raise Missing("'folder' is the course's knowledge base: this task is about your own material")
    qa, config = _own_questions(answer), _own_config(answer)
    k = answer_field(answer, "k", int)
    if k < 1:
        raise Missing(f"k = {k}: retrieve at least 1 chunk")
    reported = {key: answer_field(answer, key, (int, float)) for key in ("hit@k", "mrr")}
    patterns = rag.default_patterns(folder)
    try:
        sources = {d.metadata["source"] for d in rag.load_documents(folder, patterns)}
    except CourseError as exc:
        raise Missing(str(exc)) from None
    unknown = sorted({q["source"] for q in qa} - sources)
    if unknown:
        raise Missing(f"{len(unknown)} expected source(s) are not files of the folder, e.g. {unknown[0]!r}; "
                      f"'source' is the path relative to the folder, like {sorted(sources)[0]!r}")
    with tempfile.TemporaryDirectory(prefix="l3-own-") as tmp:  # rebuilt here: the learner's store is not trusted
        store, built = rag.build_vectorstore(folder, tmp, patterns=patterns, config=config, progress=False)
        report = rag.evaluate_retrieval(store, qa, k=k)
    got = {"hit@k": report.hit_rate, "mrr": report.mrr}
    for key, value in got.items():
        if abs(float(reported[key]) - value) > 0.0015:  # reported numbers may be rounded to 3 decimals
            raise Missing(f"you report {key} = {float(reported[key]):.3f}, but rebuilding the store from your "
                          f"files gives {value:.3f} (k = {k}, {config.signature()})")
    return (f"rebuilt {built.total_chunks} chunks from {built.total_files} files; recomputed on {len(qa)} "
            f"questions: hit@{k} = {got['hit@k']:.3f}, MRR = {got['mrr']:.3f}, as you report")
