"""rag.reset_store empties only a vector store the course built (issue #13).

It used to delete any folder without a Chroma database in it, so ``reset_store(KB_DIR)`` (arguments
swapped) wiped the knowledge base. Every refusal test also replaces ``shutil.rmtree`` with a
recorder, so a regression fails the test instead of deleting the repo, the home folder or ``/``.
"""

import shutil
from pathlib import Path

import pytest

from course_utils import knowledge, rag
from course_utils.errors import CourseError
from course_utils.paths import REPO_ROOT

FILES = {"alpha.md": "# Alpha\n\nAlpha cleans datasets.\n", "beta.md": "# Beta\n\nBeta listens on port 4242.\n"}


@pytest.fixture(scope="module")
def embeddings():
    return rag.load_embeddings("all-minilm-l6-v2")


@pytest.fixture
def kb(tmp_path):
    folder = tmp_path / "kb"
    folder.mkdir()
    for name, text in FILES.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def no_rmtree(monkeypatch):
    """``shutil.rmtree`` that deletes nothing: what reset_store tried to delete, for the assertions."""
    calls = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **kw: calls.append(Path(path)))
    return calls


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def build(kb, store, embeddings):
    return rag.build_vectorstore(kb, store, embeddings=embeddings, progress=False)


def test_the_knowledge_base_is_refused_and_untouched(kb, no_rmtree):
    before = snapshot(kb)
    with pytest.raises(CourseError, match="STORE_DIR") as err:
        rag.reset_store(kb)  # reset_store(KB_DIR): the swapped-argument mistake
    assert "kb" in str(err.value) and "nothing was deleted" in str(err.value)
    assert snapshot(kb) == before and not no_rmtree


def test_a_folder_with_any_other_file_is_refused(tmp_path, no_rmtree):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.bin").write_bytes(b"\x00\x01")
    with pytest.raises(CourseError, match="not a vector store"):
        rag.reset_store(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.bin").read_bytes() == b"\x00\x01" and not no_rmtree


def test_a_file_path_is_refused(kb, no_rmtree):
    with pytest.raises(CourseError, match="is a file"):
        rag.reset_store(kb / "alpha.md")
    assert (kb / "alpha.md").read_text(encoding="utf-8") == FILES["alpha.md"] and not no_rmtree


@pytest.mark.parametrize("folder", [REPO_ROOT, Path.home(), Path("/")], ids=["repo", "home", "root"])
def test_the_repo_home_and_filesystem_root_are_refused(folder, no_rmtree):
    with pytest.raises(CourseError, match="not a vector store"):
        rag.reset_store(folder)
    assert not no_rmtree


def test_the_course_marker_alone_is_not_enough(kb, no_rmtree):
    (kb / knowledge.STORE_MARKER).write_text('{"made_by": "course_utils.knowledge.build_vectorstore"}')
    with pytest.raises(CourseError, match="not a vector store"):
        rag.reset_store(kb)
    assert set(snapshot(kb)) == {*FILES, knowledge.STORE_MARKER} and not no_rmtree


def test_a_chroma_store_the_course_did_not_build_is_refused(tmp_path, no_rmtree):
    other = tmp_path / "other_app_store"
    client = knowledge._client(other)
    client.create_collection("their_data")
    with pytest.raises(CourseError, match="not a vector store"):
        rag.reset_store(other)
    assert knowledge._has_collection(client, "their_data") and not no_rmtree


def test_a_missing_folder_is_nothing_to_do(tmp_path):
    rag.reset_store(tmp_path / "never_built")
    assert not (tmp_path / "never_built").exists()


def test_a_store_built_by_the_course_is_emptied(kb, tmp_path, embeddings):
    store_dir = tmp_path / "store"
    build(kb, store_dir, embeddings)
    assert (store_dir / "chroma.sqlite3").is_file() and (store_dir / knowledge.STORE_MARKER).is_file()
    rag.reset_store(store_dir)
    with pytest.raises(CourseError, match="No collection"):
        rag.load_vectorstore(store_dir, embeddings=embeddings)
    _, report = build(kb, store_dir, embeddings)  # the next build starts from nothing
    assert sorted(report.added) == sorted(FILES) and report.unchanged == 0
    assert snapshot(kb) == {name: text.encode() for name, text in FILES.items()}  # the sources are untouched


def test_a_store_built_before_the_marker_still_resets_and_gets_marked(kb, tmp_path, embeddings):
    # outputs/rag/kb_store on a student's machine was built by the previous course version.
    store_dir = tmp_path / "store"
    build(kb, store_dir, embeddings)
    (store_dir / knowledge.STORE_MARKER).unlink()
    _, report = build(kb, store_dir, embeddings)  # a rebuild marks it
    assert report.unchanged == 2 and (store_dir / knowledge.STORE_MARKER).is_file()
    (store_dir / knowledge.STORE_MARKER).unlink()
    rag.reset_store(store_dir)  # the lesson resets before it builds: the course's collection identifies it
    _, report = build(kb, store_dir, embeddings)
    assert sorted(report.added) == sorted(FILES)
