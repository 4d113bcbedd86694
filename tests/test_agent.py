"""agent: Lagent's request format, the sandboxed tool, ReAct parsing and the trace (no server:
the model is scripted; the real-server run is in test_serving.py)."""

import pytest

from course_utils import agent
from course_utils.errors import CourseError

SOLVE = ("import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 5*x + 6, x))")


def test_requests_use_the_plain_openai_format():
    llm = agent.make_llm("http://127.0.0.1:9/v1", model="smollm2-135m-instruct",
                         repetition_penalty=1.1)
    assert llm.url == "http://127.0.0.1:9/v1/chat/completions"
    header, data = llm.generate_request_data(llm.model_type, [{"role": "user", "content": "hi"}],
                                             dict(llm.gen_params))
    assert data["model"] == "smollm2-135m-instruct"
    assert set(data) <= {"model", "messages", "max_tokens", "temperature", "top_p", "stop",
                         "frequency_penalty"}  # transformers serve rejects top_k, n, ...
    assert data["frequency_penalty"] == pytest.approx(0.1) and data["stop"] == ["Response:"]
    assert header["content-type"] == "application/json"


def test_make_llm_needs_a_model_name_for_a_bare_url():
    with pytest.raises(CourseError, match="model="):
        agent.make_llm("http://127.0.0.1:9")


def test_python_tool_runs_code_in_the_sandbox():
    tool = agent.python_tool()
    assert tool.name == "PythonInterpreter"
    ok = tool(f'{{"command": {SOLVE!r}}}'.replace("'", '"').replace('"x"', "'x'"))
    assert ok.format_result() == "[2, 3]", ok.errmsg
    bare = tool("```python\nprint(6 * 7)\n```")  # small models write code, not JSON
    assert bare.format_result() == "42"
    bad = tool("open('/etc/owned', 'w')")
    assert bad.errmsg and "Permission denied: '/etc/owned'" in bad.errmsg  # /etc is read-only there


def test_search_is_left_out_without_a_key(monkeypatch, capsys):
    monkeypatch.delenv(agent.SEARCH_KEY_ENV, raising=False)
    assert agent.search_tool() is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and agent.SEARCH_KEY_ENV in out
    assert agent.search_tool(api_key="dummy").name == "GoogleSearch"


def _agent_with_script(replies, monkeypatch, **kw):
    monkeypatch.delenv(agent.SEARCH_KEY_ENV, raising=False)
    a = agent.make_agent("http://127.0.0.1:9/v1", model="m", language="en", **kw)
    script = iter(replies)
    a._llm.chat = lambda prompt, **gen: next(script)
    return a


GOOD = f"Thought: solve it with sympy.\nAction: PythonInterpreter\nAction Input: {SOLVE}\n"


def test_react_loop_runs_the_tool_and_finishes(monkeypatch):
    a = _agent_with_script([GOOD, "Thought: done.\nFinal Answer: x = 2 or x = 3\n"], monkeypatch)
    ret = agent.ask_agent(a, "Solve x^2 - 5x + 6 = 0")
    assert ret.response.strip() == "x = 2 or x = 3"
    steps = agent.trace_steps(ret)
    assert [s.action for s in steps] == ["PythonInterpreter", "FinishAction"]
    assert steps[0].observation == "[2, 3]"
    trace = agent.format_trace(ret)
    for part in ["turn 1: the model wrote", "action = PythonInterpreter", "tool result: [2, 3]",
                 "final answer: x = 2 or x = 3"]:
        assert part in trace
    assert "Response:[2, 3]" in ret.inner_steps[1]["content"]  # what the model sees next


def test_a_reply_without_react_format_is_recorded(monkeypatch):
    a = _agent_with_script(["Sure! The roots are 2 and 3."] * 2, monkeypatch, max_turn=2)
    ret = agent.ask_agent(a, "Solve x^2 - 5x + 6 = 0")
    assert [s.action for s in agent.trace_steps(ret)] == ["NoAction", "NoAction"]
    assert "Sorry" in ret.response


def test_execute_action_runs_a_correct_action_like_the_agent(monkeypatch):
    a = _agent_with_script([], monkeypatch)
    result = agent.execute_action(a, GOOD)
    assert result.type == "PythonInterpreter" and result.format_result() == "[2, 3]"
    assert result.thought.strip() == "solve it with sympy."


def test_server_failure_becomes_a_course_error(monkeypatch):
    a = _agent_with_script([], monkeypatch)

    def down(prompt, **gen):
        raise RuntimeError("Calling OpenAI failed after retrying for 1 times.")

    a._llm.chat = down
    with pytest.raises(CourseError, match="server"):
        agent.ask_agent(a, "hi")
