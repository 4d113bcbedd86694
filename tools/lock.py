"""Generate the exact locks from the top-level requirements with pip's resolver (pip --dry-run).

    python tools/lock.py cpu              # re-lock requirements/cpu.txt from requirements/cpu.in (make lock)
    python tools/lock.py gpu              # re-lock requirements/gpu.txt from requirements/gpu.in
    python tools/lock.py cpu --upgrade    # resolve afresh: the newest versions the .in allows
    python tools/lock.py gpu --check      # resolve requirements/gpu.txt as is (what the test does)

A re-lock keeps every version the current lock pins (it is passed as pip constraints), so adding a
line to an .in adds that package and its new dependencies and moves nothing else; --upgrade drops them.
The CPU lock is resolved for the Python that runs this (make lock: .venv's 3.11); the GPU lock for
InternStudio's platform without a GPU, which pip can only do with --only-binary=:all:, so the
pure-Python packages that ship only as sdists are built into py3-none-any wheels first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                 "manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux1_x86_64",
                 "linux_x86_64", "any"]
# Left to the venv, as pip freeze leaves them: pip installs what torch and modelscope ask of setuptools.
VENV_TOOLS = {"pip", "setuptools"}


@dataclass(frozen=True)
class Lock:
    """One lock: requirements/{name}.in resolved into requirements/{name}.txt."""

    name: str
    header: str  # the lock's comment lines; {py} is the Python version
    foreign_platform: bool = False  # resolve for GPU_PLATFORMS, not this machine
    sdist_only: tuple[str, ...] = ()  # built into wheels first (foreign platform only)
    keep_venv_tools: bool = True  # pin pip/setuptools too where a resolve pulls them in
    cpu_torch: bool = False  # torch must resolve to the +cpu build; pinned without the tag

    @property
    def source(self) -> Path:
        return ROOT / "requirements" / f"{self.name}.in"

    @property
    def target(self) -> Path:
        return ROOT / "requirements" / f"{self.name}.txt"


LOCKS = {
    "cpu": Lock("cpu", keep_venv_tools=False, cpu_torch=True, header="""\
# Exact CPU lock for the tiny profile (Python {py}, linux x86_64). Tested: 2 cores, no GPU, offline.
# Generated from requirements/cpu.in by `make lock` (tools/lock.py cpu): edit the .in, not this file.
# torch is the CPU build, pinned without its +cpu tag; pip and setuptools are left to the venv.
# tests/test_requirements.py checks this lock against cpu.in and the installed .venv.
"""),
    "gpu": Lock("gpu", foreign_platform=True, header="""\
# Exact GPU lock for the internstudio profile: CUDA 12 wheels, linux x86_64, Python {py}.
# One env for the whole InternLM toolchain: xtuner 0.2.0 (transformers==4.48.0), lmdeploy 0.10.2
# (torch<=2.8.0, peft<=0.14.0), opencompass 0.5.4 (numpy<2). Why: docs/architecture.md, "One env".
# tests/test_requirements.py proves it resolves (pip --dry-run for that platform); regenerate with
# `make lock LOCK=gpu` after changing requirements/gpu.in. `make sim` installs it on a CPU.
""", sdist_only=(  # pure-Python packages with no wheel that lagent, xtuner and opencompass need
        "func-timeout==4.3.5", "timeout-decorator==0.5.0", "transformers-stream-generator==0.0.5",
        "jieba==0.42.1")),
}


def _platform_args(lock: Lock, tmp: Path, python_version: str) -> list[str]:
    """pip options that resolve for InternStudio's platform from here (nothing for the CPU lock)."""
    if not lock.foreign_platform:
        return []
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                    *lock.sdist_only], check=True)
    args = ["--python-version", python_version, "--only-binary=:all:", "--find-links", str(wheels),
            "--target", str(tmp / "t")]
    for platform in GPU_PLATFORMS:
        args += ["--platform", platform]
    return args


def resolve(lock: Lock, requirements: Path, constraints: Path | None = None,
            python_version: str = "3.11") -> dict[str, str]:
    """Resolve ``requirements`` (pinned to ``constraints`` where given) for ``lock``; {name: version}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
               "--report", str(report), *_platform_args(lock, Path(tmp), python_version),
               "-r", str(requirements)]
        if constraints is not None:
            cmd += ["-c", str(constraints)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{requirements.name} does not resolve:\n{done.stderr[-3000:]}")
        installs = json.loads(report.read_text())["install"]
    pins = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}
    return pins if lock.keep_venv_tools else {n: v for n, v in pins.items() if n not in VENV_TOOLS}


def cpu_build_only(pins: dict[str, str]) -> dict[str, str]:
    """The CPU lock's pins with torch's +cpu tag dropped: pip's ``torch==X`` takes the +cpu wheel."""
    torch = pins.get("torch", "")
    if not torch.endswith("+cpu"):
        raise RuntimeError(f"torch resolved to {torch!r}, not a CPU build: offer the +cpu wheel "
                           "(PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu or a wheel folder)")
    return {**pins, "torch": torch.removesuffix("+cpu")}


def render(lock: Lock, pins: dict[str, str], python_version: str) -> str:
    """The lock file's text: the header, then one ``name==version`` a line, sorted by name."""
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    return lock.header.format(py=python_version) + "\n".join(lines) + "\n"


def generate(lock: Lock, python_version: str, upgrade: bool = False) -> str:
    """The lock file resolved from the lock's .in, keeping the current pins unless ``upgrade``."""
    keep = None if upgrade or not lock.target.is_file() else lock.target
    pins = resolve(lock, lock.source, keep, python_version)
    if lock.cpu_torch:
        pins = cpu_build_only(pins)
    return render(lock, pins, python_version)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", choices=sorted(LOCKS))
    parser.add_argument("--check", action="store_true", help="resolve the lock as it is, write nothing")
    parser.add_argument("--upgrade", action="store_true", help="ignore the current pins")
    parser.add_argument("--python-version", default="3.11", help="the GPU lock's Python")
    args = parser.parse_args()
    lock = LOCKS[args.lock]
    python_version = args.python_version
    if not lock.foreign_platform:
        python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
        if python_version != "3.11":
            parser.error(f"the CPU lock is for Python 3.11, not {python_version}: run `make lock`")
    if args.check:
        pins = resolve(lock, lock.target, python_version=python_version)
        print(f"{lock.target.name} resolves: {len(pins)} packages")
        return 0
    lock.target.write_text(generate(lock, python_version, args.upgrade))
    print(f"locked {lock.target.name} from {lock.source.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
