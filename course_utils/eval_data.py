"""Evaluation data the OpenCompass way: datasets, prompt templates, answer extraction, summary tables.

A dataset is a folder under ``data/eval/`` holding C-Eval-style JSONL splits (``dev`` for few-shot
examples, ``val`` to score) and a ``meta.json`` with its language, subject names and reader config;
or a single JSONL file with the same columns. Nothing here needs a model: ``course_utils.evaluate`` runs
models on these sets, re-exports this module, and writes the real OpenCompass config.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CourseError, is_whole
from .paths import DATA_DIR, REPO_ROOT

__all__ = [  # the public API, re-exported by course_utils.evaluate (tests/test_lesson_modules.py keeps them equal)
    "ANSWER_CUE", "ASK_LETTER", "CLOZE_QUESTION", "EVAL_DIR", "HEADERS", "OPTIONS", "PREDICTION_KEYS", "PROMPT_VERSION", "READER_KEYS",
    "EvalDataset", "ReaderConfig", "answer_text", "build_messages", "check_shots", "disagreements", "extract_choice",
    "format_question", "list_datasets", "load_dataset", "load_predictions", "locate_dataset", "parse_range",
    "plot_comparison", "prompt_version", "read_predictions", "render_plain", "summarize", "summary_table"]

OPTIONS = ("A", "B", "C", "D")
EVAL_DIR = DATA_DIR / "eval"
PROMPT_VERSION = 1  # bump when the templates below change, so old predictions are not reused


@dataclass
class ReaderConfig:
    """Which columns are read and which splits are used, like OpenCompass's ``reader_cfg``."""

    input_columns: list[str] = field(default_factory=lambda: ["question", *OPTIONS])
    output_column: str = "answer"
    train_split: str = "dev"  # few-shot examples come from here
    test_split: str = "val"  # the questions that are scored
    test_range: str | None = None  # a slice of the test split, e.g. "[0:20]" (OpenCompass syntax)


@dataclass
class EvalDataset:
    name: str
    records: list[dict]  # the test split, after test_range
    dev: list[dict]  # few-shot examples, in file order (OpenCompass's FixKRetriever takes the first k)
    language: str  # "en" or "zh": picks the prompt wording
    subjects: dict[str, str]  # category -> how the prompt names it
    reader: ReaderConfig
    path: Path  # the test split's file
    fingerprint: str  # hash of the files' contents, part of the result's version

    def __len__(self) -> int:
        return len(self.records)


READER_KEYS = ("input_columns", "output_column", "train_split", "test_split")  # what meta.json may set
_JSON_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "true/false", type(None): "null"}


def _kind(value) -> str:
    """A value's type as JSON spells it ("array", "null"): what the learner sees in the file."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _shown(path) -> str:
    """A path for a message: repo-relative inside the repo, where course_en/val.jsonl and
    course_zh/val.jsonl would otherwise both read as val.jsonl."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _snippet(value) -> str:
    return json.dumps(value, ensure_ascii=False)[:40]


def list_datasets() -> list[str]:
    """The dataset names under ``data/eval/``."""
    return sorted(p.name for p in EVAL_DIR.iterdir() if (p / "meta.json").is_file())


def parse_range(test_range, n: int) -> slice:
    """A slice from OpenCompass's ``test_range`` string ("[0:20]", "[:10]", "[5:]"), a slice or an int."""
    if test_range is None:
        return slice(None)
    if isinstance(test_range, slice):
        parts = (test_range.start, test_range.stop, test_range.step)
        if test_range.step == 0 or not all(x is None or is_whole(x) for x in parts):
            raise CourseError(f"test_range={test_range!r} is not a usable slice: start, stop and step must be "
                              "whole numbers (a step of 1 or more), e.g. slice(0, 20).")
        return test_range
    if is_whole(test_range):
        if test_range < 0:
            raise CourseError(f"test_range={test_range}: a number means the first n questions, so it cannot be "
                              f"negative. Use {-test_range} for the first {-test_range}, or "
                              f"'[{test_range}:]' for the last {-test_range}.")
        return slice(0, int(test_range))
    # True/False and floats fall through to here: str() of them is not a slice either.
    match = re.fullmatch(r"\s*\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\]\s*", str(test_range))
    if not match:
        raise CourseError(f"test_range={test_range!r} is not a slice. Write it like OpenCompass: "
                          f"'[0:20]' (the first 20 of {n}), '[:10]' or '[5:]'.")
    start, stop = (int(x) if x else None for x in match.groups())
    return slice(start, stop)


