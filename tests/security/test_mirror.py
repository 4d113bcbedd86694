"""hub.serve_mirror stays inside its root (issue #13): real HTTP requests against a real mirror.

Every route (model and dataset ``resolve``, ``api/models`` and ``api/datasets`` ``revision`` and
``tree``) is attacked with absolute paths, ``..`` (plain, %-encoded, double-encoded), backslashes,
NUL bytes and symlinks that lead out of the root. Each must answer 404 without a trace of the
secret file that lies next to the root. Requests go through http.client, which sends the path
byte for byte (requests/urllib3 would remove the ``..`` segments before they reach the server).
"""

import hashlib
import http.client
import warnings
from urllib.parse import quote, urlparse

import pytest

from course_utils import hub
from course_utils.errors import CourseError

SECRET_NAME = "secret-outside.txt"
SECRET_TEXT = "course-secret-4b1d9e"
CONFIG = b'{"model_type": "llama"}'
WEIGHTS = bytes(range(256)) * 16


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_layout(base):
    """``base/outside/secret`` next to ``base/mirror``: a model, a dataset, and symlinks out."""
    outside, root = base / "outside", base / "mirror"
    outside.mkdir()
    (outside / SECRET_NAME).write_text(SECRET_TEXT)
    model = root / "course" / "toy"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_bytes(CONFIG)
    (model / "sub" / "weights.bin").write_bytes(WEIGHTS)
    (model / "alias.json").symlink_to("config.json")  # a link that stays inside: allowed
    (model / "leak.txt").symlink_to(outside / SECRET_NAME)  # a file link out of the root
    (model / "linkdir").symlink_to(outside, target_is_directory=True)  # a folder link out
    (root / "course" / "escape").symlink_to(outside, target_is_directory=True)  # a repo that is a link out
    dataset = root / "datasets" / "course" / "toyset"
    dataset.mkdir(parents=True)
    (dataset / "data.csv").write_text("a,b\n1,2\n")
    (root / "datasets" / "course" / "escape").symlink_to(outside, target_is_directory=True)
    return root, outside


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root, outside = make_layout(tmp_path_factory.mktemp("site"))
    with hub.serve_mirror(root) as mirror:
        yield mirror, outside


def fetch(endpoint: str, path: str, method: str = "GET"):
    """``(status, headers and body as text)`` for ``path`` sent exactly as written."""
    url = urlparse(endpoint)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        headers = "\n".join(f"{k}: {v}" for k, v in response.getheaders())
        return response.status, headers + "\n" + body.decode("latin-1"), body
    finally:
        conn.close()


def enc(text: str) -> str:
    """Every character that could split or climb a path, %-encoded."""
    return quote(text, safe="")


