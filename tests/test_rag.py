"""Lesson 3: loading, splitting, the incremental Chroma store, the RAG chain and session, retrieval metrics."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from course_utils import rag
from course_utils.errors import CourseError
from course_utils.paths import DATA_DIR, REPO_ROOT

SMALL = rag.SplitConfig(chunk_size=200, chunk_overlap=40)  # several chunks per fixture file

FILES = {
    "alpha.md": """\
        # Alpha tool

        Alpha is a command-line tool for cleaning datasets before training.

        ## Install

        Install Alpha with `pip install alpha-clean`. It needs Python 3.10 or newer and no GPU.
        After installing, run `alpha --version` to check that the command is on your PATH.

        ## Usage

        Run `alpha clean data.jsonl --out clean.jsonl` to drop empty and duplicated samples.
        The report at the end lists how many samples were removed and why.
        """,
    "beta.md": """\
        # Beta server

        Beta serves models over HTTP for the course.

        ## Port

        The Beta server listens on port 4242 by default. Pass `--port` to choose another port when 4242
        is taken by an older server that is still running.

        ## Health

        A GET request to /health returns ok once the model has loaded. Clients should wait for it.
        """,
    "notes/gamma.txt": """\
        Gamma quantizer notes.

        The gamma quantizer stores weights with 3 bits per value and one scale per group of 32 weights.
        It is meant for experiments, not for production, because its kernels are slow.
        """,
}
QA = [
    {"id": "q1", "question": "Which port does the Beta server listen on?", "source": "beta.md"},
    {"id": "q2", "question": "How do I install the Alpha tool?", "source": "alpha.md"},
    {"id": "q3", "question": "How many bits per weight does the gamma quantizer use?", "source": "notes/gamma.txt"},
]


def write_kb(root, files=FILES):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def embeddings():
    return rag.load_embeddings("all-minilm-l6-v2")


@pytest.fixture
def kb(tmp_path):
    return write_kb(tmp_path / "kb")


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF with a text layer, written by hand (no PDF writer is pinned)."""
    stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


# ---------------------------------------------------------------- loading

def test_load_documents_keeps_relative_source_and_title(kb):
    docs = rag.load_documents(kb)
    by_source = {d.metadata["source"]: d for d in docs}
    assert sorted(by_source) == ["alpha.md", "beta.md", "notes/gamma.txt"]
    assert by_source["alpha.md"].metadata["title"] == "Alpha tool"
    assert by_source["notes/gamma.txt"].metadata["title"] == "gamma"  # no heading: the file name
    assert all(len(d.metadata["hash"]) == 16 for d in docs)


