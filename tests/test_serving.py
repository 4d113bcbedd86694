"""serving: command lines, guards, the load test, and one real `transformers serve` process on the tiny
model (started once for the module) used by the OpenAI client, ChatSession.remote and the agent."""

import socket
import time
from pathlib import Path
from types import SimpleNamespace

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


class _FakeCompletions:
    def __init__(self, delay):
        self.delay, self.seen = delay, []

    def create(self, model, messages, max_tokens, temperature):
        self.seen.append(messages[0]["content"])
        time.sleep(self.delay)
        message = SimpleNamespace(content=f"reply to {messages[0]['content']}")
        return SimpleNamespace(usage=SimpleNamespace(completion_tokens=max_tokens),
                               choices=[SimpleNamespace(message=message)])


def test_benchmark_concurrency_runs_requests_in_parallel():
    fake = SimpleNamespace(chat=SimpleNamespace(completions=_FakeCompletions(0.3)))
    res = serving.benchmark_concurrency(fake, "m", [f"p{i}" for i in range(8)], concurrency=8, max_tokens=5)
    assert sorted(fake.chat.completions.seen) == [f"p{i}" for i in range(8)]
    assert res["completion_tokens"] == 40 and res["requests"] == 8
    assert res["wall_s"] < 1.5  # eight 0.3 s requests at once, not 2.4 s one after another
    assert res["latency_max_s"] >= res["latency_p50_s"] >= 0.3
    assert res["max_in_flight"] == 8 and [r["text"] for r in res["log"]] == [f"reply to p{i}" for i in range(8)]
    one = serving.benchmark_concurrency(fake, "m", ["a", "b", "c"], concurrency=1, max_tokens=5)
    assert one["max_in_flight"] == 1 and one["wall_s"] >= 0.9


def test_load_summary_recomputes_a_benchmark_from_its_log():
    log = [{"start_s": 0.0, "end_s": 1.0, "completion_tokens": 10},
           {"start_s": 0.5, "end_s": 2.0, "completion_tokens": 20},
           {"start_s": 1.0, "end_s": 3.0, "completion_tokens": 30}]
    summary = serving.load_summary(log)
    assert summary["wall_s"] == 3.0 and summary["throughput_tok_s"] == 20.0
    assert summary["latency_mean_s"] == 1.5 and summary["max_in_flight"] == 2
    # one request ending exactly when the next starts is not two in flight
    assert serving.max_in_flight([{"start_s": 0, "end_s": 1}, {"start_s": 1, "end_s": 2}]) == 1


def _run(concurrency: int, spans: list[tuple[float, float]], tokens: int = 24) -> dict:
    """A benchmark_concurrency result as the homework returns it, built from request spans."""
    log = [{"prompt": f"p{i}", "start_s": a, "end_s": b, "completion_tokens": tokens, "text": f"reply {i}"}
           for i, (a, b) in enumerate(spans)]
    return {**serving.load_summary(log), "concurrency": concurrency, "log": log}


def test_the_serve_homework_check_recomputes_the_load_test():
    from course_utils import homework

    server = SimpleNamespace(host="127.0.0.1", running=False, model="m", backend="transformers")
    serial = _run(1, [(i, i + 1.0) for i in range(8)])  # 8 s for 192 tokens
    batched = _run(8, [(0.0, 1.5 + 0.01 * i) for i in range(8)])  # all at once, done in 1.57 s
    passed = homework.run_check("L5.serve", {"server": server, "load": [serial, batched]})
    assert passed.passed and "concurrency 1 → 24.0 tok/s, 8 → 122.3 tok/s" in passed.detail, passed.detail

    def detail(load):
        result = homework.run_check("L5.serve", {"server": server, "load": load})
        assert not result.passed
        return result.detail

    edited = {**batched, "throughput_tok_s": batched["throughput_tok_s"] * 2}
    assert "but its log gives" in detail([serial, edited])
    one_by_one = _run(8, [(i * 0.2, i * 0.2 + 0.2) for i in range(8)])  # "concurrency 8" that never overlapped
    assert "no two requests were ever open at once" in detail([serial, one_by_one])
    unbatched = _run(8, [(0.0, 6.0 + 0.1 * i) for i in range(8)])  # parallel requests, no faster in total
    slow = homework.run_check("L5.serve", {"server": server, "load": [serial, unbatched]})
    assert slow.passed and "(1.2×" in slow.detail and "no throughput gain" in slow.detail  # reported, not failed
    assert "at concurrency 1 the log shows requests overlapping" in detail([_run(1, [(0.0, 2.0)] * 8), batched])
    assert "'load' holds 1 runs" in detail([serial])
    other_prompts = {**batched, "log": [{**r, "prompt": "x"} for r in batched["log"]]}
    assert "same prompts" in detail([serial, other_prompts])


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


@pytest.mark.slow
def test_server_round_trip_stream_and_concurrency_with_the_openai_client():
    with serving.serve("smollm2-135m-instruct", port=serving.free_port(),
                       extra_args=serving.CPU_BATCHING_ARGS) as server:
        client = serving.client(server)
        messages = [{"role": "user", "content": "Name a colour."}]
        chunks = [c.choices[0].delta.content for c in client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=6, temperature=0, stream=True)
            if c.choices and c.choices[0].delta.content]
        full = client.chat.completions.create(model=server.model, messages=messages, max_tokens=6,
                                              temperature=0)
        assert len(chunks) > 1 and "".join(chunks) == full.choices[0].message.content
        res = serving.benchmark_concurrency(client, server.model, ["Say hi.", "Say yes."], concurrency=2,
                                            max_tokens=4)
        assert res["requests"] == 2 and res["completion_tokens"] > 0 and res["throughput_tok_s"] > 0
