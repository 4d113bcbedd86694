"""The pins students install: the CPU lock matches this venv, the GPU lock resolves for CUDA."""

import re
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, ver = line.partition("==")
            assert ver, f"{path.name}: {line!r} is not an exact pin"
            pins[name.lower()] = ver
    return pins


def test_cpu_lock_is_exact_and_installed():
    pins = _pins(ROOT / "requirements/cpu.txt")
    assert pins["torch"] == "2.13.0", "the CPU lock must pin the local CPU wheel"
    for name in ("transformers", "peft", "langchain", "chromadb", "nbval", "lagent", "cachetools"):
        assert version(name) == pins[name], f"{name} in the venv differs from requirements/cpu.txt"


def test_gpu_lock_has_lmdeploy_constraints():
    pins = _pins(ROOT / "requirements/gpu.txt")
    assert pins["lmdeploy"].startswith("0.18.")
    torch = tuple(int(x) for x in re.findall(r"\d+", pins["torch"])[:3])
    assert torch <= (2, 12, 1), "lmdeploy 0.18 needs torch<=2.12.1"
    assert tuple(int(x) for x in pins["peft"].split(".")) <= (0, 14, 0)
    assert "triton" in pins and any(n.startswith("nvidia-") for n in pins)


@pytest.mark.slow
def test_gpu_lock_resolves_for_linux_cuda():
    sys.path.insert(0, str(ROOT / "tools"))
    from lock_gpu import resolve

    resolved = resolve(ROOT / "requirements/gpu.txt")
    assert resolved == _pins(ROOT / "requirements/gpu.txt"), "the lock is not closed under its deps"
