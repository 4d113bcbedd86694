"""LMDeploy's argument builders on any machine. LMDeploy itself is not in the CPU env: the simulation
stage (tests/sim/test_lmdeploy.py, `make sim`) checks them against the pinned package and runs
``auto_awq`` for real."""

import pytest
import torch

from course_utils import CourseError
from course_utils import lmdeploy_lite as ll
from course_utils.memory import GIB, INTERNLM2_5, kv_bytes_per_token, weight_memory

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


def test_kwargs_name_a_calibration_set_lmdeploy_accepts(job):
    kwargs = ll.auto_awq_kwargs(job)
    assert kwargs["calib_dataset"] == ll.ONLINE_CALIB == "wikitext2" and "calib_file" not in kwargs
    assert kwargs["device"] == "cuda" and kwargs["w_group_size"] == 128


@pytest.mark.parametrize("change,match", [({"w_group_size": 100}, "w_group_size"), ({"w_bits": 8}, "w_bits"),
                                          ({"calib_file": "missing.txt"}, "not found"),
                                          ({"dtype": "fp8"}, "dtype"), ({"device": "npu"}, "device")])
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
    data, test = loader("wikitext2", tok, nsamples=2, seqlen=32)
    assert test is None and torch.cat(data).shape == (2, 32)  # tests/sim runs LMDeploy's calibrate on it


def test_no_cuda_means_a_course_error(job, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CourseError, match="CUDA"):
        ll.run_auto_awq(job)
    with pytest.raises(CourseError, match="CUDA"):
        ll.make_pipeline("m", quant_policy=8)


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


def test_gpu_memory_needs_nvidia_smi(monkeypatch):
    import subprocess

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(CourseError, match="nvidia-smi"):
        ll.gpu_memory_used_mib()


def test_chat_command_carries_the_engine_settings():
    cmd = ll.chat_cli("/share/m", quant_policy=8, cache_max_entry_count=0.4)
    assert cmd == ["lmdeploy", "chat", "/share/m", "--backend", "turbomind", "--quant-policy", "8",
                   "--cache-max-entry-count", "0.4"]
    assert cmd == ll.chat_cli("/share/m", quant_policy=8, cache_max_entry_count=0.4, tp=1)  # the default stays implicit
    awq = ll.chat_cli("/share/w4", model_format="awq", tp=2, session_len=4096)
    assert awq[awq.index("--model-format") + 1] == "awq" and awq[awq.index("--tp") + 1] == "2"
    assert awq[awq.index("--session-len") + 1] == "4096"


@pytest.mark.parametrize("kwargs, match", [({"quant_policy": 2}, "quant_policy=2"),
                                           ({"cache_max_entry_count": 1.5}, "cache_max_entry_count"),
                                           ({"backend": "vllm"}, "backend='vllm'"),
                                           ({"backend": "pytorch", "model_format": "awq"}, "TurboMind option")])
def test_chat_command_checks(kwargs, match):
    with pytest.raises(CourseError, match=match):
        ll.chat_cli("/share/m", **kwargs)


def test_quant_policy_table_doubles_the_tokens_per_halving():
    table = ll.quant_policy_table(INTERNLM2_5["InternLM2.5-1.8B"], 8, cache_max_entry_count=0.4)
    assert table.index.tolist() == [0, 8, 4]
    tokens = table["KV tokens"]
    assert abs(tokens[8] / tokens[0] - 2) < 0.01 and abs(tokens[4] / tokens[8] - 2) < 0.01
    assert table.loc[8, "bytes per K/V value"] == 1 and "int4" in table.loc[4, "KV cache"]
