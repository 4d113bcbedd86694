import subprocess
import sys

import pytest

from course_utils import CourseError, env, models


def test_detect_reports_this_machine():
    facts = env.detect()
    assert facts.cpu_cores >= 1 and facts.ram_gb > 0
    assert facts.python.startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert facts.torch is not None
    if not facts.cuda:
        assert facts.gpu_name is None and facts.gpu_memory_gb is None


def test_profile_override_and_offline_default(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "tiny")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert env.profile() == "tiny"
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1", "the tiny profile must switch the hub off"
    monkeypatch.setenv("COURSE_PROFILE", "InternStudio")
    assert env.profile() == "internstudio"


def test_profile_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "gpu")
    with pytest.raises(CourseError, match="tiny, internstudio"):
        env.profile()


def test_profile_detects_tiny_without_cuda(monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    monkeypatch.setattr(env, "detect", lambda: env.Platform("3.11", "Linux", 2, 8.0, "2", False,
                                                            None, None, True))
    assert env.profile() == "tiny"


def test_share_roots_override(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_SHARE_ROOTS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert env.share_roots() == [tmp_path / "a", tmp_path / "b"]
    (tmp_path / "b").mkdir()
    assert env.detect().internstudio


def test_doctor_table_lists_packages_and_models():
    table = models.doctor()
    assert table.loc["profile", "value"] in env.PROFILES
    assert table.loc["transformers", "value"][0].isdigit()
    assert table.loc["model: all-minilm-l6-v2", "value"] == "bundled"
    assert table.loc["model: internlm2_5-7b-chat", "value"] in ("missing", "share", "cache")


def test_doctor_command_line():
    out = subprocess.run([sys.executable, "-m", "course_utils", "doctor"], capture_output=True,
                         text=True, check=True).stdout
    assert "profile" in out and "model: smollm2-135m-instruct" in out


# ---- torch's thread count on a shared machine ----------------------------------------------------
BUSY = "print('ready', flush=True)\nwhile True:\n    pass"  # one thread, always runnable


@pytest.fixture
def restore_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_course_threads_fixes_the_count(monkeypatch, restore_threads):
    import torch

    monkeypatch.setenv(env.THREADS_ENV, "1")
    assert env.configure_threads() == 1 and torch.get_num_threads() == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(env.THREADS_ENV, bad)
        with pytest.raises(CourseError, match="whole number of threads"):
            env.configure_threads()


def test_threads_leave_the_cores_other_jobs_hold(monkeypatch, restore_threads):
    """More running jobs than the host has CPUs: one thread, not a spinning pair."""
    import os

    import torch

    monkeypatch.delenv(env.THREADS_ENV, raising=False)
    cpus = os.cpu_count()  # the host's: procs_running counts them all
    jobs = [subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
            for _ in range(cpus + 1)]
    try:
        assert all(job.stdout.readline().strip() == "ready" for job in jobs)
        assert env.busy_cpus() >= cpus + 1
        assert env.configure_threads() == 1 and torch.get_num_threads() == 1
    finally:
        for job in jobs:
            job.kill()
            job.wait()


@pytest.mark.slow
def test_a_model_load_sets_the_thread_count(tiny_model_dir, monkeypatch, restore_threads):
    import torch

    torch.set_num_threads(2)
    monkeypatch.setenv(env.THREADS_ENV, "1")
    models.load_model(tiny_model_dir)
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("files, cpus", [
    ({"cpu.max": "250000 100000\n"}, 2.5),                                  # cgroup v2, a pod's limit
    ({"cpu.max": "max 100000\n"}, None),                                    # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.5),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage"}, None), ({}, None)])
def test_cpu_quota_of_a_container(tmp_path, files, cpus):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert env.cpu_quota(tmp_path) == cpus


def test_a_quota_caps_the_usable_cpus(monkeypatch):
    import os

    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(env, "cpu_quota", lambda: 0.5)
    assert env.usable_cpus() == 1
    monkeypatch.setattr(env, "cpu_quota", lambda: affinity + 8.0)
    assert env.usable_cpus() == affinity  # a quota above the mask does not add CPUs
    monkeypatch.setattr(env, "cpu_quota", lambda: None)
    assert env.usable_cpus() == affinity
