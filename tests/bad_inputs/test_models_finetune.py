"""Learner mistakes around models, SFT data and fine-tuning (issue #14), one table per loader.

Each bad input must give one CourseError that names the folder / file / record / field and the
fix, before anything slow: the `no_model_load` tripwire fails a test that reaches transformers'
loaders, so these cases stay fast. The killed-run test at the end is the only slow one.
"""

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from course_utils import models
from course_utils.env import THREADS_ENV
from course_utils.errors import CourseError
from course_utils.finetune import FinetuneConfig, _start_step, train
from course_utils.paths import REPO_ROOT
from course_utils.sft_data import load_conversations, make_identity_dataset


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model or tokenizer load fails the test: these mistakes must be caught before one."""
    import transformers

    def tripwire(*args, **kwargs):
        raise AssertionError(f"a model or tokenizer was loaded ({args[:1]}) before the check")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", tripwire)


# ---- model names and folders -------------------------------------------------------------------

def _safetensors(path: Path, floats: int = 1, *, cut: int = 0) -> None:
    """A real safetensors file holding one float32 tensor; ``cut`` bytes short if asked."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [floats], "data_offsets": [0, 4 * floats]}})
    blob = struct.pack("<Q", len(header)) + header.encode() + b"\0" * (4 * floats)
    path.write_bytes(blob[:len(blob) - cut])


def _folder(tmp: Path, *, config="{\"model_type\": \"llama\"}", weights=True, tokenizer=True) -> Path:
    folder = tmp / "my-model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    if weights:
        _safetensors(folder / "model.safetensors")
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


def _empty(tmp):
    (tmp / "my-model").mkdir()
    return tmp / "my-model"


def _a_file(tmp):
    folder = _folder(tmp)
    return folder / "model.safetensors"


def _truncated(tmp):
    folder = _folder(tmp, weights=False)
    _safetensors(folder / "model.safetensors", 1000, cut=1000)
    return folder


def _missing_shard(tmp):
    folder = _folder(tmp, weights=False)
    _safetensors(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return folder


def _adapter(tmp):
    folder = _empty(tmp)
    (folder / "adapter_config.json").write_text("{}")
    _safetensors(folder / "adapter_model.safetensors")
    return folder


def _lfs_pointer(tmp):  # what `git clone` of a hub repo leaves without git-lfs installed
    folder = _folder(tmp, weights=False)
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n"
                                              "oid sha256:0123\nsize 538090408\n")
    return folder


def _gguf(tmp):
    folder = _empty(tmp)
    (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    return folder


MODEL_CASES = [  # (input class, build(tmp_path) -> what the learner passes, message)
    ("missing", lambda t: t / "nowhere" / "my-model", r"'.*nowhere/my-model' does not exist"),
    ("empty", lambda t: "", r"model name is empty"),
    ("empty", lambda t: "   ", r"model name is empty"),
    ("empty", _empty, r"'.*my-model' is empty: it needs config\.json, the weights"),
    ("wrong type", lambda t: "None", r"text 'None': write None without quotes"),
    ("wrong type", lambda t: 7, r"The model is 7 \(type int\): pass a registry name"),
    ("wrong type", _gguf, r"holds a GGUF file, not a Hugging Face folder: convert it first"),
    ("wrong type", _a_file, r"model\.safetensors' is a file, not a model folder"),
    ("wrong type", _adapter, r"holds a LoRA adapter, not a model"),
    ("wrong type", lambda t: " smollm2-135m-instruct", r"spaces at the start or end"),
    ("corrupted on disk", lambda t: _folder(t, config="{\"model_type\": "),
     r"config\.json in '.*my-model' is not valid JSON \(line 1"),
    ("corrupted on disk", lambda t: _folder(t, config="[1, 2]"),
     r"'.*my-model' is not a model config \(a JSON list"),
    ("wrong type", lambda t: _folder(t, config='{"name": "x"}'), r"'.*my-model' has no 'model_type'"),
    ("half-written", lambda t: _folder(t, weights=False, tokenizer=False),
     r"'.*my-model' has config\.json but no weights"),
    ("half-written", lambda t: _folder(t, tokenizer=False), r"'.*my-model' has no tokenizer"),
    ("half-written", _truncated, r"model\.safetensors in '.*my-model' is cut short \(3075 of 4075 bytes\)"),
    ("half-written", _lfs_pointer, r"model\.safetensors in '.*my-model' is a Git LFS pointer.*git lfs pull"),
    ("half-written", _missing_shard, r"missing 1 weight file\(s\) .*model-00002-of-00002\.safetensors"),
]


@pytest.mark.parametrize("kind,build,message", MODEL_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(MODEL_CASES)])
def test_bad_model_is_named_before_loading(kind, build, message, tmp_path, no_model_load):
    with pytest.raises(CourseError, match=message):
        models.load_model(build(tmp_path))