def test_load_documents_skips_binary_empty_and_non_utf8_files_with_a_warning_each(kb):
    (kb / "logo.md").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (kb / "empty.md").write_text("  \n\n", encoding="utf-8")
    (kb / "gbk.txt").write_bytes("书生·浦语的知识库".encode("gbk"))
    (kb / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = rag.load_documents(kb)
    messages = [str(w.message) for w in caught if issubclass(w.category, rag.SkippedFileWarning)]
    assert len(messages) == 4
    assert any("logo.md" in m and "binary" in m for m in messages)
    assert any("empty.md" in m and "empty" in m for m in messages)
    assert any("gbk.txt" in m and "UTF-8" in m for m in messages)
    assert any("broken.pdf" in m for m in messages)
    assert len(docs) == 3  # the good files are all still there


def test_load_documents_reads_pdf_text(tmp_path):
    (tmp_path / "guide.pdf").write_bytes(tiny_pdf("LMDeploy listens on port 23333"))
    [doc] = rag.load_documents(tmp_path)
    assert "23333" in doc.page_content and doc.metadata["source"] == "guide.pdf"


def test_load_documents_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(CourseError, match="KB_DIR"):
        rag.load_documents(tmp_path / "nope")


def test_load_documents_reads_utf16_text_with_a_bom(tmp_path):
    # Windows Notepad's "Unicode": full of NUL bytes, yet text, not a binary file.
    (tmp_path / "notes.md").write_bytes("# Notes\n\nLMDeploy 的端口是 23333。\n".encode("utf-16"))
    [doc] = rag.load_documents(tmp_path)
    assert "23333" in doc.page_content and doc.metadata["title"] == "Notes"


def test_patterns_may_be_one_glob_string(kb):
    assert [d.metadata["source"] for d in rag.load_documents(kb, "*.md")] == ["alpha.md", "beta.md"]


def two_folders(root):
    """Two folders that each hold a README.md and one identical file, like en/ and zh/ copies."""
    a = write_kb(root / "a", {"README.md": "# Alpha folder\n\nAlpha cleans datasets before training.\n",
                              "shared.md": "# Shared\n\nThe same page in both folders.\n"})
    b = write_kb(root / "b", {"README.md": "# Beta folder\n\nThe Beta server listens on port 4242.\n",
                              "shared.md": "# Shared\n\nThe same page in both folders.\n"})
    return a, b


def test_load_documents_keeps_sources_unique_across_folders(kb, tmp_path):
    a, b = two_folders(tmp_path)
    sources = lambda paths: sorted(d.metadata["source"] for d in rag.load_documents(paths))
    # Several folders: paths from their common parent, so same-named files stay apart.
    assert sources([a, b]) == ["a/README.md", "a/shared.md", "b/README.md", "b/shared.md"]
    assert sources([a / "README.md", b / "README.md"]) == ["a/README.md", "b/README.md"]
    # One folder (the lesson's case, and the eval set's paths) is unchanged.
    assert sources(a) == sources([a]) == ["README.md", "shared.md"]
    # A folder listed inside another is read once.
    assert sources([kb, kb / "notes"]) == ["alpha.md", "beta.md", "notes/gamma.txt"]


# ---------------------------------------------------------------- splitting

def test_markdown_sections_follow_headers_but_not_code_comments():
    text = "# T\nintro\n## A\na text\n```bash\n# not a header\n```\n### A1\ndeep\n## B\nb text\n"
    sections = rag.markdown_sections(text)
    assert [p for p, _ in sections] == [["T"], ["T", "A"], ["T", "A", "A1"], ["T", "B"]]
    assert "# not a header" in sections[1][1]


def test_split_keeps_sections_sizes_and_header_context(kb):
    docs = rag.load_documents(kb)
    chunks = rag.split_documents(docs, SMALL)
    alpha = [c for c in chunks if c.metadata["source"] == "alpha.md"]
    assert {c.metadata["section"] for c in alpha} == {"", "Install", "Usage"}
    assert all(c.metadata["n_chunks"] == len(alpha) for c in alpha)
    assert [c.metadata["chunk"] for c in alpha] == list(range(len(alpha)))
    install = next(c for c in alpha if c.metadata["section"] == "Install")
    assert install.page_content.startswith("Alpha tool > Install\n")
    for c in chunks:  # the body respects chunk_size; the header line comes on top
        assert len(c.page_content.split("\n", 1)[1]) <= SMALL.chunk_size
    plain = rag.split_documents(docs, rag.SplitConfig(200, 40, header_context=False))
    assert any(c.page_content.startswith("## Install") for c in plain)
    with pytest.raises(CourseError, match="chunk_overlap"):
        rag.split_documents(docs, rag.SplitConfig(100, 100))


def test_chunk_stats_table_counts_every_chunk(kb):
    chunks = rag.split_documents(rag.load_documents(kb), SMALL)
    table = rag.chunk_stats(chunks)
    assert table.loc["ALL", "chunks"] == len(chunks)
    assert table.drop("ALL")["chunks"].sum() == len(chunks)


# ---------------------------------------------------------------- the incremental store

def expected_chunks(folder) -> int:
    return len(rag.split_documents(rag.load_documents(folder), SMALL))


def stored_ids(store) -> list[str]:
    return store.get()["ids"]


def test_incremental_rebuild_add_change_delete(kb, tmp_path, embeddings):
    persist = tmp_path / "store"
    build = lambda: rag.build_vectorstore(kb, persist, config=SMALL, embeddings=embeddings, progress=False)
    store, report = build()
    assert len(report.added) == 3 and report.total_chunks == expected_chunks(kb)

    store, report = build()  # nothing changed: nothing embedded
    assert (report.unchanged, report.chunks_added, report.chunks_removed) == (3, 0, 0)

    (kb / "beta.md").write_text("# Beta server\n\nBeta now listens on port 5151.\n", encoding="utf-8")
    (kb / "notes" / "gamma.txt").unlink()
    (kb / "delta.md").write_text("# Delta\n\nDelta schedules evaluation jobs on a cluster.\n", encoding="utf-8")
    store, report = build()
    assert report.updated == ["beta.md"] and report.removed == ["notes/gamma.txt"] and report.added == ["delta.md"]
    ids = stored_ids(store)
    assert len(ids) == len(set(ids)) == expected_chunks(kb) == report.total_chunks
    sources = {m["source"] for m in store.get(include=["metadatas"])["metadatas"]}
    assert sources == {"alpha.md", "beta.md", "delta.md"}
    [beta] = store.get(where={"source": "beta.md"})["documents"]
    assert "5151" in beta


def test_a_build_over_two_folders_settles(tmp_path, embeddings):
    a, b = two_folders(tmp_path)
    persist = tmp_path / "store"
    build = lambda: rag.build_vectorstore([a, b], persist, embeddings=embeddings, progress=False)
    store, report = build()
    assert report.total_files == 4 and len(stored_ids(store)) == report.total_chunks == 4
    _, report = build()  # unchanged folders: nothing to do
    assert (report.added, report.updated, report.removed, report.unchanged) == ([], [], [], 4)
    assert (report.chunks_added, report.chunks_removed) == (0, 0)
    hits = rag.retrieve(store, "Which port does the Beta server listen on?", k=1)
    assert "`b/README.md`" in rag.sources_markdown(hits)  # the citation says which folder


def test_a_store_with_older_source_names_is_reindexed_once(tmp_path, embeddings):
    # A store that named these files "README.md" and "shared.md" (built before sources were made unique
    # across folders, or from folder a alone): the next build replaces those names once, then settles.
    a, b = two_folders(tmp_path)
    persist = tmp_path / "store"
    rag.build_vectorstore(a, persist, embeddings=embeddings, progress=False)
    store, report = rag.build_vectorstore([a, b], persist, embeddings=embeddings, progress=False)
    assert report.removed == ["README.md", "shared.md"] and len(report.added) == 4
    assert sorted(rag.indexed_files(store)) == ["a/README.md", "a/shared.md", "b/README.md", "b/shared.md"]
    _, report = rag.build_vectorstore([a, b], persist, embeddings=embeddings, progress=False)
    assert report.unchanged == 4 and report.chunks_added == report.chunks_removed == 0


def test_an_unreadable_course_marker_is_rewritten(kb, tmp_path, embeddings):
    persist = tmp_path / "store"
    rag.build_vectorstore(kb, persist, config=SMALL, embeddings=embeddings, progress=False)
    (persist / "course_store.json").write_text('{"made_by": "course_utils.kno')  # cut short
    rag.build_vectorstore(kb, persist, config=SMALL, embeddings=embeddings, progress=False)
    assert json.loads((persist / "course_store.json").read_text())["made_by"].startswith("course_utils.")


class Interrupted(Exception):
    pass


class FailingEmbeddings:
    """The real model, but the build dies after ``calls`` embedding batches (like a Ctrl-C)."""

    def __init__(self, real, calls: int):
        self.real, self.calls, self.model_name = real, calls, real.model_name

    def embed_documents(self, texts):
        if self.calls == 0:
            raise Interrupted
        self.calls -= 1
        return self.real.embed_documents(texts)

    def embed_query(self, text):
        return self.real.embed_query(text)


def test_interrupted_build_loads_and_completes_without_duplicates(kb, tmp_path, embeddings):
    persist = tmp_path / "store"
    with pytest.raises(Interrupted):  # batch_size=1: one file per batch, so one file gets in
        rag.build_vectorstore(kb, persist, config=SMALL, embeddings=FailingEmbeddings(embeddings, 1),
                              batch_size=1, progress=False)
    half = rag.load_vectorstore(persist, embeddings=embeddings)
    assert len(rag.indexed_files(half)) == 1

    store, report = rag.build_vectorstore(kb, persist, config=SMALL, embeddings=embeddings, progress=False)
    assert report.unchanged == 1 and len(report.added) == 2
    ids = stored_ids(store)
    assert len(ids) == len(set(ids)) == expected_chunks(kb)

    # A file with a chunk missing (a write cut short) is detected and redone.
    store.delete(ids=[i for i in ids if i.startswith("alpha.md::")][:1])
    store, report = rag.build_vectorstore(kb, persist, config=SMALL, embeddings=embeddings, progress=False)
    assert report.updated == ["alpha.md"] and len(stored_ids(store)) == expected_chunks(kb)


def test_new_chunk_settings_reindex_every_file(kb, tmp_path, embeddings):
    persist = tmp_path / "store"
    rag.build_vectorstore(kb, persist, config=SMALL, embeddings=embeddings, progress=False)
    store, report = rag.build_vectorstore(kb, persist, config=rag.SplitConfig(300, 50), embeddings=embeddings,
                                          progress=False)
    assert len(report.updated) == 3
    assert report.total_chunks == len(rag.split_documents(rag.load_documents(kb), rag.SplitConfig(300, 50)))


def test_reset_store_then_rebuild_in_the_same_process(kb, tmp_path, embeddings):
    persist = tmp_path / "store"
    for _ in range(2):  # like re-running the notebook cell in one kernel
        rag.reset_store(persist)
        store, report = rag.build_vectorstore(kb, persist, config=SMALL, embeddings=embeddings, progress=False)
        assert len(report.added) == 3 and len(stored_ids(store)) == expected_chunks(kb)


@pytest.mark.slow
def test_store_persists_across_processes(kb, tmp_path, embeddings):
    persist = tmp_path / "store"
    code = ("import sys; from course_utils import rag; "
            "print(rag.build_vectorstore(sys.argv[1], sys.argv[2], progress=False)[1])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COURSE_PROFILE": "tiny"}
    proc = subprocess.run([sys.executable, "-c", code, str(kb), str(persist)], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 added" in proc.stdout

    store = rag.load_vectorstore(persist, embeddings=embeddings)  # this process: the other one's store
    assert rag.retrieve(store, "Which port does the Beta server listen on?", k=1)[0].path == "beta.md"
    assert store._client.get_settings().anonymized_telemetry is False
    _, report = rag.build_vectorstore(kb, persist, embeddings=embeddings, progress=False)
    assert report.unchanged == 3 and report.chunks_added == 0


KILLED_BUILD = """
import sys
from course_utils import rag

real = rag.load_embeddings("all-minilm-l6-v2")


class Announcing:  # the real model; says when each file's chunks are embedded, just before they are written
    model_name = real.model_name

    def embed_documents(self, texts):
        vectors = real.embed_documents(texts)
        print("embedded", flush=True)
        return vectors

    def embed_query(self, text):
        return real.embed_query(text)


rag.build_vectorstore(sys.argv[1], sys.argv[2], config=rag.SplitConfig(200, 40), embeddings=Announcing(),
                      batch_size=1, progress=False)
print("finished", flush=True)
"""


def stored_pairs(store) -> list[tuple[str, str]]:
    got = store.get(include=["metadatas", "documents"])
    return sorted((m["source"], d) for m, d in zip(got["metadatas"], got["documents"]))


@pytest.mark.slow
def test_a_build_killed_mid_way_resumes_to_the_same_store_as_a_clean_build(tmp_path, embeddings):
    import select
    import signal
    import time

    kb = write_kb(tmp_path / "kb", {
        f"topic_{i:02d}.md": f"""\
            # Topic {i}

            ## Facts

            Topic {i} concerns the number {i * 7919}. It is described here with a few sentences, so that
            each file splits into several chunks at the test's chunk size of two hundred characters.

            ## Usage

            Run `tool-{i} --seed {i}` to reproduce topic {i}. The run prints {i * 13} lines and exits.
            """ for i in range(30)})
    persist, log = tmp_path / "killed_store", tmp_path / "stderr.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COURSE_PROFILE": "tiny"}
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(kb), str(persist)], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
    out, deadline = b"", time.monotonic() + 60
    try:
        # Raw reads, not readline: a buffered reader could hold lines that select() no longer sees.
        while out.count(b"embedded") < 3:  # by the third batch the first two files' writes have completed
            assert time.monotonic() < deadline, f"the build never got going: {log.read_text()[-2000:]}"
            if select.select([proc.stdout], [], [], 1)[0]:
                data = os.read(proc.stdout.fileno(), 4096)
                assert data, f"the build ended before the test could kill it: {log.read_text()[-2000:]}"
                out += data
        proc.send_signal(signal.SIGKILL)  # no cleanup of any kind, like a kernel killed for memory
    finally:
        proc.kill()
        out += proc.communicate(timeout=30)[0]
    assert proc.returncode == -signal.SIGKILL and b"finished" not in out

    half = rag.load_vectorstore(persist, embeddings=embeddings)
    assert 2 <= len(rag.indexed_files(half)) < 30  # killed mid-way, with some files in

    store, report = rag.build_vectorstore(kb, persist, config=SMALL, embeddings=embeddings, progress=False)
    assert report.unchanged >= 2 and report.unchanged + len(report.added) + len(report.updated) == 30
    clean, _ = rag.build_vectorstore(kb, tmp_path / "clean_store", config=SMALL, embeddings=embeddings,
                                     progress=False)
    ids = stored_ids(store)
    assert len(ids) == len(set(ids)) == len(stored_ids(clean)) == expected_chunks(kb)  # nothing duplicated
    assert stored_pairs(store) == stored_pairs(clean)  # nothing lost, nothing extra
    for i in (0, 29):  # the vector index answers for a file written before the kill and one after
        assert rag.retrieve(store, f"What does topic {i} concern? The number {i * 7919}", k=1)[0].path == \
            f"topic_{i:02d}.md"
    _, report = rag.build_vectorstore(kb, persist, config=SMALL, embeddings=embeddings, progress=False)
    assert report.unchanged == 30 and report.chunks_added == 0