# Attack paths; {secret} is the secret's absolute path, {outside} its folder's, both starting with "/".
UP_FROM_MODEL = "../../../outside/" + SECRET_NAME  # mirror/course/toy -> base
UP_FROM_DATASET = "../../../../outside/" + SECRET_NAME  # mirror/datasets/course/toyset -> base
ATTACKS = {
    # model resolve: /<org>/<name>/resolve/<revision>/<file>
    "resolve-double-slash-absolute": "/course/toy/resolve/main/{secret}",
    "resolve-%2F-absolute": "/course/toy/resolve/main/{secret_enc}",
    "resolve-dotdot": "/course/toy/resolve/main/" + UP_FROM_MODEL,
    "resolve-%2e%2e": "/course/toy/resolve/main/" + UP_FROM_MODEL.replace("..", "%2e%2e"),
    "resolve-%2e%2e-%2F": "/course/toy/resolve/main/" + enc(UP_FROM_MODEL).replace(".", "%2e"),
    "resolve-double-encoded-%252e": "/course/toy/resolve/main/" + UP_FROM_MODEL.replace("..", "%252e%252e"),
    "resolve-double-encoded-%252F": "/course/toy/resolve/main/" + enc(enc(UP_FROM_MODEL)),
    "resolve-backslash-%5C": "/course/toy/resolve/main/" + UP_FROM_MODEL.replace("/", "%5C"),
    "resolve-backslash-raw": "/course/toy/resolve/main/" + UP_FROM_MODEL.replace("/", "\\"),
    "resolve-symlink-file": "/course/toy/resolve/main/leak.txt",
    "resolve-symlink-folder": f"/course/toy/resolve/main/linkdir/{SECRET_NAME}",
    "resolve-symlink-repo": f"/course/escape/resolve/main/{SECRET_NAME}",
    "resolve-nul": f"/course/toy/resolve/main/leak.txt%00config.json",
    "resolve-nul-dotdot": "/course/toy/resolve/main/%00/" + UP_FROM_MODEL,
    "resolve-empty-segment": "/course/toy/resolve/main/sub//weights.bin",
    "resolve-dot-segment": "/course/toy/resolve/main/./config.json",
    "resolve-repo-dotdot": f"/course/../../outside/resolve/main/{SECRET_NAME}",
    "resolve-repo-%2F-absolute": "/{outside_enc}/resolve/main/" + SECRET_NAME,
    # dataset resolve: /datasets/<org>/<name>/resolve/<revision>/<file>
    "dataset-resolve-double-slash-absolute": "/datasets/course/toyset/resolve/main/{secret}",
    "dataset-resolve-%2F-absolute": "/datasets/course/toyset/resolve/main/{secret_enc}",
    "dataset-resolve-dotdot": "/datasets/course/toyset/resolve/main/" + UP_FROM_DATASET,
    "dataset-resolve-%2e%2e": "/datasets/course/toyset/resolve/main/" + enc(UP_FROM_DATASET).replace(".", "%2e"),
    "dataset-resolve-%252e": "/datasets/course/toyset/resolve/main/" + UP_FROM_DATASET.replace("..", "%252e%252e"),
    "dataset-resolve-backslash": "/datasets/course/toyset/resolve/main/" + UP_FROM_DATASET.replace("/", "%5C"),
    "dataset-resolve-symlink-repo": f"/datasets/course/escape/resolve/main/{SECRET_NAME}",
    "dataset-resolve-nul": "/datasets/course/toyset/resolve/main/data.csv%00",
    # api/models: /api/models/<repo>/revision/<rev> and /api/models/<repo>/tree/<rev>[/<path>]
    "api-models-revision-double-slash-absolute": "/api/models/{outside}/revision/main",
    "api-models-tree-double-slash-absolute": "/api/models/{outside}/tree/main",
    "api-models-tree-%2F-absolute": "/api/models/{outside_enc}/tree/main",
    "api-models-revision-%2F-absolute": "/api/models/{outside_enc}/revision/main",
    "api-models-tree-dotdot": "/api/models/../../outside/tree/main",
    "api-models-tree-dotdot-up-only": "/api/models/../../../tree/main",
    "api-models-tree-%2e%2e": "/api/models/%2e%2e/%2e%2e/outside/tree/main",
    "api-models-tree-%252e": "/api/models/%252e%252e/%252e%252e/outside/tree/main",
    "api-models-tree-backslash": "/api/models/..%5C..%5Coutside/tree/main",
    "api-models-tree-symlink-repo": "/api/models/course/escape/tree/main",
    "api-models-revision-symlink-repo": "/api/models/course/escape/revision/main",
    "api-models-tree-nul": "/api/models/course/toy%00/tree/main",
    "api-models-tree-subpath-dotdot": "/api/models/course/toy/tree/main/../../../outside",
    "api-models-tree-subpath-absolute": "/api/models/course/toy/tree/main/{outside_enc}",
    "api-models-tree-subpath-symlink": "/api/models/course/toy/tree/main/linkdir",
    # api/datasets: the same routes for datasets
    "api-datasets-tree-double-slash-absolute": "/api/datasets/{outside}/tree/main",
    "api-datasets-revision-%2F-absolute": "/api/datasets/{outside_enc}/revision/main",
    "api-datasets-tree-dotdot": "/api/datasets/../../outside/tree/main",
    "api-datasets-tree-%2e%2e": "/api/datasets/%2e%2e%2F%2e%2e%2Foutside/tree/main",
    "api-datasets-tree-%252e": "/api/datasets/%252e%252e/%252e%252e/outside/tree/main",
    "api-datasets-tree-backslash": "/api/datasets/..\\..\\outside/tree/main",
    "api-datasets-tree-symlink-repo": "/api/datasets/course/escape/tree/main",
    "api-datasets-revision-symlink-repo": "/api/datasets/course/escape/revision/main",
}


def assert_no_trace(text: str, outside) -> None:
    secret = (outside / SECRET_NAME).read_bytes()
    for trace in (SECRET_TEXT, SECRET_NAME, str(outside), git_blob_sha(secret), "leak.txt", "linkdir"):
        assert trace not in text, f"{trace!r} leaked"


