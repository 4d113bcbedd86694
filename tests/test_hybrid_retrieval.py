"""BM25, reciprocal rank fusion and the retrieval modes of course_utils.rag, on a real store built with the
bundled all-MiniLM-L6-v2 (issue 17, item 4)."""

import math

import pytest

from course_utils import rag
from course_utils.errors import CourseError

# The question shares only the code E4012 with licence.md, and its meaning with errors.md: the embedding
# model puts errors.md first, while the rare exact word puts licence.md first for BM25.
FILES = {
    "licence.md": "# Licence files\n\nThe licence file lives in the home folder. Code E4012 means it is missing.\n",
    "errors.md": "# Start-up errors\n\nMost errors when the server starts come from a wrong model path or too little "
                 "GPU memory.\n",
    "ports.md": "# Ports\n\nThe server listens on port 23333 unless told otherwise.\n",
}
QUESTION = "Boot fails: E4012"


@pytest.fixture(scope="module")
def embeddings():
    return rag.load_embeddings("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def kb_and_store(tmp_path_factory, embeddings):
    root = tmp_path_factory.mktemp("hybrid")
    kb = root / "kb"
    kb.mkdir()
    for name, text in FILES.items():
        (kb / name).write_text(text, encoding="utf-8")
    store, _ = rag.build_vectorstore(kb, root / "store", embeddings=embeddings, progress=False)
    return kb, root / "store", store


@pytest.fixture(scope="module")
def store(kb_and_store):
    return kb_and_store[2]


def paths(hits):
    return [h.path for h in hits]


def test_bm25_ranks_the_exact_keyword_first_where_dense_does_not(store):
    assert paths(rag.retrieve(store, QUESTION, k=3, mode="dense"))[0] == "errors.md"
    assert paths(rag.retrieve(store, QUESTION, k=3, mode="bm25")) == ["licence.md"]  # the only chunk with a shared word
    assert paths(rag.retrieve(store, QUESTION, k=3, mode="hybrid"))[0] == "licence.md"


def test_bm25_scores_follow_the_okapi_formula():
    bm25 = rag.BM25(["red apple", "green apple apple pie", "blue sky"])
    scores = bm25.scores("apple pie")
    assert scores[2] == 0.0 and scores[1] > scores[0] > 0
    avg = 8 / 3  # tokens per text
    idf_apple, idf_pie = math.log((3 - 2 + 0.5) / 2.5 + 1), math.log((3 - 1 + 0.5) / 1.5 + 1)
    apple_0 = idf_apple * 1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 2 / avg))
    assert scores[0] == pytest.approx(apple_0)
    assert bm25.top("apple pie", 5) == [1, 0]  # texts without a query word are left out
    assert rag.tokenize("Set cache_max_entry_count, 中文") == ["set", "cache_max_entry_count", "中", "文"]


def test_fusion_keeps_each_item_once_ordered_by_fused_rank():
    fused = rag.fuse_rankings([["a", "b", "c"], ["c", "a", "d"]])
    # a: 1/61 + 1/62, c: 1/63 + 1/61, b: 1/62, d: 1/63
    assert fused == ["a", "c", "b", "d"]
    assert rag.fuse_rankings([["a", "b", "c"], ["c", "a", "d"]], weights=[0, 1]) == ["c", "a", "d", "b"]
    assert rag.fuse_rankings([["a", "a", "b"], ["b"]]) == ["b", "a"]  # a repeated in one list counts once
    assert rag.fuse_rankings([["x", "y"], ["y", "x"]]) == ["x", "y"]  # a tie keeps the first-seen order


def test_hybrid_hits_are_distinct_chunks_with_their_cosine_scores(store):
    hybrid = rag.retrieve(store, QUESTION, k=3, mode="hybrid", fetch_k=3)
    dense = {h.text: h.score for h in rag.retrieve(store, QUESTION, k=3, mode="dense")}
    assert len({h.text for h in hybrid}) == len(hybrid) == 3
    assert all(h.score == pytest.approx(dense[h.text], abs=1e-5) for h in hybrid)


def test_default_mode_is_hybrid_and_mmr_means_dense(store):
    assert rag.DEFAULT_MODE == "hybrid"
    assert rag.retrieve(store, QUESTION, k=2) == rag.retrieve(store, QUESTION, k=2, mode="hybrid")
    mmr = rag.retrieve(store, QUESTION, k=2, mmr=True)
    assert paths(mmr) == paths(rag.retrieve(store, QUESTION, k=2, mode="dense", mmr=True))
    report = rag.evaluate_retrieval(store, [{"question": QUESTION, "source": "licence.md"}], k=1)
    assert report.hit_rate == 1.0  # the evaluation uses the default (hybrid); dense would miss at k=1
    assert rag.evaluate_retrieval(store, [{"question": QUESTION, "source": "licence.md"}], k=1,
                                  mode="dense").hit_rate == 0.0


def test_keyword_index_follows_a_rebuilt_store(kb_and_store, embeddings):
    kb, store_dir, store = kb_and_store
    assert rag.retrieve(store, "zorbex", k=1, mode="bm25") == []
    (kb / "garden.md").write_text("# Garden\n\nThe zorbex tomato ripens in August.\n", encoding="utf-8")
    try:
        rag.build_vectorstore(kb, store_dir, embeddings=embeddings, progress=False)
        assert paths(rag.retrieve(store, "zorbex", k=1, mode="bm25")) == ["garden.md"]  # the same store object
    finally:
        (kb / "garden.md").unlink()
        rag.build_vectorstore(kb, store_dir, embeddings=embeddings, progress=False)


BAD_CALLS = {
    "unknown mode": lambda s: rag.retrieve(s, QUESTION, mode="sparse"),
    "mmr with hybrid": lambda s: rag.retrieve(s, QUESTION, mode="hybrid", mmr=True),
    "fetch_k 0 with hybrid": lambda s: rag.retrieve(s, QUESTION, mode="hybrid", fetch_k=0),
    "bad mode in evaluate": lambda s: rag.evaluate_retrieval(s, [{"question": "q", "source": "a.md"}], mode=1),
    "bad mode in settings": lambda s: rag.compare_retrieval(s, [{"question": "q", "source": "a.md"}],
                                                            [{"k": 2, "mode": "keyword"}]),
    "bad mode in chain": lambda s: rag.make_rag_chain(lambda p: p, s, mode="BM25"),
    "rankings not lists": lambda s: rag.fuse_rankings("abc"),
    "weights of wrong length": lambda s: rag.fuse_rankings([["a"], ["b"]], weights=[1]),
    "negative weight": lambda s: rag.fuse_rankings([["a"]], weights=[-1]),
    "negative c": lambda s: rag.fuse_rankings([["a"]], c=-1),
    "BM25 of nothing": lambda s: rag.BM25([]),
    "BM25 of a string": lambda s: rag.BM25("one text"),
    "BM25 top 0": lambda s: rag.BM25(["a"]).top("a", 0),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_arguments_raise_course_error(store, call):
    with pytest.raises(CourseError):
        call(store)
