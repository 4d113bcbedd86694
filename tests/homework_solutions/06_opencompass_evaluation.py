"""Reference solutions for homework/06_opencompass_evaluation.ipynb.

Each ``# %% task:<id>`` section replaces the notebook cell tagged ``task:<id>`` (tests/test_homework.py).
"""

# %% task:L6.modes
from course_utils import evaluate as ev
from course_utils.models import default_name
from course_utils.paths import outputs_dir

SLICE = "[0:16]"
OUT = outputs_dir() / "homework" / "eval"


def both_modes() -> dict:
    """Evaluate the chat model on SLICE of course_en in ppl and gen mode; read the summary table."""
    lm = ev.load_lm(default_name("chat"))
    ppl = ev.evaluate(lm, "course_en", mode="ppl", test_range=SLICE, out_dir=OUT, progress=False)
    gen = ev.evaluate(lm, "course_en", mode="gen", test_range=SLICE, out_dir=OUT, max_out_len=24,
                      progress=False)
    table = ev.summary_table([ppl, gen])
    print(table.to_string())
    accuracy = table.set_index("mode")[lm.abbr]  # one row per mode, one column per model
    return {"ppl": ppl, "gen": gen, "ppl_accuracy": float(accuracy["ppl"]),
            "gen_accuracy": float(accuracy["gen"])}


modes = homework.attempt(both_modes)

# %% task:L6.compare
from course_utils import quantize as q
from course_utils.models import load_model


def compare_variant() -> dict:
    """Evaluate a fine-tuned or quantized variant against the base on the same slice; explain the change."""
    base = modes["ppl"]  # the base model's ppl run from task 1
    model, tokenizer = load_model()
    q.quantize_w4a16(model, "rtn", progress=False)
    variant = ev.evaluate((model, tokenizer), "course_en", mode="ppl", test_range=SLICE, out_dir=OUT,
                          abbr="w4a16-rtn", progress=False)
    delta = variant.accuracy - base.accuracy
    explanation = (f"W4A16 (RTN, group 128) moves ppl-mode accuracy from {base.accuracy:.2f}% to "
                   f"{variant.accuracy:.2f}%, a change of {delta:+.2f} points on {base.num_questions} "
                   "questions: rounding every weight to 4 bits perturbs the option log-likelihoods, "
                   "so close calls between options can flip either way.")
    print(explanation)
    return {"base": base, "variant": variant, "explanation": explanation}


comparison = homework.attempt(compare_variant)
