"""LMDeploy's command lines, engine settings and KV-cache plans on any machine. LMDeploy itself is not
in the CPU env: the simulation stage (tests/sim/test_lmdeploy.py, `make sim`) checks them against the
pinned package."""

import pytest
import torch

from course_utils import CourseError
from course_utils import lmdeploy_lite as ll
from course_utils.memory import GIB, INTERNLM2_5, kv_bytes_per_token, weight_memory


def test_no_cuda_means_a_course_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
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
