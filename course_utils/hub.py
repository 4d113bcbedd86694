"""Model-hub downloads (Hugging Face or ModelScope, mirrors honoured) and a local hub mirror.

``serve_mirror(root)`` answers the few URLs the real ``huggingface_hub`` client asks for
(``resolve``, ``api/models/.../revision``, ``api/models/.../tree``), so the lesson and the tests
run the genuine download code offline. It listens on loopback (this machine only) and serves only
files under ``root``; ``expose=True`` lets a classroom without internet share one copy.
Layout of ``root``: ``<org>/<name>/<files>`` for models, ``datasets/<org>/<name>/...`` for datasets.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from .errors import CourseError
from .memory import count_parameters

SOURCES = ("hf", "modelscope")
# ModelScope publishes the InternLM models under the lab's name; the mirror keeps one folder per model.
MODELSCOPE_ORGS = {"Shanghai_AI_Laboratory": "internlm"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
HF_MIRROR = "https://hf-mirror.com"  # the mirror the bootcamp uses in mainland China
COMPLETE_MARKER = ".course-complete"  # written last, so a half-downloaded or half-converted folder is never used


def downloads_allowed() -> bool:
    """Hub downloads happen only when ``HF_HUB_OFFLINE`` is off (the tiny profile turns it on)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "false", "no", "")


def hub_source(source: str | None = None) -> str:
    """The hub to use: ``source``, else ``COURSE_HUB``, else Hugging Face."""
    chosen = (source or os.environ.get("COURSE_HUB") or "hf").lower()
    if chosen not in SOURCES:
        raise CourseError(f"Hub source {chosen!r} is unknown: use 'hf' or 'modelscope' "
                          "(argument source= or environment variable COURSE_HUB).")
    return chosen


def hf_endpoint(endpoint: str | None = None) -> str:
    """The Hugging Face endpoint: the argument, else ``HF_ENDPOINT`` (read now), else the hub."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _is_loopback(url: str) -> bool:
    return urlparse(url).hostname in LOOPBACK_HOSTS


@contextlib.contextmanager
def _hf_online(endpoint: str):
    """Lift ``HF_HUB_OFFLINE`` for a loopback mirror only; explain how to go online otherwise."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        yield
        return
    if not _is_loopback(endpoint):
        raise CourseError(
            f"Downloads are off (HF_HUB_OFFLINE=1; the tiny profile sets it), so {endpoint} is not "
            "contacted. To download, start Python with HF_HUB_OFFLINE=0 (in mainland China also "
            f"HF_ENDPOINT={HF_MIRROR}, or COURSE_HUB=modelscope), or serve a local copy with "
            "course_utils.hub.serve_mirror(folder) and pass endpoint=mirror.endpoint.")
    constants.HF_HUB_OFFLINE = False  # a loopback mirror is not the internet
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = True


def _network_error(exc: Exception, where: str) -> CourseError:
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)):
        what = str(exc).strip().splitlines()[-1]
        return CourseError(f"{where} has no such thing ({type(exc).__name__}: {what}). Check the "
                           "repository id, the file name and the revision.")
    return CourseError(f"Could not download from {where} ({type(exc).__name__}: {exc}). If the hub "
                       f"is unreachable, set HF_ENDPOINT={HF_MIRROR} or COURSE_HUB=modelscope, or "
                       "check the repository and file names.")


@contextlib.contextmanager
def _no_progress_bars():
    """Silence both clients' bars: a notebook would store a half-drawn bar for a 1 KB file."""
    from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                       enable_progress_bars)

    was_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:  # modelscope draws with its module's own tqdm and has no switch for single files
        import modelscope_hub._download as ms_download
    except ImportError:
        ms_download = None
    bar = getattr(ms_download, "tqdm", None)
    if bar is not None:
        ms_download.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            ms_download.tqdm = bar
        if not was_off:
            enable_progress_bars()


def download(repo_id: str, filename: str, *, source: str | None = None, endpoint: str | None = None,
             revision: str | None = None, cache_dir: str | Path | None = None,
             progress: bool = True) -> Path:
    """Download one file of a model repository (with a progress bar unless ``progress=False``);
    its local path."""
    with contextlib.nullcontext() if progress else _no_progress_bars():
        return _download(repo_id, filename, source, endpoint, revision, cache_dir)


