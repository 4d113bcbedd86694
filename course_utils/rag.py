"""Retrieval-augmented generation over a knowledge base: retrieve, answer with sources, evaluate.

Loading, splitting, embedding and the incremental Chroma store live in ``course_utils.knowledge``
and are re-exported here, so a notebook needs only ``from course_utils import rag``. The LLM is any
LangChain LLM (the lesson defines its own ``InternLM_LLM`` in the notebook) or a ``course_utils.chat``
protocol object (a local ``ChatSession``, an endpoint, ...).
"""

from __future__ import annotations

import json
import math
import re
import weakref
from collections import Counter
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterator

from .errors import CourseError, is_number, is_whole
from .knowledge import *  # noqa: F403  re-exported: a notebook needs one import per lesson
from .knowledge import show_path  # the names this module itself uses, spelled out for the reader
from .paths import DATA_DIR

# The default prompt of make_rag_chain / RagSession (the lesson writes its own in the notebook). One user
# message, no system message: it works the same through ChatSession.ask, .complete and an endpoint. The
# question comes before and after the context because SmolLM2-135M loses it otherwise.
RAG_TEMPLATE = ("Question: {question}\n\nHere is some information that helps:\n{context}\n\n"
                "Answer only from this information; if it does not contain the answer, say \"I don't know.\"\n"
                "Question: {question}")


def check_template(template) -> str:
    """``template`` if it is a prompt string with both ``{context}`` and ``{question}``; else a CourseError."""
    import string

    if not isinstance(template, str) or not template.strip():
        raise CourseError(f"template={template!r:.60}: use a prompt string with {{context}} and {{question}} "
                          "in it, e.g. rag.RAG_TEMPLATE.")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise CourseError(f"The prompt template does not parse ({exc}): write a literal brace as {{{{ or }}}}.") from None
    missing = [f"{{{name}}}" for name in ("context", "question") if name not in fields]
    if missing:
        # Without {context} the model answers from memory; without {question} it never sees the question.
        raise CourseError(f"The prompt template has no {' and no '.join(missing)}: the chain fills in the retrieved "
                          "chunks as {context} and the question as {question}; put both in the template.")
    extra = sorted(fields - {"context", "question"})
    if extra:
        raise CourseError(f"The prompt template has {{{extra[0]}}}, which the chain cannot fill: use only "
                          "{context} and {question} (write a literal brace as {{ or }}).")
    return template


# ---------------------------------------------------------------- retrieval

RETRIEVAL_MODES = ("dense", "bm25", "hybrid")
DEFAULT_MODE = "hybrid"  # without mode= (and without mmr=True, which means dense): best on both eval sets, see
# docs/benchmarks.md "Retrieval past the naive pipeline"
RRF_C = 60  # reciprocal rank fusion's constant (Cormack et al. 2009; LangChain's EnsembleRetriever uses 60 too)


@dataclass(frozen=True)
class Hit:
    path: str  # the file, relative to the knowledge folder
    section: str  # the Markdown section path ("" when none)
    score: float  # cosine similarity to the question, 1 = identical direction
    text: str  # the chunk as embedded (with its "title > section" line when header context is on)

    def source(self) -> dict:
        """The ``{"path", "section", "score"}`` record a chain returns."""
        return {"path": self.path, "section": self.section, "score": round(self.score, 3)}


def _hit(doc, distance: float) -> Hit:
    meta = doc.metadata
    return Hit(meta["source"], meta.get("section", ""), 1.0 - distance, doc.page_content)


def _check_k(k, name: str = "k", example: int = 4) -> None:
    if not is_whole(k) or k < 1:
        raise CourseError(f"{name}={k!r}: use a whole number of chunks to retrieve, 1 or more "
                          f"(e.g. {name}={example}).")


