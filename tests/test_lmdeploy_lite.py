"""LMDeploy paths without a GPU: every argument checked, LMDeploy itself replaced by fakes."""

import sys
import types

import pytest
import torch

from course_utils import CourseError
from course_utils import lmdeploy_lite as ll
from course_utils.memory import GIB, INTERNLM2_5, kv_bytes_per_token, weight_memory

# auto_awq's parameters in lmdeploy 0.18 (lmdeploy/lite/apis/auto_awq.py)
AUTO_AWQ_PARAMS = {"model", "work_dir", "calib_dataset", "calib_samples", "batch_size", "calib_seqlen",
                   "w_bits", "w_sym", "w_group_size", "search_scale", "device", "revision", "dtype",
                   "clamp_zeros", "download_dir"}


@pytest.fixture
def job(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("The river winds across the plain. " * 40, encoding="utf-8")
    return ll.AwqJob(model="/share/m/internlm2_5-1_8b-chat", work_dir="w4", calib_file=str(calib))


def test_cli_and_offline_commands(job):
    cli = ll.auto_awq_cli(job)
    assert cli[:4] == ["lmdeploy", "lite", "auto_awq", job.model]
    assert cli[cli.index("--w-group-size") + 1] == "128" and "--search-scale" not in cli
    off = ll.offline_awq_command(ll.AwqJob(**{**vars(job), "search_scale": True}))
    assert off[1:4] == ["-m", "course_utils.lmdeploy_lite", "auto_awq"]
    assert off[off.index("--calib-file") + 1] == job.calib_file and off[-1] == "--search-scale"


def test_offline_command_parses_back_to_the_same_job(job, monkeypatch):
    seen = []
    monkeypatch.setattr(ll, "run_auto_awq", lambda j: seen.append(j) or j.work_dir)
    ll._main(ll.offline_awq_command(job)[3:])
    assert seen == [job]


def test_kwargs_fit_lmdeploys_signature(job):
    kwargs = ll.auto_awq_kwargs(job)
    assert set(kwargs) <= AUTO_AWQ_PARAMS
    assert kwargs["calib_dataset"] == "ptb" and kwargs["w_group_size"] == 128


@pytest.mark.parametrize("change,match", [({"w_group_size": 100}, "w_group_size"), ({"w_bits": 8}, "w_bits"),
                                          ({"calib_file": "missing.txt"}, "not found"),
                                          ({"dtype": "fp8"}, "dtype")])
def test_bad_jobs(job, change, match):
    with pytest.raises(CourseError, match=match):
        ll.check_job(ll.AwqJob(**{**vars(job), **change}))


def test_calib_blocks_from_a_local_file(job, tiny_model):
    _, tok = tiny_model
    blocks = ll.calib_blocks(tok, job.calib_file, nsamples=3, seqlen=64)
    assert len(blocks) == 3 and all(b.shape == (1, 64) for b in blocks)
    one = ll.calib_blocks(tok, job.calib_file, nsamples=128, seqlen=100_000)  # file shorter than a block
    assert len(one) == 1 and one[0].shape[1] == len(tok(open(job.calib_file).read()).input_ids)
    loader = ll.local_calib_loader(job.calib_file)
    data, test = loader("ptb", tok, nsamples=2, seqlen=32)
    assert test is None and torch.cat(data).shape == (2, 32)  # what LMDeploy's calibrate does with it


def test_no_cuda_means_a_course_error(job, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CourseError, match="CUDA"):
        ll.run_auto_awq(job)
    with pytest.raises(CourseError, match="CUDA"):
        ll.make_pipeline("m", quant_policy=8)


def _fake_lmdeploy(monkeypatch):
    """Install a fake ``lmdeploy`` package that records what it is called with."""
    calls = {}
    calibrate = types.ModuleType("lmdeploy.lite.apis.calibrate")
    calibrate.get_calib_loaders = original = lambda *a, **k: "hub download"
    awq = types.ModuleType("lmdeploy.lite.apis.auto_awq")

    def auto_awq(model, **kwargs):
        calls["awq"] = (model, kwargs, calibrate.get_calib_loaders("ptb", calls["tok"], 2, 0, 16))

    awq.auto_awq = auto_awq
    top, lite, apis = (types.ModuleType(n) for n in ("lmdeploy", "lmdeploy.lite", "lmdeploy.lite.apis"))
    top.TurbomindEngineConfig = lambda **kw: ("engine", kw)
    top.pipeline = lambda model, backend_config: calls.setdefault("pipeline", (model, backend_config))
    top.lite, lite.apis, apis.calibrate, apis.auto_awq = lite, apis, calibrate, awq
    for mod in (top, lite, apis, calibrate, awq):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(ll, "require_lmdeploy", lambda what="": None)
    return calls, calibrate, original


def test_run_auto_awq_feeds_local_blocks_then_restores_the_loader(job, monkeypatch, tiny_model):
    calls, calibrate, original = _fake_lmdeploy(monkeypatch)
    calls["tok"] = tiny_model[1]
    assert str(ll.run_auto_awq(job)) == "w4"
    model, kwargs, (blocks, _) = calls["awq"]
    assert model == job.model and kwargs["work_dir"] == "w4" and kwargs["device"] == "cuda"
    assert len(blocks) == 2 and blocks[0].shape == (1, 16)  # local text, not "hub download"
    assert calibrate.get_calib_loaders is original


def test_make_pipeline_passes_the_engine_config(monkeypatch):
    calls, _, _ = _fake_lmdeploy(monkeypatch)
    ll.make_pipeline("w4", model_format="awq", quant_policy=8, cache_max_entry_count=0.4)
    assert calls["pipeline"] == ("w4", ("engine", {"quant_policy": 8, "cache_max_entry_count": 0.4,
                                                   "model_format": "awq", "tp": 1}))


@pytest.mark.parametrize("kwargs,match", [({"quant_policy": 2}, "quant_policy"),
                                          ({"cache_max_entry_count": 1.5}, "cache_max_entry_count"),
                                          ({"model_format": "gguf"}, "model_format"), ({"tp": 3}, "tp=3")])
def test_engine_config_checks(kwargs, match):
    with pytest.raises(CourseError, match=match):
        ll.engine_config(**kwargs)


def test_kv_cache_plan_on_a_10_percent_a100():
    s = INTERNLM2_5["InternLM2.5-1.8B"]
    plan = ll.kv_cache_plan(s, 8, cache_max_entry_count=0.4)
    free = 8 - weight_memory(s, "fp16") / GIB - 1.0
    assert plan["KV cache (GiB)"] == round(0.4 * free, 2)
    assert plan["KV tokens"] == int(0.4 * free * GIB / kv_bytes_per_token(s))
    int8 = ll.kv_cache_plan(s, 8, cache_max_entry_count=0.4, quant_policy=8)
    assert int8["KV tokens"] in (2 * plan["KV tokens"], 2 * plan["KV tokens"] + 1)
    with pytest.raises(CourseError, match="does not fit"):
        ll.kv_cache_plan(INTERNLM2_5["InternLM2.5-20B"], 8)


def test_gpu_variants_table_with_a_fake_engine(monkeypatch):
    calls, _, _ = _fake_lmdeploy(monkeypatch)
    sys.modules["lmdeploy"].GenerationConfig = lambda **kw: kw
    made = []

    class Pipe:
        def __init__(self, model, backend_config):
            self.cfg, self.closed = backend_config[1], False
            made.append(self)

        def __call__(self, prompts, gen_config):
            assert gen_config == {"max_new_tokens": 8, "top_k": 1}
            return [types.SimpleNamespace(text="hi", generate_token_len=8) for _ in prompts]

        def close(self):
            self.closed = True

    sys.modules["lmdeploy"].pipeline = Pipe
    monkeypatch.setattr(ll, "gpu_memory_used_mib", lambda: 1234)
    table = ll.gpu_variants_table("fp16-dir", "awq-dir", ["a", "b"], max_new_tokens=8)
    assert list(table.index) == ["fp16", "KV int8", "W4A16", "W4A16 + KV int8"]
    assert [p.cfg.get("model_format") for p in made] == [None, None, "awq", "awq"]
    assert [p.cfg["quant_policy"] for p in made] == [0, 8, 0, 8] and all(p.closed for p in made)
    assert (table["tokens"] == 16).all() and (table["GPU memory (MiB)"] == 1234).all()


def test_gpu_memory_needs_nvidia_smi(monkeypatch):
    import subprocess

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(CourseError, match="nvidia-smi"):
        ll.gpu_memory_used_mib()