def _bad_field(line: str) -> str:
    """", field 'x'" for the field of a JSON-object line whose bytes did not decode (now U+FFFD)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return ""
    fields = [k for k, v in record.items() if "\ufffd" in f"{k}{v}"] if isinstance(record, dict) else []
    return f", field {fields[0]!r}," if fields else ""


def _read_text(path: Path) -> str:
    """A file's text; one saved in another encoding (Latin-1, GBK) is an error naming its first bad line."""
    data = path.read_bytes()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # Notepad's BOM is harmless
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data[:exc.start].count(b"\n") + 1
        line = data.split(b"\n")[lineno - 1].decode("utf-8", errors="replace")
        raise CourseError(f"{_shown(path)} line {lineno}{_bad_field(line)} is not UTF-8 text (byte "
                          f"0x{data[exc.start]:02x}): the file was saved in another encoding (Latin-1, GBK, "
                          f"...). Save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > "
                          f"fixed{path.suffix}`.") from None


def _read_jsonl(path: Path, reader: ReaderConfig) -> list[dict]:
    records, first_line = [], {}
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at.
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CourseError(f"{_shown(path)} line {lineno} is not valid JSON ({exc.msg}, column {exc.colno}). "
                              "Each line must be one JSON object.") from None
        record = _check_record(record, reader, f"{_shown(path)} line {lineno}")
        if "id" in record:
            if record["id"] in first_line:
                raise CourseError(f"{_shown(path)} line {lineno} repeats id {record['id']!r} (first used on line "
                                  f"{first_line[record['id']]}). Every record needs its own id.")
            first_line[record["id"]] = lineno
        records.append(record)
    if not records:
        raise CourseError(f"{_shown(path)} has no records. Add one JSON object per line.")
    return records


def _check_record(record, reader: ReaderConfig, where: str) -> dict:
    if not isinstance(record, dict):
        raise CourseError(f"{where} is a JSON {_kind(record)}, not an object. Each line must be one object like "
                          '{"question": "...", "A": "...", "B": "...", "C": "...", "D": "...", "answer": "A"}.')
    missing = [c for c in [*reader.input_columns, reader.output_column] if c not in record]
    if missing:
        raise CourseError(f"{where} lacks column(s) {missing}. C-Eval-style records need "
                          f"{reader.input_columns} and {reader.output_column!r}.")
    for column in reader.input_columns:
        if not isinstance(record[column], str):
            raise CourseError(f"{where}: field {column!r} is {_snippet(record[column])}, not text. "
                              f'Write it as a JSON string: "{column}": "...".')
    if not record["question"].strip():
        raise CourseError(f"{where}: field 'question' is empty. Write the question, or delete the line.")
    answer = str(record[reader.output_column]).strip().upper()
    if answer not in OPTIONS:
        raise CourseError(f"{where}: field {reader.output_column!r} is {_snippet(record[reader.output_column])}, "
                          f"not one of {', '.join(OPTIONS)}. Write the letter of the correct option.")
    category = record.get("category", "all")
    if not isinstance(category, str) or not category.strip():
        raise CourseError(f"{where}: field 'category' is {_snippet(category)}, not a name. "
                          'Write a string such as "reasoning", or leave the field out.')
    record = {**record, reader.output_column: answer, "category": category}
    if "id" in record:
        if not (is_whole(record["id"]) or isinstance(record["id"], str) and record["id"].strip()):
            raise CourseError(f"{where}: field 'id' is {_snippet(record['id'])}, not an id. Write a unique "
                              'string such as "my-set-000", or leave the field out (ids are then numbered).')
        record["id"] = str(record["id"])  # so 7 and "7" are one id, as they are in a predictions table
    return record