def test_a_complete_folder_passes_the_check(tmp_path):
    folder = _folder(tmp_path)
    assert models.check_model_folder(folder) == {"model_type": "llama"}
    assert models.resolve(folder) == folder


def test_the_real_tiny_model_passes_the_check(tiny_model_dir):
    assert models.check_model_folder(tiny_model_dir)["model_type"] == "llama"


# ---- SFT data files ------------------------------------------------------------------------------

GOOD = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
USER, ASSISTANT = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


def _msgs(*messages) -> str:
    return GOOD + json.dumps({"messages": list(messages)}) + "\n"


def _turns(*turns) -> str:
    return GOOD + json.dumps({"conversation": list(turns)}) + "\n"


AT = r"bad\.jsonl, record 1 \(line 2\)"  # every record message names the file, record and line
DATA_CASES = [  # (input class, file content (str or bytes), message)
    ("missing", _turns({"input": "q"}), AT + r": conversation\[0\]\.output is missing"),
    ("missing", _msgs(USER), AT + " has no assistant message"),
    ("empty", b"", r"bad\.jsonl is empty"),
    ("empty", _turns({"input": "q", "output": "  "}), AT + r": conversation\[0\]\.output is empty"),
    ("empty", _msgs(USER, {"role": "assistant", "content": ""}),
     AT + r": messages\[1\]\.content is missing or empty"),
    ("wrong type", _turns({"system": 5, "input": "q", "output": "a"}),
     AT + r": conversation\[0\]\.system is 5 \(int\), not text"),
    ("wrong type", _turns({"input": ["q"], "output": "a"}),
     AT + r": conversation\[0\]\.input is \['q'\] \(list\), not text"),
    ("wrong type", _turns("q"), AT + r": conversation\[0\] is a str"),
    ("wrong type", _msgs(USER, {"role": "assistant", "content": [{"type": "text", "text": "a"}]}),
     AT + r": messages\[1\]\.content is a list, not text"),
    ("wrong type", _msgs("q", ASSISTANT), AT + r": messages\[0\] is a str"),
    ("wrong type", GOOD + '["q", "a"]\n', AT + r" is a list, not an object"),
    ("wrong type", GOOD + '{"input": "q", "output": "a"}\n', AT + r" has neither .*it has: input, output"),
    ("wrong type", _msgs({"role": "human", "content": "q"}, ASSISTANT), AT + r": messages\[0\]\.role is 'human'"),
    ("out of order", _msgs(ASSISTANT, USER, ASSISTANT),
     AT + r": messages\[0\] is an assistant message.*user's question first"),
    ("out of order", _msgs({"role": "system", "content": "s"}, ASSISTANT),
     AT + r": messages\[1\] is an assistant message"),
    ("out of order", _msgs(USER, USER, ASSISTANT), AT + r": messages\[1\] is a second user message in a row"),
    ("out of order", _msgs(USER, ASSISTANT, USER), AT + r" ends with a user message that has no reply"),
    ("wrong encoding", (GOOD + '{"messages": [{"role": "user", "content": "caf\u00e9?"}, '
                        '{"role": "assistant", "content": "a"}]}\n').encode("latin-1"),
     r"bad\.jsonl is not UTF-8 \(line 2\): save it as UTF-8"),
    ("corrupted on disk", GOOD + '{"messages": [{"role": "user", "con', r"bad\.jsonl, line 2 is not valid JSON"),
    ("corrupted on disk", json.dumps({"messages": [USER, ASSISTANT]}, indent=1),
     r"bad\.jsonl holds one JSON object over several lines"),
]


@pytest.mark.parametrize("kind,content,message", DATA_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(DATA_CASES)])
def test_bad_dataset_names_file_record_and_field(kind, content, message, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CourseError, match=message):
        load_conversations(path)


