"""Helpers the simulation tests share."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOCKED = ("transformers", "tokenizers", "peft", "torch", "xtuner", "opencompass", "lmdeploy",
          "bitsandbytes", "mmengine")


def gpu_pins() -> dict[str, str]:
    """{name: version} from requirements/gpu.txt."""
    pins = {}
    for line in (ROOT / "requirements/gpu.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            pins[match[1].lower()] = match[2]
    return pins