def _read_meta(folder: Path) -> dict:
    """meta.json, checked before any record is read: it decides which files and columns are read."""
    path = folder / "meta.json"
    try:
        meta = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise CourseError(f"{_shown(path)} is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                          f"{exc.colno}). Fix it; data/eval/course_en/meta.json is a working example.") from None
    if not isinstance(meta, dict):
        raise CourseError(f"{_shown(path)} holds a JSON {_kind(meta)}, not an object. Write one object with "
                          '"abbr", "language", "subjects" and "reader_cfg", like data/eval/course_en/meta.json.')
    reader = meta.get("reader_cfg", {})
    if not isinstance(reader, dict):
        raise CourseError(f"{_shown(path)}: reader_cfg is a JSON {_kind(reader)}, not an object. Write it like "
                          '{"input_columns": ["question", "A", "B", "C", "D"], "output_column": "answer", '
                          '"train_split": "dev", "test_split": "val"}.')
    for key in reader:
        if key == "test_range":  # ReaderConfig has it, but load_dataset's argument always overrides it
            raise CourseError(f"{_shown(path)}: reader_cfg.test_range is not read from meta.json. Remove it and "
                              "pass test_range='[0:20]' to evaluate() or load_dataset().")
        if key not in READER_KEYS:
            guess = "".join(f" (did you mean {m!r}?)" for m in difflib.get_close_matches(key, READER_KEYS, n=1))
            raise CourseError(f"{_shown(path)}: reader_cfg has an unknown key {key!r}{guess}. The keys it can "
                              f"set are {', '.join(READER_KEYS)}.")
    for key, default in (("output_column", "answer"), ("train_split", "dev"), ("test_split", "val")):
        value = reader.get(key, default)
        if not isinstance(value, str) or not value.strip() or "/" in value or "\\" in value:
            raise CourseError(f"{_shown(path)}: reader_cfg.{key} is {_snippet(value)}; it must be a plain name "
                              f"such as {default!r} (a split names a .jsonl file next to meta.json).")
    columns = reader.get("input_columns", ["question", *OPTIONS])
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns) \
            or not {"question", *OPTIONS} <= set(columns):
        raise CourseError(f"{_shown(path)}: reader_cfg.input_columns is {_snippet(columns)}; it must be a list "
                          f"of column names that includes {['question', *OPTIONS]} (the prompt is built from them).")
    abbr = meta.get("abbr", folder.name)
    if not isinstance(abbr, str) or not abbr.strip() or "/" in abbr or "\\" in abbr:
        raise CourseError(f"{_shown(path)}: abbr is {_snippet(abbr)}; it must be a short name without slashes "
                          f"such as {folder.name!r} (it names the results files).")
    language = meta.get("language", "en")
    if not isinstance(language, str) or language not in HEADERS:
        raise CourseError(f"{_shown(path)}: language is {_snippet(language)}; the prompt wording exists for "
                          f"{', '.join(map(repr, HEADERS))}.")
    subjects = meta.get("subjects", {})
    if not isinstance(subjects, dict) or not all(isinstance(v, str) for v in subjects.values()):
        raise CourseError(f"{_shown(path)}: subjects is {_snippet(subjects)}; it must be an object from each "
                          'category to how the prompt names it, e.g. {"reasoning": "reasoning"}.')
    return meta


