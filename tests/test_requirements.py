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


def _v(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_gpu_lock_is_the_toolchain_that_agrees():
    """The version facts behind the one InternStudio env (docs/architecture.md, "One env")."""
    pins = _pins(ROOT / "requirements/gpu.txt")
    assert (pins["xtuner"], pins["transformers"], pins["bitsandbytes"], pins["mmengine"]) == \
        ("0.2.0", "4.48.0", "0.45.0", "0.10.6"), "xtuner 0.2.0 pins these exactly"
    assert pins["lmdeploy"].startswith("0.10."), "lmdeploy 0.12+ needs transformers>=4.52"
    assert pins["opencompass"] == "0.5.4" and _v(pins["numpy"]) < (2,)
    assert _v(pins["torch"]) <= (2, 5, 1) and _v(pins["triton"]) < (3, 2), \
        "bitsandbytes 0.45.0 imports triton.ops, which triton 3.2 (torch 2.6) removed"
    assert _v(pins["peft"]) <= (0, 14, 0), "lmdeploy pins peft<=0.14.0"
    assert _v(pins["pyarrow"]) < (26,) and _v(pins["setuptools"]) < (82,)  # numpy<2; pkg_resources for mmengine
    assert any(n.startswith("nvidia-") and n.endswith("-cu12") for n in pins)


@pytest.mark.slow
def test_gpu_lock_resolves_for_linux_cuda():
    sys.path.insert(0, str(ROOT / "tools"))
    from lock_gpu import resolve

    resolved = resolve(ROOT / "requirements/gpu.txt")
    assert resolved == _pins(ROOT / "requirements/gpu.txt"), "the lock is not closed under its deps"
