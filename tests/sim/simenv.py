"""Helpers the simulation tests share."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOCKED = ("transformers", "tokenizers", "peft", "torch", "xtuner", "opencompass", "lmdeploy",
          "bitsandbytes", "mmengine")


def gpu_pins() -> dict[str, str]:
    """{name: version} from requirements/gpu.txt."""
    from course_utils.env import read_pins

    return read_pins(ROOT / "requirements/gpu.txt")
