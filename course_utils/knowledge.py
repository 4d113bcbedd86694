"""The knowledge-base half of RAG: load files, split them, embed them, keep them in Chroma.

The store is incremental. Every chunk carries its file's content hash and the file's chunk count,
so a rebuild adds only new or changed files, drops the chunks of deleted ones, and redoes a file
that an interrupted build left incomplete. That state is read from the store itself (no manifest
that could disagree with it), and each file's chunks go in with one write. The one file the course
adds, ``course_store.json``, only says that the folder is a course store, so that ``reset_store``
never empties anything else.

Learner mistakes (bad arguments, a store folder that is a file or whose database is damaged) raise one
CourseError each, checked before the embedding model loads.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import shutil
import sqlite3
import warnings
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CourseError, is_whole
from .paths import REPO_ROOT

__all__ = [  # the public API, re-exported by course_utils.rag (tests/test_lesson_modules.py keeps them equal)
    "COLLECTION", "DEFAULT_PATTERNS", "MARKDOWN_SUFFIXES", "STORE_MARKER", "BuildReport", "SkippedFileWarning",
    "SplitConfig", "build_vectorstore", "chunk_stats", "default_patterns", "indexed_files", "load_documents",
    "load_embeddings", "load_vectorstore", "markdown_sections", "plot_chunk_lengths", "reset_store", "show_path",
    "split_documents"]

DEFAULT_PATTERNS = ("**/*.md", "**/*.markdown", "**/*.txt", "**/*.pdf")
COLLECTION = "course_kb"
STORE_MARKER = "course_store.json"  # written by build_vectorstore; reset_store needs it beside chroma.sqlite3
_MADE_BY = "course_utils.knowledge.build_vectorstore"
MARKDOWN_SUFFIXES = {".md", ".markdown"}
_HEADER = re.compile(r"^(#{1,3})\s+(.+?)\s*#*\s*$")
# What Chroma writes in a store folder: the database (and SQLite's side files), and one folder of HNSW
# index files per segment, named by a UUID. Only these are deleted when a damaged store is reset.
_CHROMA_DB = re.compile(r"chroma\.sqlite3(-wal|-shm|-journal)?")
_SEGMENT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SEGMENT_FILES = {"header.bin", "data_level0.bin", "length.bin", "link_lists.bin", "index_metadata.pickle"}


class SkippedFileWarning(UserWarning):
    """A file that ``load_documents`` could not read and left out."""


@dataclass(frozen=True)
class SplitConfig:
    chunk_size: int = 500  # characters; the bootcamp's default
    chunk_overlap: int = 150  # characters shared by neighbouring chunks
    header_context: bool = True  # prefix each chunk with "title > section" so its embedding knows where it is

    def __post_init__(self):
        # Checked when the learner writes the config, not deep inside a build once the model has loaded.
        size, overlap = self.chunk_size, self.chunk_overlap
        if not is_whole(size) or size < 1:
            raise CourseError(f"chunk_size={size!r}: use a whole number of characters, 1 or more "
                              "(the course uses 500).")
        if not is_whole(overlap) or not 0 <= overlap < size:
            raise CourseError(f"chunk_overlap={overlap!r}: use a whole number of characters from 0 to {size - 1} "
                              f"(below chunk_size={size}); the course uses 150 with chunk_size=500.")
        if not isinstance(self.header_context, bool):
            raise CourseError(f"header_context={self.header_context!r}: use True or False.")
        object.__setattr__(self, "chunk_size", int(size))  # numpy ints would change signature()'s text
        object.__setattr__(self, "chunk_overlap", int(overlap))

    def signature(self) -> str:
        """A short string that changes whenever the chunks would change."""
        return f"size={self.chunk_size},overlap={self.chunk_overlap},headers={self.header_context}"


def show_path(path: str | Path) -> str:
    """``path`` relative to the repo when it lies inside it, so messages and outputs hold no absolute paths."""
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.name if path.is_absolute() else str(path)


def default_patterns(folder: str | Path) -> tuple[str, ...]:
    """Glob patterns for a knowledge folder: the tiny profile reads only ``en/`` when there is one."""
    from .env import profile

    if profile() == "tiny" and (Path(folder) / "en").is_dir():
        return tuple(f"en/{p}" for p in DEFAULT_PATTERNS)
    return DEFAULT_PATTERNS


# ---------------------------------------------------------------- loading

def _skip(path: Path, why: str, skipped: list[str]) -> None:
    skipped.append(f"{path.name}: {why}")
    warnings.warn(f"skipped {path.name}: {why}", SkippedFileWarning, stacklevel=4)


def _read_pdf(path: Path) -> str:
    from pypdf import PdfReader

    return "\n\n".join(page.extract_text() or "" for page in PdfReader(path).pages)


def _read_text(path: Path, raw: bytes, skipped: list[str]) -> str | None:
    """The text of one file, or None (with a warning) when it is binary, not UTF-8 or empty."""
    if path.suffix.lower() == ".pdf":
        try:
            text = _read_pdf(path)
        except Exception as exc:  # pypdf raises many types for damaged files; one bad file must not stop the rest
            return _skip(path, f"unreadable PDF ({type(exc).__name__}); re-export it", skipped)
        if not text.strip():
            return _skip(path, "the PDF has no text layer (a scan?); run OCR first", skipped)
        return text
    # Windows saves "Unicode" text as UTF-16 with a byte-order mark: full of NUL bytes, but not binary.
    encoding = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    if encoding != "utf-16" and b"\x00" in raw[:8192]:
        return _skip(path, "binary file; only Markdown, text and PDF are indexed", skipped)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        return _skip(path, "not UTF-8; convert it, e.g. iconv -f GBK -t UTF-8 in > out", skipped)
    if not text.strip():
        return _skip(path, "empty file", skipped)
    return text


def _title(text: str, path: Path) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("_", " ")


def _files(folder: Path, patterns) -> list[Path]:
    found = {p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _check_source(source) -> list[Path]:
    """``source`` as a list of paths: one folder or file, or a list (any iterable) of them."""
    items = [source] if isinstance(source, (str, Path)) else None
    if items is None and not isinstance(source, (bytes, dict)):
        try:
            items = list(source)
        except TypeError:
            pass
    if not items or not all(isinstance(p, Path) or (isinstance(p, str) and p.strip()) for p in items):
        raise CourseError(f"source={source!r:.100}: pass the knowledge folder (KB_DIR, a str or Path), a file, "
                          "or a non-empty list of them.")
    return [Path(p) for p in items]


def _check_patterns(patterns) -> tuple[str, ...]:
    if isinstance(patterns, str):  # one pattern; iterating it would glob single characters
        patterns = (patterns,)
    if not isinstance(patterns, (list, tuple)) or not patterns or not all(isinstance(p, str) for p in patterns):
        raise CourseError(f"patterns={patterns!r:.100}: pass glob patterns such as ('**/*.md', '**/*.txt'), "
                          "or leave them out.")
    return tuple(patterns)


def _where(paths: list[Path]) -> str:
    return ", ".join(show_path(p) for p in paths)


def _load(paths: list[Path], patterns: tuple[str, ...], skipped: list[str]) -> list:
    from langchain_core.documents import Document

    for base in paths:
        if not base.exists():
            raise CourseError(f"{show_path(base)} does not exist; point KB_DIR at a folder of .md/.txt/.pdf files.")
    # Sources are relative to the folders' common parent: one folder keeps paths relative to itself (the
    # eval set's), several keep their folder's name, so en/README.md and zh/README.md stay two files.
    roots = [base.resolve() if base.is_dir() else base.parent.resolve() for base in paths]
    common = Path(os.path.commonpath(roots))
    docs, seen = [], set()
    for base, root in zip(paths, roots):
        for path in _files(root, patterns) if base.is_dir() else [root / base.name]:
            if path in seen:  # a folder listed inside another one
                continue
            seen.add(path)
            try:
                raw = path.read_bytes()
            except OSError as exc:  # permissions, a broken link: skip this file, keep the rest
                _skip(path, f"cannot be read ({exc.strerror})", skipped)
                continue
            text = _read_text(path, raw, skipped)
            if text is not None:
                docs.append(Document(page_content=text, metadata={
                    "source": path.relative_to(common).as_posix(), "title": _title(text, path),
                    "hash": hashlib.sha256(raw).hexdigest()[:16]}))
    return docs


def load_documents(paths, patterns=DEFAULT_PATTERNS) -> list:
    """Markdown, text and PDF files under ``paths`` (folders, searched recursively, or files) as Documents.

    Each keeps ``source``, ``title`` and a content ``hash``. ``source`` is the path relative to the
    folder (for a file, its folder); with several folders or files, relative to their common parent
    (``[kb/en, kb/zh]`` gives ``en/...`` and ``zh/...``). Binary, non-UTF-8, empty and unreadable
    files are skipped with a warning each.
    """
    return _load(_check_source(paths), _check_patterns(patterns), [])


# ---------------------------------------------------------------- splitting

def markdown_sections(text: str) -> list[tuple[list[str], str]]:
    """Split Markdown at #, ## and ### headers: ``[(header path, body)]``; code fences are not headers."""
    sections, path, body, fenced = [], [], [], False
    for line in text.splitlines():
        fenced ^= line.lstrip().startswith("```")
        match = None if fenced else _HEADER.match(line)
        if match:
            sections.append((list(path), "\n".join(body)))
            level = len(match.group(1))
            path = path[: level - 1] + [""] * max(0, level - 1 - len(path)) + [match.group(2)]
            body = []
        else:
            body.append(line)
    sections.append((list(path), "\n".join(body)))
    return [(p, b.strip()) for p, b in sections if b.strip()]


