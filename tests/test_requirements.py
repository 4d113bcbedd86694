"""The pins students install: the CPU lock is cpu.in's closure and .venv; the GPU lock resolves for CUDA."""

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import lock  # noqa: E402  (tools/lock.py, the generator of both locks)


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
    installed = {name: version(name).removesuffix("+cpu") for name in pins}
    assert installed == pins, "the venv differs from requirements/cpu.txt: make setup"


def _top_level(path: Path) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def _needed(requirements: list[Requirement]) -> dict[str, str]:
    """{package: who asks for it} for all that ``requirements`` pull in, per the venv's metadata."""
    askers, seen, todo = {}, set(), [(r, "requirements/cpu.in") for r in requirements]
    while todo:
        req, asker = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        askers.setdefault(name, asker)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # not installed: the test reports it as needed but not locked
        envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]  # markers like `extra == "serving"`
        for dep in map(Requirement, dist.requires or []):
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                todo.append((dep, name))
    return askers


def test_cpu_lock_is_the_closure_of_cpu_in():
    """What cpu.in asks for, transitively, is exactly what cpu.txt pins (make lock keeps them so)."""
    top = _top_level(ROOT / "requirements/cpu.in")
    pins = {canonicalize_name(n): v for n, v in _pins(ROOT / "requirements/cpu.txt").items()}
    needed = {n: who for n, who in _needed(top).items() if n not in lock.VENV_TOOLS}
    unlocked = {name: asker for name, asker in needed.items() if name not in pins}
    assert not unlocked, "needed (by whom), not locked: make lock"
    orphans = sorted(set(pins) - set(needed))
    assert not orphans, "locked, but nothing in requirements/cpu.in needs it: make lock"
    for req in top:
        assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), \
            f"requirements/cpu.txt pins {req.name} {pins[canonicalize_name(req.name)]}, outside {req}"


@pytest.mark.slow
def test_cpu_lock_is_what_the_generator_writes():
    """tools/lock.py cpu resolves cpu.in (with the current pins) into this very file (needs PyPI)."""
    cpu = lock.LOCKS["cpu"]
    assert lock.generate(cpu, "3.11") == cpu.target.read_text(), "requirements/cpu.txt is stale: make lock"


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
    gpu = lock.LOCKS["gpu"]
    resolved = lock.resolve(gpu, gpu.target)
    assert resolved == _pins(ROOT / "requirements/gpu.txt"), "the lock is not closed under its deps"
