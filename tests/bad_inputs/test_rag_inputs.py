"""Learner mistakes in the RAG lesson (issue #14): each gives one CourseError that names the file,
folder or argument and the fix, raised before anything is embedded.

One table, by class of bad input: missing, empty, wrong type, wrong encoding, out of range, corrupted
on disk, half-written. The real embedding model and real Chroma throughout; stores are built from two
tiny files (well under a second each). The damaged-store tests then follow the message's advice and
check that it really recovers the store.
"""

import random
import re
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from course_utils import knowledge, rag
from course_utils.errors import CourseError

FILES = {"alpha.md": "# Alpha\n\nAlpha cleans datasets before training.\n",
         "beta.md": "# Beta\n\nThe Beta server listens on port 4242.\n"}
QA = [{"question": "Which port does the Beta server listen on?", "source": "beta.md"}]


class Counting:
    """The real model, counting its calls: a bad input must be refused before anything is embedded."""

    def __init__(self, real):
        self.real, self.model_name, self.calls = real, real.model_name, 0

    def embed_documents(self, texts):
        self.calls += 1
        return self.real.embed_documents(texts)

    def embed_query(self, text):
        self.calls += 1
        return self.real.embed_query(text)


def write_files(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return folder


@pytest.fixture(scope="module")
def emb():
    return Counting(rag.load_embeddings("all-minilm-l6-v2"))


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory, emb):
    """One healthy store for the rows that only read (retrieve, evaluate)."""
    root = tmp_path_factory.mktemp("shared")
    return rag.build_vectorstore(write_files(root / "kb", FILES), root / "kb_store", embeddings=emb,
                                 progress=False)[0]


@dataclass
class Ctx:
    tmp: Path
    kb: Path
    emb: Counting
    store: object

    @property
    def store_dir(self) -> Path:
        return self.tmp / "kb_store"


@pytest.fixture
def c(tmp_path, emb, shared_store):
    return Ctx(tmp_path, write_files(tmp_path / "kb", FILES), emb, shared_store)


def build(c, source=None, persist=None, **kw):
    kw.setdefault("embeddings", c.emb)
    return rag.build_vectorstore(c.kb if source is None else source, c.store_dir if persist is None else persist,
                                 progress=False, **kw)