def _check_search(k, mmr: bool = False, fetch_k=20, lambda_mult=0.5, mode: str | None = None) -> str:
    """The retrieval settings, checked where a learner passes them (before any question is embedded).

    Returns the mode to use: ``mode``, else "dense" for MMR (it reorders embedding neighbours), else DEFAULT_MODE.
    """
    _check_k(k)
    mode = mode if mode is not None else "dense" if mmr else DEFAULT_MODE
    if mode not in RETRIEVAL_MODES:
        raise CourseError(f"mode={mode!r:.40}: use one of {', '.join(map(repr, RETRIEVAL_MODES))} "
                          f"(the default is {DEFAULT_MODE!r}).")
    if mmr and mode != "dense":
        raise CourseError(f"mmr=True works with mode='dense' only (MMR reorders embedding neighbours); "
                          f"leave mmr out with mode={mode!r}.")
    if mode != "dense":
        _check_k(fetch_k, "fetch_k", 20)
    if mmr:
        _check_k(fetch_k, "fetch_k", 20)
        if not is_number(lambda_mult) or not 0 <= lambda_mult <= 1:
            raise CourseError(f"lambda_mult={lambda_mult!r}: use a number from 0 (most diverse) to 1 "
                              "(most relevant); the default is 0.5.")
    return mode


def _check_store(store) -> None:
    # build_vectorstore returns (store, report): a forgotten unpacking is the likeliest wrong store.
    if isinstance(store, tuple) and store and hasattr(store[0], "similarity_search_by_vector_with_relevance_scores"):
        raise CourseError("store is the (store, report) pair that build_vectorstore returns: unpack it, "
                          "store, report = rag.build_vectorstore(KB_DIR, STORE_DIR).")
    if not (hasattr(store, "similarity_search_by_vector_with_relevance_scores") and hasattr(store, "embeddings")):
        raise CourseError(f"store={store!r:.60}: pass the vector store from rag.build_vectorstore(KB_DIR, STORE_DIR) "
                          "or rag.load_vectorstore(STORE_DIR).")


def _check_question(question) -> None:
    # An empty question still embeds to a vector and "retrieves" chunks: wrong answers, no error.
    if not isinstance(question, str) or not question.strip():
        raise CourseError(f"question={question!r:.80}: ask a non-empty question string, e.g. "
                          "retrieve(store, \"Which port does LMDeploy serve on?\").")


def retrieve(store, question: str, *, k: int = 4, mode: str | None = None, mmr: bool = False, fetch_k: int = 20,
             lambda_mult: float = 0.5, vector: list[float] | None = None) -> list[Hit]:
    """The ``k`` chunks that best match ``question``, best first.

    ``mode``: "hybrid" (the default: the dense and the BM25 top ``fetch_k`` fused by reciprocal rank),
    "dense" (closest embeddings; with ``mmr=True``, the default then, also mutually different) or "bm25"
    (shared words, weighted by rarity). Every hit's score is its cosine similarity to the question.
    """
    _check_store(store)
    mode = _check_search(k, mmr, fetch_k, lambda_mult, mode)
    _check_question(question)
    vector = vector if vector is not None else store.embeddings.embed_query(question)
    if mode != "dense":
        return _lexical_retrieve(store, question, vector, k=k, mode=mode, fetch_k=fetch_k)
    scored = store.similarity_search_by_vector_with_relevance_scores(vector, k=max(k, fetch_k) if mmr else k)
    if not mmr:
        return [_hit(doc, dist) for doc, dist in scored]
    distance = {doc.id: dist for doc, dist in scored}
    picked = store.max_marginal_relevance_search_by_vector(vector, k=k, fetch_k=max(k, fetch_k),
                                                           lambda_mult=lambda_mult)
    return [_hit(doc, distance.get(doc.id, 1.0)) for doc in picked]


# ---------------------------------------------------------------- keyword retrieval and fusion