def test_load_vectorstore_errors_say_what_to_do(kb, tmp_path, embeddings):
    with pytest.raises(CourseError, match="build_vectorstore"):
        rag.load_vectorstore(tmp_path / "missing", embeddings=embeddings)
    persist = tmp_path / "store"
    rag.build_vectorstore(kb, persist, config=SMALL, embeddings=embeddings, progress=False)

    other = FailingEmbeddings(embeddings, 0)
    other.model_name = "another-embedding-model"
    with pytest.raises(CourseError, match="built with"):
        rag.load_vectorstore(persist, embeddings=other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CourseError, match="No readable files"):
        rag.build_vectorstore(tmp_path / "empty", tmp_path / "s2", embeddings=embeddings)


# ---------------------------------------------------------------- retrieval metrics

@pytest.fixture
def fixture_store(kb, tmp_path, embeddings):
    return rag.build_vectorstore(kb, tmp_path / "store", config=SMALL, embeddings=embeddings, progress=False)[0]


def test_metrics_math():
    import pandas as pd

    report = rag.RetrievalReport(3, pd.DataFrame({"rank": [1, 2, 0, 3]}))
    assert report.hit_rate == 0.75
    assert report.mrr == pytest.approx((1 + 1 / 2 + 0 + 1 / 3) / 4)
    assert (report.hit_at(1), report.hit_at(2)) == (0.25, 0.5)
    assert len(report.misses()) == 1


