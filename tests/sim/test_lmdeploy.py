"""LMDeploy as pinned: every command line the course builds goes through LMDeploy's own parser, and
``lmdeploy lite auto_awq`` runs for real on the CPU with the course's local calibration text."""

import copy
import dataclasses
import functools
import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from course_utils import CourseError
from course_utils import lmdeploy_awq as la
from course_utils import lmdeploy_lite as ll
from course_utils import serving

from simenv import ROOT


@functools.cache
def lmdeploy_parser():
    """The parser `lmdeploy` builds in lmdeploy.cli.entrypoint.run(), without running anything."""
    from lmdeploy.cli.cli import CLI
    from lmdeploy.cli.lite import SubCliLite
    from lmdeploy.cli.serve import SubCliServe

    CLI.add_parsers()
    SubCliServe.add_parsers()
    SubCliLite.add_parsers()
    return CLI.parser


def parse(cmd: list[str]):
    """LMDeploy's reading of a command line (``cmd[0]`` is the lmdeploy executable)."""
    assert cmd[0].endswith("lmdeploy"), cmd
    return lmdeploy_parser().parse_args(cmd[1:])


def test_api_server_command_means_what_serve_asked_for():
    cmd = serving.lmdeploy_command("/share/m", model_name="m-w4", host="0.0.0.0", port=23334, api_key="k",
                                   tp=2, quant_policy=8, cache_max_entry_count=0.4, model_format="awq")
    args = parse(cmd)
    assert args.run.__qualname__ == "SubCliServe.api_server"
    assert (args.model_path, args.server_name, args.server_port, args.model_name) == ("/share/m", "0.0.0.0", 23334, "m-w4")
    assert (args.backend, args.tp, args.quant_policy, args.cache_max_entry_count) == ("turbomind", 2, 8, 0.4)
    assert (args.model_format, args.api_keys) == ("awq", ["k"])
    default = parse(serving.lmdeploy_command("/share/m", model_name="m"))
    assert default.server_name == "127.0.0.1" and default.api_keys is None and default.quant_policy == 0


def test_serve_passes_an_absolute_model_path(tmp_path, monkeypatch):
    # The server runs in outputs/serving/...: a relative folder would be read as a hub id there.
    seen = {}
    monkeypatch.setattr(serving, "choose_backend", lambda backend: "lmdeploy")
    monkeypatch.setattr(serving, "_launch", lambda cmd, cwd, log, env: seen.setdefault("cmd", cmd) and None)
    monkeypatch.setattr(serving, "wait_until_ready", lambda server, timeout: 0.0)
    (tmp_path / "w4").mkdir()
    monkeypatch.chdir(tmp_path)
    serving.serve("w4", port=serving.free_port())
    assert parse(seen["cmd"]).model_path == str(tmp_path / "w4")


def test_auto_awq_command_means_the_job():
    job = la.AwqJob(model="/share/m", work_dir="/tmp/w4", w_group_size=64, search_scale=True, dtype="float16")
    args = parse(la.auto_awq_cli(job))
    assert args.run.__qualname__ == "SubCliLite.auto_awq"
    assert (args.model, args.work_dir, args.w_group_size, args.w_bits, args.search_scale) == ("/share/m", "/tmp/w4", 64, 4, True)
    assert (args.calib_samples, args.calib_seqlen, args.batch_size, args.dtype, args.device) == (128, 2048, 1, "float16", "cuda")
    from lmdeploy.lite.apis import calibrate

    # The data set name must be one LMDeploy's calibrate() accepts (its assert runs before any work).
    assert f"'{args.calib_dataset}'" in inspect.getsource(calibrate.calibrate).split("assert calib_dataset in")[1][:80]


def test_chat_command_means_the_engine_settings():
    args = parse(ll.chat_cli("/share/m", quant_policy=8, cache_max_entry_count=0.4, model_format="awq", tp=2,
                             session_len=4096))
    assert args.run.__qualname__ == "CLI.chat"
    assert (args.model_path, args.backend, args.quant_policy, args.cache_max_entry_count) == ("/share/m", "turbomind", 8, 0.4)
    assert (args.model_format, args.tp, args.session_len) == ("awq", 2, 4096)
    default = parse(ll.chat_cli("/share/m", backend="pytorch"))
    assert (default.backend, default.quant_policy, default.cache_max_entry_count, default.tp) == ("pytorch", 0, 0.8, 1)


def test_quant_policies_are_the_ones_lmdeploy_takes():
    for policy in ll.QUANT_POLICIES:  # the lesson's table: every value it explains is accepted ...
        assert parse(ll.chat_cli("/share/m", quant_policy=policy)).quant_policy == policy
    with pytest.raises(SystemExit):  # ... and LMDeploy takes no other
        parse(["lmdeploy", "chat", "/share/m", "--quant-policy", "2"])
    assert ll.quant_policy_table(ll_shape()).index.tolist() == [0, 8, 4]


def ll_shape():
    from course_utils.memory import INTERNLM2_5

    return INTERNLM2_5["InternLM2.5-1.8B"]