def _section_name(header_path: list[str], title: str) -> str:
    # The H1 is normally the page title already; the section is what lies below it.
    parts = [h for h in header_path if h]
    if parts and parts[0] == title:
        parts = parts[1:]
    return " > ".join(parts)


def _check_config(config) -> None:
    if not isinstance(config, SplitConfig):  # its own fields are checked when it is made
        raise CourseError(f"config={config!r:.100}: pass rag.SplitConfig(chunk_size=..., chunk_overlap=...), "
                          "e.g. rag.SplitConfig(500, 150).")


def split_documents(docs, config: SplitConfig = SplitConfig()) -> list:
    """Recursive character chunks of ``docs``; Markdown is cut at headers first so chunks keep their section."""
    from langchain_core.documents import Document
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    _check_config(config)
    splitter = RecursiveCharacterTextSplitter(chunk_size=config.chunk_size, chunk_overlap=config.chunk_overlap)
    chunks = []
    for doc in docs:
        meta, title = doc.metadata, doc.metadata.get("title", "")
        is_md = Path(meta["source"]).suffix.lower() in MARKDOWN_SUFFIXES
        sections = markdown_sections(doc.page_content) if is_md else [([], doc.page_content)]
        if is_md and not config.header_context:  # headers stay inline, as a plain splitter would see them
            sections = [(p, (f"{'#' * len(p)} {p[-1]}\n\n{b}" if p else b)) for p, b in sections]
        pieces = [(_section_name(p, title), piece) for p, body in sections for piece in splitter.split_text(body)]
        for i, (section, piece) in enumerate(pieces):
            text = f"{' > '.join(filter(None, [title, section]))}\n{piece}" if config.header_context else piece
            chunks.append(Document(page_content=text, metadata={
                **meta, "section": section, "chunk": i, "n_chunks": len(pieces)}))
    return chunks