def test_evaluate_retrieval_on_fixture(fixture_store):
    report = rag.evaluate_retrieval(fixture_store, QA, k=2)
    assert list(report.table["rank"]) == [1, 1, 1] and report.mrr == 1.0
    wrong = [{**QA[0], "source": "alpha.md"}]  # a wrong label shows up as a miss or a lower rank
    assert rag.evaluate_retrieval(fixture_store, wrong, k=1).hit_rate == 0.0
    table = rag.compare_retrieval(fixture_store, QA, [{"k": 1}, {"k": 3, "mmr": True}])
    assert list(table["hit@k"]) == [1.0, 1.0]
    why = rag.explain_miss(fixture_store, wrong[0], k=1)
    assert list(why["path"]) == ["beta.md", "alpha.md"]  # retrieved instead, then the expected file's best chunk


def test_mmr_returns_distinct_chunks_with_scores(fixture_store):
    hits = rag.retrieve(fixture_store, "How do I install and use Alpha?", k=3, mmr=True, fetch_k=10)
    assert len({h.text for h in hits}) == 3
    assert all(0 < h.score <= 1 for h in hits)


def test_project_eval_set_points_at_existing_pages():
    qa = rag.load_eval_set(languages=["en"])
    assert len(qa) >= 40
    for item in qa + rag.load_eval_set(languages=["zh"]):
        assert (DATA_DIR / "knowledge_base" / item["source"]).is_file(), item