def locate_dataset(dataset: str | Path) -> tuple[Path, dict]:
    """(test file, meta) for a dataset name under data/eval/, a dataset folder or a JSONL file."""
    if not isinstance(dataset, (str, os.PathLike)) or not str(dataset).strip():
        raise CourseError(f"dataset={dataset!r}: pass a dataset name ({', '.join(list_datasets())}), a dataset "
                          "folder, or the path of a .jsonl file.")
    path = Path(dataset)
    folder = path if path.is_dir() else EVAL_DIR / str(dataset)
    if folder.is_dir() and (folder / "meta.json").is_file():
        meta = _read_meta(folder)
        split = meta.get("reader_cfg", {}).get("test_split", "val")
        test_file = folder / f"{split}.jsonl"
        if not test_file.is_file():
            present = sorted(p.stem for p in folder.glob("*.jsonl"))
            raise CourseError(f"{_shown(folder)} has no {split}.jsonl, the split that is scored (meta.json's "
                              f"reader_cfg.test_split, default 'val'). Add it, or set test_split to one of the "
                              f"splits there: {present}.")
        return test_file, meta
    if path.is_dir():
        raise CourseError(f"{_shown(path)} has no meta.json, so it is not a dataset folder. Add one like "
                          "data/eval/course_en/meta.json, or pass the path of one of its .jsonl files.")
    if path.is_file() and path.suffix != ".jsonl":
        raise CourseError(f"{_shown(path)} is not a .jsonl file. An evaluation set is JSON Lines: one object "
                          "per line with question, A-D and answer, in a file ending in .jsonl.")
    if path.suffix == ".jsonl" and path.is_file():
        return path, {"abbr": path.stem}
    raise CourseError(f"Dataset {str(dataset)!r} not found. Use one of {list_datasets()} "
                      "or the path of a .jsonl file with C-Eval columns (question, A-D, answer).")


def load_dataset(dataset: str | Path, *, test_range=None) -> EvalDataset:
    """Load a dataset by name (``data/eval/<name>``), folder or JSONL path, sliced by ``test_range``."""
    if isinstance(dataset, EvalDataset):
        if test_range is not None:  # silently scoring the whole loaded set would misreport the slice
            raise CourseError(f"test_range={test_range!r} cannot slice an already loaded dataset "
                              f"({dataset.name}). Pass load_dataset({dataset.name!r}, test_range=...) or "
                              "the dataset's name instead.")
        return dataset
    test_file, meta = locate_dataset(dataset)
    reader = ReaderConfig(**{**meta.get("reader_cfg", {}), "test_range": test_range})
    records = _read_jsonl(test_file, reader)
    for i, record in enumerate(records):  # predictions are keyed by id; plain JSONL files may have none
        record.setdefault("id", f"{test_file.stem}-{i:04d}")
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):  # a written id equal to a numbered one (written ones were checked)
        clash = next(i for i in ids if ids.count(i) > 1)
        raise CourseError(f"{_shown(test_file)}: id {clash!r} is written on one record and also numbered for "
                          f"one without an id. Give every record an id, or none.")
    dev_file = test_file.with_name(f"{reader.train_split}.jsonl")
    dev = _read_jsonl(dev_file, reader) if dev_file.is_file() and dev_file != test_file else []
    digest = hashlib.sha1(test_file.read_bytes() + (dev_file.read_bytes() if dev else b""))
    name = meta.get("abbr") or test_file.parent.name
    selected = records[parse_range(test_range, len(records))]
    if not selected:  # caught here, before a model is loaded for nothing
        raise CourseError(f"test_range={test_range!r} selects no questions: {name} has {len(records)} "
                          f"(positions 0 to {len(records) - 1}). Use a range inside that, e.g. "
                          f"'[0:{min(20, len(records))}]'.")
    return EvalDataset(name=name, records=selected, dev=dev,
                       language=meta.get("language", "en"), subjects=meta.get("subjects", {}),
                       reader=reader, path=test_file, fingerprint=digest.hexdigest()[:12])


