"""Refresh the README screenshots in docs/images/ (`make screenshots`).

Runs the browser suite's "send a question" test for the lesson-2 chat and the lesson-3 RAG chat
(JupyterLab + headless Chromium, see tests/browser/) with ``COURSE_DOCS_IMAGES=docs/images``, so the
pictures always show a conversation that the test has just checked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS_IMAGES = "docs/images"
EXPECTED = ["lesson2-chat.png", "lesson3-rag-chat.png"]


def has_cjk_font() -> bool:
    """Whether fontconfig knows a Chinese font (else the notebooks' Chinese shows as boxes)."""
    if shutil.which("fc-list") is None:
        return False
    out = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout
    return bool(out.strip())


def main(argv: list[str] | None = None) -> int:
    """Run the send tests with docs output on; report which images were written."""
    if not has_cjk_font():
        print("No Chinese font found: install one (`apt-get install -y fonts-wqy-microhei`) so the "
              "screenshots show the notebooks' Chinese text, then run again.", file=sys.stderr)
        return 2
    target = ROOT / DOCS_IMAGES
    before = {name: (target / name).stat().st_mtime if (target / name).exists() else None
              for name in EXPECTED}
    env = dict(os.environ, COURSE_DOCS_IMAGES=DOCS_IMAGES,
               HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/browser/test_browser_chat.py", "-k", "test_send_streams_reply", *(argv or [])]
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    for name in EXPECTED:
        path = target / name
        fresh = path.exists() and path.stat().st_mtime != before[name]
        print(f"{DOCS_IMAGES}/{name}: {'updated' if fresh else 'NOT updated'}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
