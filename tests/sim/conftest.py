"""The InternStudio simulation stage (`make sim`): the GPU lock's packages on a CPU, the course in its
internstudio profile, and a tiny random-weight checkpoint in InternLM2.5's exact folder layout under
a fake share root. Run in `.venv-sim` (requirements/gpu.txt, installed as InternStudio would);
docs/architecture.md, "Simulating InternStudio on a CPU", says what this proves and what it cannot.
"""

import os
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simenv import LOCKED, ROOT  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
# The GPU lock's torch (a CUDA build) warns about its pynvml on every import; nothing to act on.
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")


def pytest_report_header(config):
    return "sim env: " + ", ".join(f"{name} {version(name)}" for name in LOCKED)


@pytest.fixture(scope="session", autouse=True)
def share_root(tmp_path_factory):
    """A fake InternStudio share root, built from scratch (the tiny InternLM2.5 checkpoint + MiniLM),
    and this whole session in the internstudio profile against it."""
    from tiny_internlm2 import build_share

    root = build_share(tmp_path_factory.mktemp("share"))
    os.environ.update(COURSE_PROFILE="internstudio", COURSE_SHARE_ROOTS=str(root))
    os.environ.pop("COURSE_MODEL_DIR", None)
    # xtuner and opencompass start `python` from PATH: make it this env's.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return root


@pytest.fixture(autouse=True)
def outputs(tmp_path, monkeypatch):
    """Each test writes its outputs (fine-tuning, evaluation, serving) into its own folder."""
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path / "outputs"))


@pytest.fixture(scope="session")
def chat_dir(share_root):
    """The tiny InternLM2.5 folder, where /share keeps internlm2_5-1_8b-chat."""
    from tiny_internlm2 import CHAT_NAME
    from course_utils.models import REGISTRY

    return share_root / REGISTRY[CHAT_NAME].share_path


@pytest.fixture(scope="session")
def chat_model(share_root):
    """(model, tokenizer) of the tiny InternLM2.5, loaded once by the course's own loader."""
    from course_utils.models import load_model

    return load_model()