def test_load_eval_set_rejects_malformed_lines(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "no source"}) + "\n", encoding="utf-8")
    with pytest.raises(CourseError, match="source"):
        rag.load_eval_set(path)


def test_knowledge_base_has_english_and_chinese_pages():
    en = list((DATA_DIR / "knowledge_base" / "en").rglob("*.md"))
    zh = list((DATA_DIR / "knowledge_base" / "zh").rglob("*.md"))
    assert len(en) >= 30 and len(zh) >= 10
    assert all(p.read_text(encoding="utf-8").startswith("# ") for p in en + zh)


# ---------------------------------------------------------------- the chain and the session (tiny model)

@pytest.fixture(scope="module")
def chat(tiny_model):
    from course_utils.chat import ChatSession

    return ChatSession.load(tiny_model, max_new_tokens=12)


@pytest.mark.slow
def test_chain_returns_answer_and_sources(chat, fixture_store, monkeypatch):
    sent = []
    real_complete = chat.complete
    monkeypatch.setattr(chat, "complete", lambda messages, **gen: sent.append(messages) or real_complete(messages, **gen))
    chain = rag.make_rag_chain(chat, fixture_store, k=2)
    result = chain.invoke("Which port does the Beta server listen on?")
    assert set(result) == {"question", "answer", "sources"}
    assert isinstance(result["answer"], str) and result["answer"]
    assert len(result["sources"]) == 2 and result["sources"][0]["path"] == "beta.md"
    assert set(result["sources"][0]) == {"path", "section", "score"}
    assert result["sources"][0]["score"] >= result["sources"][1]["score"]
    [messages] = sent  # one user message with the retrieved context and the question
    assert messages[0]["role"] == "user" and "4242" in messages[0]["content"]
    assert chain.invoke({"question": "How do I install the Alpha tool?"})["sources"][0]["path"] == "alpha.md"
    with pytest.raises(CourseError):
        chain.invoke({"query": "wrong key"})


