"""Evaluation throughput on this machine: questions/s for each inferencer on the profile's model.

Compares the ppl inferencer's two batching strategies (left padding with a shared, cached prompt vs
right-padded full sequences) for letter and option-text answers, and the gen inferencer, on the
same slice of ``course_en``. Usage: ``python bench/bench_evaluate.py [N_QUESTIONS]`` (default 16).
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


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