def test_a_json_list_names_the_line_of_the_bad_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"conversation": [{"input": "q", "output": "a"}]},
                                {"conversation": [{"input": "q", "output": 4}]}], indent=1))
    with pytest.raises(CourseError, match=r"bad\.json, record 1 \(line 10\): conversation\[0\]\.output is 4"):
        load_conversations(path)


def test_a_folder_or_a_missing_file_is_named(tmp_path):
    make_identity_dataset("Alex", repeats=1, out_dir=tmp_path / "data")
    with pytest.raises(CourseError, match=r"'.*data' is a folder: pass the \.json or \.jsonl file "
                                          r"inside it \(identity\.json"):
        load_conversations(tmp_path / "data")
    with pytest.raises(CourseError, match=r"'.*nope\.jsonl' not found"):
        load_conversations(tmp_path / "nope.jsonl")


def test_identity_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("")
    with pytest.raises(CourseError, match=r"out_dir='.*data' is a file: give a folder"):
        make_identity_dataset("Alex", out_dir=tmp_path / "data")


def test_a_utf8_file_with_a_bom_loads(tmp_path):
    path = tmp_path / "notepad.jsonl"  # Windows Notepad starts UTF-8 files with a BOM
    path.write_bytes(GOOD.encode("utf-8-sig"))
    assert load_conversations(path) == [[USER, ASSISTANT]]


IDENTITY_CASES = [  # (input class, make_identity_dataset arguments, message)
    ("missing", {"extra": [{"input": "q"}]}, r"extra\[0\]\.output is missing"),
    ("empty", {"extra": [{"input": "", "output": "a"}]}, r"extra\[0\]\.input is empty"),
    ("wrong type", {"extra": [{"input": "q", "output": 4}]}, r"extra\[0\]\.output is 4 \(int\), not text"),
    ("wrong type", {"extra": [{"input": "q", "output": "a", "system": ["s"]}]}, r"extra\[0\]\.system is"),
    ("wrong type", {"extra": {"input": "q", "output": "a"}}, r"extra must be a list"),
    ("wrong type", {"extra": ["q"]}, r"extra\[0\] is a str"),
    ("wrong type", {"name": 5}, r"name=5: give your name as text"),
    ("empty", {"name": "  "}, r"name='  ': give your name as text"),
    ("wrong type", {"repeats": 2.5}, r"repeats=2\.5: use a whole number >= 1"),
    ("out of range", {"repeats": 0}, r"repeats=0: use a whole number >= 1"),
    ("wrong type", {"base": None}, r"base=None: give the base model's name as text"),
]


@pytest.mark.parametrize("kind,kwargs,message", IDENTITY_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(IDENTITY_CASES)])
def test_bad_identity_arguments_write_nothing(kind, kwargs, message, tmp_path):
    kwargs = {"name": "Alex", **kwargs}
    with pytest.raises(CourseError, match=message):
        make_identity_dataset(kwargs.pop("name"), out_dir=tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()  # no half-made dataset to train on later


# ---- FinetuneConfig ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    return str(make_identity_dataset("Alex", repeats=1,
                                     out_dir=tmp_path_factory.mktemp("data"))["conversation"])


