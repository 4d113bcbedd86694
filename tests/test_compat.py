"""course_utils.compat on whichever transformers this env has: the CPU lock runs this file with 5.x,
`make sim` with the InternStudio lock's 4.48."""

import json
import shutil

import pytest
import torch

from course_utils import CourseError, compat


def test_version_is_read_from_the_installed_package():
    import transformers

    assert ".".join(map(str, compat.transformers_version())) == ".".join(transformers.__version__.split(".")[:2])


def test_dtype_reaches_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **compat.dtype_kwargs(torch.bfloat16))
    assert model.dtype == torch.bfloat16  # 4.48 silently ignores dtype= and would load fp32


@pytest.fixture
def written_by_5x(tmp_path, tiny_model_dir):
    """The converted SmolLM2 folder as transformers 5.x writes it (weights linked, not copied)."""
    folder = tmp_path / "smollm2"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix == ".safetensors":
            (folder / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy(f, folder / f.name)
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    tok.pop("model_input_names", None)
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok, "tokenizer_class": "TokenizersBackend"}))
    config = json.loads((folder / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "torch_dtype"):
        config.pop(key, None)
    config.update(rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, dtype="float32")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    return folder


def test_make_portable_lets_this_transformers_read_a_5x_folder(written_by_5x):
    from transformers import AutoConfig, AutoTokenizer

    assert compat.make_portable(written_by_5x) is True
    assert compat.make_portable(written_by_5x) is False  # idempotent: nothing left to change
    config = AutoConfig.from_pretrained(written_by_5x)
    # What the model will use: 5.x reads rope_parameters, 4.x rope_theta (default 10000 when missing).
    theta = config.rope_parameters["rope_theta"] if compat.transformers_version() >= (5, 0) else config.rope_theta
    assert theta == 100000.0
    tok = AutoTokenizer.from_pretrained(written_by_5x)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n"
    assert set(tok("Hi")) == {"input_ids", "attention_mask"}  # no token_type_ids for generate() to reject


def test_warmup_share_reaches_the_scheduler(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], **compat.warmup_kwargs(0.1))
    assert args.get_warmup_steps(200) == 20


def test_remote_internlm2_code_is_refused_only_where_it_breaks(tmp_path):
    config = {"model_type": "internlm2", "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.X"}}
    if compat.transformers_version() <= compat.REMOTE_CODE_LAST_GOOD:
        compat.check_remote_code(tmp_path, config)
    else:
        with pytest.raises(CourseError, match="environment.yml"):
            compat.check_remote_code(tmp_path, config)
    compat.check_remote_code(tmp_path, {"model_type": "llama"})  # native models load on any major


def test_serving_backend_matches_what_this_env_has(monkeypatch):
    from course_utils import serving

    monkeypatch.setattr(serving, "_has_cuda", lambda: False)
    if compat.has_serve_cli():
        assert serving.choose_backend("auto") == "transformers"
    else:
        with pytest.raises(CourseError, match="transformers serve"):
            serving.choose_backend("auto")


def test_four_bit_on_the_cpu_only_where_bitsandbytes_can(monkeypatch):
    from course_utils import models

    monkeypatch.setattr(models, "_cuda_available", lambda: False)
    if compat.bnb_4bit_on_cpu():
        return  # tests/test_models.py loads and trains 4-bit on the CPU
    with pytest.raises(CourseError, match="bitsandbytes >= 0.46"):
        models.load_model("smollm2-135m-instruct", quantization="4bit")


@pytest.mark.parametrize("kind", ["bf16", "int8", "quanto-int4"])
def test_caches_hold_what_generation_wrote(tiny_model, kind):
    from course_utils import kvcache as kv

    model, tok = tiny_model
    ids = tok("The sea is", return_tensors="pt").input_ids
    cache = kv.make_cache(kind, model.config)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    assert cache.get_seq_length() == out.shape[1] - 1  # the last token is never fed back
    assert len(compat.cache_layer_tensors(cache)) == model.config.num_hidden_layers
    assert kv.cache_bytes(cache) > 0


def test_which_folders_run_their_own_code():
    internlm2 = {"model_type": "internlm2", "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.X"}}
    internlm3 = {"model_type": "internlm3", "auto_map": {"AutoModelForCausalLM": "modeling_internlm3.X"}}
    assert compat.use_remote_code(internlm2) and not compat.use_remote_code({"model_type": "internlm2"})
    assert compat.use_remote_code(internlm3) == (compat.transformers_version() < (5, 0))  # native in 5.x
    assert not compat.use_remote_code({"model_type": "llama", "auto_map": {}})  # other code is never trusted