def chunk_stats(chunks):
    """Per-file chunk counts and lengths (characters) as a table, plus an ``ALL`` row."""
    import pandas as pd

    frame = pd.DataFrame({"source": [c.metadata["source"] for c in chunks],
                          "chars": [len(c.page_content) for c in chunks]})
    table = frame.groupby("source").chars.agg(chunks="count", mean="mean", min="min", max="max")
    table.loc["ALL"] = [len(frame), frame.chars.mean(), frame.chars.min(), frame.chars.max()]
    return table.round(0).astype(int)


def plot_chunk_lengths(chunks, *, bins: int = 30):
    """A histogram of chunk lengths in characters."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist([len(c.page_content) for c in chunks], bins=bins, color="#3b82f6")
    ax.set(xlabel="chunk length (characters)", ylabel="chunks", title=f"{len(chunks)} chunks")
    fig.tight_layout()
    plt.close(fig)  # shown once, as the cell's value; an open pyplot figure would be shown again at cell end
    return fig


# ---------------------------------------------------------------- embeddings and the store

def load_embeddings(name: str | None = None, *, batch_size: int = 64, device: str | None = None):
    """The profile's sentence-transformers model (or ``name``) as LangChain embeddings, normalised."""
    import torch
    from langchain_huggingface import HuggingFaceEmbeddings
    from transformers.utils import logging as hf_logging

    from .env import configure_threads
    from .models import embedding_path

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar for a 90 MB model is noise
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        configure_threads()  # as for a chat model: no thread spinning on a core another job holds
    return HuggingFaceEmbeddings(model_name=str(embedding_path(name)), model_kwargs={"device": device},
                                 encode_kwargs={"batch_size": batch_size, "normalize_embeddings": True})


