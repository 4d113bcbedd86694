"""Where the course keeps things: the repo root, its data folder, the model cache, run outputs."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"


def cache_dir() -> Path:
    """Converted and downloaded models: ``COURSE_CACHE_DIR`` or ``.cache/`` at the repo root."""
    return Path(os.environ.get("COURSE_CACHE_DIR") or REPO_ROOT / ".cache")


def outputs_dir() -> Path:
    """Run outputs (training, evaluation, vector stores): ``COURSE_OUTPUT_DIR`` or ``outputs/``."""
    return Path(os.environ.get("COURSE_OUTPUT_DIR") or REPO_ROOT / "outputs")