NAN, INF = math.nan, math.inf
CONFIG_CASES = [  # (input class, FinetuneConfig fields, message)
    ("out of range", {"lr": 0}, r"lr=0 must be a finite number above 0"),
    ("out of range", {"lr": -2e-4}, r"lr=-0\.0002 must be a finite number above 0"),
    ("NaN", {"lr": NAN}, r"lr=nan must be a finite number above 0"),
    ("NaN", {"lr": INF}, r"lr=inf must be a finite number above 0"),
    ("wrong type", {"lr": "1e-3"}, r"lr='1e-3' must be a finite number above 0 \(no quotes"),
    ("out of range", {"max_steps": 0}, r"max_steps=0 must be None or a whole number of at least 1"),
    ("wrong type", {"max_steps": 2.5}, r"max_steps=2\.5 must be None or a whole number"),
    ("out of range", {"max_epochs": 0}, r"max_epochs=0 must be a finite number above 0"),
    ("NaN", {"max_epochs": NAN}, r"max_epochs=nan must be a finite number above 0"),
    ("out of range", {"batch_size": 0}, r"batch_size=0 must be a whole number of at least 1"),
    ("wrong type", {"batch_size": True}, r"batch_size=True must be a whole number"),
    ("wrong type", {"batch_size": 4.0}, r"batch_size=4\.0 must be a whole number"),
    ("out of range", {"lora_r": 0}, r"lora_r=0 must be a whole number of at least 1"),
    ("out of range", {"lora_alpha": -16}, r"lora_alpha=-16 must be a finite number above 0"),
    ("out of range", {"max_length": 0}, r"max_length=0 must be a whole number"),
    ("NaN", {"max_length": NAN}, r"max_length=nan must be a whole number"),
    ("out of range", {"lora_dropout": 1.5}, r"lora_dropout=1\.5 must be a number from 0 up to"),
    ("out of range", {"warmup_ratio": -0.1}, r"warmup_ratio=-0\.1 must be a share from 0 to 1"),
    ("NaN", {"weight_decay": NAN}, r"weight_decay=nan must be a finite number >= 0"),
    ("out of range", {"save_total_limit": 0}, r"save_total_limit=0 must be None or a whole number"),
    ("out of range", {"evaluation_freq": -1}, r"evaluation_freq=-1 must be a whole number >= 0"),
    ("out of range", {"seed": -1}, r"seed=-1 must be a whole number from 0"),
    ("wrong type", {"evaluation_inputs": "Who are you?"}, r"evaluation_inputs='Who are you\?' is one string"),
    ("empty", {"evaluation_inputs": ["Who are you?", " "]},
     r"evaluation_inputs\[1\]=' ' must be a non-empty question"),
    ("wrong type", {"lora_targets": []}, r"lora_targets=\[\]: use 'all-linear'"),
    ("wrong type", {"pack_to_max_length": "yes"}, r"pack_to_max_length='yes' must be True or False"),
    ("wrong type", {"system_prompt": 3}, r"system_prompt must be text or None"),
    ("empty", {"data_path": ""}, r"data_path is an empty string"),
    ("missing", {"data_path": "nowhere/identity.json"}, r"'nowhere/identity\.json' not found"),
    ("empty", {"model": ""}, r"model name is empty"),
    ("wrong type", {"quantization": "8bit"}, r"quantization='8bit'"),
]


@pytest.mark.parametrize("kind,fields,message", CONFIG_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CONFIG_CASES)])
def test_bad_config_fails_before_the_model_load(kind, fields, message, data_file, tmp_path, no_model_load):
    cfg = FinetuneConfig(**{"data_path": data_file, "work_dir": str(tmp_path / "run"), **fields})
    with pytest.raises(CourseError, match=message):
        train(cfg)


def test_bad_data_paths_and_work_dir_fail_before_the_model_load(tmp_path, data_file, no_model_load):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    corrupt = tmp_path / "my-model"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{")
    cases = [({"data_path": str(empty)}, r"empty\.jsonl is empty"),
             ({"data_path": str(tmp_path)}, r"is a folder"),
             ({"work_dir": str(a_file)}, r"work_dir='.*not-a-folder' is a file"),
             ({"model": str(corrupt)}, r"config\.json in '.*my-model' is not valid JSON")]
    for fields, message in cases:
        cfg = FinetuneConfig(**{"data_path": data_file, "work_dir": str(tmp_path / "run"), **fields})
        with pytest.raises(CourseError, match=message):
            train(cfg)
    with pytest.raises(CourseError, match=r"train\(\) needs a FinetuneConfig, not a dict"):
        train({"lr": 1e-3})


# ---- half-written checkpoints --------------------------------------------------------------------

def _checkpoint(work: Path, step: int, *, state: str | None = '{"global_step": 0}', r: int = 8) -> Path:
    """A checkpoint folder as the Trainer writes it: weights first, trainer_state.json last."""
    folder = work / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    _safetensors(folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 16}))
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    return folder


CHECKPOINT_CASES = [  # (what was on disk, (step, trainer_state) per checkpoint, resumed from, printed)
    ("torn newest", [(2, '{"global_step": 2}'), (3, None)], 2, "checkpoint-3 was cut off while saving"),
    ("torn state file", [(2, '{"global_step": 2}'), (3, '{"global_st')], 2, "resuming from checkpoint-2"),
    ("nothing complete", [(1, None)], None, "no complete checkpoint"),
    ("all complete", [(2, '{"global_step": 2}'), (10, '{"global_step": 10}')], 10, ""),
]