def _model_id(embeddings) -> str:
    return Path(getattr(embeddings, "model_name", type(embeddings).__name__)).name


def _check_embeddings(embeddings) -> None:
    if embeddings is not None and not all(callable(getattr(embeddings, m, None)) for m in ("embed_documents",
                                                                                          "embed_query")):
        raise CourseError(f"embeddings={embeddings!r:.60}: pass an embedding model such as "
                          "rag.load_embeddings('all-minilm-l6-v2'), or leave it out for the course's model.")


def _check_store_dir(persist_dir) -> Path:
    if not isinstance(persist_dir, (str, Path)) or (isinstance(persist_dir, str) and not persist_dir.strip()):
        raise CourseError(f"persist_dir={persist_dir!r:.100}: pass the folder for the vector store "
                          "(STORE_DIR, a str or Path).")
    persist_dir = Path(persist_dir)
    blocker = next((p for p in [persist_dir, *persist_dir.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise CourseError(f"{show_path(blocker)} is a file, so {show_path(persist_dir)} cannot be a vector store "
                          "folder: pass a folder path (STORE_DIR); build_vectorstore creates it.")
    return persist_dir


class _Damaged(Exception):
    """The store's files cannot be read; the message says what is wrong."""


def _damage(persist_dir: Path) -> str | None:
    """What is wrong with the store's database file, or None when SQLite can read all of it.

    Chroma reports a damaged file only as an internal error, at a different call each time (a
    truncated file fails at start, overwritten pages only when read), so SQLite checks it first:
    milliseconds for a course-sized store.
    """
    db = persist_dir / "chroma.sqlite3"
    if not db.is_file() or db.stat().st_size == 0:  # Chroma starts a new database in an empty file
        return None
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            problems = [row[0] for row in con.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            return f"chroma.sqlite3: {exc}"
        return None  # busy or locked by another process: not damage, and Chroma reports that itself
    return None if problems == ["ok"] else f"chroma.sqlite3: {problems[0].splitlines()[0]}"


def _forget_client(persist_dir: Path) -> None:
    """Drop the client Chroma keeps for ``persist_dir`` for the rest of the process.

    Chroma keeps one per path, also one that failed to start (every later call then fails with an
    AttributeError) or one opened before the files were damaged or deleted; the next open must read
    the disk afresh.
    """
    try:
        from chromadb.api.shared_system_client import SharedSystemClient as shared
        system = shared._identifier_to_system.pop(str(persist_dir), None)
        shared._identifier_to_refcount.pop(str(persist_dir), None)
    except (ImportError, AttributeError):  # another Chroma version keeps no such cache
        return
    if system is not None:
        try:
            system.stop()
        except Exception:  # a half-started or stale client may fail to stop; it is discarded either way
            pass


def _connect(persist_dir: Path):
    """A Chroma client for the store, or ``_Damaged`` when its files cannot be read."""
    import chromadb
    from chromadb.config import Settings
    from chromadb.errors import ChromaError

    why = _damage(persist_dir)
    if why:
        _forget_client(persist_dir)
        raise _Damaged(why)
    try:
        # Telemetry off: the course never talks to the network.
        return chromadb.PersistentClient(path=str(persist_dir), settings=Settings(anonymized_telemetry=False))
    except ChromaError as exc:
        _forget_client(persist_dir)
        raise _Damaged(f"Chroma cannot open it: {str(exc).splitlines()[0][:200]}") from None


def _client(persist_dir: Path):
    """``_connect``, with a damaged store as the CourseError that says how to recover."""
    try:
        return _connect(persist_dir)
    except _Damaged as exc:
        where = show_path(persist_dir) or str(persist_dir)
        if _is_marked(persist_dir):
            # STORE_DIR, not the path: a notebook's working folder is not the repo root the path is shown from.
            raise CourseError(f"The vector store in {where} is damaged ({exc}). Run rag.reset_store(STORE_DIR) on "
                              "that folder, then build it again.") from None
        raise CourseError(f"The vector store in {where} is damaged ({exc}) and has no {STORE_MARKER}, so "
                          "reset_store cannot tell that it is the course's. If it is, delete the folder "
                          f"{where} yourself and build it again.") from None


def _has_collection(client, name: str) -> bool:
    # list_collections() gave names in some Chroma versions and Collection objects in others.
    return name in [c if isinstance(c, str) else c.name for c in client.list_collections()]


def _open_store(client, persist_dir: Path, embeddings, collection: str, *, create: bool):
    """LangChain's Chroma over a cosine collection; refuses a store built with another embedding model.

    ``embeddings=None`` loads the course's model, once the store itself has been found usable.
    """
    from langchain_chroma import Chroma

    exists = _has_collection(client, collection)
    if not exists and not create:
        raise CourseError(f"No collection {collection!r} in {show_path(persist_dir)}; build it first with "
                          "build_vectorstore(KB_DIR, STORE_DIR).")
    embeddings = embeddings or load_embeddings()
    col = client.get_collection(collection) if exists else client.create_collection(
        collection, configuration={"hnsw": {"space": "cosine"}}, metadata={"embedding_model": _model_id(embeddings)})
    built_with = (col.metadata or {}).get("embedding_model")
    if built_with != _model_id(embeddings):
        raise CourseError(f"The store in {show_path(persist_dir)} was built with {built_with}, not "
                          f"{_model_id(embeddings)}. Use another STORE_DIR, or reset_store() and rebuild.")
    return Chroma(client=client, collection_name=collection, embedding_function=embeddings)


def _mark_store(persist_dir: Path) -> None:
    """Label ``persist_dir`` as a course store (once), so reset_store can tell it from any other folder."""
    marker = persist_dir / STORE_MARKER
    if not _is_marked(persist_dir):  # also rewrites a marker cut short, which would leave the store unresettable
        marker.write_text(json.dumps({"made_by": _MADE_BY, "note": "rag.reset_store() empties only "
                                      "folders holding this file and chroma.sqlite3"}, indent=1) + "\n")


def _is_marked(persist_dir: Path) -> bool:
    try:
        return json.loads((persist_dir / STORE_MARKER).read_text()).get("made_by") == _MADE_BY
    except (OSError, ValueError, AttributeError):  # missing, not JSON, not an object
        return False


def _built_by_course(client, collection: str) -> bool:
    # A store from before the marker: the course's collection, labelled with its embedding model.
    return (_has_collection(client, collection)
            and "embedding_model" in (client.get_collection(collection).metadata or {}))


def _refuse(persist_dir: Path, what: str):
    where = show_path(persist_dir) or str(persist_dir)
    raise CourseError(f"reset_store({where!r}) refused: {what}, so nothing was deleted. Pass the store "
                      "folder that build_vectorstore(KB_DIR, STORE_DIR) wrote (STORE_DIR), not the "
                      "knowledge base (KB_DIR). To remove any other folder, delete it yourself.")


def _remove_chroma_files(persist_dir: Path) -> None:
    """Delete what Chroma wrote in ``persist_dir`` (its database, its index folders) and nothing else."""
    _forget_client(persist_dir)
    for path in persist_dir.iterdir():
        if path.is_file() and _CHROMA_DB.fullmatch(path.name):
            path.unlink()
        elif (path.is_dir() and not path.is_symlink() and _SEGMENT.fullmatch(path.name)
              and {p.name for p in path.iterdir()} <= _SEGMENT_FILES):
            shutil.rmtree(path)


def reset_store(persist_dir: str | Path, collection: str = COLLECTION) -> None:
    """Empty a store that ``build_vectorstore`` made (the next build starts from nothing).

    Only a folder holding ``chroma.sqlite3`` and the course's ``course_store.json`` (or, for a store
    built before that marker, the course's collection) is a store: anything else (the knowledge
    base passed by mistake, a folder of yours, a file) raises CourseError and nothing is deleted.
    A missing or empty folder is nothing to reset.

    The collection is dropped through Chroma rather than by deleting the folder: Chroma caches one
    client per path in the process, and a folder deleted under it breaks the next build in this kernel.
    A course store whose database is damaged cannot be opened to drop anything: then Chroma's files
    (only those) are deleted and its cached client forgotten. A damaged store without the marker is
    refused, since nothing shows that it is the course's.
    """
    if not isinstance(persist_dir, (str, Path)):
        raise CourseError(f"persist_dir={persist_dir!r:.100}: pass the folder of the vector store (STORE_DIR).")
    persist_dir = Path(persist_dir)
    if not persist_dir.exists() or (persist_dir.is_dir() and not any(persist_dir.iterdir())):
        return
    if not persist_dir.is_dir():
        _refuse(persist_dir, "that is a file, not a vector store folder")
    if not (persist_dir / "chroma.sqlite3").is_file():
        _refuse(persist_dir, "that folder is not a vector store (it has no chroma.sqlite3)")
    try:
        client = _connect(persist_dir)
    except _Damaged as exc:
        if not _is_marked(persist_dir):
            where = show_path(persist_dir) or str(persist_dir)
            raise CourseError(f"reset_store({where!r}) refused: the store is damaged ({exc}) and has no "
                              f"{STORE_MARKER}, so it cannot be told from another program's store; nothing was "
                              "deleted. If it is the course's store, delete the folder yourself and build it "
                              "again.") from None
        _remove_chroma_files(persist_dir)
        return
    if not (_is_marked(persist_dir) or _built_by_course(client, collection)):
        _refuse(persist_dir, f"that folder is not a vector store built by the course (no {STORE_MARKER})")
    if _has_collection(client, collection):
        client.delete_collection(collection)
    _mark_store(persist_dir)  # a store from before the marker is recognised by the file from now on


@dataclass
class BuildReport:
    added: list[str] = field(default_factory=list)  # new files
    updated: list[str] = field(default_factory=list)  # changed, or left incomplete by an interrupted build
    removed: list[str] = field(default_factory=list)  # gone from the folder
    unchanged: int = 0  # files already indexed
    chunks_added: int = 0
    chunks_removed: int = 0
    total_chunks: int = 0
    total_files: int = 0

    def __str__(self) -> str:
        return (f"files: {len(self.added)} added, {len(self.updated)} updated, {len(self.removed)} removed, "
                f"{self.unchanged} unchanged | chunks: +{self.chunks_added} -{self.chunks_removed} | "
                f"store: {self.total_chunks} chunks from {self.total_files} files")


def indexed_files(store) -> dict[str, dict]:
    """What the store holds per source file: ``{source: {"key", "n_chunks", "count"}}``."""
    state: dict[str, dict] = {}
    for meta in store.get(include=["metadatas"])["metadatas"]:
        entry = state.setdefault(meta["source"], {"key": meta.get("key"), "n_chunks": meta.get("n_chunks"), "count": 0})
        entry["count"] += 1
        if entry["key"] != meta.get("key"):  # chunks of two versions of the file: treat it as incomplete
            entry["n_chunks"] = -1
    return state


def _plan(docs, state: dict, config: SplitConfig, report: BuildReport) -> list:
    """The documents that need (re)indexing; fills the report's file lists."""
    pending = []
    for doc in docs:
        src = doc.metadata["source"]
        # The key covers content and split settings: new chunk settings re-index every file.
        doc.metadata["key"] = hashlib.sha256(f"{doc.metadata['hash']}|{config.signature()}".encode()).hexdigest()[:16]
        have = state.get(src)
        if have and have["key"] == doc.metadata["key"] and have["count"] == have["n_chunks"]:
            report.unchanged += 1
            continue
        (report.updated if have else report.added).append(src)
        pending.append(doc)
    return pending


def _delete_sources(store, state: dict, sources, report: BuildReport) -> None:
    for src in sources:
        store.delete(where={"source": src})
        report.chunks_removed += state[src]["count"]


def _file_groups(chunks, batch_size: int):
    """Whole files' chunks, grouped until a group holds at least ``batch_size`` chunks."""
    by_file: dict[str, list] = {}
    for chunk in chunks:
        by_file.setdefault(chunk.metadata["source"], []).append(chunk)
    group: list[list] = []
    for file_chunks in by_file.values():
        group.append(file_chunks)
        if sum(map(len, group)) >= batch_size:
            yield group
            group = []
    if group:
        yield group


def _write_chunks(store, chunks, *, batch_size: int, progress: bool) -> None:
    """Embed ``chunks`` in batches (a progress bar over chunks) and write each file's chunks in one upsert."""
    from .progress import progress as progress_bar

    collection = store._collection  # the raw collection takes precomputed vectors; add_texts would re-embed
    with progress_bar(total=len(chunks), desc="embedding", unit="chunk", disable=not progress or not chunks) as bar:
        for group in _file_groups(chunks, batch_size):
            vectors = store.embeddings.embed_documents([c.page_content for fc in group for c in fc])
            start = 0
            for fc in group:  # one write per file: a file is either fully in or detectably incomplete
                collection.upsert(ids=[_chunk_id(c) for c in fc], documents=[c.page_content for c in fc],
                                  metadatas=[c.metadata for c in fc], embeddings=vectors[start:start + len(fc)])
                start += len(fc)
            bar.update(start)


def _chunk_id(chunk) -> str:
    meta = chunk.metadata
    return f"{meta['source']}::{meta['key']}::{meta['chunk']}"


def build_vectorstore(source, persist_dir: str | Path, *, patterns=None, config: SplitConfig = SplitConfig(),
                      embeddings=None, collection: str = COLLECTION, batch_size: int = 64,
                      progress: bool = True):
    """Index ``source`` (a folder or files) into a Chroma store on disk, incrementally: ``(store, report)``.

    Re-running adds only new or changed files, removes chunks of deleted files, and completes
    what an interrupted run left unfinished; it never duplicates chunks. With several folders,
    each file's ``source`` keeps its folder's name (see ``load_documents``); a store built from a
    list of folders before sources did so is re-indexed once by its next build.
    """
    paths, persist_dir = _check_source(source), _check_store_dir(persist_dir)
    _check_config(config)
    _check_embeddings(embeddings)
    if not is_whole(batch_size) or batch_size < 1:
        raise CourseError(f"batch_size={batch_size!r}: use a whole number of chunks per embedding batch, "
                          "1 or more (default 64).")
    if patterns is None:
        patterns = default_patterns(source) if isinstance(source, (str, Path)) else DEFAULT_PATTERNS
    patterns, skipped = _check_patterns(patterns), []
    docs = _load(paths, patterns, skipped)
    if not docs and skipped:
        raise CourseError(f"No file in {_where(paths)} could be read ({len(skipped)} skipped), e.g. "
                          f"{skipped[0]}. Fix or convert them (each has a warning above), then build again.")
    stores = [p for p in paths if (p / "chroma.sqlite3").is_file()]
    if not docs and stores:
        raise CourseError(f"{show_path(stores[0])} is a vector store, not a knowledge base: the arguments go "
                          "build_vectorstore(KB_DIR, STORE_DIR), the folder of documents first.")
    if not docs:
        raise CourseError(f"No readable files matching {', '.join(patterns)} in {_where(paths)}; "
                          "check KB_DIR and the patterns.")
    store = _open_store(_client(persist_dir), persist_dir, embeddings, collection, create=True)
    _mark_store(persist_dir)  # also marks a store built before the marker existed
    state, report = indexed_files(store), BuildReport()
    pending = _plan(docs, state, config, report)
    report.removed = sorted(set(state) - {d.metadata["source"] for d in docs})
    _delete_sources(store, state, report.removed + report.updated, report)
    chunks = split_documents(pending, config)
    _write_chunks(store, chunks, batch_size=batch_size, progress=progress)
    report.chunks_added = len(chunks)
    final = indexed_files(store)
    report.total_files, report.total_chunks = len(final), sum(e["count"] for e in final.values())
    return store, report


def load_vectorstore(persist_dir: str | Path, *, embeddings=None, collection: str = COLLECTION):
    """Open a store that ``build_vectorstore`` persisted (in this or another process)."""
    persist_dir = _check_store_dir(persist_dir)
    _check_embeddings(embeddings)
    if not (persist_dir / "chroma.sqlite3").is_file():
        raise CourseError(f"No vector store in {show_path(persist_dir)}; build one with "
                          "build_vectorstore(KB_DIR, STORE_DIR).")
    return _open_store(_client(persist_dir), persist_dir, embeddings, collection, create=False)