_WORD = re.compile(r"[^\W\u3400-\u9fff]+|[\u3400-\u9fff]")  # words; each Chinese character is its own token


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens for BM25 (``cache_max_entry_count`` stays one token, 中文 splits per character)."""
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 over a fixed list of texts: shared words count, rare words count more.

    ``k1`` caps how much repeating a word helps, ``b`` how much long texts are discounted; 1.5 and 0.75
    are the defaults of the rank-bm25 package. IDF is Lucene's, which is never negative.
    """

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise CourseError(f"texts={texts!r:.60}: BM25 needs a non-empty list of strings (the chunks).")
        self.k1, self.b = k1, b
        self.counts = [Counter(tokenize(t)) for t in texts]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.avg_length = max(sum(self.lengths) / len(texts), 1e-9)
        df = Counter(word for c in self.counts for word in c)
        self.idf = {w: math.log((len(texts) - n + 0.5) / (n + 0.5) + 1) for w, n in df.items()}

    def scores(self, query: str) -> list[float]:
        """One score per text (0 when no query word occurs in it)."""
        words = tokenize(query)
        out = []
        for counts, length in zip(self.counts, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg_length)
            out.append(sum(self.idf[w] * counts[w] * (self.k1 + 1) / (counts[w] + norm) for w in words if w in counts))
        return out

    def top(self, query: str, n: int) -> list[int]:
        """The indices of the ``n`` best-scoring texts, best first (texts without a query word left out)."""
        _check_k(n, "n", 4)
        scores = self.scores(query)
        return sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: -scores[i])[:n]


def fuse_rankings(rankings: list[list], weights: list[float] | None = None, c: int = RRF_C) -> list:
    """Reciprocal rank fusion: each item once, ordered by sum(weight / (c + rank)) over the rankings.

    Ties keep the order of first appearance, as in LangChain's EnsembleRetriever.
    """
    if isinstance(rankings, (str, bytes)) or not isinstance(rankings, (list, tuple)) or not all(
            isinstance(r, (list, tuple)) for r in rankings):
        raise CourseError(f"rankings={rankings!r:.60}: pass a list of rankings, each a list of ids, best first.")
    weights = [1.0] * len(rankings) if weights is None else weights
    if not isinstance(weights, (list, tuple)) or len(weights) != len(rankings) or not all(
            is_number(w) and w >= 0 for w in weights):
        raise CourseError(f"weights={weights!r:.60}: give one number >= 0 per ranking ({len(rankings)}).")
    if not is_whole(c) or c < 0:
        raise CourseError(f"c={c!r}: use a whole number >= 0 (RRF's usual constant is {RRF_C}).")
    fused: dict = {}
    for ranking, weight in zip(rankings, weights):
        for rank, item in enumerate(dict.fromkeys(ranking), 1):  # an id twice in one list counts once
            fused[item] = fused.get(item, 0.0) + weight / (c + rank)
    return sorted(fused, key=lambda item: -fused[item])  # sorted() is stable: ties stay in first-seen order


@dataclass
class _ChunkIndex:
    """The store's chunks as plain lists, with their BM25 index (rebuilt when the store's chunks change)."""
    ids: list[str]
    texts: list[str]
    metadatas: list[dict]
    vectors: Any  # numpy array (chunks, dim), normalised like the store's embeddings
    bm25: BM25


_INDEXES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # store -> _ChunkIndex


def _chunk_index(store) -> _ChunkIndex:
    """The cached index of ``store``, checked against the store's chunk ids (cheap) on every call."""
    import numpy as np

    ids = store.get(include=[])["ids"]
    cached = _INDEXES.get(store)
    if cached is not None and sorted(cached.ids) == sorted(ids):
        return cached
    got = store.get(include=["documents", "metadatas", "embeddings"])
    if not got["ids"]:
        raise CourseError("The vector store is empty: build it with rag.build_vectorstore(KB_DIR, STORE_DIR).")
    index = _ChunkIndex(got["ids"], got["documents"], got["metadatas"], np.asarray(got["embeddings"], dtype=float),
                        BM25(got["documents"]))
    _INDEXES[store] = index
    return index


