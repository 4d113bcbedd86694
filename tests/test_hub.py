"""hub: the real huggingface_hub client against the local mirror, errors, and model snapshots."""

import json

import pytest

from course_utils import hub, memory
from course_utils.errors import CourseError
from course_utils.hub import COMPLETE_MARKER
from course_utils.models import ModelSpec
from course_utils.paths import DATA_DIR

REPO = "internlm/internlm2-chat-1_8b"
REPO_20B = "internlm/internlm-20b"  # the bootcamp's homework downloads its config.json


@pytest.fixture(scope="module")
def mirror():
    with hub.serve_mirror() as m:
        yield m


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE as the tiny profile sets it (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_the_real_client_downloads_from_the_mirror(mirror, tmp_path, offline):
    path = hub.download(REPO, "config.json", endpoint=mirror.endpoint, cache_dir=tmp_path)
    assert path.read_bytes() == (DATA_DIR / "hub_mirror" / REPO / "config.json").read_bytes()
    assert f"GET /{REPO}/resolve/main/config.json" in mirror.requests
    assert path.is_relative_to(tmp_path) and "snapshots" in path.parts


def test_hf_endpoint_is_read_at_call_time(mirror, tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_ENDPOINT", mirror.endpoint)
    assert hub.hf_endpoint() == mirror.endpoint
    path = hub.download(REPO, "model.safetensors.index.json", cache_dir=tmp_path)
    assert json.loads(path.read_text())["metadata"]["total_size"] == 3_778_220_032


def test_offline_without_a_mirror_says_what_to_set(tmp_path, monkeypatch, offline):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    with pytest.raises(CourseError, match="HF_HUB_OFFLINE=0") as err:
        hub.download(REPO, "config.json", cache_dir=tmp_path)
    assert "hf-mirror.com" in str(err.value) and "serve_mirror" in str(err.value)


def test_missing_repo_and_file_are_clear_errors(mirror, tmp_path, offline):
    with pytest.raises(CourseError, match="RepositoryNotFound"):
        hub.download("internlm/no-such-model", "config.json", endpoint=mirror.endpoint,
                     cache_dir=tmp_path)
    with pytest.raises(CourseError, match="EntryNotFound"):
        hub.download(REPO, "tokenizer.model", endpoint=mirror.endpoint, cache_dir=tmp_path)


def test_unknown_source_is_rejected(monkeypatch):
    monkeypatch.setenv("COURSE_HUB", "github")
    with pytest.raises(CourseError, match="'hf' or 'modelscope'"):
        hub.hub_source()


def _toy_mirror(root):
    repo = root / "course" / "toy-model"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "llama"}')
    (repo / "sub").mkdir()
    (repo / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    return repo


def test_download_model_snapshots_atomically(tmp_path, offline):
    _toy_mirror(tmp_path / "mirror")
    spec = ModelSpec("toy", "chat", "course/toy-model")
    dest = tmp_path / "cache" / "models" / "toy"
    with hub.serve_mirror(tmp_path / "mirror") as m:
        got = hub.download_model(spec, dest, endpoint=m.endpoint)
    assert got == dest and (dest / COMPLETE_MARKER).is_file()
    assert (dest / "sub" / "weights.bin").read_bytes() == bytes(range(256)) * 64
    assert not dest.with_name("toy.partial").exists() and not (dest / ".cache").exists()


def test_models_resolve_downloads_through_hub_when_allowed(tmp_path, monkeypatch, offline):
    from course_utils.models import resolve

    mirror_root = tmp_path / "mirror"
    repo = mirror_root / "maidalun1020" / "bce-embedding-base_v1"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text("{}")
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COURSE_SHARE_ROOTS", str(tmp_path / "no-share"))
    monkeypatch.delenv("COURSE_MODEL_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # downloads allowed (hub.downloads_allowed)
    with hub.serve_mirror(mirror_root) as m:
        monkeypatch.setenv("HF_ENDPOINT", m.endpoint)
        folder = resolve("bce-embedding-base_v1")
    assert folder == tmp_path / "cache" / "models" / "bce-embedding-base_v1"
    assert (folder / "config.json").is_file() and (folder / COMPLETE_MARKER).is_file()


def test_modelscope_source_uses_the_modelscope_id(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "snapshot", lambda repo_id, dest, **kw: calls.append((repo_id, kw))
                        or dest.mkdir(parents=True, exist_ok=True))
    monkeypatch.setenv("COURSE_HUB", "modelscope")
    spec = ModelSpec("m", "chat", "internlm/internlm2_5-1_8b-chat",
                     "Shanghai_AI_Laboratory/internlm2_5-1_8b-chat")
    hub.download_model(spec, tmp_path / "m")
    assert calls == [("Shanghai_AI_Laboratory/internlm2_5-1_8b-chat", {"source": "modelscope",
                                                                       "endpoint": None})]
    with pytest.raises(CourseError, match="no modelscope id"):
        hub.download_model(ModelSpec("x", "chat", "a/b"), tmp_path / "x")


def test_mirror_layout_and_weights_summary(mirror):
    assert hub.mirror_repos() == [REPO_20B, REPO]
    folder = DATA_DIR / "hub_mirror" / REPO
    summary = hub.weights_summary(folder / "config.json", folder / "model.safetensors.index.json")
    # InternLM2-chat-1.8B: 1.89 B parameters in bf16 = the index's byte total / 2, in 2 shards.
    assert summary["parameters"] == summary["index_parameters"] == 1_889_110_016
    assert summary["shards"] == 2 and summary["tensors"] == 24 * 7 + 3


def test_mirror_rejects_unknown_urls(mirror):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(mirror.endpoint + f"/{REPO}/resolve/main/../../../etc/passwd")
    assert err.value.code == 404


def test_modelscope_refuses_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CourseError, match="ModelScope"):
        hub.download("Shanghai_AI_Laboratory/internlm2-chat-1_8b", "config.json",
                     source="modelscope", cache_dir=tmp_path)
    with pytest.raises(CourseError, match="ModelScope"):
        hub.snapshot("Shanghai_AI_Laboratory/internlm2-chat-1_8b", tmp_path / "m",
                     source="modelscope")


def test_internlm_20b_config_counts_to_its_published_weights(mirror, tmp_path, offline):
    """The mirror's copy of InternLM-20B's config.json is the published file: the real client serves it
    unchanged, and the parameters it implies fill exactly the bytes of the published weight index."""
    path = hub.download(REPO_20B, "config.json", endpoint=mirror.endpoint, cache_dir=tmp_path)
    config = json.loads(path.read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("internlm", 60, 5120)
    assert memory.count_parameters(config) == 20_088_714_240
    # total_size of pytorch_model.bin.index.json in internlm/internlm-20b (bf16, 5 shards)
    assert 2 * memory.count_parameters(config) == 40_177_428_480


def test_the_real_modelscope_client_downloads_from_the_mirror(mirror, tmp_path, monkeypatch):
    """modelscope's own model_file_download, against the mirror's ModelScope URL layout (offline)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # downloads are off: only the loopback mirror is allowed
    path = hub.download("Shanghai_AI_Laboratory/internlm-20b", "config.json", source="modelscope",
                        endpoint=mirror.endpoint, cache_dir=tmp_path)
    assert path.read_bytes() == (DATA_DIR / "hub_mirror" / REPO_20B / "config.json").read_bytes()
    assert path.is_relative_to(tmp_path)
    assert "GET /api/v1/models/Shanghai_AI_Laboratory/internlm-20b/repo" in mirror.requests
    with pytest.raises(CourseError, match="ModelScope"):
        hub.download("Shanghai_AI_Laboratory/internlm-20b", "tokenizer.model", source="modelscope",
                     endpoint=mirror.endpoint, cache_dir=tmp_path)


def test_modelscope_layout_refuses_paths_out_of_the_mirror(mirror):
    import urllib.error
    import urllib.request

    for bad in ("../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{mirror.endpoint}/api/v1/models/Shanghai_AI_Laboratory/"
                                   f"internlm-20b/repo?Revision=master&FilePath={bad}")
        assert err.value.code == 404


def test_progress_false_leaves_no_bar_in_the_output(mirror, tmp_path, monkeypatch, capsys):
    """A notebook stores whatever a bar drew: progress=False keeps a small download's output clean."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for n, progress in enumerate((True, False)):
        hub.download("Shanghai_AI_Laboratory/internlm-20b", "config.json", source="modelscope",
                     endpoint=mirror.endpoint, cache_dir=tmp_path / str(n), progress=progress)
        drawn = "%|" in capsys.readouterr().err
        assert drawn == progress