def test_what_the_lesson_says_about_lmdeploy_0_10_holds():
    import importlib.util

    import lmdeploy.cli.chat

    # The bootcamp's `lmdeploy convert` and `lmdeploy serve gradio` are gone from the pinned CLI ...
    for command in ll.REMOVED_COMMANDS:
        with pytest.raises(SystemExit):
            parse(shlex.split(command) + ["/share/m"])
    # ... because TurboMind converts a Hugging Face folder in memory when it starts
    # (read as text: importing lmdeploy.turbomind.turbomind needs its CUDA library)
    source = (Path(importlib.util.find_spec("lmdeploy").origin).parent / "turbomind" / "turbomind.py").read_text()
    from_hf = source.split("def _from_hf(", 1)[1].split("\n    def ", 1)[0]
    assert "get_tm_model(" in from_hf
    # and this is the prompt a learner sees in `lmdeploy chat`
    assert f"{ll.CHAT_PROMPT}', end=''" in inspect.getsource(lmdeploy.cli.chat)
    # and what `lmdeploy serve api_server` prints before uvicorn's own log
    api_server = (Path(importlib.util.find_spec("lmdeploy").origin).parent / "serve" / "openai" / "api_server.py").read_text()
    assert "in a browser for detailed api" in api_server and "uvicorn.run(" in api_server


def test_commands_shown_in_the_lessons_parse():
    commands = []
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            for out in cell.get("outputs", []):
                text = "".join(out.get("text", ""))
                commands += re.findall(r"(?m)^(?:\w+ *: )?(lmdeploy (?:serve|lite|chat) .+)$", text)
    assert len(commands) >= 3
    for line in commands:
        parse(shlex.split(line))


def test_engine_and_generation_settings_fit_lmdeploys_classes():
    from lmdeploy import GenerationConfig, TurbomindEngineConfig, pipeline
    from lmdeploy.messages import Response
    from lmdeploy.serve.async_engine import AsyncEngine

    cfg = TurbomindEngineConfig(**ll.engine_config(quant_policy=4, cache_max_entry_count=0.4, model_format="awq", tp=2))
    assert (cfg.quant_policy, cfg.cache_max_entry_count, cfg.model_format, cfg.tp) == (4, 0.4, "awq", 2)
    assert "backend_config" in inspect.signature(pipeline).parameters
    assert GenerationConfig(max_new_tokens=8, top_k=1).top_k == 1  # what pipeline_benchmark sends
    assert {"text", "generate_token_len"} <= {f.name for f in dataclasses.fields(Response)}
    assert callable(getattr(AsyncEngine, "close", None))  # gpu_variants_table frees each engine


def test_cpu_cannot_start_an_engine():
    with pytest.raises(CourseError, match="CUDA"):
        ll.make_pipeline("/share/m", quant_policy=8)


def _dequantize_awq(qweight, qzeros, scales, group_size: int):
    """LMDeploy's AWQ GEMM layout back to a float weight (out, in): 8 nibbles per int32, order 0 2 4 6 1 3 5 7."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(packed):  # (rows, cols / 8) int32 -> (rows, cols)
        out = torch.empty(packed.shape[0], packed.shape[1] * 8, dtype=torch.int32)
        for i, col in enumerate(order):
            out[:, col::8] = (packed >> (4 * i)) & 0xF
        return out

    q, z = unpack(qweight), unpack(qzeros)  # (in, out), (in / group, out)
    z, s = z.repeat_interleave(group_size, 0), scales.float().repeat_interleave(group_size, 0)
    return ((q - z) * s).t()


def test_auto_awq_runs_on_the_cpu_with_local_calibration(chat_dir, chat_model, tmp_path):
    from safetensors.torch import load_file

    from course_utils.quantize import quantize_w4a16

    job = la.AwqJob(model=str(chat_dir), work_dir=str(tmp_path / "w4"), calib_file=str(ROOT / "data/ppl/calib.txt"),
                    calib_samples=4, calib_seqlen=128, device="cpu")
    out = la.run_auto_awq(job)  # LMDeploy's own calibrate + smooth + pack, fed by local_calib_loader
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "version": "gemm", "bits": 4,
                                             "group_size": 128, "zero_point": True}
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    stats = torch.load(out / "inputs_stats.pth", weights_only=True)
    assert all(v.numel() for v in stats["absmax"].values())  # every layer saw the local calibration text
    # De-quantized, it computes nearly the original model's function: as close as the course's own
    # RTN W4 at the same group size (a wrong unpacking order gives a relative error above 1).
    model, tok = chat_model
    w4 = load_file(out / "model.safetensors")
    state = {k: v.float() for k, v in w4.items() if not k.endswith(("qweight", "qzeros", "scales"))}
    for key in [k for k in w4 if k.endswith(".qweight")]:
        name = key[:-len(".qweight")]
        state[f"{name}.weight"] = _dequantize_awq(w4[key], w4[f"{name}.qzeros"], w4[f"{name}.scales"], 128)
    awq = type(model)(model.config).eval()
    awq.load_state_dict(state)
    rtn = quantize_w4a16(copy.deepcopy(model), "rtn", group_size=128, progress=False)
    ids = tok((ROOT / "data/ppl/heldout.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        ref, got, course = (m(ids).logits for m in (model, awq, rtn))

    def error(logits):  # relative to the spread of the original logits
        return float((logits - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm())

    assert error(got) < 0.5 and error(got) <= 1.1 * error(course), (error(got), error(course))