def check_shots(shots, dataset: EvalDataset) -> int:
    """``shots`` as an int, if the dev split has that many examples (0 always works)."""
    n, dev_file = len(dataset.dev), _shown(dataset.path.with_name(f"{dataset.reader.train_split}.jsonl"))
    if not is_whole(shots):
        raise CourseError(f"shots={shots!r}: give a whole number of few-shot examples, 0 to {n}.")
    if shots > 0 and n == 0:
        raise CourseError(f"shots={shots} needs few-shot examples, but {dataset.name} has no dev split "
                          f"({dev_file} is missing). Use shots=0, or add that file.")
    if not 0 <= shots <= n:  # dev[:-1] would silently use all but one example
        raise CourseError(f"shots={shots} is out of range: {dataset.name} has {n} dev examples ({dev_file}), "
                          f"so use 0 to {n}.")
    return int(shots)


# ---- prompt templates -------------------------------------------------------------------------
# Wording follows OpenCompass's C-Eval configs: a header naming the subject, the question with
# lettered options, then "答案：" / "Answer:" and the letter.
HEADERS = {
    "en": "The following are multiple choice questions about {subject}.",
    "zh": "以下是关于{subject}的单项选择题，请选出其中的正确答案。",
}
ASK_LETTER = {  # added for gen mode, so the model replies with a letter a regex can find
    "en": "Answer with the letter of the correct option.",
    "zh": "请直接给出正确选项的字母。",
}
ANSWER_CUE = {"en": "Answer:", "zh": "答案："}


CLOZE_QUESTION = {"en": "Question: {question}", "zh": "问题：{question}"}  # the cloze prompt: no options listed


def format_question(record: dict, language: str = "en", *, cloze: bool = False) -> str:
    """The question with its lettered options, as the model reads it; ``cloze``: the question alone."""
    if cloze:
        return CLOZE_QUESTION[language].format(question=record["question"])
    lines = [record["question"], *(f"{o}. {record[o]}" for o in OPTIONS)]
    return "\n".join(lines)


def answer_text(letter: str, language: str, style: str) -> str:
    """What follows the prompt for answer ``letter``: " B" after "Answer:", "B" in a chat reply."""
    return f" {letter}" if style == "plain" and language == "en" else letter


def build_messages(record: dict, dataset: EvalDataset, *, shots: int = 0, mode: str = "ppl",
                   cloze: bool = False) -> list[dict]:
    """Chat messages for one question: k dev examples as earlier turns, then the question.

    ``cloze`` (ppl only): no header and no option list; a dev example's answer is its option's text.
    """
    shots = check_shots(shots, dataset)
    lang = dataset.language
    subject = dataset.subjects.get(record["category"], record["category"].replace("_", " "))
    header = "" if cloze else HEADERS[lang].format(subject=subject)
    if mode == "gen":
        header += " " + ASK_LETTER[lang] if lang == "en" else ASK_LETTER[lang]
    key = dataset.reader.output_column
    messages = []
    for i, example in enumerate(dataset.dev[:shots]):
        text = format_question(example, lang, cloze=cloze)
        messages += [{"role": "user", "content": f"{header}\n\n{text}" if i == 0 and header else text},
                     {"role": "assistant", "content": str(example[example[key]]) if cloze else example[key]}]
    text = format_question(record, lang, cloze=cloze)
    messages.append({"role": "user", "content": f"{header}\n\n{text}" if header and not shots else text})
    return messages


def render_plain(messages: list[dict], language: str = "en") -> str:
    """Messages as one completion prompt (for base models and /v1/completions): Q, Answer: X, ..."""
    cue, parts = ANSWER_CUE[language], []
    for m in messages:
        if m["role"] == "user":
            parts.append(f"{m['content']}\n{cue}")
        else:
            parts[-1] += answer_text(m["content"], language, "plain") + "\n\n"
    return "".join(parts)


def prompt_version(dataset: EvalDataset, *, mode: str, shots: int, style: str, extra: dict) -> str:
    """A short hash of everything that changes a prediction, like OpenCompass's config hash."""
    key = json.dumps([PROMPT_VERSION, dataset.fingerprint, mode, shots, style, extra], sort_keys=True)
    return hashlib.md5(key.encode()).hexdigest()[:6]


