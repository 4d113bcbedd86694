"""The cloze formulation (lm-evaluation-harness / OLMES for small models) next to OpenCompass's letter one."""

import pytest

from course_utils import CourseError
from course_utils.evaluate import (OPTIONS, TARGETS, LocalLM, answer_text, build_messages, evaluate, load_dataset,
                                   render_plain, task_name)


def test_the_cloze_prompt_is_the_question_alone_and_shots_answer_with_the_option_text():
    data = load_dataset("heldout_en")
    record = data.records[0]
    listed = render_plain(build_messages(record, data, shots=0), "en")
    cloze = render_plain(build_messages(record, data, shots=2, cloze=True), "en")
    assert all(f"{o}. {record[o]}" in listed for o in OPTIONS)
    assert not any(f"{o}. " in cloze or record[o] in cloze for o in OPTIONS)  # no option, not even the gold one
    assert "multiple choice" not in cloze and cloze.endswith(f"Question: {record['question']}\nAnswer:")
    first = data.dev[0]
    assert f"Question: {first['question']}\nAnswer: {first[first['answer']]}\n\n" in cloze


def test_each_target_has_its_own_predictions_file_and_gen_takes_letters_only():
    assert len({task_name("x", "ppl", 0, t) for t in TARGETS}) == len(TARGETS)
    assert task_name("x", "ppl", 0, "letter") == "x_ppl" and task_name("x", "ppl", 5, "cloze_norm") == "x_ppl_cloze_norm_5shot"
    with pytest.raises(CourseError, match="cloze_norm"):
        evaluate("smollm2-135m-instruct", "heldout_en", mode="gen", target="cloze")


def test_cloze_scores_are_the_summed_and_per_byte_log_likelihoods(random_llama, tiny_tokenizer, tmp_path):
    lm = LocalLM(random_llama, tiny_tokenizer, abbr="random-llama")
    data = load_dataset("heldout_en", test_range="[0:6]")
    results = {t: evaluate(lm, "heldout_en", target=t, test_range="[0:6]", out_dir=tmp_path, progress=False)
               for t in ("cloze", "cloze_norm")}
    for record in data.records:
        prompt = render_plain(build_messages(record, data, cloze=True), "en")
        conts = [answer_text(record[o], "en", "plain") for o in OPTIONS]
        totals = [s for s, _ in lm.loglikelihood([(prompt, c) for c in conts])]
        per_byte = [s / len(c.encode("utf-8")) for s, c in zip(totals, conts)]
        for target, scores in (("cloze", totals), ("cloze_norm", per_byte)):
            row = results[target].predictions().set_index("id").loc[record["id"]]
            assert [row.scores[o] for o in OPTIONS] == pytest.approx(scores, abs=1e-3)
            assert row.prediction == OPTIONS[max(range(4), key=scores.__getitem__)]
