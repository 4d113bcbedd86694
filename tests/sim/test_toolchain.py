"""The bootcamp's own CLIs, run for real from the configs the course exports: XTuner and OpenCompass."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simenv import ROOT

BIN = Path(sys.executable).parent


def run(cmd: list, cwd: Path, timeout: int = 600) -> str:
    """Run a CLI of this env; on failure show its output's end."""
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd[0]} failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout + done.stderr


@pytest.mark.parametrize("mode", ["gen", "ppl"])
def test_opencompass_runs_the_exported_config_on_four_questions(chat_dir, tmp_path, mode):
    from course_utils.evaluate import export_opencompass_config

    config = tmp_path / f"eval_{mode}.py"
    command = export_opencompass_config(["internlm2_5-1_8b-chat"], ["course_en"], config, mode=mode,
                                        test_range="[0:4]", work_dir=str(tmp_path / "oc"),
                                        data_root=str(ROOT / "data/eval"))
    assert command.split()[:1] == ["opencompass"] and f"path='{chat_dir}'" in config.read_text()
    run([BIN / "opencompass", config, "--debug"], cwd=tmp_path)
    [stamp] = (tmp_path / "oc").iterdir()
    model = "internlm2_5-1_8b-chat" if mode == "ppl" else "internlm2_5-1_8b-chat-hf"
    predictions = json.loads((stamp / "predictions" / model / "course_en.json").read_text())
    assert len(predictions) == 4
    if mode == "ppl":  # every option was scored by the model
        assert all({f"label: {letter}" for letter in "ABCD"} <= set(p) for p in predictions.values())
    [summary] = (stamp / "summary").glob("summary_*.csv")
    [row] = list(csv.DictReader(summary.open()))
    assert (row["dataset"], row["mode"]) == ("course_en", mode) and 0 <= float(row[model]) <= 100


def test_xtuner_trains_converts_merges_and_chats_from_the_exported_config(chat_dir, tmp_path):
    from peft import PeftModel

    from course_utils.finetune import FinetuneConfig, export_xtuner_config, xtuner_chat_reply
    from course_utils.models import reply
    from course_utils.models import load_model
    from course_utils.sft_data import make_identity_dataset

    data = make_identity_dataset("Ada", base="InternLM2.5-1.8B", repeats=2, out_dir=tmp_path / "data")
    cfg = FinetuneConfig(data_path=str(data["conversation"]), max_steps=3, batch_size=2, evaluation_freq=2,
                         eval_max_new_tokens=8, save_steps=3, evaluation_inputs=["Please introduce yourself."])
    config = export_xtuner_config(cfg, tmp_path / "identity.py", device="cpu")  # the profile's model: the share's
    work = tmp_path / "work"
    log = run([BIN / "xtuner", "train", config, "--work-dir", work], cwd=tmp_path)
    # `xtuner` exits 0 even when training fails: the checkpoint it names is the proof.
    assert (work / "last_checkpoint").is_file(), log[-3000:]
    last = Path((work / "last_checkpoint").read_text().strip())
    assert last.name == "iter_3.pth" and last.is_file()
    assert "Iter(train) [3/3]" in log and log.count("Sample output") >= 2  # EvaluateChatHook ran
    assert all(f"Iter(train) [{i}/3]" in log for i in (1, 2))  # a short run logs every iteration's loss
    run([BIN / "xtuner", "convert", "pth_to_hf", config, last, tmp_path / "hf"], cwd=tmp_path)
    adapter = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"wqkv", "wo", "w1", "w2", "w3"}  # as the course's all-linear
    run([BIN / "xtuner", "convert", "merge", chat_dir, tmp_path / "hf", tmp_path / "merged", "--device", "cpu"],
        cwd=tmp_path)
    # XTuner's merged model answers as the course's loader sees base + XTuner's adapter, and the adapter matters.
    merged, tok = load_model(tmp_path / "merged")
    base, base_tok = load_model(chat_dir)
    question = "Please introduce yourself."
    before = reply(base, base_tok, question, max_new_tokens=12)
    tuned = reply(PeftModel.from_pretrained(base, tmp_path / "hf").eval(), base_tok, question, max_new_tokens=12)
    assert reply(merged, tok, question, max_new_tokens=12) == tuned != before
    chat = subprocess.run([BIN / "xtuner", "chat", tmp_path / "merged", "--prompt-template", "internlm2_chat",
                           "--max-new-tokens", "12", "--temperature", "0"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, input=f"{question}\n\nEXIT\n\n")  # EXIT, then an empty line
    assert tuned in chat.stdout, chat.stdout[-2000:] + chat.stderr[-2000:]
    assert xtuner_chat_reply(chat.stdout + chat.stderr).startswith(tuned)  # the lesson's reading of the reply