@pytest.mark.parametrize("what,saved,expected,printed", CHECKPOINT_CASES,
                         ids=[c[0] for c in CHECKPOINT_CASES])
def test_resume_skips_half_written_checkpoints(what, saved, expected, printed, tmp_path, capsys):
    for step, state in saved:
        _checkpoint(tmp_path, step, state=state)
    start = _start_step(tmp_path, True, FinetuneConfig())
    assert (Path(start).name if start else None) == (f"checkpoint-{expected}" if expected else None)
    out = capsys.readouterr().out
    assert printed in out and out.count("\n") <= 1  # one line says what happened
    left = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert left == sorted(f"checkpoint-{s}" for s, state in saved if state and state.endswith("}"))


def test_resume_with_other_lora_settings_is_refused_before_the_model_load(tmp_path, data_file,
                                                                            no_model_load):
    _checkpoint(tmp_path / "run", 3, r=16)
    cfg = FinetuneConfig(data_path=data_file, work_dir=str(tmp_path / "run"), lora_r=8)
    with pytest.raises(CourseError, match=r"checkpoint-3 was saved with lora_r=16, lora_alpha=16; "
                                          r"this config has lora_r=8"):
        train(cfg, resume=True)


# ---- a run killed mid-way ------------------------------------------------------------------------

KILLED_RUN = ("import json, sys\nfrom course_utils.finetune import FinetuneConfig, train\n"
              "train(FinetuneConfig(**json.loads(sys.argv[1])))")


def _logged(text: str) -> dict[int, float]:
    """{step: loss} from ConciseLog's lines ("step   3/5  loss 1.234")."""
    import re

    return {int(s): float(loss) for s, loss in re.findall(r"step\s+(\d+)/\d+\s+loss ([\d.]+)", text)}


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_complete_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    data = make_identity_dataset("Alex", repeats=4, out_dir=tmp_path / "data")
    run = tmp_path / "run"
    fields = dict(model=str(tiny_model_dir), data_path=str(data["conversation"]), work_dir=str(run),
                  max_steps=5, batch_size=2, save_steps=1, save_total_limit=3, max_length=48,
                  evaluation_freq=0, evaluation_inputs=["Who are you?"], eval_max_new_tokens=1)
    # One thread in both runs: on a shared 2-core machine two spinning threads per run make
    # each step 10x slower, and equal thread counts keep the losses of both runs comparable.
    env = {**os.environ, THREADS_ENV: "1", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "killed.log"
    with open(log, "w") as out:  # -u: a SIGKILL must not lose lines waiting in a buffer
        proc = subprocess.Popen([sys.executable, "-u", "-c", KILLED_RUN, json.dumps(fields)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    try:
        deadline = time.monotonic() + 45
        while not (run / "checkpoint-2" / "trainer_state.json").is_file():
            assert proc.poll() is None, f"the run ended before its second checkpoint:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no second checkpoint in 45 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no handler runs, as when the kernel dies mid-run
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert steps and steps[-1] < 5, "the run was not killed mid-way"
    (run / f"checkpoint-{steps[-1]}" / "trainer_state.json").unlink(missing_ok=True)  # a torn write
    complete = max(s for s in steps if (run / f"checkpoint-{s}" / "trainer_state.json").is_file())

    def too_slow(*_):
        raise TimeoutError("the resumed run took over 40 s")

    import torch

    threads, old = torch.get_num_threads(), signal.signal(signal.SIGALRM, too_slow)
    monkeypatch.setenv(THREADS_ENV, "1")  # train's model load sets it
    signal.alarm(40)
    try:
        resumed = train(FinetuneConfig(**fields), resume=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        torch.set_num_threads(threads)

    assert resumed.resumed_from == complete and resumed.global_step == 5
    assert list(resumed.log.step) == list(range(complete + 1, 6))  # nothing redone twice here
    before = _logged(log.read_text())
    assert set(range(1, complete + 1)) <= set(before)  # nothing lost: the killed run did these
    # a step the killed run did after its last complete checkpoint is redone the same way
    for step, loss in resumed.log.set_index("step").loss.items():
        if step in before:
            assert abs(loss - before[step]) < 2e-3, (step, loss, before[step])
    assert all((p / "trainer_state.json").is_file() for p in run.glob("checkpoint-*"))
    assert (resumed.adapter_dir / "adapter_config.json").is_file()