def damage(db: Path, how: str) -> None:
    data = db.read_bytes() if db.exists() else b""
    junk = random.Random(0).randbytes
    if how == "truncated":  # a copy or download cut short
        db.write_bytes(data[: len(data) // 2])
    elif how == "junk":  # overwritten from the first byte
        db.write_bytes(junk(len(data)))
    elif how == "pages":  # a third of the file overwritten in the middle
        third = len(data) // 3
        db.write_bytes(data[:third] + junk(third) + data[2 * third:])
    elif how == "foreign":  # a sound SQLite file, but not Chroma's tables (another program's, another version's)
        db.unlink(missing_ok=True)
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE embeddings (id INTEGER, vector BLOB)")
        con.close()


def damaged_store(c, how: str, *, marked: bool = True) -> Path:
    """A store at ``c.store_dir``, built and then damaged ``how`` ("healthy": left alone; "foreign": not
    built, only marked as the course's)."""
    if how == "foreign":  # copied in from elsewhere: no Chroma client in this process has opened it
        c.store_dir.mkdir()
        knowledge._mark_store(c.store_dir)
    else:
        build(c)
    if not marked:  # as from another program, or from before the course marked its stores
        (c.store_dir / knowledge.STORE_MARKER).unlink()
    damage(c.store_dir / "chroma.sqlite3", how)
    return c.store_dir


def eval_file(c, content) -> Path:
    path = c.tmp / "qa.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def docs(c):
    return rag.load_documents(c.kb)


def _(call, fragment, id, store=None):
    """A row: ``call(c)`` must raise a CourseError containing ``fragment``. ``store`` first builds a
    store at ``c.store_dir``: "healthy", or damaged ("junk", "pages", "truncated", "foreign"; "-unmarked": without
    the course's marker)."""
    return pytest.param(call, fragment, store, id=id)


CASES = [
    # ---- missing
    _(lambda c: rag.load_eval_set(c.tmp / "qa.jsonl"), "qa.jsonl does not exist: pass a JSONL file",
      "missing/eval-set-file"),
    _(lambda c: rag.load_eval_set(languages=["fr"]), "No eval set for language 'fr'",
      "missing/eval-set-language"),
    _(lambda c: rag.retrieve(c.store, None), "question=None: ask a non-empty question",
      "missing/question"),
    _(lambda c: rag.build_vectorstore(c.kb, None, embeddings=c.emb), "persist_dir=None: pass the folder",
      "missing/store-dir-argument"),
    _(lambda c: build(c, source=[None]), "source=[None]: pass the knowledge folder",
      "missing/source-in-list"),
    _(lambda c: rag.build_vectorstore(None, c.store_dir, embeddings=c.emb),
      "source=None: pass the knowledge folder", "missing/source-argument"),

    # ---- empty
    _(lambda c: rag.retrieve(c.store, ""), "question='': ask a non-empty question", "empty/question"),
    _(lambda c: rag.retrieve(c.store, "  \n"), "ask a non-empty question", "empty/question-blank"),
    _(lambda c: build(c, source=[]), "source=[]: pass the knowledge folder", "empty/source-list"),
    _(lambda c: rag.load_eval_set(eval_file(c, "\n\n")), "qa.jsonl has no questions", "empty/eval-set-file"),
    _(lambda c: rag.load_eval_set(eval_file(c, '{"question": "", "source": "alpha.md"}\n')),
      'qa.jsonl line 1: each line needs non-empty "question" and "source" strings', "empty/eval-question"),
    _(lambda c: rag.evaluate_retrieval(c.store, []), "No questions to evaluate: pass rag.load_eval_set()",
      "empty/qa-list"),
    _(lambda c: build(c, source=write_files(c.tmp / "blank", {"notes.md": "\n  \n"})),
      "No file in blank could be read (1 skipped), e.g. notes.md: empty file", "empty/kb-files"),

    # ---- wrong type
    _(lambda c: rag.SplitConfig(chunk_size="500"), "chunk_size='500': use a whole number of characters",
      "wrong-type/chunk_size-str"),
    _(lambda c: rag.SplitConfig(chunk_size=500.5), "chunk_size=500.5: use a whole number",
      "wrong-type/chunk_size-float"),
    _(lambda c: rag.SplitConfig(True, 0), "chunk_size=True: use a whole number", "wrong-type/chunk_size-bool"),
    _(lambda c: rag.SplitConfig(500, 10.5), "chunk_overlap=10.5: use a whole number",
      "wrong-type/chunk_overlap-float"),
    _(lambda c: rag.SplitConfig(header_context="no"), "header_context='no': use True or False",
      "wrong-type/header_context"),
    _(lambda c: build(c, config=500), "config=500: pass rag.SplitConfig(", "wrong-type/config-build"),
    _(lambda c: rag.split_documents(docs(c), {"chunk_size": 300}),
      "config={'chunk_size': 300}: pass rag.SplitConfig(", "wrong-type/config-split"),
    _(lambda c: rag.retrieve(c.store, "Which port?", k="3"), "k='3': use a whole number of chunks",
      "wrong-type/k-str"),
    _(lambda c: rag.retrieve(c.store, "Which port?", k=2.5), "k=2.5: use a whole number of chunks",
      "wrong-type/k-float"),
    _(lambda c: build(c, embeddings="all-minilm-l6-v2"),
      "embeddings='all-minilm-l6-v2': pass an embedding model", "wrong-type/embeddings-name"),
    _(lambda c: build(c, batch_size="64"), "batch_size='64': use a whole number", "wrong-type/batch_size"),
    _(lambda c: build(c, persist=5), "persist_dir=5: pass the folder", "wrong-type/store-dir"),
    _(lambda c: build(c, patterns=5), "patterns=5: pass glob patterns", "wrong-type/patterns"),
    _(lambda c: rag.load_eval_set(eval_file(c, '["question", "source"]\n')),
      "qa.jsonl line 1: each line needs", "wrong-type/eval-line-list"),
    _(lambda c: rag.load_eval_set(eval_file(c, '{"question": 3, "source": "alpha.md"}\n')),
      "qa.jsonl line 1: each line needs", "wrong-type/eval-question-number"),
    _(lambda c: rag.evaluate_retrieval(c.store, ["Which port?"]), "qa[0] = 'Which port?': each question needs",
      "wrong-type/qa-item"),
    _(lambda c: rag.explain_miss(c.store, "Which port?"), "item='Which port?': pass one question",
      "wrong-type/explain-item"),
    _(lambda c: rag.compare_retrieval(c.store, QA, [{"k": 3}, {"top_k": 3}]),
      "settings: {'top_k': 3} is not a retrieval setting", "wrong-type/compare-setting"),
    _(lambda c: rag.load_eval_set(c.tmp), "is a folder: pass the .jsonl file inside it",
      "wrong-type/eval-set-folder"),
    _(lambda c: rag.load_eval_set(5), "path=5: pass the path of a JSONL eval file", "wrong-type/eval-set-path"),
    _(lambda c: rag.reset_store(None), "persist_dir=None: pass the folder of the vector store",
      "wrong-type/reset-store-dir"),
    _(lambda c: rag.retrieve((c.store, "report"), "Which port?"),
      "store is the (store, report) pair that build_vectorstore returns: unpack it", "wrong-type/store-pair"),
    _(lambda c: rag.retrieve("Which port?", c.store), "store='Which port?': pass the vector store",
      "wrong-type/store-swapped-with-question"),
    _(lambda c: rag.RagSession(None, (c.store, "report")), "store is the (store, report) pair",
      "wrong-type/session-store-pair"),
    _(lambda c: rag.build_vectorstore(c.store_dir, c.kb, embeddings=c.emb),
      "kb_store is a vector store, not a knowledge base: the arguments go build_vectorstore(KB_DIR, STORE_DIR)",
      "wrong-type/build-arguments-swapped", store="healthy"),

    # ---- wrong encoding
    _(lambda c: build(c, source=write_files(c.tmp / "zh", {"guide.txt": "书生·浦语的知识库".encode("gbk")})),
      "e.g. guide.txt: not UTF-8; convert it", "wrong-encoding/kb-gbk"),
    _(lambda c: build(c, source=write_files(c.tmp / "fr", {"notes.md": "# Café\n\nrésumé".encode("cp1252")})
                              / "notes.md"),
      "e.g. notes.md: not UTF-8", "wrong-encoding/kb-file-cp1252"),
    _(lambda c: rag.load_eval_set(eval_file(c, '{"question": "书生", "source": "a.md"}\n'.encode("gbk"))),
      "qa.jsonl is not UTF-8 text: save it as UTF-8", "wrong-encoding/eval-set-gbk"),

    # ---- out of range
    _(lambda c: rag.SplitConfig(chunk_size=0), "chunk_size=0: use a whole number of characters, 1 or more",
      "out-of-range/chunk_size-0"),
    _(lambda c: rag.SplitConfig(chunk_size=-5, chunk_overlap=0), "chunk_size=-5: use a whole number",
      "out-of-range/chunk_size-negative"),
    _(lambda c: rag.SplitConfig(500, -1), "chunk_overlap=-1: use a whole number of characters from 0 to 499",
      "out-of-range/chunk_overlap-negative"),
    _(lambda c: rag.SplitConfig(200, 200), "chunk_overlap=200: use a whole number of characters from 0 to 199",
      "out-of-range/chunk_overlap-equal"),
    _(lambda c: rag.SplitConfig(chunk_size=100),
      "chunk_overlap=150: use a whole number of characters from 0 to 99", "out-of-range/size-below-default-overlap"),
    _(lambda c: rag.retrieve(c.store, "Which port?", k=0),
      "k=0: use a whole number of chunks to retrieve, 1 or more", "out-of-range/k-0"),
    _(lambda c: rag.retrieve(c.store, "Which port?", k=-1), "k=-1: use a whole number of chunks",
      "out-of-range/k-negative"),
    _(lambda c: rag.retrieve(c.store, "Which port?", mmr=True, fetch_k=0), "fetch_k=0: use a whole number",
      "out-of-range/fetch_k"),
    _(lambda c: rag.retrieve(c.store, "Which port?", mmr=True, lambda_mult=1.5),
      "lambda_mult=1.5: use a number from 0", "out-of-range/lambda_mult"),
    _(lambda c: rag.evaluate_retrieval(c.store, QA, k=0), "k=0: use a whole number of chunks",
      "out-of-range/evaluate-k"),
    _(lambda c: rag.compare_retrieval(c.store, QA, [{"k": 3}, {"k": 0}]), "k=0: use a whole number of chunks",
      "out-of-range/compare-k"),
    _(lambda c: rag.explain_miss(c.store, QA[0], k=0), "k=0: use a whole number of chunks",
      "out-of-range/explain-k"),
    _(lambda c: rag.make_rag_chain(None, c.store, k=0), "k=0: use a whole number of chunks",
      "out-of-range/chain-k"),
    _(lambda c: rag.RagSession(None, c.store, k=-2), "k=-2: use a whole number of chunks",
      "out-of-range/session-k"),
    _(lambda c: build(c, batch_size=0), "batch_size=0: use a whole number", "out-of-range/batch_size"),

    # ---- corrupted on disk
    _(lambda c: build(c, persist=c.kb / "alpha.md"),
      "alpha.md is a file, so alpha.md cannot be a vector store folder: pass a folder path (STORE_DIR)",
      "corrupted/store-dir-is-a-file"),
    _(lambda c: build(c, persist=c.kb / "alpha.md" / "store"), "alpha.md is a file, so store cannot be",
      "corrupted/store-dir-inside-a-file"),
    _(lambda c: rag.load_vectorstore(c.kb / "alpha.md", embeddings=c.emb), "alpha.md is a file",
      "corrupted/load-a-file"),
    _(build, "The vector store in kb_store is damaged (chroma.sqlite3: file is not a database)",
      "corrupted/junk-build", store="junk"),
    _(lambda c: rag.load_vectorstore(c.store_dir, embeddings=c.emb),
      "The vector store in kb_store is damaged (chroma.sqlite3: file is not a database). "
      "Run rag.reset_store(STORE_DIR) on that folder, then build it again.", "corrupted/junk-load",
      store="junk"),
    _(build, "The vector store in kb_store is damaged (chroma.sqlite3:", "corrupted/overwritten-pages-build",
      store="pages"),
    _(build, "The vector store in kb_store is damaged (Chroma cannot open it: ", "corrupted/foreign-database",
      store="foreign"),
    _(build, "delete the folder kb_store yourself and build it again", "corrupted/unmarked-build",
      store="junk-unmarked"),
    _(lambda c: rag.reset_store(c.store_dir),
      "reset_store('kb_store') refused: the store is damaged (chroma.sqlite3: file is not a database)",
      "corrupted/unmarked-reset", store="junk-unmarked"),

    # ---- half-written
    _(build, "The vector store in kb_store is damaged (chroma.sqlite3: database disk image is malformed)",
      "half-written/db-build", store="truncated"),
    _(lambda c: rag.load_vectorstore(c.store_dir, embeddings=c.emb),
      "is damaged (chroma.sqlite3: database disk image is malformed)", "half-written/db-load",
      store="truncated"),
    _(lambda c: rag.load_eval_set(eval_file(c, '{"question": "Which port?", "source": "beta.md"}\n'
                                               '{"question": "How do I inst')),
      "qa.jsonl line 2 is not valid JSON", "half-written/eval-line"),
]


@pytest.mark.filterwarnings("ignore::course_utils.knowledge.SkippedFileWarning")  # the unreadable-file rows
@pytest.mark.parametrize("call, fragment, store", CASES)
def test_a_bad_input_gives_one_course_error_before_embedding(c, call, fragment, store):
    if store:
        damaged_store(c, store.removesuffix("-unmarked"), marked=not store.endswith("-unmarked"))
    c.emb.calls = 0
    with pytest.raises(CourseError, match=re.escape(fragment)) as err:
        call(c)
    assert c.emb.calls == 0, "the error came after the model had already embedded something"
    # One error for the learner: no raw chromadb / json / codec traceback chained above it.
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)


# ---------------------------------------------------------------- following the advice recovers

# A foreign file replacing a store this kernel has open goes unseen: Chroma keeps using the file it opened.
@pytest.mark.parametrize("how, opened_before", [(how, opened) for how in ("truncated", "junk", "pages", "foreign")
                                                for opened in (True, False) if not (how == "foreign" and opened)],
                         ids=lambda v: {True: "opened-in-this-kernel", False: "fresh-kernel"}.get(v, v))
def test_reset_store_as_suggested_recovers_a_damaged_store(c, how, opened_before):
    if opened_before:  # the notebook built it in this kernel: Chroma holds a client for the path
        damaged_store(c, how)
    else:  # built elsewhere and copied in: this process never opened it
        build(c, persist=c.tmp / "elsewhere")
        shutil.copytree(c.tmp / "elsewhere", c.store_dir)
        damage(c.store_dir / "chroma.sqlite3", how)
    with pytest.raises(CourseError) as err:
        build(c)
    assert "kb_store is damaged" in str(err.value) and "rag.reset_store(STORE_DIR)" in str(err.value)

    rag.reset_store(c.store_dir)  # what the message says to do
    assert (c.store_dir / knowledge.STORE_MARKER).is_file()  # still the course's store
    store, report = build(c)
    assert sorted(report.added) == sorted(FILES) and report.unchanged == 0
    assert rag.retrieve(store, QA[0]["question"], k=1)[0].path == "beta.md"
    _, report = build(c)
    assert (report.unchanged, report.chunks_added) == (len(FILES), 0)


def test_a_damaged_store_without_the_marker_is_left_for_the_learner_to_delete(c):
    damaged_store(c, "junk", marked=False)
    before = {p.relative_to(c.store_dir): p.read_bytes() for p in c.store_dir.rglob("*") if p.is_file()}
    with pytest.raises(CourseError, match="nothing was deleted"):
        rag.reset_store(c.store_dir)
    assert {p.relative_to(c.store_dir): p.read_bytes() for p in c.store_dir.rglob("*") if p.is_file()} == before

    with pytest.raises(CourseError, match="delete the folder kb_store yourself"):
        build(c)
    shutil.rmtree(c.store_dir)  # what the message says to do, in the same kernel
    store, report = build(c)
    assert sorted(report.added) == sorted(FILES)
    assert rag.retrieve(store, QA[0]["question"], k=1)[0].path == "beta.md"


def test_the_table_covers_every_class_of_bad_input():
    classes = {p.id.split("/")[0] for p in CASES}
    assert classes == {"missing", "empty", "wrong-type", "wrong-encoding", "out-of-range", "corrupted",
                       "half-written"}
    assert len({p.id for p in CASES}) == len(CASES)
