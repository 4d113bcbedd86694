"""serving: command lines, guards, and one real `transformers serve` process on the tiny model
(started once for the module) used by the OpenAI client, ChatSession.remote and the agent."""

import socket
from pathlib import Path

import pytest

from course_utils import serving
from course_utils.errors import CourseError


def test_lmdeploy_command_carries_every_setting():
    cmd = serving.lmdeploy_command("/share/m/internlm2_5-7b-chat", model_name="internlm2_5-7b-chat",
                                   port=23334, tp=2, quant_policy=8, cache_max_entry_count=0.4,
                                   model_format="awq", api_key="k1", extra_args=["--log-level", "INFO"])
    assert Path(cmd[0]).name == "lmdeploy"
    assert cmd[1:4] == ["serve", "api_server", "/share/m/internlm2_5-7b-chat"]
    pairs = dict(zip(cmd[4::2], cmd[5::2]))
    assert pairs == {"--server-name": "127.0.0.1", "--server-port": "23334",
                     "--model-name": "internlm2_5-7b-chat", "--backend": "turbomind", "--tp": "2",
                     "--quant-policy": "8", "--cache-max-entry-count": "0.4",
                     "--model-format": "awq", "--api-keys": "k1", "--log-level": "INFO"}


def test_lmdeploy_command_defaults_and_validation():
    cmd = serving.lmdeploy_command("m", model_name="m")
    assert "--model-format" not in cmd and "--api-keys" not in cmd
    assert cmd[cmd.index("--quant-policy") + 1] == "0"
    assert cmd[cmd.index("--server-name") + 1] == "127.0.0.1"
    for bad in [dict(quant_policy=2), dict(cache_max_entry_count=1.5), dict(model_format="gguf")]:
        with pytest.raises(CourseError):
            serving.lmdeploy_command("m", model_name="m", **bad)


def test_transformers_command():
    cmd = serving.transformers_command("smollm2-135m-instruct", port=9, quantization="bnb-4bit")
    assert cmd[1:3] == ["serve", "smollm2-135m-instruct"]
    assert cmd[cmd.index("--port") + 1] == "9" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--quantization") + 1] == "bnb-4bit"


def test_lmdeploy_without_cuda_says_what_to_use(monkeypatch):
    monkeypatch.setattr(serving, "_has_cuda", lambda: False)
    with pytest.raises(CourseError, match="backend='transformers'"):
        serving.serve(backend="lmdeploy")
    assert serving.choose_backend("auto") == "transformers"
    with pytest.raises(CourseError):
        serving.choose_backend("vllm")


def test_exposing_a_server_needs_a_key():
    with pytest.raises(CourseError, match="api_key"):
        serving.serve(host="0.0.0.0", backend="transformers")
    with pytest.raises(CourseError, match="cannot check API keys"):
        serving.serve(backend="transformers", api_key="secret")


def test_port_taken_by_someone_else_is_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(CourseError, match=f"Port {port} on 127.0.0.1 is already in use"):
            serving.serve(port=port, backend="transformers")


def test_free_port_is_free():
    port = serving.free_port()
    assert not serving.port_in_use(port)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real transformers-serve process on the tiny model for this module."""
    import os

    os.environ["COURSE_OUTPUT_DIR"] = str(tmp_path_factory.mktemp("serving-out"))
    try:
        with serving.serve("smollm2-135m-instruct", port=serving.free_port()) as srv:
            yield srv
    finally:
        os.environ.pop("COURSE_OUTPUT_DIR", None)


ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_openai_client_against_the_real_server(server):
    assert server.running and server.backend == "transformers"
    assert server.model == "smollm2-135m-instruct" and server.log_path.is_file()
    reply = serving.client(server).chat.completions.create(
        model=server.model, messages=ASK, max_tokens=8, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert "Application startup complete" in server.log_tail(200)


@pytest.mark.slow
def test_chat_session_remote_streams_and_stops(server):
    from course_utils.chat import ChatSession

    session = ChatSession.remote(server, max_new_tokens=8)
    chunks = list(session.ask(ASK[0]["content"], stream=True))
    assert len(chunks) > 1 and "Paris" in session.history[-1]["content"]
    for i, _ in enumerate(session.ask("Write a long poem about rivers.", stream=True)):
        if i == 1:
            session.stop()
    assert len(session.history) == 4 and len(session.history[-1]["content"].split()) <= 3


@pytest.mark.slow
def test_agent_gets_a_reply_through_lagent(server):
    from course_utils.agent import ask_agent, format_trace, make_agent

    agent = make_agent(server, max_turn=1, max_new_tokens=12, search=False)
    ret = ask_agent(agent, "What is 2 + 3?")
    trace = format_trace(ret)
    assert "turn 1: the model wrote" in trace and "final answer" in trace
    assert ret.inner_steps[0]["content"].strip()  # the model produced text through GPTAPI


@pytest.mark.slow
def test_second_server_on_the_same_port_and_clean_stop(server):
    with pytest.raises(CourseError, match="this kernel started"):
        serving.serve(port=server.port)
    server.stop()
    assert not server.running and not serving.port_in_use(server.port)


@pytest.mark.slow
def test_a_server_that_dies_at_start_up_shows_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path / "out"))
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    with pytest.raises(CourseError, match="exited during start-up") as err:
        serving.serve(broken, port=serving.free_port(), timeout=300)
    assert "not-a-model" in str(err.value)  # the log tail names what it failed to load
