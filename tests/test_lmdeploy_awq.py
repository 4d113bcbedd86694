"""LMDeploy's auto_awq job on any machine: the command lines, the checks, and the local calibration
blocks. LMDeploy itself is not in the CPU env: the simulation stage (tests/sim/test_lmdeploy.py,
`make sim`) parses the commands with the pinned package and runs ``auto_awq`` for real."""

import pytest
import torch

from course_utils import CourseError
from course_utils import lmdeploy_awq as la


@pytest.fixture
def job(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("The river winds across the plain. " * 40, encoding="utf-8")
    return la.AwqJob(model="/share/m/internlm2_5-1_8b-chat", work_dir="w4", calib_file=str(calib))


def test_cli_and_offline_commands(job):
    cli = la.auto_awq_cli(job)
    assert cli[:4] == ["lmdeploy", "lite", "auto_awq", job.model]
    assert cli[cli.index("--w-group-size") + 1] == "128" and "--search-scale" not in cli
    off = la.offline_awq_command(la.AwqJob(**{**vars(job), "search_scale": True}))
    assert off[1:4] == ["-m", "course_utils.lmdeploy_awq", "auto_awq"]
    assert off[off.index("--calib-file") + 1] == job.calib_file and off[-1] == "--search-scale"


def test_offline_command_parses_back_to_the_same_job(job, monkeypatch):
    seen = []
    monkeypatch.setattr(la, "run_auto_awq", lambda j: seen.append(j) or j.work_dir)
    la._main(la.offline_awq_command(job)[3:])
    assert seen == [job]


def test_the_offline_command_is_a_runnable_module(job):
    import subprocess

    cmd = la.offline_awq_command(job)[:4] + ["--help"]  # python -m <module> auto_awq --help
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--calib-file" in done.stdout, done.stderr[-2000:]


def test_kwargs_name_a_calibration_set_lmdeploy_accepts(job):
    kwargs = la.auto_awq_kwargs(job)
    assert kwargs["calib_dataset"] == la.ONLINE_CALIB == "wikitext2" and "calib_file" not in kwargs
    assert kwargs["device"] == "cuda" and kwargs["w_group_size"] == 128


@pytest.mark.parametrize("change,match", [({"w_group_size": 100}, "w_group_size"), ({"w_bits": 8}, "w_bits"),
                                          ({"calib_file": "missing.txt"}, "not found"),
                                          ({"dtype": "fp8"}, "dtype"), ({"device": "npu"}, "device")])
def test_bad_jobs(job, change, match):
    with pytest.raises(CourseError, match=match):
        la.check_job(la.AwqJob(**{**vars(job), **change}))


def test_calib_blocks_from_a_local_file(job, tiny_model):
    _, tok = tiny_model
    blocks = la.calib_blocks(tok, job.calib_file, nsamples=3, seqlen=64)
    assert len(blocks) == 3 and all(b.shape == (1, 64) for b in blocks)
    one = la.calib_blocks(tok, job.calib_file, nsamples=128, seqlen=100_000)  # file shorter than a block
    assert len(one) == 1 and one[0].shape[1] == len(tok(open(job.calib_file).read()).input_ids)
    loader = la.local_calib_loader(job.calib_file)
    data, test = loader("wikitext2", tok, nsamples=2, seqlen=32)
    assert test is None and torch.cat(data).shape == (2, 32)  # tests/sim runs LMDeploy's calibrate on it


def test_no_cuda_means_a_course_error(job, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CourseError, match="CUDA"):
        la.run_auto_awq(job)