def _lexical_retrieve(store, question: str, vector, *, k: int, mode: str, fetch_k: int) -> list[Hit]:
    """BM25 alone, or BM25 and dense fused by reciprocal rank (equal weights, as EnsembleRetriever's default)."""
    import numpy as np

    index = _chunk_index(store)
    depth = min(max(k, fetch_k), len(index.ids))  # Chroma warns when asked for more chunks than it holds
    position = {chunk_id: i for i, chunk_id in enumerate(index.ids)}
    lexical = [index.ids[i] for i in index.bm25.top(question, depth)]
    if mode == "bm25":
        order = lexical[:k]
    else:
        dense = [doc.id for doc, _ in store.similarity_search_by_vector_with_relevance_scores(vector, k=depth)]
        order = fuse_rankings([dense, lexical])[:k]
    cosine = index.vectors @ np.asarray(vector, dtype=float)
    return [Hit(index.metadatas[i]["source"], index.metadatas[i].get("section", ""), float(cosine[i]), index.texts[i])
            for i in (position[chunk_id] for chunk_id in order)]


def format_context(hits: list[Hit]) -> str:
    """The retrieved chunks, best first, as the prompt's context (paths left out: small models copy them)."""
    return "\n\n".join(h.text for h in hits)


def rag_messages(hits: list[Hit], question: str, template: str = RAG_TEMPLATE) -> list[dict]:
    """The message list the model gets for one question: ``template`` filled in, as one user message."""
    return [{"role": "user", "content": template.format(context=format_context(hits), question=question)}]


def sources_markdown(hits: list[Hit], max_sources: int = 3) -> str:
    """A Markdown list of the distinct (file, section) pairs behind an answer, best first."""
    seen, lines = set(), []
    for h in hits:
        if (h.path, h.section) not in seen and len(lines) < max_sources:
            seen.add((h.path, h.section))
            where = f" — {h.section}" if h.section else ""
            lines.append(f"{len(lines) + 1}. `{h.path}`{where} (score {h.score:.2f})")
    return "**Sources**\n\n" + "\n".join(lines)


# ---------------------------------------------------------------- the chain

def _as_runnable(llm):
    """A LangChain LLM or chat model as it is; a chat-protocol session (``complete(messages)``) as a step
    that sends the filled-in prompt as one user message (what the lesson's LLM class does in its ``_call``)."""
    from langchain_core.runnables import Runnable, RunnableLambda

    if isinstance(llm, Runnable):
        return llm
    if not callable(getattr(llm, "complete", None)):
        raise CourseError(f"{type(llm).__name__} is not an LLM: pass a LangChain LLM (the lesson's InternLM_LLM) "
                          "or a ChatSession (ChatSession.load() or ChatSession.remote(url)).")
    return RunnableLambda(lambda prompt: llm.complete([{"role": "user", "content": prompt.to_string()}]))


def _question(value) -> dict:
    if isinstance(value, str):
        value = {"question": value}
    if not isinstance(value, dict) or not str(value.get("question", "")).strip():
        raise CourseError("The RAG chain takes a question string or {'question': ...}.")
    return value


def make_rag_chain(llm, store, *, k: int = 4, mode: str | None = None, mmr: bool = False, fetch_k: int = 20,
                   lambda_mult: float = 0.5, template: str = RAG_TEMPLATE):
    """The lesson's LCEL chain, packaged for homework and checks: question -> retrieve -> prompt -> LLM ->
    ``{"question", "answer", "sources"}``.

    ``llm``: a LangChain LLM or chat model, or a ``ChatSession``. ``sources`` holds ``{"path", "section",
    "score"}`` per retrieved chunk, best first.
    """
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import PromptTemplate
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough

    _check_store(store)  # now, not at the first question
    mode = _check_search(k, mmr, fetch_k, lambda_mult, mode)
    prompt = PromptTemplate.from_template(check_template(template))
    llm = _as_runnable(llm)
    search = RunnableLambda(lambda q: retrieve(store, q, k=k, mode=mode, mmr=mmr, fetch_k=fetch_k,
                                               lambda_mult=lambda_mult))
    answer = prompt | llm | StrOutputParser()
    return (RunnableLambda(_question)
            | RunnablePassthrough.assign(hits=itemgetter("question") | search)
            | RunnablePassthrough.assign(context=lambda x: format_context(x["hits"]))
            | RunnablePassthrough.assign(answer=answer)
            | RunnableLambda(lambda x: {"question": x["question"], "answer": x["answer"].strip(),
                                        "sources": [h.source() for h in x["hits"]]}))