@pytest.mark.parametrize("template", ATTACKS.values(), ids=ATTACKS.keys())
def test_attack_answers_404_without_a_trace_of_the_secret(site, template):
    mirror, outside = site
    secret = outside / SECRET_NAME
    path = template.format(secret=secret, secret_enc=enc(str(secret)), outside=outside,
                           outside_enc=enc(str(outside)))
    status, text, _ = fetch(mirror.endpoint, path)
    assert status == 404, text[:300]
    assert_no_trace(text, outside)


def test_head_of_a_symlink_out_is_404_too(site):
    mirror, outside = site
    status, text, _ = fetch(mirror.endpoint, "/course/toy/resolve/main/leak.txt", "HEAD")
    assert status == 404
    assert_no_trace(text, outside)


def test_legitimate_downloads_still_work(site):
    mirror, _ = site
    status, text, body = fetch(mirror.endpoint, "/course/toy/resolve/main/config.json")
    assert status == 200 and body == CONFIG and f'"{git_blob_sha(CONFIG)}"' in text
    assert fetch(mirror.endpoint, "/course/toy/resolve/main/sub/weights.bin")[2] == WEIGHTS
    assert fetch(mirror.endpoint, "/course/toy/resolve/main/alias.json")[2] == CONFIG  # link inside the root
    assert fetch(mirror.endpoint, "/course/toy/resolve/main/sub%2Fweights.bin")[2] == WEIGHTS  # an encoded "/" is a "/"
    assert fetch(mirror.endpoint, "/datasets/course/toyset/resolve/main/data.csv")[2] == b"a,b\n1,2\n"
    status, text, _ = fetch(mirror.endpoint, "/course/toy/resolve/main/config.json", "HEAD")
    assert status == 200 and "X-Repo-Commit" in text


def test_listings_show_the_repo_but_not_links_out_of_it(site):
    mirror, outside = site
    import json

    status, text, body = fetch(mirror.endpoint, "/api/models/course/toy/revision/main")
    assert status == 200
    assert sorted(s["rfilename"] for s in json.loads(body)["siblings"]) == [
        "alias.json", "config.json", "sub/weights.bin"]
    status, text, body = fetch(mirror.endpoint, "/api/models/course/toy/tree/main")
    assert status == 200 and {e["path"] for e in json.loads(body)} == {"alias.json", "config.json",
                                                                         "sub/weights.bin"}
    assert_no_trace(text, outside)
    status, _, body = fetch(mirror.endpoint, "/api/models/course/toy/tree/main/sub")
    assert status == 200 and [e["path"] for e in json.loads(body)] == ["sub/weights.bin"]
    status, _, body = fetch(mirror.endpoint, "/api/datasets/course/toyset/tree/main")
    assert status == 200 and [e["path"] for e in json.loads(body)] == ["data.csv"]


def test_the_real_client_snapshots_the_repo_without_the_links_out(site, tmp_path):
    mirror, _ = site
    dest = hub.snapshot("course/toy", tmp_path / "toy", endpoint=mirror.endpoint)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")
                   if p.is_file() and ".cache" not in p.parts)
    assert files == ["alias.json", "config.json", "sub/weights.bin"]
    assert (dest / "config.json").read_bytes() == CONFIG


# ---- who may connect -----------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", "", "192.0.2.10", "::", "example.org"])
def test_a_non_loopback_host_needs_expose(tmp_path, host):
    (tmp_path / "course" / "toy").mkdir(parents=True)
    with pytest.raises(CourseError, match="expose=True"):
        hub.serve_mirror(tmp_path, host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_needs_no_expose_and_warns_nothing(tmp_path, host):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hub.serve_mirror(tmp_path, host=host, port=0) as mirror:
            assert fetch(mirror.endpoint, "/nothing")[0] == 404


def test_expose_warns_and_serves_every_interface(tmp_path):
    make_layout(tmp_path)
    with pytest.warns(UserWarning, match="every machine"):
        mirror = hub.serve_mirror(tmp_path / "mirror", host="0.0.0.0", port=0, expose=True)
    with mirror:
        port = urlparse(mirror.endpoint).port
        status, _, body = fetch(f"http://127.0.0.1:{port}", "/course/toy/resolve/main/config.json")
        assert status == 200 and body == CONFIG
        assert fetch(f"http://127.0.0.1:{port}", "/course/toy/resolve/main/leak.txt")[0] == 404