# ---- answer extraction (gen mode) ---------------------------------------------------------------
# Tried in order; the first pattern that matches wins (OpenCompass's first_option_postprocess idea).
# Lower-case letters are accepted only where they cannot be an English word ("a", "I"-like cases).
_L = "ABCDabcd"
_PATTERNS = [
    rf"(?:答案|正确答案|选项)\s*(?:是|为|应该是|应为)?\s*[:：]?\s*[\(（\[]?\s*([{_L}])(?![A-Za-z])",
    rf"(?i:answer|option|choice)\s*(?:is|would be|should be)?\s*[:：]?\s*[\(（\[]?\s*([{_L}])(?![A-Za-z])",
    rf"^\s*[\(（\[]?\s*([{_L}])\s*(?:[\)）\]\.．。:：,，、]|$)",  # "B. because...", "(c)", "b"
    rf"[\(（\[]\s*([{_L}])\s*[\)）\]]",  # "(C)" anywhere
    r"(?<![A-Za-z])([B-D])(?![A-Za-z])|(?<![A-Za-z])(A)(?![A-Za-z])(?!\s+[a-z])",  # a lone capital,
    # but not the English article in "A rainbow forms..."
]


def extract_choice(text: str, record: dict | None = None) -> str | None:
    """The option letter a generated answer picks ("答案是 B", "(c)", "B. because..."), else None.

    With ``record`` given, a reply that quotes exactly one option's text (e.g. "Canberra") counts too.
    """
    text = text or ""
    for pattern in _PATTERNS:
        match = re.search(pattern, text, flags=re.MULTILINE)
        if match:
            return next(g for g in match.groups() if g).upper()
    if record is not None:
        quoted = [o for o in OPTIONS if str(record[o]).strip() and str(record[o]).lower() in text.lower()]
        if len(quoted) == 1:
            return quoted[0]
    return None


# ---- results as tables (OpenCompass's summarizer) ------------------------------------------------
PREDICTION_KEYS = ("id", "prediction")  # what every reader of a predictions file needs


def _prediction_row(raw: bytes, path: Path, lineno: int, required) -> dict:
    why = None
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        why = "not UTF-8 text"
    except json.JSONDecodeError as exc:
        why = f"not JSON: {exc.msg}"
    else:
        if not isinstance(row, dict):
            why = f"a JSON {_kind(row)}, not an object"
        elif any(k not in row for k in required):
            why = f"no {', '.join(repr(k) for k in required if k not in row)}"
        elif not (is_whole(row["id"]) or isinstance(row["id"], str)):
            why = f"its id is {_snippet(row['id'])}"
    if why:
        raise CourseError(f"{_shown(path)} line {lineno} is corrupted ({why}). A stopped run only cuts the "
                          "last line short, so something else changed this file: delete it, or run "
                          "evaluate(..., reuse=False) to make it again.")
    return row


def read_predictions(path, *, required=PREDICTION_KEYS) -> tuple[list[dict], int | None]:
    """A predictions file's rows, and the number of its last line if a stop cut it short (else None).

    evaluate() appends whole lines, so a run killed mid-write can only leave the last line
    unfinished (no newline yet); that line is left for the caller to redo. A bad line anywhere else
    is not what a stop leaves, so its rows cannot be trusted either: that is an error, not a skip.
    """
    path = Path(path)
    *lines, tail = path.read_bytes().split(b"\n")
    rows = [_prediction_row(raw, path, n, required) for n, raw in enumerate(lines, 1) if raw.strip()]
    if not tail.strip():
        return rows, None
    try:  # a whole row whose newline was not written yet is kept: no prefix of a line is valid JSON
        rows.append(_prediction_row(tail, path, len(lines) + 1, required))
    except CourseError:
        return rows, len(lines) + 1
    return rows, None


