"""Lesson prose quotes only numbers the lesson's own code printed (or states as inputs).

A result quoted in a Markdown cell drifts silently when the code changes; nbval only compares outputs.
Every decimal number or percentage in a lesson's prose must therefore occur in that notebook's stored
outputs or in its code. Constants of the world (A100 = 80 GB, a 4096-token context) are integers and
pass; a measured claim ("hit@1 = 0.93", "41.67%") must be printed by a cell first.
"""

import json
import re
from pathlib import Path

import pytest

from course_utils.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
# A decimal (0.332, 14.4) or a percentage (41.67%, 6%) not glued to a word or a version (v0.2.0, 3.11.2).
QUOTED = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?%|\d+\.\d+)(?!\.?\d)")


def quoted_numbers(markdown: str) -> set[str]:
    """Numbers a Markdown cell quotes, outside code spans and links (file names, versions in commands)."""
    text = re.sub(r"`[^`]*`|\]\([^)]*\)|https?://\S+", " ", markdown)
    return set(QUOTED.findall(text))


def variants(number: str) -> set[str]:
    """Spellings a printed value may take: 41.67% as 41.67 or 0.4167, 0.330 as 0.33."""
    value = number.rstrip("%")
    spellings = {number, value, value.rstrip("0").rstrip(".") if "." in value else value}
    if number.endswith("%"):
        spellings.add(f"{float(value) / 100:g}")
    return spellings


def notebook_text(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        parts.append("".join(cell["source"]))
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for mime, data in out.get("data", {}).items():
                if mime.startswith("text/"):
                    parts.append("".join(data))
    return "\n".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_prose_numbers_come_from_the_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    printed = notebook_text(nb)
    missing = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        for number in sorted(quoted_numbers("".join(cell["source"]))):
            if not any(re.search(rf"(?<![\d.]){re.escape(v)}(?!\d)", printed) for v in variants(number)):
                missing.append(f"cell {index}: {number}")
    assert not missing, "prose quotes numbers no output or code contains:\n" + "\n".join(missing)


def test_the_check_finds_a_number_no_cell_printed():
    assert quoted_numbers("loss 停在 0.332，准确率 41.67%，`v0.2.0` 与 3.11.2 不算") == {"0.332", "41.67%"}
    nb = {"cells": [{"cell_type": "markdown", "source": ["loss ends at 0.332"]},
                    {"cell_type": "code", "source": ["print(loss)"], "outputs": [{"text": "0.29"}]}]}
    printed = notebook_text(nb)
    assert not any(re.search(rf"(?<![\d.]){re.escape(v)}(?!\d)", printed) for v in variants("0.332"))