# ---------------------------------------------------------------- a chat session over the knowledge base

class RagSession:
    """The chat protocol over a knowledge base: every reply is answered from retrieved chunks and ends
    with a Markdown list of its sources, so ``ChatWidget(RagSession(chat, store))`` just works.

    Each question is retrieved and answered on its own (the knowledge base, not the conversation, is the
    context); ``history`` keeps the conversation for display.
    """

    def __init__(self, chat, store, *, k: int = 4, mode: str | None = None, mmr: bool = False, max_sources: int = 3,
                 template: str = RAG_TEMPLATE):
        _check_store(store)  # now, not at the first question
        mode = _check_search(k, mmr, mode=mode)
        self.chat, self.store, self.k, self.mmr, self.max_sources = chat, store, k, mmr, max_sources
        self.mode = mode
        self.template = check_template(template)
        self.history: list[dict] = []
        self.last_hits: list[Hit] = []

    @property
    def generation(self):
        """The wrapped session's generation settings (the widget's sliders change them)."""
        return getattr(self.chat, "generation", None)

    @generation.setter
    def generation(self, value) -> None:
        self.chat.generation = value

    def _retrieve(self, question: str) -> list[Hit]:
        self.last_hits = retrieve(self.store, question, k=self.k, mode=self.mode, mmr=self.mmr)
        return self.last_hits

    def ask(self, text: str, stream: bool = False) -> str | Iterator[str]:
        """Answer ``text`` from the knowledge base; with ``stream=True`` an iterator of text chunks."""
        if not isinstance(text, str) or not text.strip():
            raise CourseError("ask() needs a non-empty question string.")
        chunks = self._stream(text)
        return chunks if stream else "".join(chunks).strip()

    def _stream(self, text: str) -> Iterator[str]:
        hits, parts = self._retrieve(text), []
        try:
            self.chat.reset()  # the wrapped session only ever holds the current RAG prompt
            for piece in self.chat.ask(rag_messages(hits, text, self.template)[0]["content"], stream=True):
                parts.append(piece)
                yield piece
            parts.append("\n\n" + sources_markdown(hits, self.max_sources))  # also after stop()
            yield parts[-1]
        finally:
            self.history += [{"role": "user", "content": text},
                             {"role": "assistant", "content": "".join(parts).strip()}]

    def complete(self, messages: list[dict], **gen) -> str:
        """A stateless answer (with sources) to the last user message in ``messages``."""
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        if not question:
            raise CourseError("complete() needs at least one user message.")
        hits = self._retrieve(question)
        answer = self.chat.complete(rag_messages(hits, question, self.template), **gen)
        return f"{answer.strip()}\n\n{sources_markdown(hits, self.max_sources)}"

    def stop(self) -> None:
        """End a running answer early; the partial answer and its sources are kept."""
        self.chat.stop()

    def reset(self) -> None:
        """Forget the conversation."""
        self.history.clear()
        self.chat.reset()


# ---------------------------------------------------------------- evaluation