def _download(repo_id, filename, source, endpoint, revision, cache_dir) -> Path:
    if hub_source(source) == "modelscope":
        return _modelscope_file(repo_id, filename, revision, cache_dir, endpoint)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = hf_endpoint(endpoint)
    with _hf_online(endpoint):
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=endpoint,
                                        cache_dir=cache_dir))
        except (HfHubHTTPError, OSError) as exc:
            raise _network_error(exc, endpoint) from exc


def _require_modelscope_online() -> None:
    if not downloads_allowed():
        raise CourseError("Downloads are off (HF_HUB_OFFLINE=1; the tiny profile sets it): start "
                          "Python with HF_HUB_OFFLINE=0 to download from ModelScope.")


def _modelscope_file(repo_id: str, filename: str, revision: str | None, cache_dir,
                     endpoint: str | None = None) -> Path:
    from modelscope.hub.file_download import model_file_download

    if not (endpoint and _is_loopback(endpoint)):  # a loopback mirror is not the internet
        _require_modelscope_online()
    try:
        return Path(model_file_download(repo_id, filename, revision=revision or "master",
                                        cache_dir=None if cache_dir is None else str(cache_dir),
                                        endpoint=endpoint and endpoint.rstrip("/")))
    except Exception as exc:  # modelscope raises plain requests/HTTP errors
        raise _network_error(exc, "ModelScope") from exc


def snapshot(repo_id: str, dest: Path, *, source: str | None = None, endpoint: str | None = None,
             revision: str | None = None) -> Path:
    """Download a whole repository into ``dest`` (re-running resumes an interrupted download)."""
    if hub_source(source) == "modelscope":
        from modelscope import snapshot_download as ms_snapshot

        _require_modelscope_online()
        try:
            return Path(ms_snapshot(repo_id, revision=revision or "master", local_dir=str(dest)))
        except Exception as exc:
            raise _network_error(exc, "ModelScope") from exc
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = hf_endpoint(endpoint)
    with _hf_online(endpoint):
        try:
            return Path(snapshot_download(repo_id, revision=revision, local_dir=dest,
                                          endpoint=endpoint))
        except (HfHubHTTPError, OSError) as exc:
            raise _network_error(exc, endpoint) from exc


