"""Evaluation throughput on this machine: questions/s for each inferencer on the profile's model.

Compares the ppl inferencer's two batching strategies (left padding with a shared, cached prompt vs
right-padded full sequences) for letter and option-text answers, and the gen inferencer, on the
same slice of ``course_en``. Usage: ``python bench/bench_evaluate.py [N_QUESTIONS]`` (default 16).

``--formulations``: accuracy of each formulation (ppl letter / text / cloze acc / cloze acc_norm, gen) on the
whole ``course_en`` and on ``heldout_en`` (written after the formulations were fixed), next to chance.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(n: int = 16) -> None:
    import pandas as pd
    import torch

    from course_utils.evaluate import LocalLM, evaluate, load_lm
    from course_utils.compat import quiet_libraries

    quiet_libraries()
    base = load_lm(None)
    runs = [("ppl letter", "left", dict(mode="ppl")), ("ppl letter", "right", dict(mode="ppl")),
            ("ppl text", "left", dict(mode="ppl", target="text")), ("ppl text", "right", dict(mode="ppl", target="text")),
            ("gen (max 24 tokens)", "left", dict(mode="gen", max_out_len=24))]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for label, side, kwargs in runs:
            lm = LocalLM(base.model, base.tokenizer, abbr=f"{base.abbr}-{side}", padding_side=side)
            start = time.perf_counter()
            result = evaluate(lm, "course_en", test_range=f"[0:{n}]", out_dir=out, progress=False, **kwargs)
            seconds = time.perf_counter() - start
            rows.append({"inferencer": label, "padding": side, "questions": n, "seconds": round(seconds, 1),
                         "questions/s": round(n / seconds, 2), "accuracy": result.accuracy})
    print(f"model {base.abbr}, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print(pd.DataFrame(rows).to_string(index=False))


def formulations() -> None:
    import pandas as pd

    from course_utils.compat import quiet_libraries
    from course_utils.evaluate import OPTIONS, evaluate, load_lm

    quiet_libraries()
    lm = load_lm(None)
    kinds = {"ppl letter": dict(mode="ppl"), "ppl text": dict(mode="ppl", target="text"),
             "ppl cloze (acc)": dict(mode="ppl", target="cloze"),
             "ppl cloze (acc_norm)": dict(mode="ppl", target="cloze_norm"), "gen": dict(mode="gen", max_out_len=24)}
    table = {}
    with tempfile.TemporaryDirectory() as out:
        for dataset in ("course_en", "heldout_en"):
            results = {name: evaluate(lm, dataset, out_dir=out, progress=False, **kw) for name, kw in kinds.items()}
            n = next(iter(results.values())).num_questions
            table[f"{dataset} ({n} q)"] = {name: r.accuracy for name, r in results.items()}
    frame = pd.DataFrame(table)
    frame.loc["chance"] = 100 / len(OPTIONS)
    print(f"model {lm.abbr}, accuracy (%), zero-shot, plain prompt for ppl, chat template for gen")
    print(frame.round(2).to_string())


if __name__ == "__main__":
    if "--formulations" in sys.argv:
        formulations()
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
