"""Bad inputs to evaluation (issue #14): each is one CourseError that names the file, line, field or
argument and says what to do, raised before any model loads; a stopped run resumes without losing
or repeating a question; the L6.modes check refuses an accuracy that is not a number."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from course_utils import homework
from course_utils.env import THREADS_ENV
from course_utils.errors import CourseError
from course_utils.eval_data import load_dataset, load_predictions, summarize
from course_utils.evaluate import evaluate
from course_utils.paths import REPO_ROOT

# Loading this fails with its own CourseError, so a case that matches another message also shows
# that its error came before any model load.
NO_MODEL = "no/such/model"
GOOD = {"question": "2 + 2 = ?", "A": "3", "B": "4", "C": "5", "D": "6", "answer": "B"}


def record(**changes) -> str:
    return json.dumps({**GOOD, **changes}, ensure_ascii=False)


def jsonl(tmp_path, *lines: str, encoding: str = "utf-8"):
    path = tmp_path / "mine.jsonl"
    path.write_bytes("".join(line + "\n" for line in lines).encode(encoding))
    return path


def folder(tmp_path, meta, *, val: bool = True):
    """A dataset folder ``myset/`` with ``meta`` (text or bytes; None: no meta.json) and a val split."""
    path = tmp_path / "myset"
    path.mkdir()
    if meta is not None:
        (path / "meta.json").write_bytes(meta if isinstance(meta, bytes) else meta.encode())
    if val:
        (path / "val.jsonl").write_text(record() + "\n")
    return path


def run(tmp_path, dataset="course_en", **kwargs):
    return evaluate(NO_MODEL, dataset, out_dir=tmp_path / "run", progress=False, **kwargs)


STORED = {"id": "en-val-000", "category": "general_knowledge", "prediction": "A", "gold": "C",
          "correct": False, "version": "0123ab"}


def stored(tmp_path, *lines: bytes) -> None:
    """A predictions file as evaluate(..., abbr="m") finds it for course_en in ppl mode."""
    path = tmp_path / "run" / "predictions" / "m" / "course_en_ppl.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"".join(lines))


def row(**changes) -> bytes:
    return (json.dumps({**STORED, **changes}) + "\n").encode()


def resume(tmp_path):
    return run(tmp_path, test_range="[0:3]", reuse=True, abbr="m")


def torn_table(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(row() + row(id="en-val-001")[:40])
    return load_predictions(path)


def garbled_result(tmp_path):
    (tmp_path / "results" / "m").mkdir(parents=True)
    (tmp_path / "results" / "m" / "course_en_ppl.json").write_text('{"model": "m", "accu')
    return summarize(tmp_path)


CASES = [
    # missing
    pytest.param(lambda t: load_dataset(folder(t, "{}", val=False)),
                 r"myset has no val\.jsonl, the split that is scored .* Add it, or set test_split",
                 id="missing-test-split"),
    pytest.param(lambda t: load_dataset(folder(t, None)), r"myset has no meta\.json, so it is not a dataset folder",
                 id="missing-meta-json"),
    pytest.param(lambda t: load_dataset(jsonl(t, record(), record(question=None))),
                 r"mine\.jsonl line 2: field 'question' is null, not text", id="missing-question-null"),
    pytest.param(lambda t: load_predictions(t / "nope.jsonl"), r"No predictions file at .*nope\.jsonl. Run evaluate",
                 id="missing-predictions-file"),
    # empty
    pytest.param(lambda t: load_dataset(jsonl(t, record(), record(question="  "))),
                 r"mine\.jsonl line 2: field 'question' is empty", id="empty-question"),
    pytest.param(lambda t: load_dataset(folder(t, "")), r"myset/meta\.json is not valid JSON \(Expecting value",
                 id="empty-meta-json"),
    pytest.param(lambda t: run(t, test_range="[0:0]"),
                 r"test_range='\[0:0\]' selects no questions: course_en has \d+ \(positions 0 to \d+\)",
                 id="empty-slice"),
    pytest.param(lambda t: run(t, test_range=0), r"test_range=0 selects no questions", id="empty-count"),
    # wrong type
    pytest.param(lambda t: load_dataset(jsonl(t, record(), "[1, 2]")),
                 r"mine\.jsonl line 2 is a JSON array, not an object", id="record-is-array"),
    pytest.param(lambda t: load_dataset(jsonl(t, record(), "7")),
                 r"mine\.jsonl line 2 is a JSON number, not an object", id="record-is-number"),
    pytest.param(lambda t: load_dataset(jsonl(t, record(category=3))),
                 r"line 1: field 'category' is 3, not a name", id="category-is-number"),
    pytest.param(lambda t: load_dataset(jsonl(t, record(A=32))), r"line 1: field 'A' is 32, not text",
                 id="option-is-number"),
    pytest.param(lambda t: load_dataset(jsonl(t, record(id=None))), r"line 1: field 'id' is null, not an id",
                 id="id-is-null"),
    pytest.param(lambda t: load_dataset(folder(t, "[]")),
                 r"myset/meta\.json holds a JSON array, not an object", id="meta-is-array"),
    pytest.param(lambda t: load_dataset(folder(t, '{"reader_cfg": ["val"]}')),
                 r"myset/meta\.json: reader_cfg is a JSON array, not an object", id="reader-cfg-is-array"),
    pytest.param(lambda t: load_dataset(folder(t, '{"reader_cfg": {"test_spilt": "val"}}')),
                 r"reader_cfg has an unknown key 'test_spilt' \(did you mean 'test_split'\?\)",
                 id="reader-cfg-unknown-key"),
    pytest.param(lambda t: load_dataset(folder(t, '{"reader_cfg": {"test_range": "[0:5]"}}')),
                 r"reader_cfg\.test_range is not read from meta\.json", id="reader-cfg-test-range"),
    pytest.param(lambda t: load_dataset(folder(t, '{"language": "fr"}')),
                 r'myset/meta\.json: language is "fr"; the prompt wording exists for', id="language-unknown"),
    pytest.param(lambda t: load_dataset(None), r"dataset=None: pass a dataset name", id="dataset-none"),
    pytest.param(lambda t: run(t, load_dataset("course_en"), test_range="[0:2]"),
                 r"cannot slice an already loaded dataset", id="slice-of-loaded-dataset"),
    pytest.param(lambda t: run(t, shots=1.5), r"shots=1\.5: give a whole number", id="shots-not-whole"),
    pytest.param(lambda t: run(t, reuse="False"), r"reuse='False': pass True", id="reuse-string"),
    pytest.param(lambda t: run(t, test_range=True), r"test_range=True is not a slice", id="range-bool"),
    # wrong encoding
    pytest.param(lambda t: load_dataset(jsonl(t, record(), record(question="Un café ?"), encoding="latin-1")),
                 r"mine\.jsonl line 2, field 'question', is not UTF-8 text \(byte 0xe9\).* Save it as UTF-8",
                 id="latin1-record"),
    pytest.param(lambda t: load_dataset(folder(t, '{"abbr": "café"}'.encode("latin-1"))),
                 r"myset/meta\.json line 1, field 'abbr', is not UTF-8 text", id="latin1-meta"),
    # out of range
    pytest.param(lambda t: run(t, shots=-1, test_range="[0:1]"),
                 r"shots=-1 is out of range: course_en has 5 dev examples .*so use 0 to 5", id="shots-negative"),
    pytest.param(lambda t: run(t, shots=6), r"shots=6 is out of range: course_en has 5 dev examples",
                 id="shots-above-dev"),
    pytest.param(lambda t: run(t, jsonl(t, record()), shots=1),
                 r"shots=1 needs few-shot examples, but mine has no dev split .*Use shots=0", id="shots-without-dev"),
    pytest.param(lambda t: run(t, test_range="[100:]"), r"selects no questions: course_en has", id="range-past-end"),
    pytest.param(lambda t: load_dataset("course_en", test_range=-3),
                 r"test_range=-3: a number means the first n questions.*'\[-3:\]' for the last 3", id="range-negative"),
    pytest.param(lambda t: load_dataset("course_en", test_range=slice(0, 9, 0)),
                 r"is not a usable slice", id="range-step-zero"),
    pytest.param(lambda t: run(t, batch_size=0, test_range="[0:1]"), r"batch_size=0: use a whole number of at least 1",
                 id="batch-size-zero"),
    pytest.param(lambda t: run(t, mode="gen", max_out_len=0, test_range="[0:1]"), r"max_out_len=0: use a whole number",
                 id="max-out-len-zero"),
    pytest.param(lambda t: run(t, abbr="../elsewhere", test_range="[0:1]"),
                 r"abbr='\.\./elsewhere': give a short model name without slashes", id="abbr-is-a-path"),
    # corrupted on disk (a stop only ever cuts the last line short, so these were made otherwise)
    pytest.param(lambda t: load_dataset(folder(t, '{"abbr": "myset",')),
                 r"myset/meta\.json is not valid JSON \(.* at line 1, column \d+\)", id="meta-not-json"),
    pytest.param(lambda t: (stored(t, row(), b'{"id": "en-val-001", "pred\n', row(id="en-val-002")), resume(t)),
                 r"course_en_ppl\.jsonl line 2 is corrupted \(not JSON: .*\).*delete it, or run "
                 r"evaluate\(\.\.\., reuse=False\)", id="predictions-garbled-line"),
    pytest.param(lambda t: (stored(t, row(), b"[1, 2]\n", row(id="en-val-002")), resume(t)),
                 r"line 2 is corrupted \(a JSON array, not an object\)", id="predictions-array-line"),
    pytest.param(lambda t: (stored(t, row(), b'{"id": "en-val-001"}\n', row(id="en-val-002")), resume(t)),
                 r"line 2 is corrupted \(no 'category', 'prediction'", id="predictions-row-lacks-fields"),
    pytest.param(lambda t: (stored(t, row(), row(id="en-val-001").replace(b"general", b"g\xe9n\xe9ral"),
                                   row(id="en-val-002")), resume(t)),
                 r"line 2 is corrupted \(not UTF-8 text\)", id="predictions-not-utf8"),
    pytest.param(garbled_result, r"results/m/course_en_ppl\.json is not a readable result", id="results-garbled"),
    # half-written
    pytest.param(torn_table, r"p\.jsonl line 2 was cut off mid-write .*evaluate\(\.\.\., reuse=True",
                 id="predictions-table-torn"),
]


@pytest.mark.parametrize("call, message", CASES)
def test_bad_input_is_one_course_error(tmp_path, call, message):
    with pytest.raises(CourseError, match=message):
        call(tmp_path)


def test_what_editors_write_is_still_read(tmp_path):
    """Not mistakes: a BOM (Windows Notepad), CRLF line ends, a U+2028 inside a question, numeric ids."""
    path = tmp_path / "mine.jsonl"
    text = record(question="Line one\u2028line two?", id=7) + "\r\n" + record(id=8) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    data = load_dataset(path)
    assert [r["id"] for r in data.records] == ["7", "8"] and "\u2028" in data.records[0]["question"]


# ---- with the real tiny model --------------------------------------------------------------------
TINY = dict(abbr="tiny", batch_size=1, progress=False)  # no padding: a resumed batch scores the same


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while this module runs: on cores shared with other jobs, two threads wait
    on each other (12 ppl questions took 35 s with two, 4 s with one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clean_runs(tiny_model, one_thread, tmp_path_factory):
    """Uninterrupted runs on small slices: what a resumed run must reproduce."""
    out = tmp_path_factory.mktemp("clean")
    return {
        "ppl": evaluate(tiny_model, "course_en", test_range="[0:4]", out_dir=out, **TINY),
        "gen": evaluate(tiny_model, "course_en", mode="gen", test_range="[0:4]", max_out_len=8, out_dir=out, **TINY),
        "zh": evaluate(tiny_model, "course_zh", test_range="[0:3]", out_dir=out, **TINY),
    }


def _lines(path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _cut_last(lines: list[bytes], how: str) -> bytes:
    """The file a stop leaves while the last of ``lines`` was being written."""
    *whole, last = lines
    if how == "half-line":
        cut = len(last) // 2
    elif how == "newline-missing":
        cut = len(last) - 1
    else:  # inside a character: the second byte of the first multi-byte UTF-8 sequence
        cut = next(i for i, b in enumerate(last) if b >= 0xC0) + 1
    return b"".join(whole) + last[:cut]


@pytest.mark.slow
@pytest.mark.parametrize("key, how", [("ppl", "half-line"), ("ppl", "newline-missing"), ("zh", "mid-character")])
def test_reuse_redoes_a_torn_last_line(tiny_model, clean_runs, tmp_path, key, how):
    clean = clean_runs[key]
    shutil.copytree(clean.out_dir, tmp_path, dirs_exist_ok=True)
    path = tmp_path / clean.predictions_path.relative_to(clean.out_dir)
    lines = _lines(path)
    path.write_bytes(_cut_last(lines[:3], how))
    kept = 3 if how == "newline-missing" else 2  # a whole row lacking only its newline is kept
    resumed = evaluate(tiny_model, clean.dataset, test_range=f"[0:{clean.num_questions}]", out_dir=tmp_path,
                       reuse=True, **TINY)
    assert resumed.reused == kept and resumed.accuracy == clean.accuracy
    rows = [json.loads(line) for line in _lines(path)]  # every line whole again
    assert [r["id"] for r in rows] == [json.loads(line)["id"] for line in lines]  # each once, in order
    assert [r["prediction"] for r in rows] == clean.predictions().prediction.tolist()


@pytest.mark.slow
def test_modes_check_fails_accuracies_that_are_not_numbers(clean_runs, tmp_path):
    ppl, gen = clean_runs["ppl"], clean_runs["gen"]
    answer = {"ppl": ppl, "gen": gen, "ppl_accuracy": ppl.accuracy, "gen_accuracy": gen.accuracy}
    assert homework.run_check("L6.modes", answer).passed, "the real results pass as they are"
    for bad in (float("nan"), float("inf"), float("-inf")):
        for key in ("ppl_accuracy", "gen_accuracy"):
            result = homework.run_check("L6.modes", {**answer, key: bad})
            assert not result.passed and f"{key}={bad} is not an accuracy" in result.detail, (key, bad)
    flag = homework.run_check("L6.modes", {**answer, "ppl_accuracy": True})
    assert not flag.passed and "should be a number" in flag.detail

    twice = tmp_path / "twice.jsonl"  # a question counted twice would change the accuracy
    twice.write_bytes(ppl.predictions_path.read_bytes() + _lines(ppl.predictions_path)[0])
    result = homework.run_check("L6.modes", {**answer, "ppl": dataclasses.replace(ppl, predictions_path=twice)})
    assert not result.passed and "more than once" in result.detail
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(_cut_last(_lines(ppl.predictions_path), "half-line"))
    result = homework.run_check("L6.modes", {**answer, "ppl": dataclasses.replace(ppl, predictions_path=torn)})
    assert not result.passed and "line 4 was cut off mid-write" in result.detail


# ---- a run killed mid-way, then resumed ------------------------------------------------------------
KILLED_RUN = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))  # the parent's: the same arithmetic, the same scores
from course_utils.evaluate import evaluate
evaluate("smollm2-135m-instruct", "course_en", test_range="[0:12]", batch_size=1, abbr="tiny",
         out_dir=sys.argv[1], progress=False)
"""
PPL12 = dict(test_range="[0:12]", **TINY)  # batch_size=1: one line written per question


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_clean_result(tiny_model, one_thread, tmp_path):
    clean = evaluate(tiny_model, "course_en", out_dir=tmp_path / "clean", **PPL12)
    clean_rows = [json.loads(line) for line in _lines(clean.predictions_path)]

    run_dir = tmp_path / "killed"
    path = run_dir / "predictions" / "tiny" / "course_en_ppl.jsonl"
    log = tmp_path / "killed.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(run_dir), str(one_thread)],
                                cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, THREADS_ENV: str(one_thread)})  # its model load keeps it
    try:
        deadline = time.monotonic() + 60  # import, model load and three answers, on busy cores
        while not (path.is_file() and path.read_bytes().count(b"\n") >= 3):
            assert proc.poll() is None, f"the run ended before it was killed:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no predictions within 60 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = path.read_bytes().count(b"\n")
    assert 3 <= done < 12, "killed mid-way"
    # and a torn write on top: half of the next question's line
    with open(path, "ab") as f:
        f.write(json.dumps(clean_rows[done]).encode()[:60])

    resumed = evaluate(tiny_model, "course_en", out_dir=run_dir, reuse=True, **PPL12)
    rows = [json.loads(line) for line in _lines(path)]
    assert resumed.reused == done and resumed.num_questions == 12
    assert [r["id"] for r in rows] == [r["id"] for r in clean_rows]  # the same questions, each once
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in clean_rows]
    assert resumed.accuracy == clean.accuracy
