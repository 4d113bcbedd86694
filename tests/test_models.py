"""Where models are found (in order), the one-time GGUF conversion, and the errors a learner sees."""

import json
import struct
from pathlib import Path

import pytest

from course_utils import CourseError, hub, models


@pytest.fixture
def places(tmp_path, monkeypatch):
    """An empty course cache, share roots and COURSE_MODEL_DIR under tmp_path."""
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COURSE_SHARE_ROOTS", str(tmp_path / "share"))
    monkeypatch.delenv("COURSE_MODEL_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_resolution_order(places, monkeypatch):
    name = "internlm2_5-1_8b-chat"
    cached = _model_folder(places / "cache/models" / name)
    (cached / hub.COMPLETE_MARKER).write_text("")
    assert models.resolve(name) == cached
    share = _model_folder(places / "share/Shanghai_AI_Laboratory" / name)
    assert models.resolve(name) == share, "the InternStudio share comes before the cache"
    monkeypatch.setenv("COURSE_MODEL_DIR", str(places / "mine"))
    mine = _model_folder(places / "mine" / name)
    assert models.resolve(name) == mine, "COURSE_MODEL_DIR comes before the share"
    explicit = _model_folder(places / "explicit")
    assert models.resolve(explicit) == explicit, "an explicit folder always wins"


def test_incomplete_cache_folder_is_ignored(places):
    half = _model_folder(places / "cache/models/internlm2_5-7b-chat")  # no completion marker
    assert half.is_dir()
    assert models.locate("internlm2_5-7b-chat") == ("missing", None)


def test_missing_model_error_lists_places_and_fix(places):
    with pytest.raises(CourseError) as err:
        models.resolve("internlm2_5-7b-chat")
    msg = str(err.value)
    assert "share/Shanghai_AI_Laboratory/internlm2_5-7b-chat" in msg
    assert "cache/models/internlm2_5-7b-chat" in msg
    assert "COURSE_MODEL_DIR" in msg and "HF_HUB_OFFLINE" in msg


def test_hub_is_used_only_when_downloads_are_allowed(places, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "download_model", lambda spec, dest: calls.append((spec.name, dest)) or dest)
    with pytest.raises(CourseError):
        models.resolve("internlm2-chat-1_8b")
    assert calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert models.resolve("internlm2-chat-1_8b") == places / "cache/models/internlm2-chat-1_8b"
    assert calls and calls[0][0] == "internlm2-chat-1_8b"


def test_unknown_name_and_missing_path(places):
    with pytest.raises(CourseError, match="smollm2-135m-instruct"):
        models.resolve("gpt-5")
    with pytest.raises(CourseError, match="does not exist"):
        models.resolve(str(places / "nowhere"))


def test_a_big_model_on_a_cpu_machine_points_to_the_tiny_profile(places, monkeypatch):
    monkeypatch.setattr(models, "_cuda_available", lambda: False)
    folder = _model_folder(places / "share/Shanghai_AI_Laboratory/internlm2_5-7b-chat")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    size = int(3.5 * 2**30)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [size // 2],
                               "data_offsets": [0, size // 2 * 2]}}).encode()
    with open(folder / "model-00001-of-00002.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)  # a real header: the file is not cut short
        f.truncate(8 + len(header) + size)  # sparse: 3.5 GB on paper, nothing on disk
    with pytest.raises(CourseError, match="3.5 GB of weights.*COURSE_PROFILE=tiny"):
        models.load_model("internlm2_5-7b-chat")


def test_a_folder_without_config_is_named(places):
    folder = places / "empty"
    folder.mkdir()
    with pytest.raises(CourseError, match=r"'.*/empty' is empty: it needs config\.json"):
        models.load_model(folder)
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(CourseError, match=r"'.*/empty' has no config\.json"):
        models.load_model(folder)


def test_bad_quantization_value():
    with pytest.raises(CourseError, match="4bit"):
        models.load_model("smollm2-135m-instruct", quantization="int3")


def test_embedding_path_is_the_bundled_minilm(embedding_dir):
    assert (embedding_dir / "config.json").is_file()
    assert any(embedding_dir.glob("*.safetensors")) or any(embedding_dir.glob("*.bin"))


@pytest.mark.slow
def test_conversion_is_atomic_and_runs_once(places, monkeypatch):
    import transformers

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt  # the learner presses Stop after the weights were written

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", crash)
        with pytest.raises(KeyboardInterrupt):
            models.resolve("smollm2-135m-instruct")
    assert models.locate("smollm2-135m-instruct")[0] == "bundled", "a half cache was used"
    assert not list((places / "cache/models").glob("*")), "half-written files left behind"

    folder = models.resolve("smollm2-135m-instruct")
    assert folder == places / "cache/models/smollm2-135m-instruct"
    assert (folder / hub.COMPLETE_MARKER).is_file() and (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.resolve("smollm2-135m-instruct") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp, "converted twice"


@pytest.mark.slow
def test_tiny_model_answers(tiny_model):
    model, tok = tiny_model
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_four_bit_load_disables_cpu_repacking(tiny_model_dir):
    import bitsandbytes as bnb

    model, _ = models.load_model(tiny_model_dir, quantization="4bit", device="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 30 * 7  # q,k,v,o,gate,up,down in each of 30 layers
    assert all(layer.support_avx512bf16_for_cpu is False for layer in layers)