def load_predictions(path) -> "pd.DataFrame":
    """A predictions JSONL file as a table (one row per question)."""
    import pandas as pd

    if not Path(path).is_file():
        raise CourseError(f"No predictions file at {_shown(path)}. Run evaluate() first: its result's "
                          "predictions_path names the file.")
    rows, torn = read_predictions(path)
    if torn is not None:
        raise CourseError(f"{_shown(path)} line {torn} was cut off mid-write (the run was stopped). Finish "
                          "the run with evaluate(..., reuse=True, out_dir=<its run folder>): it redoes that "
                          "question.")
    return pd.DataFrame(rows)


def summary_table(results, *, categories: bool = False):
    """OpenCompass's summary: dataset, version, metric, mode, then one accuracy column per model."""
    import pandas as pd

    cells: dict[tuple, dict] = {}
    models: list[str] = []
    for r in results:
        r = r if isinstance(r, dict) else asdict(r)
        models += [r["model"]] if r["model"] not in models else []
        name = r["dataset"] + (f"_{r['shots']}shot" if r["shots"] else "")
        rows = [(name, r["accuracy"])]
        if categories:
            rows += [(f"{name}-{c}", acc) for c, acc in r["by_category"].items()]
        for dataset, acc in rows:
            cells.setdefault((dataset, r["version"], "accuracy", r["mode"]), {})[r["model"]] = acc
    table = pd.DataFrame([{"dataset": k[0], "version": k[1], "metric": k[2], "mode": k[3], **v}
                          for k, v in cells.items()], columns=["dataset", "version", "metric", "mode", *models])
    return table.fillna("-")


def summarize(run_dir, *, categories: bool = False):
    """The summary of every result in a run folder; also written to ``summary/summary.{csv,txt}``."""
    run_dir = Path(run_dir)
    files = sorted((run_dir / "results").glob("*/*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    results = []
    for p in files:
        try:
            results.append(json.loads(p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CourseError(f"{_shown(p)} is not a readable result (not valid JSON). Delete it: evaluating "
                              "that model and task again writes it anew.") from None
    table = summary_table(results, categories=categories)
    (run_dir / "summary").mkdir(parents=True, exist_ok=True)
    table.to_csv(run_dir / "summary" / "summary.csv", index=False)
    (run_dir / "summary" / "summary.txt").write_text(table.to_string(index=False) + "\n", encoding="utf-8")
    return table


def disagreements(a, b):
    """Questions where two results pick different options, with the gold answer and any raw reply."""
    la, lb = (a.mode, b.mode) if a.mode != b.mode else (a.model, b.model)
    la, lb = (la, lb) if la != lb else (f"{la} #1", f"{lb} #2")

    def picks(result, label: str):
        table = result.predictions().set_index("id")
        names = {"prediction": label, **({"output": f"{label} output"} if "output" in table else {})}
        return table[list(names)].rename(columns=names)

    both = a.predictions().set_index("id")[["category", "gold"]].join(picks(a, la)).join(picks(b, lb), how="inner")
    return both[both[la].fillna("-") != both[lb].fillna("-")]


def plot_comparison(table, *, ax=None, title: str = "accuracy (%)"):
    """A grouped bar chart of a summary table: one group per dataset/mode row, one bar per model."""
    import matplotlib.pyplot as plt

    models = [c for c in table.columns if c not in ("dataset", "version", "metric", "mode")]
    data = table.set_index(table["dataset"] + " (" + table["mode"] + ")")[models].replace("-", float("nan"))
    ax = data.astype(float).plot.bar(ax=ax or plt.subplots(figsize=(8, 3.5))[1], rot=0)
    ax.set_ylabel(title), ax.set_xlabel(""), ax.set_ylim(0, 100)
    ax.axhline(100 / len(OPTIONS), color="grey", linestyle="--", linewidth=1, label="chance")
    ax.legend(loc="upper right", fontsize="small")
    return ax