@pytest.mark.slow
def test_rag_session_follows_the_chat_protocol(chat, fixture_store):
    from course_utils.chat import ChatWidget

    session = rag.RagSession(chat, fixture_store, k=2)
    reply = session.ask("Which port does the Beta server listen on?")
    assert "**Sources**" in reply and "`beta.md` — Port" in reply
    assert [m["role"] for m in session.history] == ["user", "assistant"] and session.history[1]["content"] == reply

    chunks = list(session.ask("How do I install the Alpha tool?", stream=True))
    assert "".join(chunks).strip() == session.history[-1]["content"] and "`alpha.md`" in chunks[-1]

    stream = session.ask("How many bits per weight does the gamma quantizer use?", stream=True)
    first = next(piece for piece in stream if piece.strip())  # the streamer may yield "" first
    session.stop()  # ends the generation early; the partial answer and the sources are kept
    rest = list(stream)
    assert "`notes/gamma.txt`" in rest[-1] and len(session.history) == 6
    assert session.history[-1]["content"].startswith(first.strip())

    before = list(session.history)
    assert "**Sources**" in session.complete([{"role": "user", "content": "How do I install the Alpha tool?"}])
    assert session.history == before  # complete() is stateless
    session.reset()
    assert session.history == []

    widget = ChatWidget(session)
    answer = widget.submit("Which port does the Beta server listen on?")
    assert "`beta.md`" in answer and len(session.history) == 2


# ---------------------------------------------------------------- the prompt template

def test_check_template_names_what_is_missing():
    assert rag.check_template(rag.RAG_TEMPLATE) == rag.RAG_TEMPLATE
    with pytest.raises(CourseError, match=r"no \{context\}"):
        rag.check_template("Answer the question: {question}")  # the model would answer from memory
    with pytest.raises(CourseError, match=r"no \{question\}"):
        rag.check_template("Context: {context}")
    with pytest.raises(CourseError, match=r"\{source\}, which the chain cannot fill"):
        rag.check_template("{context} {question} {source}")
    with pytest.raises(CourseError, match="literal brace"):
        rag.check_template("{context} {question} {")