def load_eval_set(path: str | Path | None = None, languages=None) -> list[dict]:
    """Questions with the file that answers each (``{"id", "question", "source"}``) from JSONL files.

    Default: ``data/rag_eval/questions_<lang>.jsonl`` for English in the tiny profile, English and
    Chinese on InternStudio.
    """
    from .env import profile

    if path is None:
        languages = languages or (["en"] if profile() == "tiny" else ["en", "zh"])
        languages = [languages] if isinstance(languages, str) else languages
        paths = [(lang, DATA_DIR / "rag_eval" / f"questions_{lang}.jsonl") for lang in languages]
    elif isinstance(path, (str, Path)):
        paths = [(None, Path(path))]
    else:
        raise CourseError(f"path={path!r:.80}: pass the path of a JSONL eval file (str or Path), or leave it out "
                          "for the course's eval set.")
    items = []
    for lang, p in paths:
        where = show_path(p)
        if not p.exists() and lang is not None:
            have = sorted(f.stem.split("_", 1)[1] for f in (DATA_DIR / "rag_eval").glob("questions_*.jsonl"))
            raise CourseError(f"No eval set for language {lang!r} ({where} does not exist); the course has "
                              f"{', '.join(have)}.")
        if not p.exists():
            raise CourseError(f"{where} does not exist: pass a JSONL file with one {{\"question\": ..., "
                              "\"source\": ...} object per line, or no path for the course's eval set.")
        if p.is_dir():
            raise CourseError(f"{where} is a folder: pass the .jsonl file inside it.")
        try:
            text = p.read_text(encoding="utf-8-sig")  # -sig: Notepad's UTF-8 starts with a byte-order mark
        except UnicodeDecodeError:
            raise CourseError(f"{where} is not UTF-8 text: save it as UTF-8 "
                              "(e.g. iconv -f GBK -t UTF-8 in > out).") from None
        found = 0
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CourseError(f"{where} line {n} is not valid JSON ({exc.msg}); was the file cut short? "
                                  "Each line is one object like {\"question\": \"...\", \"source\": "
                                  "\"en/....md\"}.") from None
            if not is_question(item):
                raise CourseError(f"{where} line {n}: each line needs non-empty \"question\" and \"source\" "
                                  "strings, like {\"question\": \"...\", \"source\": \"en/....md\"}.")
            items.append(item)
            found += 1
        if not found:
            raise CourseError(f"{where} has no questions: add one JSON object per line, like "
                              "{\"question\": \"...\", \"source\": \"en/....md\"}.")
    return items


def is_question(item) -> bool:
    """One eval item: a dict with non-empty "question" and "source" strings (the eval set's format)."""
    return (isinstance(item, dict) and isinstance(item.get("question"), str) and item["question"].strip() != ""
            and isinstance(item.get("source"), str) and item["source"].strip() != "")


def _check_qa(qa) -> list[dict]:
    """``qa`` as a list, checked before any of its questions is embedded."""
    try:
        qa = None if isinstance(qa, (str, bytes, dict)) else list(qa)
    except TypeError:
        qa = None
    if not qa:
        raise CourseError("No questions to evaluate: pass rag.load_eval_set() or a list of "
                          "{\"question\": ..., \"source\": ...} dicts.")
    for i, item in enumerate(qa):
        if not is_question(item):
            raise CourseError(f"qa[{i}] = {item!r:.80}: each question needs non-empty \"question\" and \"source\" "
                              "strings, like the items of rag.load_eval_set().")
    return qa


@dataclass
class RetrievalReport:
    k: int
    table: Any  # pandas DataFrame: one row per question (rank 0 = not in the top k)

    @property
    def hit_rate(self) -> float:
        """hit@k: the share of questions whose source file is among the top k chunks."""
        return float((self.table["rank"] > 0).mean())

    @property
    def mrr(self) -> float:
        """Mean reciprocal rank of the first chunk from the right file (0 when missed)."""
        return float(self.table["rank"].map(lambda r: 1 / r if r else 0.0).mean())

    def hit_at(self, n: int) -> float:
        """hit@n for any n <= k."""
        return float(self.table["rank"].between(1, n).mean())

    def misses(self):
        """The rows of the questions whose file was not retrieved."""
        return self.table[self.table["rank"] == 0]

    def __str__(self) -> str:
        return f"hit@{self.k} = {self.hit_rate:.3f}, MRR = {self.mrr:.3f} over {len(self.table)} questions"


