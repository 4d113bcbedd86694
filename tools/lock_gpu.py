"""Resolve the GPU requirements for InternStudio's platform without a GPU (pip --dry-run).

    python tools/lock_gpu.py            # re-lock requirements/gpu.txt from requirements/gpu.in
    python tools/lock_gpu.py --check    # resolve requirements/gpu.txt as is (what the test does)

pip can only resolve for a foreign platform with --only-binary=:all:; the two pure-Python
packages that ship only as sdists are built into py3-none-any wheels first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux1_x86_64",
             "linux_x86_64", "any"]
# Pure-Python packages that ship only as sdists (lagent, xtuner and opencompass need them).
SDIST_ONLY = ["func-timeout==4.3.5", "timeout-decorator==0.5.0", "transformers-stream-generator==0.0.5",
              "jieba==0.42.1"]
HEADER = """# Exact GPU lock for the internstudio profile: CUDA 12 wheels, linux x86_64, Python {py}.
# One env for the whole InternLM toolchain: xtuner 0.2.0 (transformers==4.48.0), lmdeploy 0.10.2
# (torch<=2.8.0, peft<=0.14.0), opencompass 0.5.4 (numpy<2). Why: docs/architecture.md, "One env".
# tests/test_requirements.py proves it resolves (pip --dry-run for that platform); regenerate with
# `python tools/lock_gpu.py` after changing requirements/gpu.in. `make sim` installs it on a CPU.
"""


def resolve(requirements: Path, python_version: str = "3.11") -> dict[str, str]:
    """Resolve ``requirements`` for linux x86_64 CUDA wheels; returns {name: version}."""
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(tmp) / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                        *SDIST_ONLY], check=True)
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
               "--report", str(report), "--python-version", python_version,
               "--only-binary=:all:", "--find-links", str(wheels), "--target", str(Path(tmp) / "t"),
               "-r", str(requirements)]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"GPU requirements do not resolve:\n{done.stderr[-3000:]}")
        installs = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="resolve requirements/gpu.txt only")
    parser.add_argument("--python-version", default="3.11")
    args = parser.parse_args()
    if args.check:
        pins = resolve(ROOT / "requirements/gpu.txt", args.python_version)
        print(f"requirements/gpu.txt resolves: {len(pins)} packages, lmdeploy {pins.get('lmdeploy')}")
        return 0
    pins = resolve(ROOT / "requirements/gpu.in", args.python_version)
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    (ROOT / "requirements/gpu.txt").write_text(HEADER.format(py=args.python_version) + "\n".join(lines) + "\n")
    print(f"locked {len(lines)} packages into requirements/gpu.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