def download_model(spec, dest: Path, *, source: str | None = None,
                   endpoint: str | None = None) -> Path:
    """Snapshot a registry model into ``dest`` atomically: a partial folder is never used."""
    source = hub_source(source)
    repo_id = spec.modelscope_id if source == "modelscope" else spec.hf_id
    if not repo_id:
        raise CourseError(f"{spec.name} has no {source} id: use COURSE_HUB=hf.")
    partial = dest.with_name(dest.name + ".partial")  # stable name, so a re-run resumes it
    partial.parent.mkdir(parents=True, exist_ok=True)
    snapshot(repo_id, partial, source=source, endpoint=endpoint)
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's resume bookkeeping
    (partial / COMPLETE_MARKER).write_text(f"downloaded {repo_id} from {source}\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(partial, dest)
    return dest


# ---- the local mirror ----------------------------------------------------------------------------

def _git_blob_sha(data: bytes) -> str:
    # The hub's ETag for a small (non-LFS) file is its git blob id.
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _stays_in(path: Path, root: Path) -> bool:
    """Whether ``path``, symlinks followed, lies under ``root`` (itself resolved)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: not a file to serve
        return False


def _repo_files(repo_dir: Path, root: Path | None = None) -> list[Path]:
    """The repo's files; hidden ones, and links that lead out of ``root`` (default: the repo), left out."""
    root = root or repo_dir.resolve()
    return sorted(p for p in repo_dir.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and _stays_in(p, root))


def _commit_sha(repo_dir: Path, root: Path | None = None) -> str:
    """A stable fake commit id: the same files give the same id, a changed file a new one."""
    digest = hashlib.sha1()
    for path in _repo_files(repo_dir, root):
        digest.update(path.relative_to(repo_dir).as_posix().encode() + b"\0")
        digest.update(_git_blob_sha(path.read_bytes()).encode())
    return digest.hexdigest()


_API = re.compile(r"^/api/(models|datasets)/(.+?)/(revision|tree)/([^/]+)(?:/(.*))?$")
# ModelScope's file download: /api/v1/models/<org>/<name>/repo?Revision=master&FilePath=<file>
_MODELSCOPE_FILE = re.compile(r"^/api/v1/models/([^/]+)/([^/]+)/repo$")


def _request_path(raw: str) -> str:
    """The URL path of a request line, %-decoded once (``%252e`` stays the literal name ``%2e``).

    Not urlparse: it reads a path starting with ``//`` as a host name.
    """
    return unquote(raw.split("?", 1)[0].split("#", 1)[0])


def _plain_parts(relative: str) -> list[str] | None:
    """The segments of a relative path, or None if any could leave a folder or hide something.

    Refused: absolute paths and ``//`` (empty segments), ``.`` and ``..``, backslashes (a
    separator to some tools) and control characters (NUL ends a C string; no hub file name has one).
    """
    parts = relative.split("/")
    if any(p in ("", ".", "..") or "\\" in p or any(ord(c) < 32 or ord(c) == 127 for c in p)
           for p in parts):
        return None
    return parts


def _inside(root: Path, base: Path, relative: str) -> Path | None:
    """``base / relative`` with symlinks resolved, if it still lies under ``root``; else None."""
    parts = _plain_parts(relative)
    if parts is None:
        return None
    path = base.joinpath(*parts)
    return path.resolve() if _stays_in(path, root) else None


def send_json(handler: BaseHTTPRequestHandler, payload, status: int = 200, headers: dict | None = None) -> None:
    """Answer an HTTP request with ``payload`` as JSON (no body for HEAD requests)."""
    body = json.dumps(payload).encode()
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


class _MirrorHandler(BaseHTTPRequestHandler):
    root: Path
    requests: list

    def log_message(self, fmt, *args):  # keep a record for the lesson instead of stderr noise
        self.requests.append(f"{self.command} {_request_path(self.path)}")

    def _repo_dir(self, kind: str, repo_id: str) -> Path | None:
        base = self.root / "datasets" if kind == "datasets" else self.root
        folder = _inside(self.root, base, repo_id)
        return folder if folder is not None and folder.is_dir() else None

    def _error(self, status: int, code: str, message: str) -> None:
        # huggingface_hub maps X-Error-Code to RepoNotFound etc. Messages never repeat the request:
        # a refused path and a missing file look the same, and nothing reaches the headers raw.
        send_json(self, {"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message})

    def _json(self, payload) -> None:
        send_json(self, payload)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = _request_path(self.path)
        match = _API.match(path)
        if match:
            return self._api(*match.groups())
        match = _MODELSCOPE_FILE.match(path)
        if match:
            return self._modelscope(*match.groups())
        if path.startswith("/") and "/resolve/" in path:
            repo_part, rest = path[1:].split("/resolve/", 1)  # one "/" only: "//etc" stays refused
            kind = "datasets" if repo_part.startswith("datasets/") else "models"
            revision, _, filename = rest.partition("/")
            return self._resolve(kind, repo_part.removeprefix("datasets/"), revision, filename)
        self._error(404, "EntryNotFound", "Not a hub URL this mirror knows")

    def _checked_repo(self, kind: str, repo_id: str, revision: str) -> Path | None:
        repo = self._repo_dir(kind, repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not in this mirror")
        elif revision not in ("main", _commit_sha(repo, self.root)):
            self._error(404, "RevisionNotFound", "Revision not in this mirror")
            return None
        return repo

    def _api(self, kind, repo_id, action, revision, subpath):
        repo = self._checked_repo(kind, repo_id, revision)
        if repo is None:
            return
        files = _repo_files(repo, self.root)
        if action == "revision":
            return self._json({"id": repo_id, "sha": _commit_sha(repo, self.root), "private": False,
                               "siblings": [{"rfilename": p.relative_to(repo).as_posix()}
                                            for p in files]})
        subpath = (subpath or "").rstrip("/")  # a trailing "/" names the same folder
        if subpath and _inside(self.root, repo, subpath) is None:
            return self._error(404, "EntryNotFound", "Path not in this mirror")
        names = [p.relative_to(repo).as_posix() for p in files]
        self._json([{"type": "file", "path": name, "size": p.stat().st_size,
                     "oid": _git_blob_sha(p.read_bytes())}
                    for p, name in zip(files, names)
                    if not subpath or name == subpath or name.startswith(subpath + "/")])

    def _modelscope(self, org, name):
        """A file the way the ``modelscope`` client asks for it; the same files as the HF layout."""
        query = parse_qs(self.path.split("?", 1)[1] if "?" in self.path else "")
        revision = query.get("Revision", ["master"])[0]
        filename = query.get("FilePath", [""])[0]
        return self._resolve("models", f"{MODELSCOPE_ORGS.get(org, org)}/{name}",
                             "main" if revision == "master" else revision, filename)

    def _resolve(self, kind, repo_id, revision, filename):
        repo = self._checked_repo(kind, repo_id, revision)
        if repo is None:
            return
        file = _inside(self.root, repo, filename)
        if file is None or not file.is_file():
            return self._error(404, "EntryNotFound", "File not in this mirror")
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", _commit_sha(repo, self.root))
        self.send_header("ETag", f'"{_git_blob_sha(data)}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)


@dataclass
class Mirror:
    """A running local hub mirror; ``endpoint`` goes into ``HF_ENDPOINT`` or ``endpoint=``."""

    root: Path
    endpoint: str
    requests: list = field(default_factory=list)  # "GET /path" lines, in order
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Shut the mirror down."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "Mirror":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _check_host(host: str, expose: bool) -> None:
    """Loopback needs nothing; any other address only on purpose (``expose=True``), with a warning."""
    if host.lower() in LOOPBACK_HOSTS:
        return
    if not expose:
        raise CourseError(
            f"serve_mirror(host={host!r}) would let other machines download every file in the mirror "
            "folder. Keep the default host='127.0.0.1' (this machine only), or pass expose=True to "
            "share the mirror on purpose.")
    warnings.warn(f"The hub mirror listens on {host or 'every interface'}: every machine that can reach "
                  "this host can download the mirror's files. Serve only a folder you mean to share.",
                  UserWarning, stacklevel=3)


def serve_mirror(root: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 expose: bool = False) -> Mirror:
    """Serve ``root`` (default: the course's ``data/hub_mirror``) in the hub's URL layout.

    By default only this machine can connect (loopback). To share one copy with a classroom, pass
    the address to listen on (``host="0.0.0.0"``: every interface) and ``expose=True``; then every
    machine that can reach this one can download every file under ``root``. Paths that lead out
    of ``root`` (``..``, absolute paths, symlinks) are answered 404 either way.
    """
    from .paths import DATA_DIR

    _check_host(host, expose)
    root = Path(root or DATA_DIR / "hub_mirror").resolve()
    if not root.is_dir():
        raise CourseError(f"Mirror folder {root} does not exist: pass a folder laid out as "
                          "<org>/<name>/<files>.")
    requests: list[str] = []
    handler = type("Handler", (_MirrorHandler,), {"root": root, "requests": requests})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise CourseError(f"Cannot listen on {host}:{port} ({exc}): pass another port, or port=0 "
                          "for any free one.") from exc
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return Mirror(root, f"http://{host}:{server.server_address[1]}", requests, server)


def mirror_repos(root: str | Path | None = None) -> list[str]:
    """The model repository ids a mirror folder holds (``<org>/<name>`` folders with files)."""
    from .paths import DATA_DIR

    root = Path(root or DATA_DIR / "hub_mirror")
    return sorted({f"{org.name}/{repo.name}" for org in root.iterdir() if org.is_dir()
                   and org.name != "datasets" for repo in org.iterdir() if repo.is_dir()})


# ---- what the downloaded config files tell ------------------------------------------------------

def weights_summary(config_path: str | Path, index_path: str | Path) -> dict:
    """Parameter count from the config, checked against the weight index's byte total."""
    config = json.loads(Path(config_path).read_text())
    index = json.loads(Path(index_path).read_text())
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2)
    params = count_parameters(config)  # course_utils.memory: the one parameter formula
    total = index["metadata"]["total_size"]
    return {"parameters": params, "dtype": dtype, "index_total_bytes": total,
            "index_parameters": total // bytes_per,
            "shards": len(set(index["weight_map"].values())),
            "tensors": len(index["weight_map"]), "weights_GiB": round(total / 2**30, 2)}