def evaluate_retrieval(store, qa, k: int = 4, *, mode: str | None = None, mmr: bool = False, fetch_k: int = 20,
                       vectors: list | None = None) -> RetrievalReport:
    """hit@k and MRR of ``store`` on ``qa`` (dicts with "question" and the expected "source" file)."""
    import pandas as pd

    _check_store(store)
    qa = _check_qa(qa)
    mode = _check_search(k, mmr, fetch_k, mode=mode)
    rows = []
    for i, item in enumerate(qa):
        hits = retrieve(store, item["question"], k=k, mode=mode, mmr=mmr, fetch_k=fetch_k,
                        vector=vectors[i] if vectors is not None else None)
        paths = [h.path for h in hits]
        rank = paths.index(item["source"]) + 1 if item["source"] in paths else 0
        rows.append({"id": item.get("id", str(i)), "question": item["question"], "expected": item["source"],
                     "rank": rank, "top": paths[0] if paths else "", "top score": round(hits[0].score, 2)})
    return RetrievalReport(k, pd.DataFrame(rows))


def compare_retrieval(store, qa, settings: list[dict]):
    """hit@k and MRR for each retrieval setting (``{"k": 4, "mmr": True}``...) on one store, as a table."""
    import pandas as pd

    _check_store(store)
    qa = _check_qa(qa)
    for s in settings:  # all of them before the questions are embedded
        if not isinstance(s, dict) or not set(s) <= {"k", "mode", "mmr", "fetch_k"}:
            raise CourseError(f"settings: {s!r:.80} is not a retrieval setting; use dicts with k, mode, mmr and "
                              "fetch_k, e.g. [{\"k\": 4}, {\"k\": 4, \"mmr\": True}, {\"k\": 4, \"mode\": \"hybrid\"}].")
        _check_search(s.get("k", 4), s.get("mmr", False), s.get("fetch_k", 20), mode=s.get("mode"))
    vectors = [store.embeddings.embed_query(item["question"]) for item in qa]  # once for all settings
    rows = []
    for s in settings:
        report = evaluate_retrieval(store, qa, vectors=vectors, **s)
        rows.append({**s, "hit@k": round(report.hit_rate, 3), "MRR": round(report.mrr, 3)})
    return pd.DataFrame(rows)


def explain_miss(store, item: dict, k: int = 4, *, mode: str | None = None):
    """Why a question missed: the chunks retrieved instead, and the best chunk of the expected file."""
    import pandas as pd

    _check_store(store)
    mode = _check_search(k, mode=mode)
    if not is_question(item):
        raise CourseError(f"item={item!r:.80}: pass one question of the eval set, a dict with non-empty "
                          "\"question\" and \"source\" strings.")
    vector = store.embeddings.embed_query(item["question"])
    rows = [{"rank": i, "path": h.path, "section": h.section, "score": round(h.score, 3)}
            for i, h in enumerate(retrieve(store, item["question"], k=k, mode=mode, vector=vector), 1)]
    best = store.similarity_search_by_vector_with_relevance_scores(vector, k=1, filter={"source": item["source"]})
    for doc, dist in best:
        hit = _hit(doc, dist)
        rows.append({"rank": "expected", "path": hit.path, "section": hit.section, "score": round(hit.score, 3)})
    return pd.DataFrame(rows).set_index("rank")


# ---------------------------------------------------------------- RAG versus the bare model

def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table (full cell text, unlike a DataFrame's truncated HTML)."""
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(_cell(r[h]) for h in headers) + " |" for r in rows]
    return "\n".join(lines)


def compare_with_bare(chat, chain, questions: list[str]) -> list[dict]:
    """The bare model's answer and the RAG chain's answer (with its top source) for each question."""
    rows = []
    for q in questions:
        bare = chat.complete([{"role": "user", "content": q}])
        result = chain.invoke(q)
        top = result["sources"][0]["path"] if result["sources"] else ""
        rows.append({"question": q, "bare model": bare, "RAG": result["answer"], "top source": f"`{top}`"})
    return rows
