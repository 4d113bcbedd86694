"""Checks of homework/06_opencompass_evaluation.ipynb: both evaluation modes re-scored, a fine-tuned or
quantized model compared with its base and explained."""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path

from ..errors import CourseError
from .framework import Missing, answer_field, task

def _rescored(result) -> tuple[float, dict]:
    """Accuracy (percent) recomputed from a result's predictions file against the dataset's answers."""
    from ..eval_data import load_dataset, read_predictions
    from ..evidence import readable

    path = Path(getattr(result, "predictions_path", "") or "")
    if not isinstance(result.dataset, str) or "/" in result.dataset or "\\" in result.dataset:
        readable(result.dataset)  # a dataset named by path: confined like any other file
    if not path.is_file():
        raise Missing("pass evaluate()'s result: its predictions file is missing")
    try:  # the loaders' messages already name the file, line and fix
        rows, torn = read_predictions(path)
        data = load_dataset(result.dataset)
    except CourseError as exc:
        raise Missing(str(exc)) from None
    if torn is not None:
        raise Missing(f"{path.name} line {torn} was cut off mid-write (the run was stopped): finish it with "
                      "evaluate(..., reuse=True) and pass that result")
    gold = {r["id"]: r[data.reader.output_column] for r in data.records}
    if not rows or any(r["id"] not in gold for r in rows):
        raise Missing(f"{path.name} does not hold predictions for {result.dataset}")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):  # a question counted twice would skew the accuracy
        twice = next(i for i in ids if ids.count(i) > 1)
        raise Missing(f"{path.name} holds question {twice!r} more than once: pass the result of a fresh "
                      "evaluate() run, which writes each question once")
    right = sum(r["prediction"] == gold[r["id"]] for r in rows)
    return round(100 * right / len(rows), 2), {r["id"]: r["prediction"] for r in rows}


def _accuracy_field(answer, key: str, truth: float) -> None:
    """``answer[key]`` must be a finite number equal to ``truth``, the accuracy re-scored from the file."""
    reported = answer_field(answer, key)
    if isinstance(reported, bool) or not isinstance(reported, numbers.Real):
        raise Missing(f"{key!r} should be a number (the accuracy in percent), got {type(reported).__name__}")
    if not math.isfinite(reported):  # NaN compares false with everything, so the check below would pass it
        raise Missing(f"{key}={reported} is not an accuracy: report the percentage evaluate() returned "
                      "(result.accuracy), a number from 0 to 100")
    if abs(reported - truth) > 0.01:
        raise Missing(f"{key}={reported}, but the predictions file scores {truth}")


@task("L6.modes", level="basic", title="one slice, both modes, read the summary table",
      hint="evaluate.evaluate(model, 'course_en', mode='ppl', test_range='[0:20]') and mode='gen'; "
           "read both accuracies from evaluate.summary_table([ppl, gen])")
def _check_modes(answer) -> str:
    ppl, gen = answer_field(answer, "ppl"), answer_field(answer, "gen")
    if (getattr(ppl, "mode", None), getattr(gen, "mode", None)) != ("ppl", "gen"):
        raise Missing("'ppl' and 'gen' should be the results of evaluate(..., mode='ppl') and mode='gen'")
    if ppl.dataset != gen.dataset or ppl.model != gen.model:
        raise Missing("evaluate the same model on the same dataset in both modes")
    ppl_acc, ppl_pred = _rescored(ppl)
    gen_acc, gen_pred = _rescored(gen)
    if set(ppl_pred) != set(gen_pred):
        raise Missing("the two runs scored different questions: use the same test_range")
    _accuracy_field(answer, "ppl_accuracy", ppl_acc)
    _accuracy_field(answer, "gen_accuracy", gen_acc)
    differ = sum(ppl_pred[i] != gen_pred[i] for i in ppl_pred)
    return (f"re-scored {len(ppl_pred)} questions of {ppl.dataset}: ppl {ppl_acc}%, gen {gen_acc}%, "
            f"the modes disagree on {differ}")


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text)]


_CJK = r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"  # Chinese characters (unified ideographs)


def _word_count(text: str) -> int:
    """Words in English or Chinese: each Chinese character counts as one, as Chinese has no spaces."""
    return len(re.findall(_CJK, text)) + len(re.sub(_CJK, " ", text).split())


def _weights(result) -> str:
    """The weights fingerprint that evaluate() wrote on every prediction of ``result``."""
    from ..eval_data import read_predictions

    rows, _ = read_predictions(Path(result.predictions_path))
    made_by = {r.get("weights") for r in rows}
    if None in made_by:
        raise Missing(f"{Path(result.predictions_path).name} does not say which weights made it (evaluate() "
                      "of this course version records them): run evaluate(..., reuse=False) again")
    if len(made_by) > 1:
        raise Missing(f"{Path(result.predictions_path).name} mixes predictions of different weights: "
                      "run evaluate(..., reuse=False) again")
    return made_by.pop()


@task("L6.compare", level="advanced", title="evaluate your fine-tuned or quantized model and explain",
      hint="evaluate the base and the variant (other weights: an adapter or a quantized model, not just "
           "another abbr) on the same slice and mode; the explanation (≥ 15 words, or 15 Chinese "
           "characters) should state the accuracy change in points and say why it happened")
def _check_compare(answer) -> str:
    base, variant = answer_field(answer, "base"), answer_field(answer, "variant")
    explanation = answer_field(answer, "explanation", str)
    if (base.dataset, base.mode) != (variant.dataset, variant.mode) or base.model == variant.model:
        raise Missing("compare two different models on the same dataset and mode")
    base_acc, base_pred = _rescored(base)
    var_acc, var_pred = _rescored(variant)
    if set(base_pred) != set(var_pred):
        raise Missing("the two runs scored different questions: use the same test_range")
    if _weights(base) == _weights(variant):
        raise Missing(f"{base.model!r} and {variant.model!r} were scored with the same weights: a new abbr "
                      "does not make a new model. Evaluate your fine-tuned model (adapter=...) or your "
                      "quantized (model, tokenizer)")
    delta = round(var_acc - base_acc, 2)
    if _word_count(explanation) < 15:
        raise Missing("explain the difference in at least 15 words (in Chinese: 15 characters)")
    said = _numbers(explanation)
    if not any(abs(abs(x) - abs(delta)) <= 0.51 for x in said) and \
            not all(any(abs(x - acc) <= 0.51 for x in said) for acc in (base_acc, var_acc)):
        raise Missing(f"the explanation should give the change ({delta:+.2f} points) or both accuracies "
                      f"({base_acc}%, {var_acc}%)")
    changed = sum(base_pred[i] != var_pred[i] for i in base_pred)
    return (f"re-scored: {base.model} {base_acc}% → {variant.model} {var_acc}% ({delta:+.2f} points, "
            f"{changed} answers changed); the explanation states it")