@pytest.mark.slow
def test_chain_fills_the_given_template_through_a_langchain_llm(chat, fixture_store):
    """A LangChain LLM subclass (the lesson's InternLM_LLM pattern) gets the filled-in template as its prompt."""
    from typing import Any

    from langchain_core.language_models.llms import LLM

    prompts = []

    class RecordingLLM(LLM):
        session: Any

        def _call(self, prompt, stop=None, run_manager=None, **kwargs):
            prompts.append(prompt)
            return self.session.complete([{"role": "user", "content": prompt}])

        @property
        def _llm_type(self):
            return "recording"

    template = "Notes:\n{context}\n\nQ: {question}\nA:"
    chain = rag.make_rag_chain(RecordingLLM(session=chat), fixture_store, k=2, template=template)
    result = chain.invoke("Which port does the Beta server listen on?")
    [prompt] = prompts
    assert prompt.startswith("Notes:\n") and "4242" in prompt
    assert prompt.endswith("Q: Which port does the Beta server listen on?\nA:")
    assert result["answer"] and result["sources"][0]["path"] == "beta.md"
    with pytest.raises(CourseError, match=r"no \{context\}"):
        rag.make_rag_chain(chat, fixture_store, template="Q: {question}")


# ---------------------------------------------------------------- homework L3.own: your own material

OWN_QA = QA + [
    {"question": "What does Alpha drop from a dataset?", "source": "alpha.md"},
    {"question": "Which Python version does Alpha need?", "source": "alpha.md"},
    {"question": "How do I check that alpha is on my PATH?", "source": "alpha.md"},
    {"question": "What does the Beta health endpoint return?", "source": "beta.md"},
    {"question": "What do I do when port 4242 is taken?", "source": "beta.md"},
    {"question": "How many weights share one scale in gamma?", "source": "notes/gamma.txt"},
    {"question": "Why is the gamma quantizer not for production?", "source": "notes/gamma.txt"},
]


@pytest.fixture
def own_answer(kb, tmp_path):
    """An honest L3.own answer over the fixture folder: hit@2 and MRR as evaluate_retrieval reports them."""
    store, _ = rag.build_vectorstore(kb, tmp_path / "own_store", config=SMALL, progress=False)
    report = rag.evaluate_retrieval(store, OWN_QA, k=2)
    return {"folder": kb, "questions": list(OWN_QA), "k": 2, "config": SMALL,
            "hit@k": round(report.hit_rate, 3), "mrr": round(report.mrr, 3)}


@pytest.mark.slow
def test_own_material_check_recomputes_hit_and_mrr(own_answer, tmp_path):
    from course_utils import homework

    result = homework.run_check("L3.own", own_answer)
    assert result.passed, result.detail
    assert f"recomputed on {len(OWN_QA)} questions" in result.detail
    # The same questions as a JSONL file.
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in OWN_QA), encoding="utf-8")
    assert homework.run_check("L3.own", {**own_answer, "questions": path}).passed
    # A number that is not what the files give: rejected with both values.
    wrong = homework.run_check("L3.own", {**own_answer, "mrr": own_answer["mrr"] - 0.1})
    assert not wrong.passed and "rebuilding the store from your files gives" in wrong.detail
    # Labels changed after the numbers were measured: the check evaluates the labels it is given.
    relabelled = [{**q, "source": "alpha.md"} if q["source"] == "beta.md" else q for q in OWN_QA]
    stale = homework.run_check("L3.own", {**own_answer, "questions": relabelled})
    assert not stale.passed and "rebuilding the store from your files gives" in stale.detail


def test_own_material_check_refuses_too_few_questions_and_unknown_sources(own_answer):
    from course_utils import homework

    few = homework.run_check("L3.own", {**own_answer, "questions": OWN_QA[:9]})
    assert not few.passed and "9 distinct questions; write at least 10" in few.detail
    repeated = homework.run_check("L3.own", {**own_answer, "questions": OWN_QA[:9] + [dict(OWN_QA[0])]})
    assert not repeated.passed and "9 distinct questions" in repeated.detail
    elsewhere = OWN_QA[:-1] + [{"question": "What is in the appendix?", "source": "appendix.md"}]
    unknown = homework.run_check("L3.own", {**own_answer, "questions": elsewhere})
    assert not unknown.passed and "'appendix.md'" in unknown.detail
    course = homework.run_check("L3.own", {**own_answer, "folder": DATA_DIR / "knowledge_base" / "en"})
    assert not course.passed and "the course's knowledge base" in course.detail
